"""``backbone.dtype: bf16``: the frozen backbone stored in bf16 (half its bytes), everything trained and the optimizer
state in fp32, logits within bf16's rounding of the fp32 model's, and the adapter of a bf16 model fp32 and loadable
on an fp32 backbone.

The tolerance. bf16 keeps 8 significant bits, so rounding a weight to nearest changes it by a relative error of
at most u = 2^-8, uniform in [-u, u] (RMS u / sqrt(3)). A ViT with L blocks rounds n = 6 L + 3 weight tensors on the
path to the logits (norm1, qkv, proj, norm2, fc1, fc2 per block, plus the patch embedding, the position embedding
and the final norm); to first order each adds its relative error to the output, and independent errors add in
quadrature: a norm-wise relative error of the logits near sqrt(n) u / sqrt(3). The tests allow sqrt(n) u (a
factor sqrt(3) of margin; the worst case, all errors aligned, would be n u). The head is fp32 and adds nothing.
Measured on the tiny 2-block ViT: 1.5e-3 against the allowed 1.5e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, tiny_recipe, write_recipe

import vptool
from vptool.backbones.build import build_backbone
from vptool.config import ModelConfig
from vptool.prompting.lowp import stored_bytes
from vptool.prompting.model import PromptedViT

U = 2.0 ** -8  # bf16 unit roundoff (8 significant bits, round to nearest)


def tolerance(L: int) -> float:
    return (6 * L + 3) ** 0.5 * U


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    return bb


def images(n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def pair(bb, **kw) -> tuple[PromptedViT, PromptedViT]:
    """The same model (same init) on fp32 and on bf16 frozen weights."""
    out = []
    for dtype in ("fp32", "bf16"):
        c = ModelConfig(**{"num_classes": 5, "prompt_mode": "deep", "prompt_length": 3, "backbone_dtype": dtype,
                           **kw})
        out.append(PromptedViT(copy.deepcopy(bb), c, generator=torch.Generator().manual_seed(0)).eval())
    return out[0], out[1]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kw", [{}, {"prompt_mode": "gated", "temperature": "learnable"}, {"readout_pool": "avg"}])
def test_bf16_logits_within_bf16_rounding_of_fp32(vit, kw):
    fp32, bf16 = pair(vit, **kw)
    x = images()
    with torch.no_grad():
        want, got = fp32(x), bf16(x)
    assert got.dtype == torch.float32  # computed in fp32 on the CPU: the weights are upcast a block at a time
    err = rel_err(got, want)
    assert 0 < err <= tolerance(len(vit.blocks)), err  # > 0: the weights really were rounded


def test_frozen_weights_are_stored_in_bf16_and_the_trained_ones_in_fp32(vit):
    fp32, bf16 = pair(vit, prompt_mode="gated", temperature="learnable")
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}
    assert stored_bytes(bf16.backbone) == stored_bytes(fp32.backbone) / 2  # no float buffers in a ViT
    trained = dict((n, p) for n, p in bf16.named_parameters() if p.requires_grad)
    assert {"prompts.shallow", "gates.logit", "temperature", "head.weight"} <= set(trained)
    assert {p.dtype for p in trained.values()} == {torch.float32}
    # after a forward the stored weights are back in bf16 (the fp32 copies lived inside the forward only)
    bf16(images(2))
    assert {p.dtype for p in bf16.backbone.parameters()} == {torch.bfloat16}


def test_gradients_and_optimizer_state_are_fp32(vit, tmp_path):
    from vptool.engine.schedule import make_optimizer
    from vptool.recipe import resolve

    _, model = pair(vit)
    model.train()
    opt = make_optimizer(resolve(tiny_recipe(tmp_path, train={"optimizer": "adamw"})), model.trainable_parameters())
    y = torch.arange(8) % 5
    torch.nn.functional.cross_entropy(model(images()), y).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    opt.step()
    states = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    assert states and {t.dtype for t in states} == {torch.float32}
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}


def test_under_bf16_autocast_the_stored_weights_are_used_as_they_are(vit):
    """The CUDA path (bf16 autocast): no fp32 copy; checked on the CPU's autocast, against the fp32 model under the
    same autocast, whose matmuls round the weights to bf16 too."""
    fp32, bf16 = pair(vit)
    x = images()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = fp32(x).float(), bf16(x).float()
    assert rel_err(got, want) <= tolerance(len(vit.blocks))


def test_the_adapter_of_a_bf16_model_is_fp32_and_loads_on_fp32_weights(tmp_path):
    from safetensors.torch import load_file

    model = vptool.from_preset("vpt-deep", TINY_NAME, 5, pretrained=False, backbone_kwargs=dict(TINY_KWARGS),
                               prompt_length=3, backbone_dtype="bf16")
    assert model.backbone.blocks[0].mlp.fc1.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert not any(k.startswith("backbone.") for k in tensors)
    loaded = vptool.load(tmp_path / "adapter")
    assert {p.dtype for p in loaded.backbone.parameters()} == {torch.float32}
    x = images()
    with torch.no_grad():
        err = rel_err(model.eval()(x), loaded(x))
    assert 0 < err <= tolerance(len(model.backbone.blocks))


def test_store_backbone_on_a_built_model(vit):
    """The library face: ``model.store_backbone("bf16")`` on a model built in fp32."""
    fp32, _ = pair(vit)
    model = copy.deepcopy(fp32)
    model.store_backbone("bf16")
    assert model.config.backbone_dtype == "bf16"
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert rel_err(model(images()), fp32(images())) <= tolerance(len(vit.blocks))


def test_full_fine_tune_with_bf16_weights_is_refused_in_one_line(tmp_path):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    res = invoke_cli("train", str(path), "--set", "backbone.dtype=bf16", "--set", "train.tune=all", "--dry-run")
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "backbone.dtype" in lines[0], res.stderr


#: families that run their own forward (the whole backbone's weights upcast around it on the CPU)
OWN_FORWARD = {
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, patch_size=4, embed_dim=8, depths=(2,),
                                                  num_heads=(2,), window_size=4), dict(prompt_mode="deep")),
    "resnet": ("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64], "stem_width": 8,
                            "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}},
               dict(prompt_mode="shallow", prompt_location="pad")),
}


@pytest.mark.parametrize("family", sorted(OWN_FORWARD))
def test_families_with_their_own_forward_run_on_bf16_weights(family):
    name, kwargs, kw = OWN_FORWARD[family]
    torch.manual_seed(0)
    bb, _ = build_backbone(name, pretrained=False, kwargs=kwargs)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits = []
    for dtype in ("fp32", "bf16"):
        c = ModelConfig(num_classes=5, prompt_length=2, readout_pool="avg", backbone_dtype=dtype, **kw)
        model = PromptedViT(copy.deepcopy(bb), c, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits.append(model.eval()(x))
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    n = sum(1 for _ in bb.parameters())  # the rounded tensors, all on the path to the logits
    assert 0 < rel_err(logits[1], logits[0]) <= n ** 0.5 * U  # the module doc's argument


def test_backward_keeps_the_stored_weights_not_fp32_copies(vit, monkeypatch):
    """In training (no checkpointing) what autograd saves of an upcast weight is the stored bf16 tensor, upcast
    again in the backward pass: gradients equal those of a run that keeps the fp32 copies."""
    from vptool.prompting import lowp

    def grads(model):
        model.train()
        torch.manual_seed(3)
        torch.nn.functional.cross_entropy(model(images()), torch.arange(8) % 5).backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    _, model = pair(vit)
    packed, kept = [], []
    real = lowp._saved_as_stored

    def watching(stored):
        hooks = real(stored)
        pack, unpack = hooks.pack_hook, hooks.unpack_hook

        def watched_pack(t):
            out = pack(t)
            (packed if isinstance(out, tuple) else kept).append(out)
            return out

        return torch.autograd.graph.saved_tensors_hooks(watched_pack, unpack)

    monkeypatch.setattr(lowp, "_saved_as_stored", watching)
    with_hooks = grads(model)
    assert packed and all(p[0].dtype == torch.bfloat16 for p in packed)  # qkv, proj, fc1, fc2, norms: kept bf16
    shapes = {s for p in model.backbone.parameters() for s in (p.shape, p.t().shape if p.dim() == 2 else p.shape)}
    assert not [t for t in kept if t.dtype == torch.float32 and t.shape in shapes]  # no fp32 weight kept
    monkeypatch.setattr(lowp, "_saved_as_stored", lambda stored: torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t))  # the fp32 copies kept as they are
    _, plain = pair(vit)
    without = grads(plain)
    assert with_hooks.keys() == without.keys()
    assert all(torch.equal(with_hooks[n], without[n]) for n in with_hooks)


def test_forward_intermediates_with_the_final_norm_on_bf16_weights(vit):
    fp32, bf16 = pair(vit)
    with torch.no_grad():
        want = fp32.forward_intermediates(images(2), norm=True, intermediates_only=True)
        got = bf16.forward_intermediates(images(2), norm=True, intermediates_only=True)
    assert len(got) == len(want) == len(vit.blocks)
    assert all(rel_err(g, w) <= tolerance(len(vit.blocks)) for g, w in zip(got, want))


def test_dry_run_reports_the_smaller_estimate(tmp_path):
    import json

    from vptool.engine.setup import estimate_memory
    from vptool.recipe import resolve

    raw = tiny_recipe(tmp_path)
    res = invoke_cli("train", str(write_recipe(tmp_path, raw)), "--set", "backbone.dtype=bf16", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["backbone_dtype"] == "bf16"
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    fp32 = estimate_memory(resolve(raw), bb)["bytes"]
    half = sum(p.numel() for p in bb.parameters()) * 2  # the backbone's values, 2 bytes fewer each
    assert fp32 - plan["memory_estimate_bytes"] == half
