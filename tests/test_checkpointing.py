"""``train.activation_checkpointing``: each block recomputed in the backward pass gives the same loss and gradients as
keeping its activations (every prompt mode, with prompt dropout active), keeps fewer tensors for backward, and
``auto`` turns on only when the memory estimate without it exceeds the device's memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.utils.checkpoint
from beit_layout import NAME as BEIT_NAME
from beit_layout import TINY as BEIT_TINY
from conftest import TINY_KWARGS, TINY_NAME, assert_one_line_naming, tiny_recipe

from vptool.backbones.build import build_backbone
from vptool.config import ModelConfig
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT
from vptool.recipe import resolve

#: every prompted forward vptool checkpoints: the modes, both deep forms, GateVPT, VPTM on BEiT v2
CASES = {
    "shallow": ("vit", dict(prompt_mode="shallow")),
    "deep-prefix": ("vit", dict(prompt_mode="deep")),
    "deep-concat": ("vit", dict(prompt_mode="deep", deep_form="concat", readout_pool="avg_all")),
    "deep-blocks": ("vit", dict(prompt_mode="deep", prompt_blocks="2")),
    "gated": ("vit", dict(prompt_mode="gated", temperature="learnable", gate_init=0.5)),
    "gated-hard": ("vit", dict(prompt_mode="gated", gate_kind="hard", gate_init=0.0)),
    "add": ("vit", dict(prompt_mode="deep", prompt_location="add")),
    "vptm": ("beit", dict(prompt_mode="shallow", mask_token="learnable", token_order="CXPM", readout_pool="mask",
                          head="verbalizer", head_dim=8)),
    "beit-deep": ("beit", dict(prompt_mode="deep", temperature="learnable")),
}


@pytest.fixture(scope="module")
def backbones():
    torch.manual_seed(0)
    vit, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    beit, _ = build_backbone(BEIT_NAME, pretrained=False, kwargs=dict(BEIT_TINY))
    with torch.no_grad():  # timm starts BEiT's position bias tables at zero: make them matter
        for blk in beit.blocks:
            if blk.attn.relative_position_bias_table is not None:
                blk.attn.relative_position_bias_table.normal_(0, 1.0)
    return {"vit": vit, "beit": beit}


def build(bb, checkpointing: bool, **kw) -> PromptedViT:
    config = ModelConfig(num_classes=5, prompt_length=3, prompt_dropout=0.3, activation_checkpointing=checkpointing,
                         **kw)
    g = torch.Generator().manual_seed(0)
    model = PromptedViT(copy.deepcopy(bb), config, generator=g)
    with torch.no_grad():  # zero-initialised tensors (VPTM's prototypes) would zero every gradient before them
        for p in model.trainable_parameters():
            if not p.any():
                p.normal_(0, 0.5, generator=g)
    return model.train()


def loss_and_grads(model: PromptedViT, x: torch.Tensor, seed: int = 7) -> tuple[float, dict[str, torch.Tensor]]:
    """One seeded training forward (prompt dropout draws its masks from the seeded global RNG) and backward."""
    torch.manual_seed(seed)
    y = torch.arange(x.shape[0]) % model.num_classes
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def images(bb) -> torch.Tensor:
    size = bb.patch_embed.img_size
    return torch.randn(4, 3, *size, generator=torch.Generator().manual_seed(1))


def max_grad_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max((a[n] - b[n]).abs().max().item() for n in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointed_blocks_give_the_same_loss_and_gradients(backbones, case, monkeypatch):
    family, kw = CASES[case]
    bb = backbones[family]
    x = images(bb)
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    off_loss, off = loss_and_grads(build(bb, False, **kw), x)
    assert not calls
    on_loss, on = loss_and_grads(build(bb, True, **kw), x)
    assert len(calls) == len(bb.blocks)  # every block went through the checkpoint
    assert abs(on_loss - off_loss) <= 1e-6
    assert all(g.abs().sum() > 0 for n, g in off.items() if "prompts" in n)  # the gradients are not trivially 0
    assert max_grad_diff(on, off) <= 1e-6  # fp32: the recomputation repeats the same ops on the same values


def test_a_wrong_recompute_fails_the_same_comparison(backbones, monkeypatch):
    """The control: recomputing without restoring the RNG draws other prompt dropout masks, and the comparison
    above catches it (deep prompts: the dropout runs inside the checkpointed block)."""
    bb = backbones["vit"]
    x = images(bb)
    _, off = loss_and_grads(build(bb, False, prompt_mode="deep"), x)
    real = torch.utils.checkpoint.checkpoint

    def forgetful(*args, **kwargs):
        return real(*args, **{**kwargs, "preserve_rng_state": False})

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", forgetful)
    _, wrong = loss_and_grads(build(bb, True, prompt_mode="deep"), x)
    assert max_grad_diff(wrong, off) > 1e-3


def saved_bytes(model: PromptedViT, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(total)


def test_checkpointing_keeps_fewer_activations(backbones):
    bb = backbones["vit"]
    x = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    off = saved_bytes(build(bb, False, prompt_mode="deep"), x)
    on = saved_bytes(build(bb, True, prompt_mode="deep"), x)
    assert on < 0.5 * off, (on, off)  # a block's inputs only, against every op's saved inputs


def test_evaluation_and_no_grad_do_not_checkpoint(backbones, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1))
    bb = backbones["vit"]
    model = build(bb, True, prompt_mode="deep")
    x = images(bb)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x)
    assert not calls


# ------------------------------------------------------------------------------------------- settings
def test_owned_forward_family_refuses_checkpointing_in_one_line():
    from vptool.prompting.families import family_for

    torch.manual_seed(0)
    swin, _ = build_backbone("swin_tiny_patch4_window7_224", pretrained=False,
                             kwargs=dict(img_size=32, patch_size=4, embed_dim=8, depths=(1,), num_heads=(1,),
                                         window_size=4))
    assert family_for(swin).owns_forward
    with pytest.raises(UserError) as exc:
        PromptedViT(swin, ModelConfig(num_classes=3, prompt_mode="shallow", readout_pool="avg",
                                      activation_checkpointing=True))
    assert_one_line_naming(exc, "train.activation_checkpointing", "swin")


DEEP = dict(TINY_KWARGS, depth=4)  # with L blocks a run keeps 2L block activations, L + 2 checkpointed


def estimates(recipe) -> tuple[int, int, torch.nn.Module]:
    from vptool.engine.setup import estimate_memory

    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(DEEP))
    off, on = (estimate_memory(recipe, bb, checkpointing=c)["bytes"] for c in (False, True))
    return off, on, bb


@pytest.mark.parametrize("setting, tune, have, want", [
    ("auto", "prompts", "between", True),  # the estimate exceeds what the device has, checkpointed it fits: on
    ("auto", "prompts", "plenty", False),  # it fits: off, no recomputation
    ("auto", "head", "between", False),  # nothing flows back through the blocks: nothing to save
    ("on", "prompts", "plenty", True),
    ("off", "prompts", "between", False),
])
def test_auto_is_on_when_the_estimate_exceeds_the_device(tmp_path, monkeypatch, setting, tune, have, want):
    from vptool.engine import setup

    recipe = resolve(tiny_recipe(tmp_path, backbone={"kwargs": dict(DEEP)},
                                 train={"activation_checkpointing": setting, "tune": tune}))
    off, on, bb = estimates(recipe)
    assert on < off or tune == "head"  # checkpointing lowers the dry-run estimate where gradients flow back
    available = min((on + off) // 2, off - 1) if have == "between" else 100 * off
    monkeypatch.setattr(setup, "available_memory", lambda device: available)
    got = setup.runtime_options(recipe, bb, torch.device("cpu"))
    assert got["activation_checkpointing"] is want
    assert got["backbone_dtype"] == "fp32"  # auto on the CPU
    if want:  # the check (and --dry-run) use the checkpointed estimate, which fits
        assert setup.check_memory(recipe, bb, torch.device("cpu"))["bytes"] == on


def test_recipe_keys_reach_the_model(tmp_path):
    """``--set train.activation_checkpointing=on`` (YAML reads a bare ``on`` as true) reaches the model."""
    from vptool.engine.setup import prepare
    from vptool.recipe import parse_overrides

    raw = tiny_recipe(tmp_path, data={"dataset": "digits", "batch_size": 8})
    recipe = resolve(raw, parse_overrides(["train.activation_checkpointing=on", "backbone.dtype=bf16"]))
    assert recipe.train.activation_checkpointing == "on" and recipe.backbone.dtype == "bf16"
    model = prepare(recipe, torch.device("cpu"), check_mem=False).model
    assert model.activation_checkpointing is True
    assert model.backbone.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert "activation_checkpointing" not in model.options and "backbone_dtype" not in model.options
