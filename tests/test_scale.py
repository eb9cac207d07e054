"""Scale and VPTM ablations (issue 26 items 6-7): ViT-L/16 and ViT-H/14 in their released checkpoint layouts (VPT
Fig. 4, SPT §4.3), a ViT-L-shaped model that trains, BEiT (v1) pretraining checkpoints for VPTM (VPTM Table 6)
and VPTM with prompt length 0 (the verbalizer alone, VPTM Fig. 7).

Each forward is compared with one written here from the raw checkpoint arrays or from the paper's description,
not with vptool's own code.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from beit_layout import GRID, HEADS, IMG, TINY, random_beitv2_sd, reference_forward_features, write_beitv2
from conftest import invoke_cli
from test_checkpoints import jax_forward_features, jax_layout

from vptool.backbones.build import build_backbone
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT

ROOT = Path(__file__).resolve().parent.parent

#: the released in21k JAX checkpoints of the scale study, by timm name: (width D, heads, patch size, file name)
SCALES = {
    "vit_large_patch16_224.orig_in21k": (1024, 16, 16, "imagenet21k_ViT-L_16.npz"),
    "vit_huge_patch14_224.orig_in21k": (1280, 16, 14, "imagenet21k_ViT-H_14.npz"),
}


def scale_arrays(d: int, heads: int, patch: int, depth: int, seed: int) -> dict[str, np.ndarray]:
    """Random arrays in Google's JAX ViT layout at 224 px (N = (224 / patch)^2), with its pre_logits and a zero
    21k head, scaled so activations stay O(1) at width ``d``."""
    layout = jax_layout(d=d, depth=depth, heads=heads, patch=patch, classes=3)
    layout["Transformer/posembed_input/pos_embedding"] = (1, 1 + (224 // patch) ** 2, d)
    rng = np.random.default_rng(seed)
    out = {}
    for k, shape in layout.items():
        v = rng.standard_normal(shape).astype(np.float32)
        out[k] = v if k.endswith(("scale", "bias")) or "pos" in k or k == "cls" else v / np.sqrt(shape[0])
    return out


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if "huge" in n else []) for n in SCALES])
def test_large_and_huge_in21k_npz_load_into_their_timm_names(tmp_path, name):
    """A depth-2 file in the ViT-L/16 or ViT-H/14 release layout loads strictly into the timm model of that name
    (its real width, heads and patch size), and its forward equals one written from the JAX arrays."""
    d, heads, patch, file = SCALES[name]
    arrays = scale_arrays(d, heads, patch, depth=2, seed=3)
    path = tmp_path / file
    np.savez(path, **arrays)
    model, info = build_backbone(name, pretrained=False, checkpoint=str(path), kwargs={"depth": 2})
    assert info.format == "jax-npz" and model.embed_dim == d and model.patch_embed.patch_size == (patch, patch)
    assert model.blocks[0].attn.num_heads == heads
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = model.forward_features(x)
    want = jax_forward_features(arrays, x, heads=heads)
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)
    # control: the same file in a model that splits the width into other heads gives another output
    other, _ = build_backbone(name, pretrained=False, checkpoint=str(path),
                              kwargs={"depth": 2, "num_heads": heads // 2})
    with torch.no_grad(), pytest.raises(AssertionError):
        torch.testing.assert_close(other.forward_features(x), want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("recipe,D,L", [("vpt_deep_in21k_vitl_cub", 1024, 24), ("vpt_deep_in21k_vith_cub", 1280, 32),
                                        ("spt_deep_mae_vitl_cub", 1024, 24), ("spt_deep_mae_vith_cub", 1280, 32)])
def test_scale_recipes_dry_run_at_full_size(tmp_path, recipe, D, L):
    """The ViT-L/H recipes size the real model: L sets of Np prompts of width D (VPT eq. 7) and a D x 200 head."""
    res = invoke_cli("train", str(ROOT / "recipes" / f"{recipe}.yaml"), "--dry-run", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    Np = 10 if recipe.startswith("vpt") else 20
    assert plan["trainable_params"] == L * Np * D + 200 * D + 200
    assert not plan["ready"]


@pytest.mark.slow
def test_a_vit_l_shaped_model_trains(tmp_path):
    """VPT-deep on a depth-2 ViT-L (width 1024, 16 heads, patch 16) at 32 px on the digits: the trainable count is
    2 x Np x 1024 + the head, and the frozen random backbone plus prompts learns the task well above chance."""
    recipe = tmp_path / "vitl.yaml"
    recipe.write_text(
        "method: vpt-deep\nseed: 0\nbackbone:\n  name: vit_large_patch16_224\n  pretrained: false\n"
        "  kwargs: {depth: 2, img_size: 32}\n"
        "data:\n  dataset: digits\n  batch_size: 32\nprompt:\n  length: 4\nreadout: {pool: cls, norm: pretrained}\n"
        "train:\n  epochs: 2\n  optimizer: sgd\n  lr: 0.5\n  lr_scaling: linear\n  warmup_epochs: 1\n")
    res = invoke_cli("train", str(recipe), "--json", "--set", f"output.dir={tmp_path / 'runs'}")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["trainable_params"] == 2 * 4 * 1024 + 10 * 1024 + 10
    assert summary["test_top1"] >= 70.0, summary


# --- BEiT (v1) pretraining: VPTM Table 6 ----------------------------------------------------------------------------


@pytest.fixture
def beit_v1_file(tmp_path):
    """A BEiT v1 pretraining file: the BEiT v2 layout without the cls_pt_layers (BEiT v1 has no CLS pretraining)."""
    sd = random_beitv2_sd(seed=5, cls_pt=0)
    assert not any(k.startswith("cls_pt_layers.") for k in sd)
    return sd, write_beitv2(sd, tmp_path / "beit_base_patch16_224_pt22k.pth")


def test_beit_v1_pretraining_checkpoint_loads_with_its_mask_token_and_normalisation(beit_v1_file):
    sd, path = beit_v1_file
    model, info = build_backbone("beit_base_patch16_224", pretrained=False, checkpoint=str(path), kwargs=TINY)
    assert info.format == "beitv2-pretrain"  # one layout for both BEiT generations
    assert torch.equal(info.extras["mask_token"], sd["mask_token"])
    assert torch.equal(info.extras["lm_head.weight"], sd["lm_head.weight"])
    # BEiT v1 normalises with mean = std = 0.5 (BEiT v2: the ImageNet mean/std), from timm's beit config
    assert info.data_config["mean"] == pytest.approx((0.5,) * 3)
    assert info.data_config["std"] == pytest.approx((0.5,) * 3)
    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(img), reference_forward_features(sd, img, HEADS),
                                   atol=1e-5, rtol=1e-5)


def vptm_reference(sd: dict, bb, model: PromptedViT, img: torch.Tensor, prompts: torch.Tensor | None):
    """VPTM (eq. 6-9) written from the paper with timm's own BEiT blocks: rows [CLS, E, P, MASK] with the relative
    position bias on CLS and patches only, the final norm on h[MASK], then the prototypical verbalizer: h[MASK]
    projected to width t (eq. 7) and scored against each class prototype (eq. 8)."""
    B = img.shape[0]
    x = torch.cat([bb.cls_token.expand(B, -1, -1), bb.patch_embed(img)], dim=1)
    rows = [x] + ([prompts.expand(B, -1, -1)] if prompts is not None else []) + [sd["mask_token"].expand(B, -1, -1)]
    h = torch.cat(rows, dim=1)
    T, extra = x.shape[1], h.shape[1] - x.shape[1]
    rel = bb.rel_pos_bias()  # (H, T, T)
    bias = F.pad(rel, (0, extra, 0, extra)).unsqueeze(0)  # zero bias for every pair with a prompt or [MASK]
    for blk in bb.blocks:
        h = blk(h, shared_rel_pos_bias=bias)
    z = bb.norm(h[:, T + extra - 1])
    v = model.get_classifier()
    return (z @ v.proj.weight.T + v.proj.bias) @ v.prototypes.T, T


@pytest.mark.parametrize("length", [0, 3])
def test_vptm_on_beit_v1_uses_the_pretrained_mask_token(beit_v1_file, length):
    sd, path = beit_v1_file
    bb, info = build_backbone("beit_base_patch16_224", pretrained=False, checkpoint=str(path), kwargs=TINY)
    torch.manual_seed(7)
    model = PromptedViT(bb, 4, "shallow", length, prompt_init="xavier", mask_token="pretrained", readout_pool="mask",
                        head="verbalizer", head_dim=8, pretrained_mask_token=info.extras["mask_token"])
    with torch.no_grad():
        model.get_classifier().prototypes.normal_()
    img = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(8))
    prompts = None if length == 0 else model.prompts.set(None, 1)
    with torch.no_grad():
        got = model(img)
        want, T = vptm_reference(sd, bb, model, img, prompts)
    assert T == 1 + GRID * GRID
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert model.mask_source == "pretrained" and (model.prompts is None) == (length == 0)
    if length == 0:  # nothing but the verbalizer trains (the [MASK] embedding is pretrained)
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and all(n.startswith("verbalizer.") for n in names), names


def test_prompt_length_0_refusals_name_the_key(tmp_path):
    base = ROOT / "recipes" / "vptm_verbalizer_only_digits.yaml"
    for sets, needle in ((["--set", "method=gatevpt", "--set", "head.type=linear", "--set", "readout.pool=cls"],
                          "prompt.length: 0 but prompt.mode gated needs at least 1"),
                         (["--set", "prompt.init=kmeans"], "prompt.init: 'kmeans' but prompt.length is 0"),
                         (["--set", "prompt.length=-1"], "prompt.length: -1 is below the minimum 0")):
        res = invoke_cli("train", str(base), "--dry-run", *sets, cwd=tmp_path)
        assert res.exit_code == 2 and needle in res.stderr, (sets, res.stderr)
    res = invoke_cli("probe-nmi", str(base), cwd=tmp_path)
    assert res.exit_code == 2 and "prompt.length: 0 has no prompt tokens to probe" in res.stderr, res.stderr
    with pytest.raises(ValueError, match="prompt_length=0 must be >= 1 for prompt_mode"):
        bb, _ = build_backbone("vit_digits_mae")
        PromptedViT(bb, 3, "gated", 0)
    assert UserError  # the CLI maps UserError to exit 2 (above)
