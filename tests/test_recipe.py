"""Recipe schema: strict keys, types, required keys, presets, overrides, shipped recipes, lr schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from vptool.errors import RecipeError, UserError
from vptool.recipe import PRESETS, load_recipe, parse_overrides, register_preset, resolve

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))
BASE = {"method": "vpt-deep", "backbone": {"name": "vit_digits_mae"}, "data": {"dataset": "digits"}}


def problems(raw: dict, overrides: dict | None = None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        resolve(raw, overrides)
    return info.value.problems


@pytest.mark.parametrize("raw,expected", [
    ({**BASE, "prompt": {"lenght": 10}}, "prompt.lenght: unknown key; did you mean prompt.length?"),
    ({**BASE, "promt": {"length": 10}}, "promt: unknown key; did you mean prompt?"),
    ({**BASE, "lr": 0.1}, "lr: unknown key; did you mean train.lr?"),
    ({**BASE, "train": {"epochs": "ten"}}, "train.epochs: expected int, got str 'ten'"),
    ({**BASE, "train": {"epochs": 2.5}}, "train.epochs: expected int, got float 2.5"),
    ({**BASE, "prompt": {"trainable": "yes"}}, "prompt.trainable: expected bool, got str 'yes'"),
    ({**BASE, "prompt": {"mode": "depp"}}, "prompt.mode: 'depp' is not one of 'none' | 'shallow' | 'deep' | "
                                           "'gated'; did you mean 'deep'?"),
    ({"backbone": {"name": "x"}, "data": {"dataset": "digits"}}, "method: missing required key"),
    ({**BASE, "method": "vpt-deeep"}, "method: unknown preset 'vpt-deeep'; did you mean 'vpt-deep'?"),
    ({**BASE, "data": {"dataset": "imagefolder"}}, "data.root: missing"),
    ({**BASE, "method": "vpt-deep", "prompt": {"mode": "none"}}, "train.tune: 'prompts' but nothing but the head"),
    ({**BASE, "readout": {"pool": "mask"}}, "readout.pool: 'mask' reads the [MASK] token; set tokens.mask"),
    ({**BASE, "method": "vptm", "tokens": {"order": "CXP"}}, "tokens.order: 'CXP' must start with C and use each "
                                                              "of CMPX once"),
    ({**BASE, "tokens": {"mask": "auto", "order": "XCPM"}}, "tokens.order: 'XCPM' must start with C"),
    ({**BASE, "prompt": {"gate": "gumbel"}}, "prompt.gate: 'gumbel' is not one of 'soft' | 'hard'"),
    ({**BASE, "attention": {"temperature": "on"}}, "attention.temperature: 'on' is not one of 'fixed' | 'learnable'"),
    ({**BASE, "attention": {"temperature_min": 0.0}}, "attention.temperature_min: need 0 < temperature_min"),
    ({**BASE, "head": {"type": "verbaliser"}}, "head.type: 'verbaliser' is not one of"),
    ({**BASE, "head": {"dim": 0}}, "head.dim: 0 is below the minimum 1"),
    ({**BASE, "data": {"dataset": "digits", "num_classes": 1}}, "data.num_classes: 1 is below the minimum 2"),
])
def test_each_problem_is_one_line_naming_the_key(raw, expected):
    found = problems(raw)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found[0]
    assert "\n" not in found[0]


def test_all_problems_reported_at_once():
    raw = {**BASE, "prompt": {"lenght": 3, "dropout": "x"}, "train": {"epoch": 3}, "seed": "s"}
    found = problems(raw)
    assert len(found) == 4
    assert {f.split(":")[0] for f in found} == {"prompt.lenght", "prompt.dropout", "train.epoch", "seed"}


def test_overrides_go_through_the_schema():
    assert resolve(BASE, parse_overrides(["train.lr=0.05", "prompt.length=7"])).train.lr == 0.05
    found = problems(BASE, parse_overrides(["train.lrr=0.05"]))
    assert found == ["train.lrr: unknown key; did you mean train.lr?"]
    assert problems(BASE, parse_overrides(["train.epochs=abc"]))[0].startswith("train.epochs: expected int")
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        parse_overrides(["train.lr"])


@pytest.mark.parametrize("method,mode,tune,optimizer,dropout", [
    ("linear", "none", "head", "sgd", 0.0),
    ("full", "none", "all", "adamw", 0.0),
    ("vpt-shallow", "shallow", "prompts", "sgd", 0.0),
    ("vpt-deep", "deep", "prompts", "sgd", 0.1),
    ("gatevpt", "gated", "prompts", "sgd", 0.1),
    ("vptm", "shallow", "prompts", "adamw", 0.0),
])
def test_presets_fill_defaults_recipe_overrides(method, mode, tune, optimizer, dropout):
    r = resolve({**BASE, "method": method})
    assert (r.prompt.mode, r.train.tune, r.train.optimizer, r.prompt.dropout) == (mode, tune, optimizer, dropout)
    if mode != "none":
        r2 = resolve({**BASE, "method": method, "prompt": {"dropout": 0.3}})
        assert r2.prompt.dropout == 0.3 and r2.prompt.mode == mode


def test_method_presets_set_their_papers_options():
    g = resolve({**BASE, "method": "gatevpt"})
    assert (g.prompt.gate_init, g.prompt.gate, g.attention.temperature, g.readout.pool, g.readout.norm) == (
        5.0, "soft", "learnable", "auto", "auto")  # resolved per backbone when the run starts (test_conventions)
    v = resolve({**BASE, "method": "vptm"})
    assert (v.prompt.init, v.prompt.length, v.tokens.mask, v.tokens.order, v.readout.pool, v.head.type,
            v.head.dim, v.train.lr, v.train.weight_decay) == ("zeros", 20, "auto", "CXPM", "mask", "verbalizer",
                                                               128, 1e-3, 0.01)
    # presets compose with any other axis: VPTM with deep prompts, GateVPT with a verbalizer
    assert resolve({**BASE, "method": "vptm", "prompt": {"mode": "deep"}}).prompt.mode == "deep"
    assert resolve({**BASE, "method": "gatevpt", "head": {"type": "verbalizer"}}).head.type == "verbalizer"


def test_duplicate_preset_rejected():
    with pytest.raises(ValueError, match="vpt-deep"):
        register_preset("vpt-deep", "again", {})
    assert PRESETS["vpt-deep"].description.startswith("VPT-deep")


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_name_their_command(path):
    recipe = load_recipe(path)
    assert recipe.output.name == path.stem
    first = path.read_text().splitlines()[0]
    assert first == f"# vptool train recipes/{path.name}"
    # the resolved recipe is a fixed point: dumping and re-reading gives the same recipe
    again = resolve(yaml.safe_load(yaml.safe_dump(recipe.to_dict())))
    assert again == recipe


def test_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(UserError, match="line"):
        load_recipe(bad)
    code = tmp_path / "code.yaml"
    code.write_text("method: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(UserError):
        load_recipe(code)
    assert not (Path.cwd() / "pwned").exists()


def test_lr_schedule_warmup_then_cosine_never_zero():
    from vptool.engine.train import effective_lr, lr_factor

    total, warm = 50, 10
    f = [lr_factor(s, total, warm) for s in range(total)]
    assert f[:warm] == pytest.approx([(s + 1) / 10 for s in range(10)])
    for s in range(warm, total):
        assert f[s] == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm))))
    assert min(f) > 0 and f[warm] == 1.0
    r = resolve({**BASE, "train": {"lr": 0.5, "lr_scaling": "linear"}, "data": {"dataset": "digits",
                                                                               "batch_size": 32}})
    assert effective_lr(r) == pytest.approx(0.5 * 32 / 256)
