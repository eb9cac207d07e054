"""One file per backbone family: its checkpoint formats (converters and their detection), constructor kwargs,
pretraining rule and readout conventions live in ``vptool/prompting/families/<family>.py``, registered in the one
family table; the generic modules (``backbones/build.py``, ``backbones/convert.py``, ``conventions.py``) name no
family and no format, and the family files never import upwards.

The source checks parse the files with ``ast`` (independently of the table); the table checks read
``family_table()``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FAMILIES_DIR = ROOT / "vptool" / "prompting" / "families"
GENERIC = ("vptool/backbones/build.py", "vptool/backbones/convert.py", "vptool/conventions.py")

#: names that must not appear as string literals in the generic modules (besides docstrings): the families and
#: their checkpoint formats as of this test, whatever the table says.
KNOWN_FAMILIES = ("vit", "beit")
KNOWN_FORMATS = ("timm", "mae", "mocov3", "mocov3-linear", "jax-npz", "beitv2-pretrain")

#: modules a family file must not import, at module top or inside a function (the layers above it).
UPWARD = ("vptool.backbones.build", "vptool.backbones.convert", "vptool.recipe", "vptool.engine", "vptool.adapter",
          "vptool.cli")


def _tree(rel: str) -> ast.Module:
    return ast.parse((ROOT / rel).read_text())


def _docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are module/class/function docstrings."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _string_literals(tree: ast.Module) -> list[tuple[int, str]]:
    docs = _docstrings(tree)
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def _imported_modules(tree: ast.Module) -> list[tuple[int, str, list[str]]]:
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append((n.lineno, n.module, [a.name for a in n.names]))
        elif isinstance(n, ast.Import):
            out.extend((n.lineno, a.name, []) for a in n.names)
    return out


# ------------------------------------------------------------------------------------------ generic modules
@pytest.mark.parametrize("rel", GENERIC)
def test_generic_modules_compare_with_no_family_or_format_name(rel):
    """No ``family == "beit"``, ``fmt == "beitv2-pretrain"``, ``fmt == "timm"`` ... in a comparison."""
    bad = []
    for node in ast.walk(_tree(rel)):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                if isinstance(operand, ast.Constant) and operand.value in KNOWN_FAMILIES + KNOWN_FORMATS:
                    bad.append(f"{rel}:{node.lineno} compares with {operand.value!r}")
    assert bad == [], bad


@pytest.mark.parametrize("rel", GENERIC)
def test_generic_modules_hold_no_family_or_format_literal(rel):
    """Nor ``module="beit"`` or a format table keyed by format names: every such string lives in a family file
    (docstrings may still name them)."""
    bad = [f"{rel}:{line} {value!r}" for line, value in _string_literals(_tree(rel))
           if value in KNOWN_FAMILIES + KNOWN_FORMATS]
    assert bad == [], bad


@pytest.mark.parametrize("rel", GENERIC)
def test_generic_modules_define_no_converter_or_detection(rel):
    """The converters, detection rules, constructor kwargs and MAE-encoder check are defined in the family files
    (the generic modules may re-export them)."""
    defined = {n.name for n in ast.walk(_tree(rel)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    family_like = sorted(d for d in defined if d.startswith(("convert_", "_is_", "is_")) or "beit" in d or
                         "mae" in d or d in ("_format_kwargs", "_check_rel_pos_index"))
    assert family_like == [], family_like


def test_backbone_build_does_not_import_the_recipe():
    imported = [m for _, m, _ in _imported_modules(_tree("vptool/backbones/build.py"))]
    assert not any(m == "vptool.recipe" or m.startswith("vptool.recipe.") for m in imported), imported


# ------------------------------------------------------------------------------------------------- layering
def _family_files() -> list[Path]:
    return sorted(FAMILIES_DIR.glob("*.py"))


@pytest.mark.parametrize("path", _family_files(), ids=lambda p: p.name)
def test_family_files_never_import_upwards(path):
    bad = [f"{path.name}:{line} imports {m}" for line, m, _ in _imported_modules(ast.parse(path.read_text()))
           if any(m == u or m.startswith(u + ".") for u in UPWARD)]
    assert bad == [], bad


@pytest.mark.parametrize("rel", [*GENERIC, "vptool/backbones/statedict.py", "vptool/backbones/kwargs.py",
                                 "vptool/recipe.py", *(str(p.relative_to(ROOT)) for p in _family_files())])
def test_no_private_name_is_imported_from_another_module(rel):
    bad = [f"{rel}:{line} imports {name} from {m}" for line, m, names in _imported_modules(_tree(rel))
           if m.startswith("vptool") for name in names if name.startswith("_")]
    assert bad == [], bad


# ----------------------------------------------------------------------------------------------- the table
def _table():
    from vptool.prompting.families import FAMILY_FILES, family_table

    return FAMILY_FILES, family_table()


def test_one_family_per_registered_file_named_after_it():
    files, table = _table()
    assert [spec.name for spec in table] == list(files)
    assert sorted(p.stem for p in _family_files() if p.stem != "__init__") == sorted(files)
    for spec in table:
        assert spec.ops.name == spec.name
        assert type(spec.ops).__module__ == f"vptool.prompting.families.{spec.name}"


def test_each_family_s_units_live_in_its_own_file():
    _, table = _table()
    for spec in table:
        home = f"vptool.prompting.families.{spec.name}"
        units = {"problem": spec.problem, "pretraining": spec.pretraining,
                 "constructor_kwargs": spec.constructor_kwargs, "check_loaded": spec.check_loaded}
        for fmt in spec.formats:
            units.update({f"{fmt.name}.convert": fmt.convert, f"{fmt.name}.signature": fmt.signature,
                          f"{fmt.name}.detect": fmt.detect, f"{fmt.name}.after_auto_load": fmt.after_auto_load})
        elsewhere = {k: f.__module__ for k, f in units.items() if f is not None and f.__module__ != home}
        assert elsewhere == {}, (spec.name, elsewhere)
        source = (FAMILIES_DIR / f"{spec.name}.py").read_text()
        assert "FAMILY = FamilySpec(" in source


def test_the_family_files_own_today_s_formats_and_pretrainings():
    _, table = _table()
    by_family = {spec.name: [f.name for f in spec.formats] for spec in table}
    assert by_family == {"vit": ["timm", "mae", "mocov3", "mocov3-linear", "jax-npz"], "beit": ["beitv2-pretrain"],
                         "swin": ["swin-microsoft"], "convnext": [], "resnet": []}  # ConvNets: timm format
    assert {spec.name: spec.pretrainings for spec in table} == {"vit": ("supervised", "mae", "mocov3"),
                                                                "beit": ("beit",), "swin": (),
                                                                "convnext": ("convnet",), "resnet": ()}


def test_format_names_are_unique_and_detection_ranks_distinct():
    _, table = _table()
    formats = [f for spec in table for f in spec.formats]
    assert len({f.name for f in formats}) == len(formats)
    assert len({f.detect_rank for f in formats}) == len(formats)


def test_every_family_gives_a_readout_for_each_of_its_pretrainings_and_every_convention():
    from vptool.conventions import CONVENTIONS

    _, table = _table()
    all_pretrainings = [p for spec in table for p in spec.pretrainings]
    assert len(set(all_pretrainings)) == len(all_pretrainings)
    for spec in table:
        assert set(spec.readout) == {(c, p) for c in CONVENTIONS for p in spec.pretrainings}, spec.name
        for fmt in spec.formats:
            assert fmt.pretraining is None or fmt.pretraining in all_pretrainings, fmt.name


def test_generic_tables_are_the_family_table_s():
    from vptool import conventions
    from vptool.backbones import convert

    _, table = _table()
    formats = {f.name: f for spec in table for f in spec.formats}
    assert list(convert.CONVERTERS) == list(formats)
    assert all(convert.CONVERTERS[n] is f.convert for n, f in formats.items())
    assert {n: s for n, (s, _) in convert.SIGNATURES.items()} == {n: f.signature for n, f in formats.items()}
    assert conventions.PRETRAINING == tuple(p for spec in table for p in spec.pretrainings)
    assert conventions.READOUT_DEFAULTS == {k: v for spec in table for k, v in spec.readout.items()}


def test_moved_names_still_import_from_their_old_modules():
    from vptool.backbones import build, convert
    from vptool.prompting.families import beit, vit

    assert build.looks_like_mae_encoder is vit.looks_like_mae_encoder
    assert build.MAE_ENCODER_KEYS is vit.MAE_ENCODER_KEYS
    assert convert.convert_beitv2_pretrain is beit.convert_beitv2_pretrain
    assert convert.beit_constructor_kwargs is beit.beit_constructor_kwargs
    assert convert.convert_jax_npz is vit.convert_jax_npz
    assert convert.BEITV2_INDEX_KEY == beit.BEITV2_INDEX_KEY
    from vptool import recipe
    from vptool.backbones import kwargs

    assert recipe.backbone_kwargs_problems is kwargs.backbone_kwargs_problems
    assert recipe.SIZE_KWARGS is kwargs.SIZE_KWARGS
