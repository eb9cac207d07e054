"""Architecture rules on vptool's source, checked by ``bench/architecture.py`` (parses the source, imports nothing).

The rules: no import cycles between vptool modules (function-level and ``TYPE_CHECKING`` imports included), no
private names of one module used by another, no import of a module in a higher layer (``LAYERS`` in the script),
every module in a layer. The self-tests below run the analyser on small packages written to ``tmp_path``, so the
rules fail for the right reasons.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "architecture.py"
PACKAGE = REPO / "vptool"


def _load_script():
    name = "vptool_bench_architecture"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


arch = _load_script()


@pytest.fixture(scope="module")
def report():
    return arch.analyse(PACKAGE)


# ---------------------------------------------------------------------------------------------------------------
# the rules, on vptool's source


def test_no_import_cycles(report):
    graph = report.graph()
    cycles = report.cycles()
    lines = []
    for members in cycles:
        lines.append(f"{len(members)} modules: {', '.join(members)}")
        lines.append(f"  e.g. {' -> '.join(arch.shortest_cycle(graph, members))}")
        lines += [f"  {i.importer}:{i.line} {i.statement}" + (" [function]" if i.function_level else "")
                  for i in report.imports if i.importer in members and i.imported in members]
    assert not cycles, f"{len(cycles)} import cycle(s) between vptool modules:\n" + "\n".join(lines)


def test_no_private_names_across_modules(report):
    uses = report.private_uses
    assert not uses, (f"{len(uses)} use(s) of another module's private name:\n"
                      + "\n".join(f"  {u}" for u in uses))


def test_no_layer_violations(report):
    violations = report.layer_violations()
    assert not violations, (f"{len(violations)} import(s) of a higher layer (importer -> imported):\n"
                            + "\n".join(f"  {v}" for v in violations))


def test_every_module_has_a_layer(report):
    assert not report.unassigned(), f"modules no entry of LAYERS matches: {report.unassigned()}"


def test_the_source_was_read(report):
    assert "vptool" in report.modules and "vptool.cli" in report.modules
    assert not report.unresolved, report.unresolved


# ---------------------------------------------------------------------------------------------------------------
# self-tests of the analyser on synthetic packages

LAYERS = (("low", ("pkg.low",)), ("high", ("pkg", "pkg.high")))


def write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for relative, text in {"__init__.py": "", **files}.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def analyse(root: Path, **kwargs):
    return arch.analyse(root, layers=LAYERS, layer_exceptions={}, **kwargs)


def test_cycle_through_a_function_level_import_is_found(tmp_path):
    root = write_package(tmp_path, {
        "a.py": "import pkg.b\n",
        "b.py": "def f():\n    from pkg import a\n    return a\n",
        "c.py": "from pkg import a\n",
    })
    report = analyse(root)
    assert report.cycles() == [["pkg.a", "pkg.b"]]
    assert arch.shortest_cycle(report.graph(), ["pkg.a", "pkg.b"]) == ["pkg.a", "pkg.b", "pkg.a"]
    assert [(i.importer, i.imported) for i in report.function_level_imports()] == [("pkg.b", "pkg.a")]


def test_type_checking_and_relative_imports_make_edges(tmp_path):
    root = write_package(tmp_path, {
        "sub/__init__.py": "from . import x\n",
        "sub/x.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..y import thing\n",
        "y.py": "from .sub.x import name\nfrom pkg import __version__\n",
    })
    report = analyse(root)
    graph = report.graph()
    assert graph["pkg.sub"] == {"pkg.sub.x"}  # not pkg.sub itself
    assert graph["pkg.sub.x"] == {"pkg.y"}
    assert graph["pkg.y"] == {"pkg.sub.x", "pkg"}  # the implicit pkg.sub __init__ is no edge
    assert [(i.importer, i.imported) for i in report.type_checking_imports()] == [("pkg.sub.x", "pkg.y")]
    assert report.cycles() == [["pkg.sub.x", "pkg.y"]]


def test_private_from_import_is_found(tmp_path):
    root = write_package(tmp_path, {
        "a.py": "_x = 1\n__all__ = []\n",
        "b.py": "from pkg.a import _x\nfrom pkg.a import __all__\n",
        "c.py": "from .a import _x as y\n",
    })
    uses = analyse(root).private_uses
    assert [(u.importer, u.owner, u.name, u.kind) for u in uses] == [
        ("pkg.b", "pkg.a", "_x", "import"), ("pkg.c", "pkg.a", "_x", "import")]


def test_private_attribute_of_an_imported_module_is_found(tmp_path):
    root = write_package(tmp_path, {
        "sub/__init__.py": "",
        "sub/a.py": "_x = 1\n\ndef f():\n    import pkg.sub.a as me\n    return me._x\n",
        "b.py": "import pkg.sub.a\n\ndef f():\n    return pkg.sub.a._x + pkg.__doc__.count('x')\n",
        "c.py": "def f():\n    from pkg.sub import a as m\n    return m._x, m.public\n",
    })
    uses = analyse(root).private_uses
    assert [(u.importer, u.owner, u.name, u.kind) for u in uses] == [
        ("pkg.b", "pkg.sub.a", "_x", "attribute"), ("pkg.c", "pkg.sub.a", "_x", "attribute")]


def test_upward_import_is_a_layer_violation(tmp_path):
    root = write_package(tmp_path, {
        "low/__init__.py": "",
        "low/base.py": "def f():\n    from pkg.high import tool\n    return tool\n",
        "high.py": "from pkg.low.base import f\ntool = f\n",
    })
    violations = analyse(root).layer_violations()
    assert [(v.importer, v.imported, v.importer_layer, v.imported_layer, v.lines) for v in violations] == [
        ("pkg.low.base", "pkg.high", "0 low", "1 high", (2,))]


def test_clean_package_passes(tmp_path):
    root = write_package(tmp_path, {
        "low/__init__.py": "from .base import f\n",
        "low/base.py": "def f():\n    return 1\n",
        "high.py": "import pkg.low\nfrom pkg.low import base\n\ndef g():\n    from pkg.low.base import f\n"
                   "    return f() + base.f() + pkg.low.f()\n",
    })
    report = analyse(root)
    assert report.cycles() == []
    assert report.private_uses == []
    assert report.layer_violations() == []
    assert report.unassigned() == []
    assert report.unresolved == []


def test_layer_lookup():
    assert arch.layer_of("vptool.prompting.layout") == (0, "base")  # the most specific entry wins
    assert arch.layer_of("vptool.prompting.core") == (1, "model")
    assert arch.layer_of("vptool.prompting.model") == (2, "library")  # the library face, named on its own
    assert arch.layer_of("vptool.data.catalog") == (0, "base")
    assert arch.layer_of("vptool") == (2, "library")
    assert arch.layer_of("vptool.brand_new") is None  # the root entry matches the root __init__ only
    assert arch.layer_of("vptool.engine.sweep") == (3, "engine")
    assert arch.layer_of("vptool.backbones.pretrain_digits_mae") == (3, "engine")  # the exception
    assert arch.layer_of("vptool.backbones.build") == (1, "model")
    assert arch.layer_of("vptool.__main__") == (4, "commands")


def test_line_counts(tmp_path):
    long_body = "".join(f"    x{i} = {i}\n" for i in range(60))
    root = write_package(tmp_path, {
        "m.py": ("import functools\n\n\nclass C:\n    @functools.cache\n    @staticmethod\n    def long():\n"
                 + long_body.replace("    ", "        ") + "\n\ndef outer():\n    def inner():\n" + long_body
                 .replace("    ", "        ") + "    return inner\n"),
    })
    report = analyse(root, max_module_lines=100)
    assert [(f.qualname, f.lines) for f in report.long_functions()] == [("outer", 63), ("C.long", 61),
                                                                        ("outer.<locals>.inner", 61)]
    assert [(m.name, m.lines) for m in report.long_modules()] == [("pkg.m", 132)]


def test_script_prints_text_and_json(tmp_path, capsys):
    root = write_package(tmp_path, {"a.py": "import pkg.b\n", "b.py": "import pkg.a\n"})
    assert arch.main(["--root", str(root)]) == 0
    assert "import cycles: 1" in capsys.readouterr().out
    assert arch.main(["--root", str(root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["import_cycles"]["count"] == 1
    assert data["import_cycles"]["cycles"][0]["modules"] == ["pkg.a", "pkg.b"]
