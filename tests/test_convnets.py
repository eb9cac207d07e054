"""VPT on ConvNets (Jia et al. 2022, §4.4 "Apply VPT to ConvNets", Table 5): learnable pixels padded around the
image, p per side, a frozen timm ConvNeXt or ResNet, and a linear head on timm's own pooled features.

The references are written here from the paper's description and the official code's placement (top/bottom rows of
``prompts.pad_tb`` (1, 3, 2p, W + 2p) above/below, left/right columns of ``prompts.pad_lr`` (1, 3, H, 2p) beside the
image, pixels normalised like the image), built by writing into a zero-padded canvas, never by the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import invoke_cli

from vptool.backbones.build import build_backbone
from vptool.builder import resolve_readout_auto
from vptool.config import ModelConfig
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
#: tiny ConvNets built from scratch, 32x32 inputs (timm's pretrained_cfg_overlay sets the data config's size)
TINY = {
    "convnext": ("convnext_atto", {"dims": [8, 16, 32, 64], "depths": [1, 1, 1, 1]}),
    "resnet": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8,
                            "zero_init_last": False}),
}
OVERLAY = {"pretrained_cfg_overlay": {"input_size": [3, SIZE, SIZE]}}


@pytest.fixture(params=sorted(TINY))
def convnet(request):
    name, kwargs = TINY[request.param]
    torch.manual_seed(0)
    bb, info = build_backbone(name, pretrained=False, kwargs={**kwargs, **OVERLAY})
    return request.param, bb, info


@pytest.fixture
def images():
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def prompted(bb, p: int = 3, **options) -> PromptedViT:
    options = {"prompt_mode": "shallow", "prompt_length": p, "prompt_location": "pad", "readout_pool": "avg",
               **options}
    return PromptedViT(bb, ModelConfig(num_classes=4, **options), generator=torch.Generator().manual_seed(2)).eval()


def timm_features(bb, x):
    """timm's own pooled features: ``forward_head(forward_features(x), pre_logits=True)``."""
    return bb.forward_head(bb.forward_features(x), pre_logits=True)


def padded_reference(x, tb, lr, p, mean, std):
    """The image with the prompt pixels around it (VPT §4.4), written into ``F.pad``'s zero frame: rows ``tb[:p]``
    above, ``tb[p:]`` below (full width, corners included), columns ``lr[..., :p]`` left, ``lr[..., p:]`` right.
    ``tb``/``lr`` are [0, 1] pixels, normalised here with the image's mean/std."""
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    tb, lr = (tb - m) / s, (lr - m) / s
    B, _, H, W = x.shape
    out = F.pad(x, (p, p, p, p)).clone()
    out[:, :, :p, :] = tb[:, :, :p]
    out[:, :, H + p:, :] = tb[:, :, p:]
    out[:, :, p:H + p, :p] = lr[:, :, :, :p]
    out[:, :, p:H + p, W + p:] = lr[:, :, :, p:]
    assert out.shape == (B, 3, H + 2 * p, W + 2 * p)
    return out


# ----------------------------------------------------------------------------------------------- (a) no prompts
def test_without_prompts_the_model_is_timm_s_own_forward(convnet, images):
    kind, bb, info = convnet
    model = PromptedViT(bb, ModelConfig(num_classes=4, prompt_mode="none", readout_pool="avg")).eval()
    want = timm_features(bb, images)
    with torch.no_grad():
        got = model.forward_head(model.forward_features(images), pre_logits=True)
        logits = model(images)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, want @ model.head.weight.T + model.head.bias, atol=1e-6, rtol=0)
    assert got.shape == (3, bb.head_hidden_size)
    assert tuple(model.data_config["input_size"]) == tuple(info.data_config["input_size"]) == (3, SIZE, SIZE)
    assert model.family.name == kind


# ----------------------------------------------------------------------------------------------- (b) pad prompts
@pytest.mark.parametrize("p", [1, 3, 5])
def test_pad_prompts_are_pixels_around_the_image(convnet, images, p):
    _, bb, _ = convnet
    model = prompted(bb, p)
    sd = model.adapter_state_dict()
    tb, lr = sd["prompts.pad_tb"], sd["prompts.pad_lr"]
    assert tb.shape == (1, 3, 2 * p, SIZE + 2 * p) and lr.shape == (1, 3, SIZE, 2 * p)
    assert 0.0 <= float(tb.min()) and float(tb.max()) <= 1.0  # official "random": uniform [0, 1] pixels
    mean, std = model.data_config["mean"], model.data_config["std"]
    x = padded_reference(images, tb, lr, p, mean, std)
    want = timm_features(bb, x) @ sd["head.weight"].T + sd["head.bias"]
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # controls: zero padding, and the pixels in the wrong place (top and bottom swapped) give other logits
    zero = timm_features(bb, F.pad(images, (p, p, p, p))) @ sd["head.weight"].T + sd["head.bias"]
    swapped = padded_reference(images, torch.cat([tb[:, :, p:], tb[:, :, :p]], dim=2), lr, p, mean, std)
    wrong = timm_features(bb, swapped) @ sd["head.weight"].T + sd["head.bias"]
    for other in (zero, wrong):
        assert (got - other).abs().max() > 1e-3


def test_zeros_init_gives_black_pixels(convnet):
    _, bb, _ = convnet
    sd = prompted(bb, 2, prompt_init="zeros").adapter_state_dict()
    assert not sd["prompts.pad_tb"].any() and not sd["prompts.pad_lr"].any()


def test_an_input_of_another_size_is_refused(convnet):
    _, bb, _ = convnet
    with pytest.raises(ValueError, match="32x32"):
        prompted(bb)(torch.zeros(1, 3, SIZE + 8, SIZE + 8))


# ----------------------------------------------------------------------------------------------- (c) gradients
def test_gradients_reach_the_pad_pixels_and_the_head_only(convnet, images):
    _, bb, _ = convnet
    model = prompted(bb).train()
    assert not bb.training  # the frozen backbone stays in eval mode (BatchNorm statistics untouched)
    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    got = {n for n, t in model.named_parameters() if t.grad is not None and t.grad.abs().sum() > 0}
    assert got == {"prompts.pad_tb", "prompts.pad_lr", "head.weight", "head.bias"}
    assert {n for n, t in model.named_parameters() if t.requires_grad} == got
    assert set(model.adapter_state_dict()) == got  # the adapter holds exactly these, never the backbone


def test_adapter_round_trip(convnet, images, tmp_path):
    _, bb, _ = convnet
    model = prompted(bb, 3)
    model.save_adapter(str(tmp_path / "a.safetensors"))
    other = prompted(bb, 3, prompt_init="zeros")
    other.load_adapter(str(tmp_path / "a.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(other(images), model(images), atol=0, rtol=0)
    # the saved config (token order resolved) rebuilds the same model
    again = PromptedViT(bb, model.config)
    assert again.config == model.config


def test_a_timm_file_with_its_classifier_loads_strictly(convnet, tmp_path, images):
    """A checkpoint in timm's layout with the pretraining classifier (ResNet ``fc.*``, ConvNeXt ``head.fc.*``), as
    the Hub files the paper recipes name: the classifier is ignored, everything else must match."""
    import timm
    from safetensors.torch import save_file

    kind, _, _ = convnet
    name, kwargs = TINY[kind]
    torch.manual_seed(5)
    full = timm.create_model(name, pretrained=False, num_classes=7, **kwargs).eval()
    sd = {k: v.contiguous() for k, v in full.state_dict().items()}
    assert any(k.startswith(("fc.", "head.fc.")) for k in sd)
    save_file(sd, str(tmp_path / "w.safetensors"))
    bb, info = build_backbone(name, pretrained=False, checkpoint=str(tmp_path / "w.safetensors"),
                              kwargs={**kwargs, **OVERLAY})
    assert info.format == "timm"
    with torch.no_grad():
        torch.testing.assert_close(timm_features(bb, images), full.forward_head(full.forward_features(images),
                                                                                 pre_logits=True))
    del sd[next(k for k in sd if not k.startswith(("fc.", "head.")))]  # the stem: a real mismatch
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(UserError, match="missing from the file"):
        build_backbone(name, pretrained=False, checkpoint=str(tmp_path / "bad.safetensors"), kwargs=kwargs)


# ----------------------------------------------------------------------------------------------- options
def test_readout_auto_is_timm_s_pooled_features(convnet):
    kind, bb, _ = convnet
    cfg = ModelConfig(num_classes=4, readout_pool="auto", readout_norm="auto")
    for convention in ("vpt", "gatevpt", "spt"):
        got, why = resolve_readout_auto(cfg, convention, TINY[kind][0], None, bb)
        assert (got.readout_pool, got.readout_norm) == ("avg", "pretrained")
        assert "convnet backbone" in why


@pytest.mark.parametrize("options,key", [
    ({"prompt_mode": "deep"}, "prompt.mode"),
    ({"prompt_mode": "gated"}, "prompt.mode"),
    ({"prompt_location": "prepend"}, "prompt.location"),
    ({"prompt_location": "concat-channel"}, "prompt.location"),
    ({"prompt_blocks": "1"}, "prompt.blocks"),
    ({"mask_token": "learnable"}, "tokens.mask"),
    ({"token_order": "CXP"}, "tokens.order"),
    ({"readout_pool": "cls"}, "readout.pool"),
    ({"readout_pool": "avg_all"}, "readout.pool"),
    ({"readout_norm": "fresh"}, "readout.norm"),
    ({"temperature": "learnable"}, "attention.temperature"),
    ({"prompt_init": "kmeans"}, "prompt.init"),
    ({"prompt_dropout": 0.1}, "prompt.dropout"),
])
def test_what_needs_tokens_is_refused_in_one_line_naming_the_key(convnet, options, key):
    _, bb, _ = convnet
    with pytest.raises(UserError) as err:
        prompted(bb, **options)
    msg = str(err.value)
    assert msg.startswith(f"{key}:") and "\n" not in msg, msg


def test_a_convnet_without_a_global_pool_is_refused(convnet):
    kind, _, _ = convnet
    name, kwargs = TINY[kind]
    with pytest.raises(UserError, match=f"backbone.name: '{name}' has no global pool"):
        build_backbone(name, pretrained=False, kwargs={**kwargs, "global_pool": ""})


# ----------------------------------------------------------------------------------------------- (d), (e) CLI
@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TINY))
def test_digits_recipe_trains_evaluates_and_exports(kind, tmp_path):
    """The shipped digits recipe end to end (measured on this CPU: ConvNeXt 94.7 %, ResNet 95.8 % test top-1),
    then ``vptool export`` to ONNX (export's own check against the model) and to torch.export, whose graph is
    run here on the test images."""
    stem = f"vpt_{kind}_digits"
    res = invoke_cli("train", str(ROOT / "recipes" / f"{stem}.yaml"), "--json", "--set", f"output.dir={tmp_path}")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["test_top1"] >= 90.0, summary
    run = tmp_path / stem
    ev = invoke_cli("eval", str(run), "--json")
    assert ev.exit_code == 0 and json.loads(ev.stdout)["top1"] == summary["test_top1"], ev.output
    ex = invoke_cli("export", str(run), "--format", "onnx", "-o", str(tmp_path / "m.onnx"), "--json")
    assert ex.exit_code == 0 and json.loads(ex.stdout)["argmax_equal"], ex.output
    out = tmp_path / "m.pt2"
    ex = invoke_cli("export", str(run), "--format", "pt2", "-o", str(out), "--json")
    assert ex.exit_code == 0, ex.output
    assert json.loads(ex.stdout)["argmax_equal"]
    import vptool

    model = vptool.load(str(run)).eval()
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(str(out)).module()(x), model(x), atol=1e-4, rtol=0)


def test_cli_resolves_auto_readout_and_refuses_prepend_in_one_line(tmp_path):
    recipe = str(ROOT / "recipes" / "vpt_convnext_digits.yaml")
    res = invoke_cli("train", recipe, "--dry-run", "--json", "--set", "readout.pool=auto", "--set",
                     "readout.norm=auto", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["recipe"]["readout"] == {"pool": "avg", "norm": "pretrained"}
    assert plan["trainable_params"] == 3 * 2 * 3 * (SIZE + 6) + 3 * SIZE * 2 * 3 + 128 * 10 + 10  # p = 3, D = 128
    res = invoke_cli("train", recipe, "--dry-run", "--set", "prompt.location=prepend", cwd=tmp_path)
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines() == [res.stderr.strip()] and "prompt.location: 'prepend'" in res.stderr
