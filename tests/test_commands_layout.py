"""The CLI's layout, read from the source with ``ast`` (nothing is imported): one module per command under
``vptool/commands/``, and no module there (nor ``vptool/engine/sweep.py``) reaching into another module's private
names (``trial._trial_id``, ``from vptool.recipe import _all_paths``, ``getattr(sampler, "_all_grids")``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "vptool"
COMMANDS = ROOT / "commands"

#: command name -> (its module under vptool/commands/, the function that implements it)
EXPECTED = {
    "train": ("train", "train"),
    "init-prompts": ("init_prompts", "init_prompts"),
    "probe-nmi": ("probe_nmi", "probe_nmi"),
    "eval": ("eval", "eval_"),
    "export": ("export", "export"),
    "predict": ("predict", "predict"),
    "sweep": ("sweep", "sweep_command"),
    "table": ("table", "table_command"),
    "version": ("version", "version"),
}

#: command group -> (its module under vptool/commands/, {subcommand: the function that implements it})
GROUPS = {
    "recipes": ("recipes", {"ls": "ls", "cp": "cp"}),
}

#: underscore names that are documented public API, with why
ALLOWED = {
    "os._exit": "documented (exit a forked child without cleanup)",
    "typer.core._click": "Typer >= 0.22 vendors click there and raises its exceptions; no public name (falls back "
                         "to click)",
}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a chain of attributes on a name, else ``?``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def private_uses(source: str) -> list[str]:
    """Every use of another module's (or another object's) private name in ``source``: ``from m import _x``,
    ``import m._x``, ``obj._x`` (``self._x`` and ``cls._x`` are the class's own) and ``getattr(obj, "_x")``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            found += [f"from {node.module} import {a.name}" for a in node.names
                      if _private(a.name) or any(_private(p) for p in parts)]
        elif isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if any(_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(_dotted(node))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) >= 2:
            arg = node.args[1]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _private(arg.value):
                found.append(f"{_dotted(node.args[0])}.{arg.value}")
    return [f for f in found if f not in ALLOWED]


def _registrations(tree: ast.Module) -> list[ast.Call]:
    """The ``X.command(...)`` calls in a module (Typer registrations)."""
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
            and n.func.attr == "command"]


def _top_functions(tree: ast.Module) -> set[str]:
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


@pytest.mark.parametrize("command", sorted(EXPECTED))
def test_each_command_is_defined_and_registered_in_its_own_module(command):
    module, function = EXPECTED[command]
    path = COMMANDS / f"{module}.py"
    assert path.is_file(), f"vptool/commands/{module}.py: missing (the {command} command)"
    tree = _tree(path)
    assert function in _top_functions(tree), f"{path.name}: does not define {function}()"
    calls = _registrations(tree)
    assert len(calls) == 1, f"{path.name}: {len(calls)} command registrations, expected exactly one"
    names = [a.value for a in calls[0].args if isinstance(a, ast.Constant)]
    assert names in ([command], []), f"{path.name}: registers {names}, expected {command!r}"
    if not names:  # registered under its function's name
        assert function.replace("_", "-") == command


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_is_defined_and_registered_in_its_own_module(group):
    module, subcommands = GROUPS[group]
    tree = _tree(COMMANDS / f"{module}.py")
    missing = set(subcommands.values()) - _top_functions(tree)
    assert not missing, f"{module}.py: does not define {sorted(missing)}"
    names = [a.value for c in _registrations(tree) for a in c.args if isinstance(a, ast.Constant)]
    assert sorted(names) == sorted(subcommands), f"{module}.py: registers {names}, expected {sorted(subcommands)}"


def test_no_command_is_defined_outside_its_module():
    owners = {module for module, _ in EXPECTED.values()} | {module for module, _ in GROUPS.values()}
    for path in sorted(COMMANDS.glob("*.py")):
        if path.stem not in owners:
            assert not _registrations(_tree(path)), f"{path.name}: registers a command; give it its own module"
    for path in (ROOT / "cli.py", ROOT / "cli_sweep.py"):
        if path.exists():
            tree = _tree(path)
            assert not _registrations(tree), f"{path.name}: registers a command; move it under vptool/commands/"
            defined = _top_functions(tree) & {f for _, f in EXPECTED.values()}
            assert not defined, f"{path.name}: defines {sorted(defined)}; they live under vptool/commands/"
    init = _tree(COMMANDS / "__init__.py")
    imported = {a.name.rsplit(".", 1)[-1] for n in ast.walk(init) if isinstance(n, ast.Import) for a in n.names
                if a.name.startswith("vptool.commands.")}
    imported |= {a.name for n in ast.walk(init) if isinstance(n, ast.ImportFrom) and n.module == "vptool.commands"
                 for a in n.names}
    missing = owners - imported
    assert not missing, f"vptool/commands/__init__.py: does not import {sorted(missing)}"


def _checked_files() -> list[Path]:
    return sorted(COMMANDS.glob("*.py")) + [ROOT / "engine" / "sweep.py"]


@pytest.mark.parametrize("path", _checked_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_private_names_of_other_modules(path):
    uses = private_uses(path.read_text(encoding="utf-8"))
    assert not uses, f"{path.relative_to(ROOT.parent)}: uses private names {uses}"


@pytest.mark.parametrize("source, expected", [
    ("my_gid = storage.get_trial(trial._trial_id)", "trial._trial_id"),
    ("from vptool.recipe import Recipe, _all_paths", "from vptool.recipe import _all_paths"),
    ("grids = getattr(sampler, '_all_grids', None)", "sampler._all_grids"),
    ("sid = self.study._study_id", "self.study._study_id"),
    ("from optuna._imports import try_import", "from optuna._imports import try_import"),
])
def test_the_check_finds_private_names(source, expected):
    assert private_uses(source) == [expected]


def test_the_check_allows_own_and_dunder_names():
    assert private_uses("self._stop = None\ncls._cache = {}\nx = obj.__class__\nos._exit(1)\n") == []
