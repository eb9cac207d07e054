"""The typed model config (``vptool.config.ModelConfig``), prompt modes as units and the one builder.

- adapter folders written by vptool 0.1.0 before ``ModelConfig`` existed (``tests/data/adapters_v0_1_0``, made by
  main at 753312a) still load, and give the logits that version computed on the same input;
- the config is the constructor input, the schema and the saved form: the keyword form and the config form build
  the same model, ``to_dict``/``from_dict`` round-trip, the recipe's sections take its defaults and help;
- every prompt mode is a unit in its own file, registered once, and no module outside the units names a mode.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import shutil
import typing
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vptool
from vptool.config import ModelConfig, field_names
from vptool.prompting.model import PromptedViT

DATA = Path(__file__).parent / "data" / "adapters_v0_1_0"
PKG = Path(vptool.__file__).parent


@pytest.mark.parametrize("name", ["gatevpt_v010", "vptdeep_v010"])
def test_adapters_written_by_vptool_0_1_0_still_load_with_the_same_logits(tmp_path, name):
    shutil.copytree(DATA / name, tmp_path / name)  # load never writes, but keep the fixture untouched anyway
    want = load_file(str(DATA / "expected_logits.safetensors"))
    model = vptool.load(tmp_path / name)
    with torch.no_grad():
        got = model(want["x"])
    assert torch.allclose(got, want[name], atol=1e-5), (got - want[name]).abs().max()
    saved = json.loads((DATA / name / "adapter_config.json").read_text())["model"]
    # the same "model" section is written back (prompts load from the adapter, so their init reads "zeros"),
    # plus the options added since 0.1.0 at their defaults
    written = {**model.options, "prompt_init": saved["prompt_init"]}
    assert {k: written.get(k) for k in saved} == saved
    added = {k: v for k, v in written.items() if k not in saved}
    assert added == {k: ModelConfig().to_dict()[k] for k in added}
    assert model.config.num_classes == len(json.loads((DATA / name / "adapter_config.json").read_text())["classes"])


def test_config_form_equals_keyword_form(tiny_backbone):
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    kw = PromptedViT(tiny_backbone, 5, "gated", 4, readout_pool="avg_all", temperature="learnable", generator=g1)
    cfg = ModelConfig(num_classes=5, prompt_mode="gated", prompt_length=4, readout_pool="avg_all",
                      temperature="learnable")
    typed = PromptedViT(tiny_backbone, cfg, generator=g2)
    assert kw.config == typed.config
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(kw.eval()(x), typed.eval()(x))


def test_config_round_trips_through_its_saved_form():
    cfg = ModelConfig(num_classes=7, prompt_mode="deep", prompt_length=3, temperature_range=(0.1, 2.0),
                      token_order="CPX", head="verbalizer", head_dim=16)
    saved = json.loads(json.dumps(cfg.to_dict()))
    back, unknown = ModelConfig.from_dict({**saved, "from_the_future": 1}, num_classes=7)
    assert back.replace(prompt_file=cfg.prompt_file) == cfg and unknown == ["from_the_future"]
    assert "num_classes" not in saved and "prompt_file" not in saved


def test_bad_values_are_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match=r"prompt_mode='prefix' is not one of 'none', 'shallow', 'deep', 'gated'"):
        ModelConfig(num_classes=2, prompt_mode="prefix").validate()
    with pytest.raises(ValueError, match="unknown option 'prompt_style'"):
        ModelConfig().replace(prompt_style="x")


def test_recipe_sections_take_the_config_declaration():
    """Each model option is declared once (ModelConfig): the recipe key it names has its type, default and help
    (the readout's recipe keys add ``auto``)."""
    from vptool import recipe as rc

    sections = {"prompt": rc.PromptConfig, "attention": rc.AttentionConfig, "tokens": rc.TokensConfig,
                "readout": rc.ReadoutConfig, "head": rc.HeadConfig, "train": rc.TrainConfig}
    hints = typing.get_type_hints(ModelConfig)
    checked = 0
    for f in dataclasses.fields(ModelConfig):
        key = f.metadata["key"]
        if not isinstance(key, str):
            continue
        section, name = key.split(".")
        rf = {x.name: x for x in dataclasses.fields(sections[section])}[name]
        assert rf.metadata.get("model") == f.name, key
        rtype = typing.get_type_hints(sections[section])[name]
        if section == "readout":
            assert typing.get_args(rtype) == ("auto", *typing.get_args(hints[f.name])), key
            assert rf.default == "auto"
        else:
            assert rtype == hints[f.name] and rf.default == f.default and rf.metadata["help"] == f.metadata["help"]
        checked += 1
    assert checked == 21  # every model option with one recipe key (prompt.location, location_form, swin_merge)
    r = rc.resolve({"method": "gatevpt", "data": {"dataset": "digits"}, "backbone": {"name": "x"}})
    cfg = r.model_config(num_classes=3)
    assert (cfg.prompt_mode, cfg.prompt_length, cfg.temperature, cfg.temperature_range, cfg.tune) == (
        "gated", 100, "learnable", (0.01, 10.0), "prompts")


# ----------------------------------------------------------------------------------------------- prompt modes
def test_every_registered_mode_is_a_unit_in_its_own_file():
    from vptool.options import PROMPT_MODES, PromptMode
    from vptool.prompting.modes import mode_for

    assert typing.get_args(PromptMode) == tuple(PROMPT_MODES)
    for name, file in PROMPT_MODES.items():
        assert (PKG / "prompting" / "modes" / f"{file}.py").is_file(), name
        assert mode_for(name).name == name


def test_shapes_and_levels_follow_the_papers():
    from vptool.prompting.modes import mode_for

    L, Np, D = 4, 3, 8
    assert mode_for("shallow").shape(L, Np, D) == (Np, D)  # VPT eq. 4: one set
    assert mode_for("gated").shape(L, Np, D) == (Np, D)  # GateVPT: shallow prompts + gates
    assert mode_for("deep").shape(L, Np, D) == (L, Np, D)  # VPT eq. 7: a set per block
    assert mode_for("deep").init_levels(L, "same") == [0, 1, 2, 3]  # SPT: set i from the input of block i + 1
    assert mode_for("shallow").init_levels(L, "last") == [L]
    assert mode_for("deep").trained_values(L, Np, D) == L * Np * D
    assert not mode_for("none").has_prompts and mode_for("none").tensor_name is None


def _mode_literals(tree: ast.AST) -> list[str]:
    modes = {"shallow", "deep", "gated", "prompts.deep", "prompts.shallow"}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                out += [v.value for v in values if isinstance(v, ast.Constant) and v.value in modes]
    return out


def test_no_module_outside_the_units_compares_against_a_mode_name():
    offenders = {}
    for path in PKG.rglob("*.py"):
        if "modes" in path.relative_to(PKG).parts:
            continue
        found = _mode_literals(ast.parse(path.read_text(encoding="utf-8")))
        if found:
            offenders[str(path.relative_to(PKG))] = found
    assert not offenders, offenders
    assert _mode_literals(ast.parse('if mode == "deep": pass')) == ["deep"]  # the check itself can fail


# ----------------------------------------------------------------------------------------------- one builder
def test_one_builder_serves_training_load_and_presets():
    """``engine.setup.build_model``, ``vptool.load`` and ``from_preset`` all build through ``vptool.builder``;
    none constructs ``PromptedViT`` itself."""
    for rel in ("engine/setup.py", "adapter.py"):
        tree = ast.parse((PKG / rel).read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "PromptedViT"]
        assert not calls, rel
        assert any(isinstance(n, ast.ImportFrom) and n.module == "vptool.builder" for n in ast.walk(tree)), rel
    assert set(field_names()) >= {"prompt_mode", "readout_pool", "head", "tune"}


def test_every_registered_family_is_one_file_converting_its_registered_formats():
    """``vptool.options.BACKBONE_FAMILIES`` is the one registration (the recipe's ``backbone.format`` choices come
    from it without importing torch); each family file's ``FAMILY`` converts exactly the formats registered."""
    from vptool.options import BACKBONE_FAMILIES, BackboneFormat
    from vptool.prompting.families import family_table

    assert [spec.name for spec in family_table()] == list(BACKBONE_FAMILIES)
    for spec in family_table():
        assert (PKG / "prompting" / "families" / f"{spec.name}.py").is_file()
        assert tuple(f.name for f in spec.formats) == BACKBONE_FAMILIES[spec.name], spec.name
    formats = [f for fs in BACKBONE_FAMILIES.values() for f in fs]
    assert typing.get_args(BackboneFormat) == ("auto", *formats) and len(set(formats)) == len(formats)
