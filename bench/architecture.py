"""Architecture measurements of the vptool package, read from its source (nothing is imported).

What it measures
----------------
Every ``.py`` file under the package folder (default: the ``vptool/`` folder next to ``bench/``; ``--root PATH``
for another checkout, e.g. ``--root /work/wt-cli/vptool``; the folder's name is the package name) is parsed
with ``ast``:

- modules over ``--max-module-lines`` (500) lines (lines of the file);
- functions and methods, nested ones included, over ``--max-function-lines`` (60) lines, as
  ``module:qualname lines`` (``end_lineno - lineno + 1`` of the ``def``: decorators excluded);
- the import graph between the package's modules, from every ``import pkg.x.y``, ``from pkg.x import y`` (an edge
  to ``pkg.x.y`` where that is a module, else to ``pkg.x``) and relative import, at any depth: inside functions
  and under ``if TYPE_CHECKING:`` too (both also counted on their own). Only explicit imports make edges: the
  package ``__init__`` that ``import pkg.x.y`` runs on the way is not an edge, nor is ``importlib.import_module``
  with a string. An import of the root package (``import pkg``, ``from pkg import __version__``) is an edge to
  module ``pkg``. A module importing itself makes no edge;
- import cycles: the strongly connected components of that graph with more than one module (iterative Tarjan),
  each with one shortest example cycle;
- private names used across modules: ``from pkg.a import _x`` (``_x``: a leading underscore, not a dunder) in a
  module other than ``pkg.a`` (a private *submodule* imported from inside its own package is allowed), and
  attribute access ``alias._x`` / ``alias.sub._x`` where ``alias`` is a name bound anywhere in the module by an
  import of a package module (bindings are taken module-wide, not per scope);
- function-level imports of package modules (import statements inside a function body);
- layer violations against ``LAYERS`` (below): an import of a module in a higher layer. A module's layer is that
  of the most specific entry matching it (``LAYER_EXCEPTIONS`` first); an entry matches itself and the modules
  under it, except the root package entry (no dot), which matches only the root ``__init__``. Modules that no
  entry matches are listed as unassigned.

How to run
----------
python bench/architecture.py                              # this checkout's vptool/
python bench/architecture.py --root /work/wt-cli/vptool   # another checkout
python bench/architecture.py --json                       # one JSON object instead of the text

It always exits 0: it measures; ``tests/test_architecture.py`` holds the rules.
"""

from __future__ import annotations

import argparse
import ast
import json
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

#: the layers, lowest first: a module may import modules of its own layer or a lower one only.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", ("vptool.errors", "vptool.options", "vptool.hardware", "vptool.safeload", "vptool.paths",
              "vptool.progress", "vptool.config", "vptool.yamlio", "vptool.prompting.layout", "vptool.data.catalog")),
    ("model", ("vptool.prompting", "vptool.backbones", "vptool.conventions", "vptool.data", "vptool.analysis")),
    # the library face: vptool.prompting.model's PromptedViT adds predict/save_pretrained/from_pretrained to the
    # model layer's PromptedCore; vptool.builder builds either, handed the class
    # vptool.presets, vptool.recipe_checks and vptool.overrides: parts of the recipe (re-exported by vptool.recipe);
    # vptool.shipped: the shipped recipes and tables, and names to paths
    ("library", ("vptool", "vptool.recipe", "vptool.presets", "vptool.recipe_checks", "vptool.overrides",
                 "vptool.shipped", "vptool.builder", "vptool.adapter", "vptool.inference", "vptool.export",
                 "vptool.prompting.model")),
    # vptool.engine.train is the train entry point; runplan decides where a run writes, schedule holds the lr
    # schedule, optimizer and data order, loop the training loop
    ("engine", ("vptool.engine", "vptool.engine.runplan", "vptool.engine.schedule", "vptool.engine.loop")),
    ("commands", ("vptool.commands", "vptool.cli", "vptool.cli_sweep", "vptool.__main__")),
)

#: single modules placed in a layer of their own choosing (exact names; they win over ``LAYERS``).
LAYER_EXCEPTIONS: dict[str, str] = {
    # a maintenance script that builds the embedded weights: it trains, like the engine does
    "vptool.backbones.pretrain_digits_mae": "engine",
    # device, autocast dtype and seeds: torch helpers that import nothing of vptool but errors/hardware, used by the
    # library (vptool.load's device, predict's autocast) and the engine; kept at the path tests patch
    "vptool.engine.runtime": "base",
}


# ---------------------------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class Module:
    name: str
    path: str
    lines: int


@dataclass(frozen=True)
class Function:
    module: str
    qualname: str
    lineno: int
    lines: int

    def __str__(self) -> str:
        return f"{self.module}:{self.qualname} {self.lines}"


@dataclass(frozen=True)
class Import:
    """One imported package module of one import statement."""

    importer: str
    imported: str
    line: int
    statement: str
    function_level: bool
    type_checking: bool


@dataclass(frozen=True)
class PrivateUse:
    importer: str
    owner: str  # the module whose private name it is
    name: str
    line: int
    kind: str  # "import" or "attribute"
    text: str

    def __str__(self) -> str:
        return f"{self.importer}:{self.line} uses {self.owner}.{self.name} ({self.kind}: {self.text})"


@dataclass(frozen=True)
class LayerViolation:
    importer: str
    imported: str
    importer_layer: str
    imported_layer: str
    lines: tuple[int, ...]

    def __str__(self) -> str:
        return (f"{self.importer} -> {self.imported} ({self.importer_layer} -> {self.imported_layer}) "
                f"line {', '.join(map(str, self.lines))}")


@dataclass(repr=False)
class Report:
    root: str
    package: str
    modules: dict[str, Module]
    functions: list[Function]
    imports: list[Import]
    unresolved: list[str]
    private_uses: list[PrivateUse]
    max_module_lines: int = MAX_MODULE_LINES
    max_function_lines: int = MAX_FUNCTION_LINES
    layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS
    layer_exceptions: dict[str, str] = field(default_factory=lambda: dict(LAYER_EXCEPTIONS))

    def __repr__(self) -> str:
        return f"Report({self.root!r}: {len(self.modules)} modules, {len(self.imports)} imports)"

    # -- derived measurements

    def long_modules(self) -> list[Module]:
        found = [m for m in self.modules.values() if m.lines > self.max_module_lines]
        return sorted(found, key=lambda m: (-m.lines, m.name))

    def long_functions(self) -> list[Function]:
        found = [f for f in self.functions if f.lines > self.max_function_lines]
        return sorted(found, key=lambda f: (-f.lines, f.module, f.qualname))

    def graph(self) -> dict[str, set[str]]:
        edges: dict[str, set[str]] = {name: set() for name in self.modules}
        for imp in self.imports:
            edges[imp.importer].add(imp.imported)
        return edges

    def cycles(self) -> list[list[str]]:
        return import_cycles(self.graph())

    def function_level_imports(self) -> list[Import]:
        return [imp for imp in self.imports if imp.function_level]

    def type_checking_imports(self) -> list[Import]:
        return [imp for imp in self.imports if imp.type_checking]

    def layer_of(self, module: str) -> tuple[int, str] | None:
        return layer_of(module, self.layers, self.layer_exceptions)

    def unassigned(self) -> list[str]:
        return sorted(name for name in self.modules if self.layer_of(name) is None)

    def layer_violations(self) -> list[LayerViolation]:
        lines: dict[tuple[str, str], list[int]] = {}
        for imp in self.imports:
            a, b = self.layer_of(imp.importer), self.layer_of(imp.imported)
            if a is not None and b is not None and b[0] > a[0]:
                lines.setdefault((imp.importer, imp.imported), []).append(imp.line)
        out = []
        for (importer, imported), found in sorted(lines.items()):
            a, b = self.layer_of(importer), self.layer_of(imported)
            out.append(LayerViolation(importer, imported, f"{a[0]} {a[1]}", f"{b[0]} {b[1]}",
                                      tuple(sorted(set(found)))))
        return out

    def as_dict(self) -> dict:
        graph = self.graph()
        cycles = self.cycles()
        function_level = self.function_level_imports()
        type_checking = self.type_checking_imports()
        violations = self.layer_violations()
        return {
            "root": self.root,
            "package": self.package,
            "modules": len(self.modules),
            "lines": sum(m.lines for m in self.modules.values()),
            "max_module_lines": self.max_module_lines,
            "modules_over_max_lines": {"count": len(self.long_modules()),
                                       "modules": {m.name: m.lines for m in self.long_modules()}},
            "max_function_lines": self.max_function_lines,
            "functions_over_max_lines": {"count": len(self.long_functions()),
                                         "functions": {f"{f.module}:{f.qualname}": f.lines
                                                       for f in self.long_functions()}},
            "import_graph": {"edges": sum(len(v) for v in graph.values()),
                             "imports": len(self.imports),
                             "graph": {k: sorted(v) for k, v in sorted(graph.items())},
                             "unresolved": self.unresolved},
            "import_cycles": {"count": len(cycles),
                              "cycles": [{"modules": c, "example": shortest_cycle(graph, c)} for c in cycles]},
            "private_uses": {"count": len(self.private_uses), "uses": [asdict(u) for u in self.private_uses]},
            "function_level_imports": {"count": len(function_level),
                                       "statements": len({(i.importer, i.line) for i in function_level}),
                                       "imports": [asdict(i) for i in function_level]},
            "type_checking_imports": {"count": len(type_checking), "imports": [asdict(i) for i in type_checking]},
            "layer_violations": {"count": len(violations), "violations": [asdict(v) for v in violations]},
            "unassigned_modules": self.unassigned(),
        }


# ---------------------------------------------------------------------------------------------------------------
# layers


def layer_of(module: str, layers=LAYERS, exceptions=None) -> tuple[int, str] | None:
    """``(index, name)`` of ``module``'s layer: the most specific matching entry; None where none matches."""
    names = [name for name, _ in layers]
    if exceptions is None:
        exceptions = LAYER_EXCEPTIONS
    if module in exceptions:
        return names.index(exceptions[module]), exceptions[module]
    best: tuple[int, int, str] | None = None  # (prefix length, index, name)
    for index, (name, prefixes) in enumerate(layers):
        for prefix in prefixes:
            matches = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index, name)
    return None if best is None else (best[1], best[2])


# ---------------------------------------------------------------------------------------------------------------
# graph algorithms


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan), each sorted, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {t for targets in graph.values() for t in targets})
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            advanced = False
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    advanced = True
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return sorted(found)


def shortest_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One shortest cycle through the component's first module, as ``[a, b, ..., a]`` (BFS inside it)."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            if child not in seen:
                seen.add(child)
                parent[child] = node
                queue.append(child)
    return []


# ---------------------------------------------------------------------------------------------------------------
# parsing


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([root.name, *parts])


class _ModuleVisitor(ast.NodeVisitor):
    """Collects one module's functions, package imports, import bindings and private ``from`` imports."""

    def __init__(self, name: str, is_package: bool, modules: set[str], package: str):
        self.name = name
        self.is_package = is_package
        self.modules = modules
        self.package = package
        self.functions: list[Function] = []
        self.imports: list[Import] = []
        self.unresolved: list[str] = []
        self.private_uses: list[PrivateUse] = []
        self.bindings: dict[str, str] = {}  # local name -> package module it is bound to
        self.scope: list[str] = []  # qualname parts
        self.function_depth = 0
        self.type_checking = 0

    # -- scopes

    def _visit_function(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        qualname = ".".join([*self.scope, node.name])
        self.functions.append(Function(self.name, qualname, node.lineno, node.end_lineno - node.lineno + 1))
        self.scope += [node.name, "<locals>"]
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1
        del self.scope[-2:]

    visit_FunctionDef = _visit_function
    visit_AsyncFunctionDef = _visit_function

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.visit(node.test)
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    # -- imports

    def _record(self, node: ast.stmt, imported: str) -> None:
        if imported == self.name:
            return
        self.imports.append(Import(self.name, imported, node.lineno, ast.unparse(node),
                                   self.function_depth > 0, self.type_checking > 0))

    def _in_package(self, dotted: str) -> bool:
        return dotted == self.package or dotted.startswith(self.package + ".")

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if not self._in_package(alias.name):
                continue
            if alias.name not in self.modules:
                self.unresolved.append(f"{self.name}:{node.lineno} {ast.unparse(node)}")
                continue
            self._record(node, alias.name)
            if alias.asname:
                self.bindings[alias.asname] = alias.name
            else:
                self.bindings[alias.name.split(".")[0]] = self.package

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.name if self.is_package else self.name.rpartition(".")[0]
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if not base:
                self.unresolved.append(f"{self.name}:{node.lineno} {ast.unparse(node)}")
                return
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        if not self._in_package(source):
            return
        if source not in self.modules:
            self.unresolved.append(f"{self.name}:{node.lineno} {ast.unparse(node)}")
            return
        targets: list[str] = []
        for alias in node.names:
            if alias.name == "*":
                targets.append(source)
                continue
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:
                targets.append(submodule)
                self.bindings[alias.asname or alias.name] = submodule
                private = _is_private(alias.name) and not self.name.startswith(source + ".")
            else:
                targets.append(source)
                private = _is_private(alias.name) and self.name != source
            if private:
                self.private_uses.append(PrivateUse(self.name, source, alias.name, node.lineno, "import",
                                                    ast.unparse(node)))
        for target in dict.fromkeys(targets):
            self._record(node, target)


def _attribute_chain(node: ast.Attribute) -> tuple[str, list[str]] | None:
    attrs = []
    current: ast.expr = node
    while isinstance(current, ast.Attribute):
        attrs.append(current.attr)
        current = current.value
    if not isinstance(current, ast.Name):
        return None
    return current.id, attrs[::-1]


def _private_attributes(tree: ast.AST, name: str, bindings: dict[str, str], modules: set[str]) -> list[PrivateUse]:
    """``alias._x`` / ``alias.sub._x`` where ``alias`` is bound to a package module other than ``name``."""
    found = []
    seen: set[int] = set()  # inner Attribute nodes of a chain already handled
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in seen:
            continue
        inner = node.value
        while isinstance(inner, ast.Attribute):
            seen.add(id(inner))
            inner = inner.value
        chain = _attribute_chain(node)
        if chain is None or chain[0] not in bindings:
            continue
        module = bindings[chain[0]]
        for attr in chain[1]:
            if f"{module}.{attr}" in modules:
                module = f"{module}.{attr}"
                continue
            if _is_private(attr) and module != name:
                found.append(PrivateUse(name, module, attr, node.lineno, "attribute", ast.unparse(node)))
            break
    return found


def analyse(root: Path | str, max_module_lines: int = MAX_MODULE_LINES, max_function_lines: int = MAX_FUNCTION_LINES,
            layers=LAYERS, layer_exceptions: dict[str, str] | None = None) -> Report:
    """Parse every ``.py`` under the package folder ``root`` (its name is the package name) into a ``Report``."""
    root = Path(root).resolve()
    package = root.name
    paths = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    names = {path: module_name(root, path) for path in paths}
    modules_set = set(names.values())
    modules: dict[str, Module] = {}
    functions: list[Function] = []
    imports: list[Import] = []
    unresolved: list[str] = []
    private_uses: list[PrivateUse] = []
    for path in paths:
        name = names[path]
        source = path.read_text(encoding="utf-8")
        modules[name] = Module(name, str(path), len(source.splitlines()))
        tree = ast.parse(source, filename=str(path))
        visitor = _ModuleVisitor(name, path.name == "__init__.py", modules_set, package)
        visitor.visit(tree)
        functions += visitor.functions
        imports += visitor.imports
        unresolved += visitor.unresolved
        private_uses += visitor.private_uses
        private_uses += _private_attributes(tree, name, visitor.bindings, modules_set)
    private_uses.sort(key=lambda u: (u.importer, u.line, u.name))
    return Report(str(root), package, modules, functions, imports, unresolved, private_uses,
                  max_module_lines, max_function_lines, layers,
                  dict(LAYER_EXCEPTIONS if layer_exceptions is None else layer_exceptions))


# ---------------------------------------------------------------------------------------------------------------
# output


def format_text(report: Report) -> str:
    out: list[str] = []
    graph = report.graph()
    total = sum(m.lines for m in report.modules.values())
    out.append(f"package {report.package} at {report.root}: {len(report.modules)} modules, {total} lines")

    long_modules = report.long_modules()
    out.append(f"\nmodules over {report.max_module_lines} lines: {len(long_modules)}")
    out += [f"  {m.name} {m.lines}" for m in long_modules]

    long_functions = report.long_functions()
    out.append(f"\nfunctions over {report.max_function_lines} lines: {len(long_functions)}")
    out += [f"  {f}" for f in long_functions]

    function_level = report.function_level_imports()
    type_checking = report.type_checking_imports()
    out.append(f"\nimport graph: {sum(len(v) for v in graph.values())} edges between {len(graph)} modules, "
               f"from {len(report.imports)} imports of package modules")
    out.append(f"function-level imports of package modules: {len(function_level)} "
               f"(in {len({(i.importer, i.line) for i in function_level})} import statements)")
    out.append(f"TYPE_CHECKING imports of package modules: {len(type_checking)}")
    out += [f"  {i.importer}:{i.line} {i.statement}" for i in type_checking]
    if report.unresolved:
        out.append(f"unresolved imports (no such module): {len(report.unresolved)}")
        out += [f"  {u}" for u in report.unresolved]

    cycles = report.cycles()
    out.append(f"\nimport cycles: {len(cycles)}")
    for number, members in enumerate(cycles, 1):
        out.append(f"  {number}. {len(members)} modules: {', '.join(members)}")
        out.append(f"     e.g. {' -> '.join(shortest_cycle(graph, members))}")
        for imp in report.imports:
            if imp.importer in members and imp.imported in members:
                where = " [function]" if imp.function_level else ""
                where += " [TYPE_CHECKING]" if imp.type_checking else ""
                out.append(f"       {imp.importer}:{imp.line} -> {imp.imported}{where}")

    out.append(f"\nprivate names used across modules: {len(report.private_uses)}")
    out += [f"  {u}" for u in report.private_uses]

    violations = report.layer_violations()
    out.append(f"\nlayer violations: {len(violations)} (importer -> imported pairs)")
    out += [f"  {v}" for v in violations]
    unassigned = report.unassigned()
    out.append(f"modules without a layer: {len(unassigned)}")
    out += [f"  {name}" for name in unassigned]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent / "vptool",
                        help="the package folder to measure (default: the vptool/ next to bench/)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the text")
    parser.add_argument("--max-module-lines", type=int, default=MAX_MODULE_LINES)
    parser.add_argument("--max-function-lines", type=int, default=MAX_FUNCTION_LINES)
    args = parser.parse_args(argv)
    report = analyse(args.root, args.max_module_lines, args.max_function_lines)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_text(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
