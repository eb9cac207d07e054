"""The table file of ``vptool table``: a paper's benchmark table as rows (methods) x columns (tasks), read with
``yaml.safe_load`` and checked whole before anything runs.

Schema (keys with dots are recipe keys, as ``vptool train --set KEY=V`` takes them)::

    table: vpt_table1            # [a-z0-9_-]+: the output folder <output-dir>/<table>-table and the studies' prefix
    title: "VPT Table 1: ..."
    source: "Jia et al., ECCV 2022, Table 1"
    groups:                      # display order; each column is in one; the table prints each group's mean
      - {name: FGVC, protocol: fgvc}                  # fgvc: select on val, report test of the selected point
      - {name: Natural, protocol: vtab-1k, set: {}}   # vtab-1k: tune on train800/val200, retrain on train800val200
    search: {train.lr: [0.5, 0.1]}   # optional grid of every cell (omitted or {}: one point)
    set: {train.epochs: 100}         # optional overrides of every cell
    columns:
      - {name: cifar, group: Natural, data: {dataset: vtab-1k, root: data/vtab-1k, task: cifar}, set: {}}
    rows:
      - name: VPT-deep
        recipe: vpt_deep_in21k_cub   # a path relative to the table file, or a shipped recipe's name
        set: {}                      # optional
        search: {}                   # optional: replaces the table's search for this row
        cells: {cifar: {set: {prompt.length: 100}, search: {}}}   # optional per-cell overrides / grid
        paper: {cifar: 78.8, Natural: 78.48, total_params: 1.18}   # the paper's numbers (top-1 %, multiple)

Override order, later wins: the row's recipe < table ``set`` < group ``set`` < column ``data`` (every ``data.*``
key the column names; ``data.task``, ``data.image_dir`` and ``data.num_classes`` are reset to the column's or unset)
< column ``set`` < row ``set`` < cell ``set`` < the command's ``--set`` < the protocol (``data.vtab_split``,
``output.*``) < the grid point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from vptool.errors import UserError
from vptool.yamlio import read_yaml

PROTOCOLS = ("fgvc", "vtab-1k")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_TOP = {"table", "title", "source", "groups", "search", "set", "columns", "rows"}
_GROUP = {"name", "protocol", "set"}
_COLUMN = {"name", "group", "data", "set"}
_ROW = {"name", "recipe", "set", "search", "cells", "paper"}
_CELL = {"set", "search"}
#: ``paper:`` keys that are not a column or a group
PAPER_EXTRA = ("total_params", "tuned_params_m")


@dataclass
class Group:
    """A column group: its name (the mean's label), ``protocol`` (``fgvc`` | ``vtab-1k``) and overrides."""

    name: str
    protocol: str
    set: dict = field(default_factory=dict)


@dataclass
class Column:
    """A task: its name, its group, the recipe's ``data.*`` keys it sets and its overrides."""

    name: str
    group: str
    data: dict
    set: dict = field(default_factory=dict)


@dataclass
class Row:
    """A method: display name, folder-safe ``slug``, base recipe path, overrides, grid (None: the table's),
    per-cell ``{column: {"set", "search"}}`` and the paper's numbers (top-1 %, by column or group)."""

    name: str
    slug: str
    recipe: Path
    set: dict = field(default_factory=dict)
    search: dict | None = None
    cells: dict = field(default_factory=dict)
    paper: dict = field(default_factory=dict)


@dataclass
class TableSpec:
    """A checked table file (``read_table``)."""

    path: Path
    name: str
    title: str
    source: str
    groups: list[Group]
    columns: list[Column]
    rows: list[Row]
    search: dict = field(default_factory=dict)
    set: dict = field(default_factory=dict)

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)

    def cell_sets(self, row: Row, column: Column) -> list[str]:
        """The ``--set`` items of cell (row, column) before the command's own and the protocol's (module
        docstring's order)."""
        data = {"data.task": None, "data.image_dir": None, "data.num_classes": None,
                **{f"data.{k}": v for k, v in column.data.items()}}
        cell = row.cells.get(column.name, {})
        layers = [self.set, self.group(column.group).set, data, column.set, row.set, cell.get("set") or {}]
        return [f"{k}={yaml_scalar(v)}" for layer in layers for k, v in layer.items()]

    def cell_search(self, row: Row, column: Column) -> dict:
        """The grid of cell (row, column): the cell's ``search``, else the row's, else the table's (maybe {})."""
        cell = row.cells.get(column.name, {})
        if cell.get("search") is not None:
            return cell["search"]
        return row.search if row.search is not None else self.search


def yaml_scalar(value) -> str:
    """``value`` as ``--set`` takes it (a YAML flow scalar: ``null``, ``true``, ``0.5``, ``'a b'``)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text[:-4].strip() if text.endswith("\n...") else text.removesuffix("...").strip()


def slug(name: str) -> str:
    """A row's display name as a folder name: lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "row"


def _mapping(value, where: str, allowed: set[str] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{where}: must be a mapping, not {type(value).__name__}")
    if allowed is not None:
        extra = sorted(set(map(str, value)) - allowed)
        if extra:
            raise UserError(f"{where}: unknown key {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")
    return value


def _overrides(value, where: str) -> dict:
    """A ``set:`` mapping of recipe keys to scalars (lists and mappings are refused: a cell's value is one value)."""
    out = _mapping(value, where)
    for k, v in out.items():
        if not isinstance(k, str) or not k.strip():
            raise UserError(f"{where}: {k!r} is not a recipe key (e.g. train.lr or method)")
        if isinstance(v, (list, dict)):
            raise UserError(f"{where}.{k}: a list or mapping; give one value (a grid goes under search:)")
    return out


def _search(value, where: str) -> dict:
    out = _mapping(value, where)
    for k, v in out.items():
        if not isinstance(k, str) or not k.strip():
            raise UserError(f"{where}: {k!r} is not a recipe key (e.g. train.lr)")
        if not isinstance(v, list) or not v or any(isinstance(x, (list, dict)) or x is None for x in v):
            raise UserError(f"{where}.{k}: give a non-empty list of values, e.g. [0.5, 0.1]")
        if any("," in yaml_scalar(x) for x in v):
            raise UserError(f"{where}.{k}: a value holds a comma; grid values may not")
    return out


def _name(value, where: str, pattern: bool = True) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: missing or not a string")
    if pattern and not _NAME.match(value):
        raise UserError(f"{where}: {value!r} must match [a-z0-9][a-z0-9_-]* (it names folders and studies)")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: give a non-empty list")
    return value


def _unique(names: list[str], where: str) -> None:
    seen = set()
    for n in names:
        if n in seen:
            raise UserError(f"{where}: {n!r} appears twice; names must be unique")
        seen.add(n)


def resolve_row_recipe(text, table_path: Path, where: str) -> Path:
    """A row's ``recipe``: a path relative to the table file (``.yaml`` optional), else a shipped recipe's name
    (the recipes folder next to the table files' folder, ``recipes/`` in the source tree and in the wheel).

    Raises:
        UserError: neither exists (names both places).
    """
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"{where}: missing; give a recipe name (see recipes/) or a path relative to the table file")
    base = table_path.parent
    names = [text] if text.endswith((".yaml", ".yml")) else [text, f"{text}.yaml"]
    for folder in (base, base.parent):
        for n in names:
            p = folder / n
            if p.is_file():
                return p
    from vptool.shipped import shipped_recipes  # the shipped recipes (wheel or source tree)

    stem = text.removesuffix(".yaml").removesuffix(".yml")
    if stem in shipped_recipes():
        return shipped_recipes()[stem]
    raise UserError(f"{where}: {text!r} is neither a file next to {table_path} nor a shipped recipe (see "
                    "`vptool recipes ls`)")


def read_table(path: str | Path) -> TableSpec:
    """Read and check a table file (schema: the module docstring); recipe keys are checked later, per cell.

    Raises:
        UserError: the file is missing or not YAML, a key is unknown, a name repeats or is not folder-safe, a column
            names no group, a cell or paper number names no column, a row's recipe is not found (one line each,
            naming the key).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: table file not found; pass a table YAML (see recipes/tables/)")
    raw = _mapping(read_yaml(path), str(path), _TOP)
    where = str(path)
    name = _name(raw.get("table"), f"{where}: table")
    groups = []
    for i, g in enumerate(_list(raw.get("groups"), f"{where}: groups")):
        g = _mapping(g, f"{where}: groups[{i}]", _GROUP)
        protocol = g.get("protocol")
        if protocol not in PROTOCOLS:
            raise UserError(f"{where}: groups[{i}].protocol: {protocol!r}; choose {' or '.join(PROTOCOLS)}")
        groups.append(Group(_name(g.get("name"), f"{where}: groups[{i}].name", pattern=False), protocol,
                            _overrides(g.get("set"), f"{where}: groups[{i}].set")))
    _unique([g.name for g in groups], f"{where}: groups")
    columns = []
    for i, c in enumerate(_list(raw.get("columns"), f"{where}: columns")):
        c = _mapping(c, f"{where}: columns[{i}]", _COLUMN)
        col = Column(_name(c.get("name"), f"{where}: columns[{i}].name"), c.get("group"),
                     _mapping(c.get("data"), f"{where}: columns[{i}].data"),
                     _overrides(c.get("set"), f"{where}: columns[{i}].set"))
        if col.group not in {g.name for g in groups}:
            raise UserError(f"{where}: columns[{i}].group: {col.group!r} is not one of the groups "
                            f"({', '.join(g.name for g in groups)})")
        if not col.data.get("dataset"):
            raise UserError(f"{where}: columns[{i}].data.dataset: missing (e.g. vtab-1k)")
        columns.append(col)
    _unique([c.name for c in columns], f"{where}: columns")
    column_names = {c.name for c in columns}
    rows = []
    for i, r in enumerate(_list(raw.get("rows"), f"{where}: rows")):
        r = _mapping(r, f"{where}: rows[{i}]", _ROW)
        rname = _name(r.get("name"), f"{where}: rows[{i}].name", pattern=False)
        cells = _mapping(r.get("cells"), f"{where}: rows[{i}].cells")
        for col, cell in cells.items():
            if col not in column_names:
                raise UserError(f"{where}: rows[{i}].cells: {col!r} is not a column")
            cell = _mapping(cell, f"{where}: rows[{i}].cells.{col}", _CELL)
            cells[col] = {"set": _overrides(cell.get("set"), f"{where}: rows[{i}].cells.{col}.set"),
                          "search": (None if "search" not in cell
                                     else _search(cell.get("search"), f"{where}: rows[{i}].cells.{col}.search"))}
        paper = _mapping(r.get("paper"), f"{where}: rows[{i}].paper")
        known = column_names | {g.name for g in groups} | set(PAPER_EXTRA)
        for k, v in paper.items():
            if k not in known:
                raise UserError(f"{where}: rows[{i}].paper: {k!r} is not a column, a group or one of "
                                f"{', '.join(PAPER_EXTRA)}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise UserError(f"{where}: rows[{i}].paper.{k}: {v!r} is not a number")
        rows.append(Row(rname, slug(rname), resolve_row_recipe(r.get("recipe"), path, f"{where}: rows[{i}].recipe"),
                        _overrides(r.get("set"), f"{where}: rows[{i}].set"),
                        None if "search" not in r else _search(r.get("search"), f"{where}: rows[{i}].search"),
                        cells, paper))
    _unique([r.name for r in rows], f"{where}: rows")
    _unique([r.slug for r in rows], f"{where}: rows (as folder names)")
    return TableSpec(path, name, str(raw.get("title") or name), str(raw.get("source") or ""), groups, columns, rows,
                     _search(raw.get("search"), f"{where}: search"), _overrides(raw.get("set"), f"{where}: set"))
