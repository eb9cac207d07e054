"""Every on-disk checkpoint format users have (``shared/CHECKPOINTS.md``), read by ``build_backbone``.

Each file is written here with random values in exactly the official layout of its release, spelled out below
from CHECKPOINTS.md -- not produced by the converters under test:

- timm layout (``.safetensors``, bare ``.pth``); MAE ``mae_pretrain_vit_base.pth`` (``{'model': sd}``), its
  ``_full`` variant (decoder_* + ``mask_token`` (1, 1, decoder width)) and a training dump with
  ``args=argparse.Namespace``; MoCo v3 ``vit-b-300ep.pth.tar`` (base/momentum encoders with BatchNorm projector,
  predictor) and ``linear-vit-b-300ep.pth.tar`` (``module.`` + ``module.head``); Google's JAX ``.npz``.

Torch layouts are checked against a plain timm ``VisionTransformer`` loaded strictly with the encoder tensors
the file was built from; the ``.npz`` against a ViT forward written here from the JAX arrays' semantics
(``y = x @ kernel``, per-head (D, H, Dh) kernels, HWIO patch kernel), independent of timm and the converter.
"""

from __future__ import annotations

import argparse
import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_naming, invoke_cli, tiny_recipe, write_recipe
from safetensors.torch import save_file
from test_backbones import timm_vit_layout

from vptool.backbones.build import build_backbone
from vptool.backbones.convert import CONVERTERS, detect_format
from vptool.errors import UserError

# tiny ViT: 16 px, 4 px patches -> 4x4 grid, N = 16 (T = 17 with CLS), D = 32, 2 blocks, 2 heads (Dh = 16)
IMG, PATCH, DIM, DEPTH, HEADS, MLP = 16, 4, 32, 2, 2, 4
N = (IMG // PATCH) ** 2
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
NAME = "vit_base_patch16_224"  # timm's default tag (augreg) normalises with 0.5 / 0.5
MAE_NAME = "vit_base_patch16_224.mae"  # timm's MAE tag normalises with the ImageNet mean / std
DEC = 16  # MAE decoder width (512 in the release)
PROJ_HID, PROJ_OUT = 64, 24  # MoCo v3 projector / predictor widths (4096 / 256 in the release)

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


# --- layouts, from CHECKPOINTS.md --------------------------------------------------------------------------------


def vit_layout(d: int = DIM, depth: int = DEPTH, patch: int = PATCH, n: int = N, prefix: str = "") -> dict:
    """Key -> shape of the common torch ViT layout (= timm VisionTransformer, no head), keys behind ``prefix``."""
    return {prefix + k: v for k, v in timm_vit_layout(d, depth, patch, n, MLP).items()}


def mae_decoder_layout(d: int = DIM, dec: int = DEC) -> dict:
    """MAE ``_full`` / ``visualize`` extras: decoder (width ``dec``, one block here) and mask_token (1, 1, dec)."""
    shapes = {"mask_token": (1, 1, dec), "decoder_embed.weight": (dec, d), "decoder_embed.bias": (dec,),
              "decoder_pos_embed": (1, 1 + N, dec)}
    shapes.update({k.replace("blocks.0.", "decoder_blocks.0."): v
                   for k, v in vit_layout(dec, 1).items() if k.startswith("blocks.0.")})
    shapes.update({"decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
                   "decoder_pred.weight": (PATCH * PATCH * 3, dec), "decoder_pred.bias": (PATCH * PATCH * 3,)})
    return shapes


def bn(prefix: str, width: int, affine: bool = True) -> dict:
    shapes = {prefix + "weight": (width,), prefix + "bias": (width,)} if affine else {}
    shapes.update({prefix + "running_mean": (width,), prefix + "running_var": (width,),
                   prefix + "num_batches_tracked": ()})
    return shapes


def mocov3_head_layout(prefix: str) -> dict:
    """Projector MLP ``head.{0..7}``: Linear (no bias), BN, ReLU, Linear, BN, ReLU, Linear, BN (affine=False)."""
    p = prefix + "head."
    return {p + "0.weight": (PROJ_HID, DIM), **bn(p + "1.", PROJ_HID), p + "3.weight": (PROJ_HID, PROJ_HID),
            **bn(p + "4.", PROJ_HID), p + "6.weight": (PROJ_OUT, PROJ_HID), **bn(p + "7.", PROJ_OUT, affine=False)}


def mocov3_predictor_layout() -> dict:
    p = "module.predictor."
    return {p + "0.weight": (PROJ_HID, PROJ_OUT), **bn(p + "1.", PROJ_HID), p + "3.weight": (PROJ_OUT, PROJ_HID),
            **bn(p + "4.", PROJ_OUT, affine=False)}


def jax_layout(d: int = DIM, depth: int = DEPTH, heads: int = HEADS, patch: int = PATCH, classes: int = 5) -> dict:
    """Name -> shape of Google's JAX ViT .npz (flat '/'-separated arrays)."""
    dh, h = d // heads, MLP * d
    shapes = {"cls": (1, 1, d), "embedding/kernel": (patch, patch, 3, d), "embedding/bias": (d,),
              "Transformer/posembed_input/pos_embedding": (1, 1 + N, d)}
    for i in range(depth):
        b = f"Transformer/encoderblock_{i}/"
        a = b + "MultiHeadDotProductAttention_1/"
        shapes.update({b + "LayerNorm_0/scale": (d,), b + "LayerNorm_0/bias": (d,),
                       b + "LayerNorm_2/scale": (d,), b + "LayerNorm_2/bias": (d,),
                       a + "out/kernel": (heads, dh, d), a + "out/bias": (d,),
                       b + "MlpBlock_3/Dense_0/kernel": (d, h), b + "MlpBlock_3/Dense_0/bias": (h,),
                       b + "MlpBlock_3/Dense_1/kernel": (h, d), b + "MlpBlock_3/Dense_1/bias": (d,)})
        for qkv in ("query", "key", "value"):
            shapes.update({a + qkv + "/kernel": (d, heads, dh), a + qkv + "/bias": (heads, dh)})
    shapes.update({"Transformer/encoder_norm/scale": (d,), "Transformer/encoder_norm/bias": (d,),
                   "pre_logits/kernel": (d, d), "pre_logits/bias": (d,),
                   "head/kernel": (d, classes), "head/bias": (classes,)})
    return shapes


def randomize(layout: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in layout.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234, dtype=torch.int64)
        elif k.endswith("running_var"):
            out[k] = torch.rand(shape, generator=g) + 0.5
        else:
            out[k] = torch.randn(shape, generator=g)
    return out


def jax_arrays(seed: int, **layout_kwargs) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {k: rng.standard_normal(shape).astype(np.float32) for k, shape in jax_layout(**layout_kwargs).items()}
    arrays["head/kernel"][:] = 0  # released in21k heads are zero
    arrays["head/bias"][:] = 0
    return arrays


# --- the files ---------------------------------------------------------------------------------------------------


def write_timm_safetensors(enc: dict, path: Path) -> Path:
    save_file(enc, str(path))
    return path


def write_timm_pth(enc: dict, path: Path) -> Path:
    torch.save(enc, path)
    return path


def write_mae_plain(enc: dict, path: Path) -> Path:  # mae_pretrain_vit_base.pth
    torch.save({"model": enc}, path)
    return path


def write_mae_full(enc: dict, path: Path) -> Path:  # mae_pretrain_vit_base_full.pth / mae_visualize_vit_base.pth
    torch.save({"model": {**enc, **randomize(mae_decoder_layout(), 11)}}, path)
    return path


def write_mae_dump(enc: dict, path: Path) -> Path:  # an MAE training checkpoint (checkpoint-N.pth)
    args = argparse.Namespace(model="mae_vit_base_patch16", mask_ratio=0.75, norm_pix_loss=True, blr=1.5e-4,
                              input_size=IMG, output_dir="./output_dir")
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(DIM)}},
                 "param_groups": [{"lr": 1e-4, "weight_decay": 0.05, "params": [0]}]}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 7}
    torch.save({"model": {**enc, **randomize(mae_decoder_layout(), 12)}, "optimizer": optimizer, "epoch": 3,
                "scaler": scaler, "args": args}, path)
    return path


def write_mocov3(enc: dict, path: Path) -> Path:  # vit-b-300ep.pth.tar
    momentum = randomize({**vit_layout(prefix="module.momentum_encoder."),
                          **mocov3_head_layout("module.momentum_encoder.")}, 13)
    sd = {**{f"module.base_encoder.{k}": v for k, v in enc.items()},
          **randomize(mocov3_head_layout("module.base_encoder."), 14), **momentum,
          **randomize(mocov3_predictor_layout(), 15)}
    optimizer = {"state": {}, "param_groups": [{"lr": 1.5e-4, "params": list(range(len(sd)))}]}
    torch.save({"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": optimizer,
                "scaler": {"scale": 1024.0, "_growth_tracker": 0}}, path)
    return path


def write_mocov3_linear(enc: dict, path: Path) -> Path:  # linear-vit-b-300ep.pth.tar
    sd = {**{f"module.{k}": v for k, v in enc.items()}, "module.head.weight": torch.randn(1000, DIM),
          "module.head.bias": torch.randn(1000)}
    torch.save({"epoch": 90, "arch": "vit_base", "state_dict": sd, "best_acc1": torch.tensor(76.5),
                "optimizer": {"state": {}, "param_groups": [{"lr": 3.0, "params": [0, 1]}]}}, path)
    return path


# (id, writer, file name, format detect_format must name)
TORCH_CASES = [
    ("timm_safetensors", write_timm_safetensors, "vit.safetensors", "timm"),
    ("timm_pth", write_timm_pth, "vit.pth", "timm"),
    ("mae_plain", write_mae_plain, "mae_pretrain_vit_base.pth", "timm"),
    ("mae_full", write_mae_full, "mae_pretrain_vit_base_full.pth", "mae"),
    ("mae_training_dump", write_mae_dump, "checkpoint-3.pth", "mae"),
    ("mocov3", write_mocov3, "vit-b-300ep.pth.tar", "mocov3"),
    ("mocov3_linear", write_mocov3_linear, "linear-vit-b-300ep.pth.tar", "mocov3-linear"),
]


def reference_vit(enc: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A plain timm VisionTransformer of the tiny config holding ``enc`` (strict)."""
    from timm.models.vision_transformer import VisionTransformer

    ref = VisionTransformer(**TINY, num_classes=0)
    ref.load_state_dict(enc, strict=True)
    return ref.eval()


def images(seed: int = 9) -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def assert_frozen_eval(model: torch.nn.Module) -> None:
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training and all(not m.training for m in model.modules())


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
@pytest.mark.parametrize("write,fname,fmt", [c[1:] for c in TORCH_CASES], ids=[c[0] for c in TORCH_CASES])
def test_torch_layouts_load_and_match_reference(tmp_path, write, fname, fmt, explicit):
    enc = randomize(vit_layout(), seed=1)
    path = write(enc, tmp_path / fname)
    model, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY,
                                 format=fmt if explicit else "auto")
    assert info.format == fmt
    assert info.checkpoint == str(path)
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    own = model.state_dict()
    assert set(own) == set(enc)
    for k, v in enc.items():
        assert torch.equal(own[k], v), k
    assert_frozen_eval(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference_vit(enc).forward_features(x))


def test_plain_mae_file_also_loads_as_explicit_mae(tmp_path):
    """``format: mae`` accepts the encoder-only release (nothing to strip) and brings the ImageNet mean/std."""
    enc = randomize(vit_layout(), seed=2)
    path = write_mae_plain(enc, tmp_path / "mae_pretrain_vit_base.pth")
    model, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY, format="mae")
    assert info.format == "mae"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in enc.items())
    assert info.data_config["mean"] == pytest.approx(IMAGENET[0])
    assert info.data_config["std"] == pytest.approx(IMAGENET[1])


# --- converters on the raw dicts ---------------------------------------------------------------------------------


def test_detect_and_convert_mocov3_by_the_official_rule():
    """keep module.base_encoder.* but not .head, strip the prefix; everything else is ignored, input untouched."""
    enc = randomize(vit_layout(), seed=3)
    raw = {**{f"module.base_encoder.{k}": v for k, v in enc.items()},
           **randomize(mocov3_head_layout("module.base_encoder."), 4),
           **randomize({**vit_layout(prefix="module.momentum_encoder."),
                        **mocov3_head_layout("module.momentum_encoder.")}, 5),
           **randomize(mocov3_predictor_layout(), 6)}
    before = dict(raw)
    assert detect_format(raw) == "mocov3"
    timm_sd, extras, ignored = CONVERTERS["mocov3"](raw)
    assert set(timm_sd) == set(enc) and all(torch.equal(timm_sd[k], enc[k]) for k in enc)
    assert extras == {}
    assert set(ignored) == set(raw) - {f"module.base_encoder.{k}" for k in enc}
    assert any(k.endswith("head.7.num_batches_tracked") for k in ignored)
    assert raw.keys() == before.keys() and all(raw[k] is before[k] for k in raw)


def test_detect_and_convert_mae_full_strips_decoder_and_mask_token():
    enc = randomize(vit_layout(), seed=3)
    dec = randomize(mae_decoder_layout(), 4)
    raw = {**enc, **dec}
    assert detect_format(raw) == "mae" and detect_format(enc) == "timm"
    timm_sd, extras, ignored = CONVERTERS["mae"](raw)
    assert set(timm_sd) == set(enc) and extras == {} and set(ignored) == set(dec)
    assert "mask_token" in ignored and set(raw) == set(enc) | set(dec)


def test_detect_linear_and_npz():
    enc = randomize(vit_layout(), seed=3)
    linear = {**{f"module.{k}": v for k, v in enc.items()}, "module.head.weight": torch.zeros(1000, DIM),
              "module.head.bias": torch.zeros(1000)}
    assert detect_format(linear) == "mocov3-linear"
    timm_sd, _, ignored = CONVERTERS["mocov3-linear"](linear)
    assert set(timm_sd) == set(enc) and set(ignored) == {"module.head.weight", "module.head.bias"}
    npz = {k: torch.from_numpy(v) for k, v in jax_arrays(0).items()}
    assert detect_format(npz) == "jax-npz"
    _, _, ignored = CONVERTERS["jax-npz"](npz)
    assert set(ignored) == {"pre_logits/kernel", "pre_logits/bias", "head/kernel", "head/bias"}


# --- JAX .npz ----------------------------------------------------------------------------------------------------


def jax_forward_features(a: dict[str, np.ndarray], img: torch.Tensor, heads: int = HEADS) -> torch.Tensor:
    """ViT forward from the JAX arrays (float64): HWIO conv as a patch matmul, per-head attention kernels."""
    t = {k: torch.from_numpy(v).double() for k, v in a.items()}
    x = img.double()
    B, C, H, W = x.shape
    P = t["embedding/kernel"].shape[0]
    gh, gw = H // P, W // P
    # patch (i, j) pixels in (row, col, channel) order, matching the kernel's (H, W, I) axes
    patches = x.reshape(B, C, gh, P, gw, P).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, P * P * C)
    tokens = patches @ t["embedding/kernel"].reshape(P * P * C, -1) + t["embedding/bias"]
    x = torch.cat([t["cls"].expand(B, -1, -1), tokens], dim=1) + t["Transformer/posembed_input/pos_embedding"]

    def ln(v, name):
        return F.layer_norm(v, v.shape[-1:], t[name + "/scale"], t[name + "/bias"], eps=1e-6)

    for i in range(sum(k.endswith("LayerNorm_0/scale") for k in a)):
        b = f"Transformer/encoderblock_{i}/"
        at = b + "MultiHeadDotProductAttention_1/"
        y = ln(x, b + "LayerNorm_0")
        q, k, v = (torch.einsum("bnd,dhk->bnhk", y, t[at + n + "/kernel"]) + t[at + n + "/bias"]
                   for n in ("query", "key", "value"))
        att = torch.softmax(torch.einsum("bqhk,bshk->bhqs", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        o = torch.einsum("bhqs,bshk->bqhk", att, v)
        x = x + torch.einsum("bqhk,hkd->bqd", o, t[at + "out/kernel"]) + t[at + "out/bias"]
        y = ln(x, b + "LayerNorm_2")
        hid = F.gelu(y @ t[b + "MlpBlock_3/Dense_0/kernel"] + t[b + "MlpBlock_3/Dense_0/bias"])
        x = x + hid @ t[b + "MlpBlock_3/Dense_1/kernel"] + t[b + "MlpBlock_3/Dense_1/bias"]
    return ln(x, "Transformer/encoder_norm").float()


@pytest.mark.parametrize("fmt", ["auto", "jax-npz"])
def test_jax_npz_matches_a_forward_written_from_the_jax_arrays(tmp_path, fmt):
    arrays = jax_arrays(seed=21)
    path = tmp_path / "imagenet21k_ViT-B_16.npz"
    np.savez(path, **arrays)
    model, info = build_backbone(MAE_NAME, pretrained=False, checkpoint=str(path), kwargs=TINY, format=fmt)
    assert info.format == "jax-npz" and info.checkpoint == str(path)
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_frozen_eval(model)
    x = images(3)
    with torch.no_grad():
        got = model.forward_features(x)
    want = jax_forward_features(arrays, x)
    assert got.shape == (2, 1 + N, DIM)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    # the in21k normalisation replaces the .mae tag's ImageNet mean/std
    assert info.data_config["mean"] == pytest.approx(HALF[0])
    assert info.data_config["std"] == pytest.approx(HALF[1])


def test_jax_reference_is_sensitive_to_the_head_split(tmp_path):
    """Control: a kernel whose heads are swapped gives a different output, so the comparison above can fail."""
    arrays = jax_arrays(seed=22)
    x = images(4)
    swapped = dict(arrays)
    k = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"
    swapped[k] = arrays[k][:, ::-1].copy()
    assert not torch.allclose(jax_forward_features(arrays, x), jax_forward_features(swapped, x), atol=1e-3)


# --- data config per format --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,write,fname,want", [
    (NAME, write_timm_safetensors, "vit.safetensors", HALF),  # timm: the model's own cfg (augreg: 0.5)
    (MAE_NAME, write_timm_safetensors, "vit.safetensors", IMAGENET),  # timm: the model's own cfg (.mae tag)
    (NAME, write_mae_full, "mae_full.pth", IMAGENET),
    (NAME, write_mocov3, "vit-b-300ep.pth.tar", IMAGENET),
    (NAME, write_mocov3_linear, "linear-vit-b-300ep.pth.tar", IMAGENET),
], ids=["timm_augreg", "timm_mae_tag", "mae", "mocov3", "mocov3_linear"])
def test_data_config_follows_the_pretraining(tmp_path, name, write, fname, want):
    path = write(randomize(vit_layout(), seed=5), tmp_path / fname)
    _, info = build_backbone(name, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert info.data_config["mean"] == pytest.approx(want[0])
    assert info.data_config["std"] == pytest.approx(want[1])
    assert info.data_config["input_size"] == [3, IMG, IMG]


@pytest.mark.parametrize("fmt,want", [("auto", HALF), ("mocov3", IMAGENET), ("jax-npz", HALF)])
def test_explicit_format_without_a_file_sets_only_the_normalisation(fmt, want):
    _, info = build_backbone(NAME, pretrained=False, kwargs=TINY, format=fmt)
    assert info.format is None and info.checkpoint is None
    assert info.data_config["mean"] == pytest.approx(want[0])


# --- errors ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("write,fname,fmt,looks", [
    (write_timm_pth, "vit.pth", "mocov3", "timm"),
    (write_timm_safetensors, "vit.safetensors", "jax-npz", "timm"),
    (write_mocov3, "vit-b-300ep.pth.tar", "mocov3-linear", "mocov3"),
    (write_mocov3_linear, "linear.pth.tar", "mae", "mocov3-linear"),
    (write_mocov3_linear, "linear.pth.tar", "timm", "mocov3-linear"),
    (write_mae_plain, "mae.pth", "beitv2-pretrain", "timm"),
])
def test_explicit_format_missing_from_the_file(tmp_path, write, fname, fmt, looks):
    path = write(randomize(vit_layout(), seed=6), tmp_path / fname)
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY, format=fmt)
    assert_one_line_naming(exc, "backbone.format", fmt, str(path), f"looks like {looks}", "auto")


def test_explicit_timm_on_an_npz(tmp_path):
    path = tmp_path / "in21k.npz"
    np.savez(path, **jax_arrays(seed=7))
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY, format="timm")
    assert_one_line_naming(exc, "backbone.format", str(path), "looks like jax-npz")


def test_unknown_format_name():
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, kwargs=TINY, format="moco")
    assert_one_line_naming(exc, "backbone.format", "'moco'", "mocov3")


# a ViT-"L"-like file for the tiny ViT-"B": wider (D 48, 3 heads) and deeper (4 blocks)
BIG_D, BIG_DEPTH = 48, 4
N_MODEL_KEYS = 4 + 12 * DEPTH + 2  # every model key has another shape in the big file
N_UNEXPECTED = 12 * (BIG_DEPTH - DEPTH)


@pytest.mark.parametrize("write,fname", [(write_timm_safetensors, "vit_l.safetensors"),
                                         (write_mae_full, "mae_l_full.pth"),
                                         (write_mocov3, "vit-l-300ep.pth.tar")])
def test_wrong_architecture_names_the_first_mismatching_tensor(tmp_path, write, fname):
    big = randomize(vit_layout(BIG_D, BIG_DEPTH), seed=8)
    path = write(big, tmp_path / fname)
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    msg = assert_one_line_naming(exc, f"{N_MODEL_KEYS} shape", f"{N_UNEXPECTED} unexpected", "blocks.2.")
    assert msg.startswith(f"backbone.checkpoint: {path} does not match {NAME}: first mismatch cls_token is "
                          f"(1, 1, {BIG_D}) in the file, (1, 1, {DIM}) in the model"), msg


def test_wrong_architecture_npz(tmp_path):
    path = tmp_path / "vit_l.npz"
    np.savez(path, **jax_arrays(seed=9, d=BIG_D, depth=BIG_DEPTH, heads=3))
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    msg = assert_one_line_naming(exc, str(path))
    assert f"first mismatch cls_token is (1, 1, {BIG_D}) in the file, (1, 1, {DIM}) in the model" in msg


def test_first_mismatch_is_in_model_key_order(tmp_path):
    enc = randomize(vit_layout(), seed=10)
    del enc["blocks.0.norm2.bias"]
    enc["blocks.1.attn.proj.weight"] = torch.zeros(DIM, DIM + 1)
    enc["fc_norm.weight"] = torch.zeros(DIM)
    path = write_timm_safetensors(enc, tmp_path / "edited.safetensors")
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    msg = assert_one_line_naming(exc, "1 missing", "1 unexpected", "fc_norm.weight", "blocks.1.attn.proj.weight")
    assert msg.startswith(f"backbone.checkpoint: {path} does not match {NAME}: first mismatch blocks.0.norm2.bias")


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _npz(enc, path):
    np.savez(path, **jax_arrays(seed=11))
    return path


@pytest.mark.parametrize("write,fname", [(write_mae_plain, "mae.pth"), (write_timm_safetensors, "vit.safetensors"),
                                         (_npz, "in21k.npz"), (write_mocov3, "vit-b-300ep.pth.tar")])
def test_truncated_files(tmp_path, write, fname):
    path = _truncate(write(randomize(vit_layout(), seed=12), tmp_path / fname))
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert_one_line_naming(exc, "backbone.checkpoint", str(path), "truncated")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, cls=np.zeros((1, 1, DIM), np.float32), meta=np.array([{"lr": 0.1}], dtype=object))
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert_one_line_naming(exc, "backbone.checkpoint", str(path))


@pytest.mark.parametrize("bad", ["wrong_arch", "truncated", "format_mismatch"])
def test_cli_dry_run_reports_a_bad_checkpoint_on_one_line(tmp_path, bad):
    from conftest import TINY_KWARGS, TINY_NAME

    assert TINY_KWARGS["embed_dim"] == DIM and TINY_KWARGS["depth"] == DEPTH
    backbone = {}
    if bad == "wrong_arch":
        path = write_mocov3(randomize(vit_layout(BIG_D, BIG_DEPTH), seed=13), tmp_path / "vit-l-300ep.pth.tar")
        needles = ["backbone.checkpoint", TINY_NAME, f"first mismatch cls_token is (1, 1, {BIG_D}) in the file"]
    elif bad == "truncated":
        path = _truncate(write_mae_plain(randomize(vit_layout(), seed=14), tmp_path / "mae.pth"))
        needles = ["backbone.checkpoint", "truncated"]
    else:
        path = write_mocov3_linear(randomize(vit_layout(), seed=14), tmp_path / "linear-vit-b-300ep.pth.tar")
        backbone["format"] = "mocov3"
        needles = ["backbone.format", "mocov3", "looks like mocov3-linear"]
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, backbone={"checkpoint": str(path), **backbone}))
    res = invoke_cli("train", str(recipe), "--dry-run")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    for needle in [str(path), *needles]:
        assert needle in lines[0], (needle, lines[0])


# --- Hugging Face cache, offline ---------------------------------------------------------------------------------

REV = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF cache under tmp_path, offline. huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE into
    ``huggingface_hub.constants`` at import time, so the constants are patched as well as the environment."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def fill_cache(cache: Path, repo: str, filename: str, sd: dict) -> Path:
    """What a download leaves: models--timm--<name>/refs/main (the revision) + snapshots/<rev>/<file>."""
    root = cache / f"models--timm--{repo}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(REV)
    snap = root / "snapshots" / REV
    snap.mkdir(parents=True)
    path = snap / filename
    if filename.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


@pytest.mark.parametrize("filename", ["model.safetensors", "pytorch_model.bin"])
def test_hf_cache_weights_are_loaded_strictly(hf_cache, filename):
    enc = randomize(vit_layout(), seed=15)
    path = fill_cache(hf_cache, "vit_base_patch16_224.mae", filename, enc)
    model, info = build_backbone(MAE_NAME, pretrained=True, kwargs=TINY)
    assert info.checkpoint == str(path) and info.format == "timm"
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in enc.items())
    assert_frozen_eval(model)
    x = images(5)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), reference_vit(enc).forward_features(x))
    assert info.data_config["mean"] == pytest.approx(IMAGENET[0])


def test_hf_cache_file_with_a_missing_key_is_not_loaded_leniently(hf_cache):
    enc = randomize(vit_layout(), seed=16)
    del enc["norm.weight"]
    path = fill_cache(hf_cache, "vit_base_patch16_224.mae", "model.safetensors", enc)
    with pytest.raises(UserError) as exc:
        build_backbone(MAE_NAME, pretrained=True, kwargs=TINY)
    assert_one_line_naming(exc, str(path), "missing", "norm.weight")


def test_hf_cache_missing_offline(hf_cache):
    with pytest.raises(UserError) as exc:
        build_backbone(MAE_NAME, pretrained=True, kwargs=TINY)
    assert_one_line_naming(exc, "backbone.pretrained", repr(MAE_NAME),
                           str(hf_cache / "models--timm--vit_base_patch16_224.mae" / "snapshots"),
                           "model.safetensors", "HF_HUB_OFFLINE", "backbone.checkpoint")


def test_checkpoint_wins_over_the_hf_cache(hf_cache, tmp_path):
    """With backbone.checkpoint set the cache is not consulted (nothing is cached here)."""
    enc = randomize(vit_layout(), seed=17)
    path = write_mocov3(enc, tmp_path / "vit-b-300ep.pth.tar")
    model, info = build_backbone(MAE_NAME, pretrained=True, checkpoint=str(path), kwargs=TINY)
    assert info.checkpoint == str(path) and info.format == "mocov3"
    assert all(torch.equal(model.state_dict()[k], v) for k, v in enc.items())


def test_train_from_a_mocov3_release_on_an_fgvc_json_layout_records_format_and_normalisation(tmp_path):
    """The issue's path end to end through the CLI: a MoCo v3 pretraining file (module.base_encoder.*, projector,
    momentum encoder, predictor) and VPT's FGVC JSON layout; the run records the detected format and the
    ImageNet mean/std the images were normalised with, and `vptool eval` reproduces the test top-1."""
    import json

    import layouts

    ckpt = write_mocov3(randomize(vit_layout(), 3), tmp_path / "vit-b-300ep.pth.tar")
    root = layouts.make_fgvc_json(tmp_path / "data", "cub", n_classes=3, per_class={"train": 6, "val": 2, "test": 3})
    r = tiny_recipe(tmp_path, backbone={"name": NAME, "checkpoint": str(ckpt), "kwargs": dict(TINY)},
                    data={"dataset": "fgvc-json", "root": str(root), "task": "cub", "train_transform": "fgvc",
                          "batch_size": 8},
                    train={"epochs": 1, "warmup_epochs": 0})
    res = invoke_cli("train", str(write_recipe(tmp_path, r)), "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    bb = summary["backbone"]
    assert bb["format"] == "mocov3" and bb["checkpoint"] == str(ckpt)
    assert bb["mean"] == pytest.approx(IMAGENET[0]) and bb["std"] == pytest.approx(IMAGENET[1])
    assert bb["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    ev = invoke_cli("eval", summary["run_dir"], "--json")
    assert ev.exit_code == 0, ev.output
    assert json.loads(ev.stdout)["top1"] == summary["test_top1"]
