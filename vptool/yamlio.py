"""The recipe YAML reader: ``yaml.SafeLoader`` (nothing in a file is executed) with recipe-sized limits.

The base layer (no torch, nothing of vptool but ``vptool.errors``): ``vptool.recipe`` validates what it reads, and
``vptool.paths`` reads a run's ``recipe.yaml`` with it to know what the run read.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vptool.errors import UserError

#: a recipe is a small mapping: more values than this (after YAML aliases are expanded) or deeper nesting is refused
MAX_YAML_VALUES = 10_000
MAX_YAML_DEPTH = 20


class YamlProblem(yaml.YAMLError):
    """A recipe YAML that parses but is refused (a duplicate key, an alias bomb, too deep); ``line`` is 1-based."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message, self.line = message, line


class RecipeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (nothing is executed) with three changes for recipes.

    - Numbers in exponent form without a dot (``1e-3``, ``1e12``, ``5E+2``) are floats, as in YAML 1.2 and as
      users type them in ``--set train.lr=1e-3``; YAML 1.1 (PyYAML's default) reads them as strings.
    - A key repeated in one mapping is an error naming both lines (YAML 1.1 silently keeps the last one).
    - A document that expands to more than ``MAX_YAML_VALUES`` values (an alias bomb) or nests deeper than
      ``MAX_YAML_DEPTH`` is refused before any value is built.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = key_node.value
                line = key_node.start_mark.line + 1
                if key in seen:
                    where = f" (lines {seen[key]} and {line})" if seen[key] != line else ""
                    raise YamlProblem(f"key {key[:80]!r} appears twice in one mapping{where}; YAML would silently "
                                      "drop the first: merge them into one", line)
                seen[key] = line
        return super().construct_mapping(node, deep=deep)

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_size(node)
        return node


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    __import__("re").compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def _check_size(root) -> None:
    """Refuse an alias bomb or deep nesting: the expanded value count, computed once per shared node."""
    sizes: dict[int, int] = {}
    stack = [(root, 1, False)]
    while stack:
        node, depth, done = stack.pop()
        if depth > MAX_YAML_DEPTH:
            raise YamlProblem(f"values nested more than {MAX_YAML_DEPTH} levels deep; a recipe is a shallow mapping",
                              node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            sizes[id(node)] = 1
            continue
        children = ([c for pair in node.value for c in pair] if isinstance(node, yaml.MappingNode)
                    else list(node.value))
        if done:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_VALUES:
                raise YamlProblem(f"the document expands to more than {MAX_YAML_VALUES:,d} values (YAML aliases "
                                  "repeat them); a recipe is a small mapping: remove the aliases",
                                  node.start_mark.line + 1)
            continue
        if id(node) in sizes:
            continue
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def load_yaml_text(text: str):
    """Parse recipe YAML text with ``RecipeLoader`` (safe; see its docstring).

    Raises:
        yaml.YAMLError: bad syntax, or a ``YamlProblem``; RecursionError for pathological nesting.
    """
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 -- RecipeLoader is a SafeLoader


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with ``RecipeLoader`` (a ``yaml.SafeLoader``: nothing in the file is executed).

    Raises:
        UserError: the file is missing, unreadable, not YAML, not a mapping, repeats a key, or is an alias bomb
            or nested too deeply (one line naming the file and the line).
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a folder; pass the path of a YAML recipe (see recipes/)")
    if not p.is_file():
        raise UserError(f"{p}: recipe not found; pass the path of a YAML recipe (see recipes/)")
    try:
        data = load_yaml_text(p.read_text(encoding="utf-8"))
    except YamlProblem as exc:
        where = f" line {exc.line}" if exc.line else ""
        raise UserError(f"{p}:{where}: {exc.message}") from None
    except RecursionError:
        raise UserError(f"{p}: values nested too deeply to read; a recipe is a shallow mapping") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{p}:{where}: {str(problem)[:120]}; fix the YAML syntax") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{p}: cannot read recipe ({str(exc)[:120]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{p}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


