"""BEiT v2 pretraining checkpoints (``vptool.backbones.convert`` + ``build_backbone``).

Checkpoints are random-valued files written here in the official BEiT v2 pretraining layout described in
``shared/CHECKPOINTS.md`` (``{'model': sd, 'epoch', 'args': argparse.Namespace}``), spelled out below from that
description -- not by saving a timm model -- including a relative position index computed here from BEiT's
formula. The loaded timm ``Beit`` is checked against a BEiT forward written here from the raw file tensors.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import pytest
import torch
from beit_layout import (
    DIM,
    GRID,
    HEADS,
    IMG,
    INDEX_KEY,
    NAME,
    TINY,
    beit_relative_position_index,
    block_layout,
    random_beitv2_sd,
    reference_forward_features,
    write_beitv2,
)
from conftest import assert_one_line_naming

from vptool.backbones.build import build_backbone, check_supported
from vptool.backbones.convert import (
    CONVERTERS,
    beit_constructor_kwargs,
    convert_beitv2_pretrain,
    detect_format,
)
from vptool.errors import UserError


def test_test_index_matches_beit_formula_by_hand():
    """Spot-check the test's own index on a 2x2 grid (R = 3*3+3 = 12)."""
    idx = beit_relative_position_index(2, 2)
    assert idx.shape == (5, 5) and idx.dtype == torch.int64
    assert idx[0].tolist() == [11, 9, 9, 9, 9]
    assert idx[:, 0].tolist() == [11, 10, 10, 10, 10]
    # patch 0 (0,0) -> patch 3 (1,1): dy = dx = -1 -> (0)*3 + 0 = 0; patch 3 -> patch 0: (2)*3 + 2 = 8; self: 4
    assert idx[1, 4] == 0 and idx[4, 1] == 8 and idx[2, 2] == 4


def test_detect_format():
    sd = random_beitv2_sd()
    assert detect_format(sd) == "beitv2-pretrain"
    for key in ("mask_token", "rel_pos_bias.relative_position_bias_table"):
        assert detect_format({k: v for k, v in sd.items() if k != key}) == "timm"
    assert detect_format({k: v for k, v in sd.items() if not k.startswith("lm_head.")}) == "timm"
    assert detect_format({"cls_token": torch.zeros(1, 1, DIM), "pos_embed": torch.zeros(1, 17, DIM)}) == "timm"
    assert set(CONVERTERS) >= {"timm", "beitv2-pretrain"}
    assert CONVERTERS["beitv2-pretrain"] is convert_beitv2_pretrain


def test_convert_beitv2_pretrain_is_pure_and_splits_keys():
    sd = random_beitv2_sd()
    sd["mask_token"] = sd["mask_token"].half()
    before = {k: v.clone() for k, v in sd.items()}
    timm_sd, extras, ignored = convert_beitv2_pretrain(sd)
    assert set(extras) == {"mask_token", "lm_head.weight", "lm_head.bias"}
    assert extras["mask_token"].dtype == torch.float32 and extras["mask_token"].shape == (1, 1, DIM)
    assert torch.equal(extras["lm_head.weight"], sd["lm_head.weight"])
    assert set(ignored) == {INDEX_KEY} | {k for k in sd if k.startswith("cls_pt_layers.")}
    assert len(ignored) == 1 + 2 * len(block_layout(""))
    assert set(timm_sd) == set(sd) - set(extras) - set(ignored)
    assert all(timm_sd[k] is sd[k] for k in timm_sd)  # unchanged
    assert set(sd) == set(before) and all(torch.equal(sd[k], before[k]) for k in sd)  # input untouched
    assert CONVERTERS["timm"](timm_sd) == (timm_sd, {}, [])


def test_beit_constructor_kwargs():
    kw = beit_constructor_kwargs("beitv2-pretrain")
    assert kw["use_abs_pos_emb"] is False and kw["use_rel_pos_bias"] is False
    assert kw["use_shared_rel_pos_bias"] is True and kw["use_fc_norm"] is False
    assert kw["init_values"]
    assert beit_constructor_kwargs("timm") == {}


# --- loading ----------------------------------------------------------------------------------------------------


@pytest.fixture
def beit_file(tmp_path):
    sd = random_beitv2_sd(seed=1)
    return sd, write_beitv2(sd, tmp_path / "beitv2_base_patch16_224_pt1k.pth")


def test_beitv2_checkpoint_loads_strictly_and_matches_reference_forward(beit_file):
    sd, path = beit_file
    model, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)

    assert info.format == "beitv2-pretrain"
    assert torch.equal(info.extras["mask_token"], sd["mask_token"])
    assert torch.equal(info.extras["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(info.extras["lm_head.bias"], sd["lm_head.bias"])
    assert info.checkpoint == str(path) and info.name == NAME
    assert info.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.data_config["input_size"] == [3, IMG, IMG]

    own = model.state_dict()
    expect = {k for k in sd if not k.startswith(("mask_token", "lm_head.", "cls_pt_layers.")) and k != INDEX_KEY}
    assert set(own) == expect
    for k in expect:
        assert torch.equal(own[k], sd[k]), k
    assert model.pos_embed is None
    assert torch.equal(model.rel_pos_bias.relative_position_index, sd[INDEX_KEY])
    assert all(not p.requires_grad for p in model.parameters())
    assert not model.training and all(not m.training for m in model.modules())

    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        got = model.forward_features(img)
        want = reference_forward_features(sd, img, HEADS)
    assert got.shape == (2, 1 + GRID * GRID, DIM)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_beitv2_checkpoint_without_cls_pt_layers_or_extra_dump_entries(tmp_path):
    """cls_pt_layers are optional (ignored either way); optimizer/scaler entries of a training dump are skipped."""
    sd = {k: v for k, v in random_beitv2_sd(seed=2).items() if not k.startswith("cls_pt_layers.")}
    path = write_beitv2(sd, tmp_path / "dump.pth", optimizer={"state": {}, "param_groups": [{"lr": 1e-3}]},
                        scaler={"scale": 65536.0})
    model, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert info.format == "beitv2-pretrain" and set(info.extras) == {"mask_token", "lm_head.weight", "lm_head.bias"}


def test_user_init_values_kept_and_loading_overwrites_gammas(beit_file):
    sd, path = beit_file
    model, _ = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs={**TINY, "init_values": 1e-5})
    assert torch.equal(model.blocks[1].gamma_2, sd["blocks.1.gamma_2"])


def test_timm_layout_beit_round_trip(tmp_path):
    """A plain timm Beit state dict still loads as format 'timm' (no extras)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model, info = build_backbone(NAME, pretrained=False, kwargs=TINY)
    assert info.format is None and info.extras == {}
    path = tmp_path / "beit_timm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert info.format == "timm" and info.extras == {}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --- strictness -------------------------------------------------------------------------------------------------


def _drop(key):
    return lambda sd: {k: v for k, v in sd.items() if k != key}


def _set(key, value):
    return lambda sd: {**sd, key: value}


STRICT_CASES = [
    # (id, edit of the state dict, words the message must contain)
    ("missing_gamma", _drop("blocks.1.gamma_2"), ["missing", "blocks.1.gamma_2"]),
    ("missing_patch_bias", _drop("patch_embed.proj.bias"), ["missing", "patch_embed.proj.bias"]),
    ("shape_q_bias", _set("blocks.0.attn.q_bias", torch.zeros(DIM + 1)), ["shape", "blocks.0.attn.q_bias"]),
    ("shape_table", _set("rel_pos_bias.relative_position_bias_table", torch.zeros(9 * 9 + 3, HEADS)),
     ["shape", "rel_pos_bias.relative_position_bias_table"]),
    ("unexpected_block", _set("blocks.2.gamma_1", torch.zeros(DIM)), ["unexpected", "blocks.2.gamma_1"]),
    ("unexpected_pos_embed", _set("pos_embed", torch.zeros(1, 17, DIM)), ["unexpected", "pos_embed"]),
    ("wrong_index", _set(INDEX_KEY, beit_relative_position_index(GRID, GRID).T.contiguous()), [INDEX_KEY]),
]


@pytest.mark.parametrize("edit,needles", [c[1:] for c in STRICT_CASES], ids=[c[0] for c in STRICT_CASES])
def test_strict_key_report(tmp_path, edit, needles):
    path = write_beitv2(edit(random_beitv2_sd(seed=3)), tmp_path / "bad.pth")
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert_one_line_naming(exc, "backbone.checkpoint", str(path), *needles)


@pytest.mark.parametrize("name", ["vit_base_patch16_224", "vit_digits_mae"])
def test_beitv2_checkpoint_with_non_beit_name(beit_file, name):
    _, path = beit_file
    with pytest.raises(UserError) as exc:
        build_backbone(name, pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert_one_line_naming(exc, "backbone.name", repr(name), "beitv2_base_patch16_224")


def test_beitv2_checkpoint_with_misspelt_name_suggests_the_name(beit_file):
    _, path = beit_file
    with pytest.raises(UserError) as exc:
        build_backbone("beitv2_base_patch16_244", pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert_one_line_naming(exc, "backbone.name", "'beitv2_base_patch16_224'")


@pytest.mark.parametrize("key,value", [
    ("use_abs_pos_emb", True), ("use_rel_pos_bias", True), ("use_shared_rel_pos_bias", False),
    ("use_fc_norm", True), ("init_values", None), ("init_values", 0.0),
])
def test_kwargs_that_contradict_the_layout(beit_file, key, value):
    _, path = beit_file
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs={**TINY, key: value})
    assert_one_line_naming(exc, f"backbone.kwargs.{key}", repr(value))


def test_wrong_tiny_size_is_a_shape_report(beit_file):
    _, path = beit_file
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs={**TINY, "embed_dim": 48})
    assert_one_line_naming(exc, "backbone.checkpoint", "shape", "cls_token")


# --- weights-only reading: Namespace allowed, nothing else ------------------------------------------------------


def _write_marker(path):
    """Would run on unpickling if the loader executed code from the file."""
    Path(path).write_text("code from the checkpoint ran")
    return 0


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (_write_marker, (self.marker,))


class _Opaque:
    """An arbitrary (harmless) class: still not allow-listed."""

    def __init__(self):
        self.lr = 1e-3


@pytest.mark.parametrize("args", ["payload_in_namespace", "opaque_class"])
def test_only_namespace_is_allow_listed(tmp_path, args):
    marker = tmp_path / "marker.txt"
    obj = argparse.Namespace(lr=1e-3, hook=_Payload(str(marker))) if args == "payload_in_namespace" else _Opaque()
    path = tmp_path / "evil.pth"
    torch.save({"model": random_beitv2_sd(seed=4), "epoch": 3, "args": obj}, path)
    with pytest.raises(UserError) as exc:
        build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=TINY)
    msg = assert_one_line_naming(exc, "backbone.checkpoint", str(path))
    assert ("_write_marker" if args == "payload_in_namespace" else "_Opaque") in msg
    assert not marker.exists(), "the loader executed code from the checkpoint"


# --- supported architectures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared", [False, True])
def test_check_supported_accepts_beit(shared):
    import timm

    kw = dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True) if shared else {}
    model = timm.create_model(NAME, pretrained=False, num_classes=0, **TINY, **kw)
    assert (model.rel_pos_bias is not None) == shared
    check_supported(model, NAME)
    _, info = build_backbone(NAME, pretrained=False, kwargs={**TINY, **kw})  # also through the builder
    assert info.data_config["input_size"] == [3, IMG, IMG]


def test_check_supported_refuses_a_modified_beit_block():
    import timm
    from timm.models import beit

    model = timm.create_model(NAME, pretrained=False, num_classes=0, **TINY)
    model.blocks[1].__class__ = type("PatchedBlock", (beit.Block,), {})
    with pytest.raises(UserError) as exc:
        check_supported(model, "patched")
    assert_one_line_naming(exc, "backbone.name", "'patched'", "BEiT")


@pytest.mark.parametrize("name,kwargs", [
    ("swinv2_tiny_window8_256",  # Swin V1 is a family (test_swin.py); V2 is not
     dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)),
    ("efficientnet_b0", {}),
])
def test_other_architectures_still_refused(name, kwargs):
    with pytest.raises(UserError) as exc:
        build_backbone(name, pretrained=False, kwargs=kwargs)
    assert_one_line_naming(exc, "backbone.name", repr(name), "BEiT")
