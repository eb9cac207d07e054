"""The library face: ``vptool.load``, ``save_pretrained`` / ``from_pretrained``, ``from_preset``, ``predict``,
``data_config``, and option validation shared with the recipe schema.

Expectations are computed here: the evaluation transform is written out with ``F.interpolate`` and the mean/std,
probabilities with a plain softmax, and the adapter folder is read back with safetensors and json.
"""

from __future__ import annotations

import json
import logging
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, TINY_NAME, assert_one_line_naming
from PIL import Image
from safetensors.torch import load_file

import vptool
from vptool.errors import UserError
from vptool.prompting.model import CHOICE_OPTIONS, PromptedViT


def tiny(preset: str = "vpt-deep", **overrides) -> PromptedViT:
    """A tiny model on a random-init ViT that vptool built (so save_pretrained can name it)."""
    return vptool.from_preset(preset, TINY_NAME, 3, class_names=["cat", "dog", "emu"], pretrained=False,
                              backbone_kwargs=dict(TINY_KWARGS), seed=1, **overrides)


def randomise(model: PromptedViT, seed: int = 7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def images(n: int = 5, size: int = 8) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def eval_transform_by_hand(x: torch.Tensor, model: PromptedViT) -> torch.Tensor:
    """The vtab evaluation transform from its definition: bilinear (antialiased) square resize, then (x - m) / s."""
    _, H, W = model.data_config["input_size"]
    y = F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(model.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.data_config["std"]).view(1, 3, 1, 1)
    return (y - mean) / std


def same(a: list[dict], b: list[dict]) -> None:
    assert [r["classes"] for r in a] == [r["classes"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["probs"] == pytest.approx(rb["probs"], abs=1e-5)


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("option,value", [("readout_pool", "mean"), ("tune", "heads"), ("temperature", "learned"),
                                          ("mask_token", "yes"), ("prompt_mode", "prefix"), ("head", "mlp3")])
def test_bad_option_values_raise_naming_the_allowed_values(tiny_backbone, option, value):
    with pytest.raises(ValueError) as exc:
        PromptedViT(tiny_backbone, 3, **{"prompt_mode": "deep", "prompt_length": 2, option: value})
    allowed = typing.get_args(CHOICE_OPTIONS[option])
    msg = str(exc.value)
    assert option in msg and repr(value) in msg and all(repr(a) in msg for a in allowed), msg


def test_recipe_and_model_share_one_table_per_option():
    from vptool.recipe import AttentionConfig, HeadConfig, PromptConfig, ReadoutConfig, TokensConfig, TrainConfig

    fields = {"prompt_mode": (PromptConfig, "mode"), "prompt_init": (PromptConfig, "init"),
              "readout_pool": (ReadoutConfig, "pool"), "readout_norm": (ReadoutConfig, "norm"),
              "tune": (TrainConfig, "tune"), "gate_kind": (PromptConfig, "gate"),
              "temperature": (AttentionConfig, "temperature"), "mask_token": (TokensConfig, "mask"),
              "head": (HeadConfig, "type"), "head_init": (HeadConfig, "init")}
    auto = {"readout_pool", "readout_norm"}  # the recipe adds "auto", resolved before the model is built
    for option, (cls, name) in fields.items():
        recipe_values = typing.get_args(typing.get_type_hints(cls)[name])
        model_values = typing.get_args(CHOICE_OPTIONS[option])
        if option in auto:
            assert recipe_values == ("auto", *model_values), option
        else:
            assert typing.get_type_hints(cls)[name] is CHOICE_OPTIONS[option], option


# ----------------------------------------------------------------------------------------------- data config
def test_data_config_is_the_models_own_not_timms_224_default():
    from timm.data import resolve_model_data_config

    model = vptool.from_preset("linear", "vit_digits_mae", 10)
    want = {"input_size": (3, 24, 24), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}  # README: 24 px, 0.5/0.5
    for cfg in (model.data_config, resolve_model_data_config(model)):
        assert {k: tuple(cfg[k]) for k in want} == want
    assert resolve_model_data_config(model)["crop_pct"] == 1.0
    fgvc = vptool.from_preset("linear", "vit_digits_mae", 10, eval_transform="fgvc")
    assert resolve_model_data_config(fgvc)["crop_pct"] == pytest.approx(224 / 256)
    assert fgvc.pretrained_cfg["num_classes"] == 10


# ----------------------------------------------------------------------------------------------- from_preset
def test_from_preset_applies_the_preset_and_the_overrides():
    g = tiny("gatevpt")
    assert g.prompts.shallow.shape == (100, 32) and g.gates.logit.shape == (1,)
    # readout auto: GateVPT's official code reads CLS on a supervised ViT, every token after CLS on MAE
    assert g.temperature is not None and (g.readout_pool, g.readout_norm) == ("cls", "pretrained")
    on_mae = vptool.from_preset("gatevpt", "vit_digits_mae", 3, pretrained=False)
    assert (on_mae.readout_pool, on_mae.readout_norm) == ("avg_all", "pretrained")
    assert torch.equal(g.gates.logit.detach(), torch.full((1,), -5.0))  # gate prior -gate_init (preset: 5)
    short = tiny("gatevpt", prompt_length=3, readout_pool="cls")
    assert short.prompts.shallow.shape == (3, 32) and short.readout_pool == "cls"
    lin = tiny("linear")
    assert lin.prompts is None and lin.trainable_parameters() == [lin.head.weight, lin.head.bias]
    with pytest.raises(ValueError, match="'vpt-deeper' is not one of"):
        vptool.from_preset("vpt-deeper", TINY_NAME, 3, pretrained=False, backbone_kwargs=dict(TINY_KWARGS))
    with pytest.raises(ValueError, match="unknown option 'prompt_lenght'"):
        tiny(prompt_lenght=3)
    with pytest.raises(ValueError, match="prompt_values"):  # SPT starts from prototypes of the data
        tiny("spt-deep")


# ----------------------------------------------------------------------------------------------- predict
def test_predict_runs_the_eval_transform_and_a_softmax(tmp_path):
    model = tiny()  # vpt-deep: prompt dropout 0.1, which predict() must not apply
    randomise(model)
    x = images()
    with torch.no_grad():
        probs = model.eval()(eval_transform_by_hand(x, model)).softmax(1)
    model.train()
    rows = model.predict(x, top_k=2)
    assert len(rows) == 5
    for row, p in zip(rows, probs):
        order = p.argsort(descending=True)[:2]
        assert row["classes"] == [["cat", "dog", "emu"][int(i)] for i in order]
        assert row["probs"] == pytest.approx(p[order].tolist(), abs=1e-6)
    # one tensor, a list of tensors, uint8 pixels, paths and PIL images: the same answer
    same(model.predict(x[0]), model.predict([x[0]]))
    same(model.predict(x[0]), model.predict(x, top_k=5)[:1])
    u8 = (x * 255).round().to(torch.uint8)
    paths = []
    for i, img in enumerate(u8):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(paths[-1])
    via_files = model.predict(paths, top_k=3)
    same(via_files, model.predict(u8, top_k=3))
    same(via_files, model.predict([Image.open(p) for p in paths], top_k=3))
    assert len(model.predict(x, top_k=50)[0]["classes"]) == 3  # capped at K
    with pytest.raises(ValueError, match="top_k"):
        model.predict(x, top_k=0)


def test_images_of_any_mode_become_the_rgb_they_show(tmp_path):
    from vptool.inference import read_image

    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "g16.png")  # 16-bit: 257 * v is v in 8 bits
    Image.fromarray(a).save(tmp_path / "gray.png")
    Image.fromarray(a).convert("P").save(tmp_path / "palette.png")
    rgba = np.dstack([a, 255 - a, a // 2, np.full_like(a, 7)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    for name in ("g16.png", "gray.png", "palette.png"):
        got = np.asarray(read_image(tmp_path / name))
        assert got.shape == (8, 8, 3) and np.array_equal(got, np.dstack([a, a, a])), name
    assert np.array_equal(np.asarray(read_image(tmp_path / "rgba.png")), rgba[..., :3])
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(UserError) as exc:
        read_image(tmp_path / "text.png")
    assert_one_line_naming(exc, "text.png", "cannot read image")


# ----------------------------------------------------------------------------------------------- adapter folders
def test_save_pretrained_round_trip_gives_identical_logits(tmp_path):
    model = tiny("gatevpt", prompt_length=4)
    randomise(model)
    model.save_pretrained(tmp_path / "ad")
    assert {p.name for p in (tmp_path / "ad").iterdir()} == {"adapter.safetensors", "adapter_config.json",
                                                              "README.md"}
    tensors = load_file(str(tmp_path / "ad" / "adapter.safetensors"))
    assert not any(k.startswith("backbone.") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.trainable_parameters())
    back = PromptedViT.from_pretrained(tmp_path / "ad")
    assert back.class_names == ["cat", "dog", "emu"] and not back.training
    x = eval_transform_by_hand(images(), model)
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["model"]["prompt_mode"] == "gated" and cfg["backbone"]["name"] == TINY_NAME
    card = (tmp_path / "ad" / "README.md").read_text()
    for needle in ("gatevpt", "Yoo et al.", TINY_NAME, "`cat`, `dog`, `emu`", "vptool.load(", "trainable parameters"):
        assert needle in card, needle


def test_saved_configs_are_read_leniently(tmp_path, caplog):
    model = tiny()
    randomise(model)
    model.save_pretrained(tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["from_the_future"] = 1
    cfg["model"]["prompt_style"] = "fancy"
    path.write_text(json.dumps(cfg))
    with caplog.at_level(logging.WARNING):
        back = vptool.load(tmp_path / "ad")
    text = caplog.text
    assert "from_the_future" in text and "prompt_style" in text
    x = eval_transform_by_hand(images(), model)
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def test_save_pretrained_refuses_a_backbone_vptool_did_not_build(tiny_backbone, tmp_path):
    model = vptool.from_preset("vpt-deep", tiny_backbone, 3)
    with pytest.raises(ValueError, match="backbone was not built by vptool"):
        model.save_pretrained(tmp_path / "ad")
    assert not (tmp_path / "ad").exists()


def test_load_checks_the_backbone_checkpoint_by_sha256(tmp_path):
    from safetensors.torch import save_file

    from vptool.backbones.build import build_backbone

    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    ckpt = tmp_path / "vit.safetensors"
    save_file(bb.state_dict(), str(ckpt))
    model = vptool.from_preset("vpt-shallow", TINY_NAME, 3, checkpoint=str(ckpt), backbone_kwargs=dict(TINY_KWARGS))
    randomise(model)
    model.save_pretrained(tmp_path / "ad")
    x = eval_transform_by_hand(images(), model)
    with torch.no_grad():
        want = model.eval()(x)
    moved = tmp_path / "moved.safetensors"
    ckpt.rename(moved)
    with pytest.raises(UserError) as exc:
        vptool.load(tmp_path / "ad")
    sha = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["backbone"]["checkpoint_sha256"]
    assert_one_line_naming(exc, str(ckpt), sha, "--backbone-checkpoint")
    with torch.no_grad():
        assert torch.equal(vptool.load(tmp_path / "ad", backbone_checkpoint=moved)(x), want)
    other = {k: v + 0.01 for k, v in bb.state_dict().items()}
    save_file(other, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError) as exc:
        vptool.load(tmp_path / "ad", backbone_checkpoint=tmp_path / "other.safetensors")
    assert_one_line_naming(exc, "sha256", sha, "--backbone-checkpoint")


def test_load_refuses_what_is_not_an_adapter(tmp_path):
    with pytest.raises(UserError) as exc:
        vptool.load(tmp_path)
    assert_one_line_naming(exc, str(tmp_path), "adapter_config.json")
    with pytest.raises(UserError) as exc:
        vptool.load(tmp_path / "nowhere")
    assert_one_line_naming(exc, "nowhere", "not found")
