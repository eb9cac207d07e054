"""The prompted forward against references written from VPT's equations with timm's own blocks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, TINY_NAME

from vptool.backbones.build import build_backbone
from vptool.prompting.model import PromptedViT


def reference_tokens(bb, x, shallow=None, deep=None, keep_last_prompts=False):
    """VPT eq. 4-5 (shallow) and eq. 7 (deep), concatenated form, with timm's own Block.forward.

    Sequence [CLS, P, E] after the position embedding; deep: set i enters block i+1, its outputs are dropped.
    """
    t = bb.patch_embed(x)
    t = torch.cat([bb.cls_token.expand(x.shape[0], -1, -1), t], dim=1) + bb.pos_embed
    B = x.shape[0]
    if shallow is not None:
        t = torch.cat([t[:, :1], shallow.expand(B, -1, -1), t[:, 1:]], dim=1)
    for i, blk in enumerate(bb.blocks):
        if deep is not None:
            Np = deep.shape[1]
            y = blk(torch.cat([t[:, :1], deep[i].expand(B, -1, -1), t[:, 1:]], dim=1))
            last = i == len(bb.blocks) - 1
            t = y if (last and keep_last_prompts) else torch.cat([y[:, :1], y[:, 1 + Np:]], dim=1)
        else:
            t = blk(t)
    return t


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 16, 16, generator=g)


@pytest.mark.parametrize("Np", [1, 5, 40])
def test_deep_prefix_form_equals_concatenated_form(tiny_backbone, images, Np):
    model = PromptedViT(tiny_backbone, 7, "deep", Np, readout_pool="avg").eval()
    with torch.no_grad():
        model.prompts.deep.normal_(generator=torch.Generator().manual_seed(2))  # prompts of real magnitude
        got = model.forward_features(images)
        ref = reference_tokens(tiny_backbone, images, deep=model.prompts.deep)
    assert got.shape == ref.shape == (3, 1 + 16, 32)
    assert (got[:, 0] - ref[:, 0]).abs().max() <= 1e-5  # CLS
    assert (got[:, 1:] - ref[:, 1:]).abs().max() <= 1e-5  # patch tokens
    # the prompts matter: without them the outputs differ clearly
    plain = reference_tokens(tiny_backbone, images)
    assert (plain - ref).abs().max() > 1e-3  # 100x the tolerance


def test_deep_avg_all_keeps_last_block_prompt_rows(tiny_backbone, images):
    model = PromptedViT(tiny_backbone, 7, "deep", 6, readout_pool="avg_all", readout_norm="none").eval()
    with torch.no_grad():
        got = model.forward_features(images)
        ref = reference_tokens(tiny_backbone, images, deep=model.prompts.deep, keep_last_prompts=True)
        assert got.shape == (3, 1 + 6 + 16, 32)
        assert (got - ref).abs().max() <= 1e-5
        feat = model.forward_head(got, pre_logits=True)
        assert torch.allclose(feat, ref[:, 1:].mean(1), atol=1e-6)


def test_shallow_matches_eq4(tiny_backbone, images):
    model = PromptedViT(tiny_backbone, 7, "shallow", 5, readout_pool="cls").eval()
    with torch.no_grad():
        got = model.forward_features(images)
        ref = reference_tokens(tiny_backbone, images, shallow=model.prompts.shallow)
        assert (got - ref).abs().max() <= 1e-5
        # readout cls + pretrained norm: head(LN_final(x_N[CLS]))
        logits = model(images)
        want = F.linear(F.layer_norm(ref[:, 0], (32,), tiny_backbone.norm.weight, tiny_backbone.norm.bias,
                                     tiny_backbone.norm.eps), model.head.weight, model.head.bias)
        assert torch.allclose(logits, want, atol=1e-5)


def test_none_mode_is_the_plain_backbone(tiny_backbone, images):
    model = PromptedViT(tiny_backbone, 7, "none", readout_pool="cls", tune="head").eval()
    with torch.no_grad():
        assert torch.allclose(model.forward_features(images), tiny_backbone.blocks(
            tiny_backbone._pos_embed(tiny_backbone.patch_embed(images))), atol=1e-6)


@pytest.mark.parametrize("pool,norm", [("avg", "fresh"), ("avg", "none"), ("avg_all", "pretrained"), ("cls", "none")])
def test_readout_pools_then_norms(tiny_backbone, images, pool, norm):
    model = PromptedViT(tiny_backbone, 4, "shallow", 3, readout_pool=pool, readout_norm=norm).eval()
    with torch.no_grad():
        tokens = reference_tokens(tiny_backbone, images, shallow=model.prompts.shallow)
        z = {"cls": tokens[:, 0], "avg": tokens[:, 1 + 3:].mean(1), "avg_all": tokens[:, 1:].mean(1)}[pool]
        if norm == "fresh":  # a new LayerNorm: weight 1, bias 0
            mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
            z = (z - mu) / torch.sqrt(var + 1e-6)
        elif norm == "pretrained":
            n = tiny_backbone.norm
            z = F.layer_norm(z, (32,), n.weight, n.bias, n.eps)
        assert torch.allclose(model.forward_head(model.forward_features(images), pre_logits=True), z, atol=1e-5)


def test_xavier_init_bound(tiny_backbone):
    torch.manual_seed(0)
    model = PromptedViT(tiny_backbone, 4, "deep", 50)
    p = model.prompts.deep
    v = math.sqrt(6.0 / (3 * 4 * 4 + 32))  # sqrt(6 / (3 p_h p_w + D)), patch 4x4, D 32
    assert p.shape == (2, 50, 32)
    assert p.abs().max() <= v
    assert p.abs().max() > 0.98 * v  # 3,200 uniform draws reach the bound
    assert abs(p.std().item() - v / math.sqrt(3)) < 0.05 * v  # std of U(-v, v)


def test_prompt_dropout_train_only_and_backbone_stays_eval(tiny_backbone, images):
    model = PromptedViT(tiny_backbone, 4, "deep", 8, prompt_dropout=0.5)
    model.train()
    assert model.training and not tiny_backbone.training
    assert all(not m.training for m in tiny_backbone.modules())
    torch.manual_seed(0)
    a = model(images)
    torch.manual_seed(1)
    b = model(images)
    assert not torch.allclose(a, b)  # dropout masks differ in train mode
    model.eval()
    assert torch.equal(model(images), model(images))


@pytest.mark.parametrize("tune,mode,trainable,want", [
    ("head", "none", True, {"head.weight", "head.bias"}),
    ("prompts", "shallow", True, {"head.weight", "head.bias", "prompts.shallow"}),
    ("prompts", "deep", True, {"head.weight", "head.bias", "prompts.deep"}),
    ("prompts", "deep", False, {"head.weight", "head.bias"}),
])
def test_trainable_set(tiny_backbone, images, tune, mode, trainable, want):
    model = PromptedViT(tiny_backbone, 4, mode, 3, tune=tune, prompt_trainable=trainable)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == want
    F.cross_entropy(model.train()(images), torch.tensor([0, 1, 2])).backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in want), n


def test_full_finetune_trains_backbone(tiny_backbone):
    model = PromptedViT(tiny_backbone, 4, "none", tune="all")
    n_train, n_all = model.parameter_summary()
    assert n_train == n_all == sum(p.numel() for p in tiny_backbone.parameters()) + 32 * 4 + 4


def test_adapter_round_trip_identical_logits(tmp_path, images):
    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    a = PromptedViT(bb, 5, "deep", 4, readout_pool="avg", readout_norm="fresh").eval()
    with torch.no_grad():
        a.prompts.deep.normal_()
        a.head.weight.normal_()
    path = tmp_path / "adapter.safetensors"
    a.save_adapter(str(path))
    from safetensors.torch import load_file

    saved = load_file(str(path))
    assert set(saved) == {"prompts.deep", "head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert not any(k.startswith("backbone") for k in saved)  # never the frozen backbone
    b = PromptedViT(bb, 5, "deep", 4, readout_pool="avg", readout_norm="fresh").eval()
    assert not torch.equal(a(images), b(images))
    b.load_adapter(str(path))
    assert torch.equal(a(images), b(images))


def test_adapter_state_dict_is_a_snapshot(tiny_backbone):
    """The best-validation adapter must not follow the parameters as training goes on."""
    model = PromptedViT(tiny_backbone, 4, "shallow", 3)
    snap = model.adapter_state_dict()
    before = snap["prompts.shallow"].clone()
    with torch.no_grad():
        model.prompts.shallow.add_(1.0)
        model.head.weight.mul_(2.0)
    assert torch.equal(snap["prompts.shallow"], before)
    assert not torch.equal(snap["head.weight"], model.head.weight)
