"""The recipes and benchmark tables shipped with vptool: where they are, what each needs, and names to paths.

Where they live:

- in a wheel: package data, ``vptool/recipes/*.yaml`` and ``vptool/recipes/tables/*.yaml`` (``pyproject.toml`` maps
  the source tree's top-level ``recipes/`` folder into the package as ``vptool.recipes``);
- in a source checkout (an editable install, or ``PYTHONPATH``): the package folder has no ``recipes/``, so they
  are read from the checkout's ``recipes/`` beside ``vptool/``. setuptools' editable finder does not import the
  mapped folder (it has no ``__init__.py``), hence this second place; the checkout is recognised by its
  ``pyproject.toml``.

``resolve_recipe`` and ``resolve_table`` turn a command's argument into a path: an existing path wins, else a
shipped name (``quickstart`` or ``quickstart.yaml``), else one line naming the argument (exit 2). Nothing here
imports torch.
"""

from __future__ import annotations

import difflib
import re
from importlib.resources import files
from pathlib import Path

from vptool.errors import UserError

#: the papers whose tables and figures the recipe headers cite
PAPERS = ("GateVPT", "VPTM", "VPT", "SPT")
#: "GateVPT Table 1", "VPT §4.4, Table 5" (-> VPT Table 5), "VPT Fig. 4"
CITATION = re.compile(r"\b(GateVPT|VPTM|VPT|SPT) (?:§[\d.]+, )?(Table|Fig\.) (\d+)")
#: header lines that start the settings part of a recipe's comment: citations after them are of settings (lr,
#: schedule), not of the result the recipe reproduces
SETTINGS_LINE = re.compile(r"^(Settings|Optimi[sz]ation|Training|Head|Readout|Grid|Inputs you provide)\b")


def shipped_root() -> Path | None:
    """The folder of the shipped recipes (its ``tables/`` holds the tables), or None when there is none."""
    in_package = files("vptool") / "recipes"
    if isinstance(in_package, Path) and in_package.is_dir():  # a wheel install
        return in_package
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "recipes").is_dir():  # a source checkout
        return checkout / "recipes"
    return None


def _yaml_files(folder: Path | None) -> dict[str, Path]:
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def shipped_recipes() -> dict[str, Path]:
    """Every shipped recipe, name (file stem) -> path, sorted by name."""
    return _yaml_files(shipped_root())


def shipped_tables() -> dict[str, Path]:
    """Every shipped benchmark table, name (file stem) -> path, sorted by name (empty when none ship)."""
    root = shipped_root()
    return _yaml_files(root / "tables" if root is not None else None)


def _stem(name: str) -> str | None:
    """``quickstart`` for ``quickstart`` or ``quickstart.yaml``/``.yml``; None for a path (a folder in it)."""
    if "/" in name or "\\" in name:
        return None
    for suffix in (".yaml", ".yml"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def closest(name: str, names) -> str:
    """``; did you mean X?`` for the shipped name closest to ``name`` (empty when none is close)."""
    stem = Path(name).name
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    match = difflib.get_close_matches(stem, list(names), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


def find_shipped(name: str | Path, tables: bool = False) -> Path | None:
    """The shipped recipe (or table) called ``name`` (``quickstart`` or ``quickstart.yaml``), or None."""
    stem = _stem(str(name))
    return (shipped_tables() if tables else shipped_recipes()).get(stem) if stem else None


def resolve_recipe(arg: str | Path) -> Path:
    """The recipe a command's argument names: an existing path (file or run directory) wins, else a shipped
    recipe's name.

    Raises:
        UserError: neither exists (one line naming ``arg``, the closest shipped name, and ``vptool recipes ls``).
    """
    p = Path(arg)
    if p.exists():
        return p
    shipped = find_shipped(arg)
    if shipped is not None:
        return shipped
    raise UserError(f"{p}: recipe not found; pass the path of a YAML recipe or a shipped recipe's name"
                    f"{closest(str(arg), shipped_recipes())} (see `vptool recipes ls`)")


def resolve_table(arg: str | Path) -> Path:
    """The benchmark table a command's argument names: an existing path wins, else a shipped table's name.

    Raises:
        UserError: neither exists (one line naming ``arg``, the closest shipped name, and
            ``vptool recipes ls --tables``).
    """
    p = Path(arg)
    if p.exists():
        return p
    shipped = find_shipped(arg, tables=True)
    if shipped is not None:
        return shipped
    raise UserError(f"{p}: table not found; pass the path of a table YAML or a shipped table's name"
                    f"{closest(str(arg), shipped_tables())} (see `vptool recipes ls --tables`)")


# ------------------------------------------------------------------------------------------------------ listing
def _read(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read ({str(exc).splitlines()[0][:120]}); reinstall vptool") from None
    return data if isinstance(data, dict) else {}


def header_lines(text: str) -> list[str]:
    """The recipe's leading comment, one string per line, ``#`` and one space removed."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return lines


def paper_tables(text: str) -> list[str]:
    """The paper tables (and figures) a recipe reproduces, read from its header's description: the paragraph
    after the command line, up to its settings (``Settings``, ``Optimisation``, ``Training``, ...), e.g.
    ``["GateVPT Table 1", "SPT Table 2"]``; empty when it cites none (the digits recipes)."""
    lines = header_lines(text)[1:]  # line 1 is the command that runs the recipe
    while lines and not lines[0].strip():
        lines.pop(0)
    found: list[str] = []
    for line in lines:
        if not line.strip() or SETTINGS_LINE.match(line):
            break
        for paper, kind, number in CITATION.findall(line):
            cite = f"{paper} {kind} {number}"
            if cite not in found:
                found.append(cite)
    return found


def _section(data: dict, key: str) -> dict:
    value = data.get(key)
    return value if isinstance(value, dict) else {}


def recipe_needs(data: dict) -> list[str]:
    """What a recipe reads that the user provides: its data root (or dataset) and its backbone checkpoint; empty
    when everything is bundled (the digits, an embedded or randomly initialised backbone)."""
    from vptool.backbones.embedded import EMBEDDED

    d, b = _section(data, "data"), _section(data, "backbone")
    needs = []
    if d.get("dataset") != "digits":
        needs.append(f"{d.get('dataset')} {d['root']}" if d.get("root") else f"{d.get('dataset')}")
    if b.get("checkpoint"):
        needs.append(str(b["checkpoint"]))
    elif b.get("name") not in EMBEDDED and b.get("pretrained", True) is not False:
        needs.append(f"timm weights {b.get('name')}")
    return needs


def recipe_entry(name: str, path: Path) -> dict:
    """One ``vptool recipes ls`` row: name, method, paper tables, dataset, data root, checkpoint, what it needs."""
    text = path.read_text(encoding="utf-8")
    data = _read(path)
    d, b = _section(data, "data"), _section(data, "backbone")
    return {"kind": "recipe", "name": name, "method": data.get("method"), "paper_tables": paper_tables(text),
            "dataset": d.get("dataset"), "data_root": d.get("root"), "checkpoint": b.get("checkpoint"),
            "needs": recipe_needs(data), "path": str(path)}


def table_entry(name: str, path: Path) -> dict:
    """One ``vptool recipes ls --tables`` row: name, title, source, the data roots its columns read and the
    recipes its rows train."""
    data = _read(path)
    columns = data.get("columns") if isinstance(data.get("columns"), list) else []
    rows = data.get("rows") if isinstance(data.get("rows"), list) else []
    roots = [_section(c, "data").get("root") for c in columns if isinstance(c, dict)]
    recipes = [r.get("recipe") for r in rows if isinstance(r, dict)]
    return {"kind": "table", "name": name, "title": data.get("title"), "source": data.get("source"),
            "needs": sorted({str(r) for r in roots if r}), "recipes": sorted({str(r) for r in recipes if r}),
            "path": str(path)}


def list_recipes() -> list[dict]:
    """``recipe_entry`` for every shipped recipe, by name."""
    return [recipe_entry(n, p) for n, p in shipped_recipes().items()]


def list_tables() -> list[dict]:
    """``table_entry`` for every shipped table, by name (empty when none ship)."""
    return [table_entry(n, p) for n, p in shipped_tables().items()]
