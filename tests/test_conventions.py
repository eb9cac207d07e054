"""Every official convention selectable, with defaults that follow the backbone (issue 17).

The reference forwards here are written from each official file's convention with timm's own block modules
(``blk(x)``), independently of vptool's prompted forward:

- VPT ``vit_mae.py`` (VPT-deep): ``[CLS, P_i, patches]`` into block i, the mean of every token after CLS, then a
  new ``fc_norm`` (weight 1, bias 0);
- GateVPT ``vit_prompt/vit_mae.py``: gated shallow prompts, mean of every token after CLS, the pretrained norm;
  GateVPT ``vit_prompt/vit_moco.py``: the CLS token after the pretrained norm;
- SPT ``Models/MAE_vpt.py``: shallow prompts after CLS, mean of ``x[:, 1:]``, the pretrained norm.
"""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_naming
from test_checkpoints import NAME, TINY, randomize, vit_layout, write_mae_plain, write_mocov3

from vptool.backbones.build import build_backbone
from vptool.conventions import pretraining_of, readout_defaults
from vptool.engine.setup import build_model
from vptool.errors import UserError
from vptool.recipe import resolve

K = 5
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("conventions")
    enc = randomize(vit_layout(), seed=21)
    return {"mae": write_mae_plain(enc, d / "mae_pretrain_vit_base.pth"),
            "mocov3": write_mocov3(enc, d / "vit-b-300ep.pth.tar")}


def recipe_for(method: str, checkpoint: Path, fmt: str = "auto", **sections):
    raw = {"method": method, "backbone": {"name": NAME, "pretrained": False, "checkpoint": str(checkpoint),
                                          "format": fmt, "kwargs": dict(TINY)},
           "data": {"dataset": "digits"}, "prompt": {"length": 3, "init": "xavier"}, **sections}
    return resolve(raw)


def built(method: str, path: Path, fmt: str, **sections):
    r = recipe_for(method, path, fmt, **sections)
    bb, info = build_backbone(r.backbone.name, False, r.backbone.checkpoint, r.backbone.kwargs, format=fmt)
    model = build_model(r, bb, info, K).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # trained-looking tensors: prompts, gates and head away from their init
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return r, model


def images() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(8))


def embed(bb, x):
    """timm's embedding (CLS + absolute position embedding): (B, 1 + N, D)."""
    return bb._pos_embed(bb.patch_embed(x))


def vpt_deep_mae_reference(model, x):
    bb = model.backbone
    h = embed(bb, x)
    P = model.prompts.deep.detach()
    Np = P.shape[1]
    for i, blk in enumerate(bb.blocks):
        h = torch.cat([h[:, :1], P[i].expand(h.shape[0], -1, -1), h[:, 1 + (Np if i else 0):]], dim=1)
        h = blk(h)
    z = h[:, 1:].mean(dim=1)
    z = F.layer_norm(z, (z.shape[-1],), model.fc_norm.weight, model.fc_norm.bias, 1e-6)
    return z


def gated_reference(model, x, pool: str):
    bb = model.backbone
    h = embed(bb, x)
    P = model.prompts.shallow.detach()
    Np = P.shape[0]
    h = torch.cat([h[:, :1], P.expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
    g = model.gates.logit.detach().sigmoid()
    L = len(bb.blocks)
    for i, blk in enumerate(bb.blocks):
        y = blk(h)  # temperature 1: at init of the learnable temperature and after clamping to [0.01, 10]
        if i < L - 1:
            y = torch.cat([y[:, :1], g[i] * y[:, 1:1 + Np] + (1 - g[i]) * h[:, 1:1 + Np], y[:, 1 + Np:]], dim=1)
        h = y
    return bb.norm(h[:, 1:].mean(dim=1)) if pool == "mean" else bb.norm(h)[:, 0]


def spt_shallow_mae_reference(model, x):
    bb = model.backbone
    h = embed(bb, x)
    P = model.prompts.shallow.detach()
    h = torch.cat([h[:, :1], P.expand(h.shape[0], -1, -1), h[:, 1:]], dim=1)
    for blk in bb.blocks:
        h = blk(h)
    return bb.norm(h[:, 1:].mean(dim=1))


def features(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def test_vpt_on_mae_reads_every_token_after_cls_then_a_fresh_norm(files):
    r, model = built("vpt-deep", files["mae"], "mae", prompt={"length": 3, "init": "xavier", "dropout": 0.0})
    assert (r.readout.pool, r.readout.norm) == ("avg_all", "fresh")
    with torch.no_grad():
        model.fc_norm.weight.fill_(1.0)  # frozen in prompt tuning: weight 1, bias 0 as VPT's new fc_norm
        model.fc_norm.bias.zero_()
        torch.testing.assert_close(features(model, images()), vpt_deep_mae_reference(model, images()),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,pool,want", [("mae", "mean", ("avg_all", "pretrained")),
                                           ("mocov3", "cls", ("cls", "pretrained"))])
def test_gatevpt_follows_its_official_code_per_backbone(files, fmt, pool, want):
    # the MoCo v3 file is recognised by its keys; the plain MAE encoder file needs format: mae (timm's layout)
    r, model = built("gatevpt", files[fmt], "mae" if fmt == "mae" else "auto")
    assert (r.readout.pool, r.readout.norm) == want  # on MoCo: CLS, as GateVPT's vit_moco.py
    with torch.no_grad():
        model.temperature.fill_(1.0)
        torch.testing.assert_close(features(model, images()), gated_reference(model, images(), pool),
                                   atol=1e-5, rtol=1e-5)


def test_spt_on_mae_and_vpt_on_moco(files):
    r, model = built("spt-shallow", files["mae"], "mae")
    assert (r.readout.pool, r.readout.norm) == ("avg_all", "pretrained")
    with torch.no_grad():
        torch.testing.assert_close(features(model, images()), spt_shallow_mae_reference(model, images()),
                                   atol=1e-5, rtol=1e-5)
    r, _ = built("vpt-shallow", files["mocov3"], "auto")
    assert (r.readout.pool, r.readout.norm) == ("cls", "pretrained")


def test_explicit_readout_values_are_kept_and_auto_is_resolved_each_key_alone(files):
    r, _ = built("vpt-deep", files["mae"], "mae", readout={"pool": "cls"})
    assert (r.readout.pool, r.readout.norm) == ("cls", "fresh")


def test_pretraining_and_table():
    assert pretraining_of("vit_base_patch16_224", "mae") == "mae"
    assert pretraining_of("vit_base_patch16_224", "mocov3-linear") == "mocov3"
    assert pretraining_of("vit_base_patch16_224.mae") == "mae"
    assert pretraining_of("vit_base_patch16_224.augreg_in21k") == "supervised"
    assert pretraining_of("vit_digits_mae") == "mae"
    assert pretraining_of("beitv2_base_patch16_224", None, "beit") == "beit"
    assert readout_defaults("vpt", "supervised", has_class_token=False) == ("avg", "pretrained")
    assert readout_defaults("vptm", "beit") == ("mask", "pretrained")


def test_resume_accepts_the_original_auto_recipe(files):
    from vptool.engine.train import recipe_changes

    saved, _ = built("gatevpt", files["mocov3"], "auto")
    again = recipe_for("gatevpt", files["mocov3"])
    assert again.readout.pool == "auto" and recipe_changes(saved, again) == []
    again.readout.norm = "fresh"  # a real change is still refused
    assert [k for k, *_ in recipe_changes(saved, again)] == ["readout.norm"]


def test_dry_run_prints_the_resolved_readout(files, tmp_path):
    from vptool.engine.setup import dry_run

    r = recipe_for("gatevpt", files["mae"], "mae", data={"dataset": "digits", "num_classes": 10})
    plan = dry_run(r)
    assert plan["recipe"]["readout"] == {"pool": "avg_all", "norm": "pretrained"}
    assert any(line.startswith("readout.pool: auto -> avg_all (gatevpt convention, mae backbone)")
               for line in plan["resolved"])


# ----------------------------------------------------------------------------------------------- head init
def test_official_head_init_statistics():
    from vptool.prompting.heads import build_head

    D, Kbig = 512, 2000  # a large head: fan_out = K
    _, head = build_head("linear", D, Kbig, generator=torch.Generator().manual_seed(0), init="official")
    std = head.weight.detach().std().item()
    assert abs(std / math.sqrt(2 / Kbig) - 1) < 0.05, std
    assert abs(head.weight.detach().mean().item()) < 0.05 * math.sqrt(2 / Kbig)
    assert torch.equal(head.bias.detach(), torch.full((Kbig,), -math.log(99.0)))
    _, plain = build_head("linear", D, Kbig, generator=torch.Generator().manual_seed(0))
    assert abs(plain.weight.detach().std().item() / 0.02 - 1) < 0.05 and not plain.bias.detach().any()
    _, mlp = build_head("mlp2", D, Kbig, head_dim=256, generator=torch.Generator().manual_seed(0), init="official")
    assert abs(mlp.fc1.weight.detach().std().item() / math.sqrt(2 / 256) - 1) < 0.05
    assert not mlp.fc1.bias.detach().any() and torch.equal(mlp.fc2.bias.detach(), torch.full((Kbig,), -math.log(99)))


def test_official_head_init_through_the_recipe_and_refused_for_the_verbalizer(files):
    _, model = built("vpt-shallow", files["mocov3"], "auto", head={"init": "official"})
    assert model.options["head_init"] == "official"
    fresh = build_model(recipe_for("vpt-shallow", files["mocov3"], head={"init": "official"}),
                        *build_backbone(NAME, False, str(files["mocov3"]), dict(TINY)), K)
    assert torch.equal(fresh.head.bias.detach(), torch.full((K,), -math.log(99.0)))
    from vptool.recipe import RecipeError

    with pytest.raises(RecipeError, match="head.init"):
        recipe_for("vptm", files["mae"], head={"init": "official"})


# ----------------------------------------------------------------------------------------------- families
REG_KW = dict(img_size=28, patch_size=14, embed_dim=32, depth=2, num_heads=2)
REG_NAME = "vit_small_patch14_reg4_dinov2"


def test_dinov2_registers_train_one_vpt_deep_step_and_prefix_equals_concat():
    from vptool.engine.train import make_optimizer
    from vptool.prompting.model import PromptedViT

    torch.manual_seed(0)
    bb, info = build_backbone(REG_NAME, pretrained=False, kwargs=dict(REG_KW))
    assert bb.num_prefix_tokens == 5  # CLS + 4 registers
    r = resolve({"method": "vpt-deep", "backbone": {"name": REG_NAME, "pretrained": False, "kwargs": REG_KW},
                 "data": {"dataset": "digits"}, "prompt": {"length": 3, "dropout": 0.0}})
    model = build_model(r, bb, info, K)
    x = torch.randn(4, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.prompts.deep.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    concat = PromptedViT(bb, K, prompt_mode="deep", prompt_length=3, deep_form="concat",
                         prompt_values=model.prompts.deep.detach())
    with torch.no_grad():
        got, want = model.forward_features(x), concat.forward_features(x)
    assert got.shape == (4, 5 + 4, 32)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the concatenated form written here: [CLS, registers, P_i, patches] into each timm block
    h = bb._pos_embed(bb.patch_embed(x))
    for i, blk in enumerate(bb.blocks):
        h = blk(torch.cat([h[:, :5], model.prompts.deep[i].detach().expand(4, -1, -1), h[:, 5:]], dim=1))
        h = torch.cat([h[:, :5], h[:, 8:]], dim=1)
    torch.testing.assert_close(got, h.detach(), atol=1e-5, rtol=0)
    model.train()
    opt = make_optimizer(r, model.trainable_parameters())
    before = model.prompts.deep.detach().clone()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.prompts.deep.detach())


@pytest.mark.parametrize("name,kwargs,needle", [
    ("eva02_tiny_patch14_224", dict(img_size=28, depth=1), "EVA"),
    ("swinv2_tiny_window8_256",  # Swin V1 is a family (test_swin.py); V2 is not
     dict(img_size=32, patch_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4), "Swin"),
])
def test_unsupported_families_are_refused_at_build_time_in_one_line(name, kwargs, needle):
    with pytest.raises(UserError) as exc:
        build_backbone(name, pretrained=False, kwargs=kwargs)
    assert_one_line_naming(exc, "backbone.name", repr(name), needle)


def test_forward_intermediates_matches_timms_own():
    from vptool.prompting.model import PromptedViT

    torch.manual_seed(0)
    bb, _ = build_backbone(REG_NAME, pretrained=False, kwargs=dict(REG_KW))
    model = PromptedViT(bb, K, prompt_mode="none", readout_pool="avg").eval()
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for kw in (dict(indices=None), dict(indices=[0], stop_early=True), dict(indices=1, norm=True),
                   dict(indices=[-1], output_fmt="NLC", return_prefix_tokens=True)):
            want = bb.forward_intermediates(x, intermediates_only=True, **kw)
            got = model.forward_intermediates(x, intermediates_only=True, **kw)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
                    torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
        final, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))


def test_engine_calls_no_private_model_method():
    out = subprocess.run(["grep", "-rnE", r"\._run|\._rel_bias|\._block_bias", str(ROOT / "vptool" / "engine")],
                         capture_output=True, text=True)
    assert out.stdout == "", out.stdout


# ----------------------------------------------------------------------------------------------- imports
def _modules() -> dict[str, Path]:
    out = {}
    for f in (ROOT / "vptool").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(path: Path, top_level_only: bool, known: dict) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for n in nodes:
        if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module and n.module.startswith("vptool"):
            found.add(n.module)
            found.update(f"{n.module}.{a.name}" for a in n.names)
        elif isinstance(n, ast.Import):
            found.update(a.name for a in n.names if a.name.startswith("vptool"))
    return {m for m in found if m in known}


def test_module_level_imports_form_no_cycle():
    mods = _modules()
    graph = {m: _imports(p, True, mods) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # the engine's init-prompts step needs only the runtime helpers, never the run setup
    assert "vptool.engine.setup" not in _imports(mods["vptool.engine.init_prompts"], False, mods)


#: run in a fresh interpreter: third-party libraries load once, then each vptool module is imported alone in a
#: forked child that has no vptool module loaded yet (an import cycle fails there whatever the order)
_ALONE = """
import importlib, os, sys, traceback
import numpy, torch, torchvision, timm, yaml, safetensors, typer, rich  # noqa: F401  (third-party, shared)
failed = []
for m in sys.argv[1:]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            importlib.import_module(m)
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().strip().splitlines()[-1].encode())
            code = 1
        os._exit(code)
    os.close(w)
    msg = os.read(r, 4096).decode()
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status:
        failed.append(f"{m}: {msg}")
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_each_module_imports_alone_in_a_fresh_interpreter():
    mods = sorted(m for m in _modules() if not m.endswith("__main__"))
    out = subprocess.run([sys.executable, "-c", _ALONE, *mods], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
