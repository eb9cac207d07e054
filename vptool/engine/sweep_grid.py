"""The grid of a ``vptool sweep``: recipe keys with the values to try (``--grid KEY=V1,V2,...``), the trial names
every worker derives from it, and the point table (what the Optuna study says about each grid point).

Layout: the sweep directory is ``<output.dir>/<output.name>-sweep/`` (the recipe's, after ``--set``); grid point
``i`` trains in ``<SWEEP_DIR>/<TRIAL>/`` where ``TRIAL`` is ``i`` (zero-padded, in cross-product order) followed by
``-<last key segment><value>`` for each key (``000-lr0.5-weight_decay0``), so every worker agrees on it.

Every grid value, and every grid point, is validated against the recipe schema before anything is written
(``check_grid_values``: ``train.lr=abc`` or ``-1`` is refused with exit 2, every problem listed at once).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

from vptool.errors import RecipeError, UserError
from vptool.recipe import Recipe, key_paths, load_yaml_text, parse_overrides, read_yaml, resolve

SWEEP_SUFFIX = "-sweep"
#: keys the sweep sets itself for every trial
RESERVED_KEYS = ("output.dir", "output.name")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


# --------------------------------------------------------------------------------------------------- the grid
class Grid:
    """The grid: recipe keys in the order given, each with its values as typed (strings, passed verbatim to
    ``--set``). Points are numbered in cross-product order (the last key varies fastest)."""

    def __init__(self, keys: list[str], values: list[list[str]]):
        self.keys = tuple(keys)
        self.values = tuple(tuple(v) for v in values)
        self.points = list(itertools.product(*self.values))
        self._index = {p: i for i, p in enumerate(self.points)}
        self._width = max(3, len(str(len(self.points) - 1)))

    def __len__(self) -> int:
        return len(self.points)

    def params(self, i: int) -> dict[str, str]:
        """Point ``i`` as ``{key: value string}``."""
        return dict(zip(self.keys, self.points[i]))

    def overrides(self, i: int) -> list[str]:
        """Point ``i`` as ``--set`` items, ``["train.lr=0.5", ...]``."""
        return [f"{k}={v}" for k, v in zip(self.keys, self.points[i])]

    def name(self, i: int) -> str:
        """The trial (run directory) name of point ``i``, e.g. ``000-lr0.5-weight_decay0``."""
        parts = [f"{i:0{self._width}d}"]
        for k, v in zip(self.keys, self.points[i]):
            parts.append(_NAME_CHARS.sub("_", f"{k.rsplit('.', 1)[-1]}{v}")[:48])
        return "-".join(parts)[:200]

    def index(self, params: dict) -> int | None:
        """The index of the point with these parameter values (None: not a point of this grid)."""
        try:
            return self._index.get(tuple(params[k] for k in self.keys))
        except KeyError:
            return None

    def search_space(self) -> dict[str, list[str]]:
        """The ``GridSampler`` search space (categorical string choices)."""
        return {k: list(v) for k, v in zip(self.keys, self.values)}

    def to_attr(self) -> list:
        """The JSON form stored in the study (order matters: it fixes the trial names)."""
        return [[k, list(v)] for k, v in zip(self.keys, self.values)]


def _recipe_keys() -> tuple[list[str], set[str]]:
    """(every leaf key of the recipe schema, the section names)."""
    paths = key_paths(Recipe)
    sections = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    return [p for p in paths if p not in sections], sections


def _check_grid_key(key: str) -> None:
    leaves, sections = _recipe_keys()
    if key in RESERVED_KEYS:
        raise UserError(f"--grid {key}: the sweep sets output.dir and output.name itself (each trial trains in "
                        f"<output.dir>/<output.name>{SWEEP_SUFFIX}/<TRIAL>); to move the sweep use --set {key}=...")
    if key in leaves or (key.startswith("backbone.kwargs.") and len(key) > len("backbone.kwargs.")):
        return
    if key in sections or key == "":
        example = next((p for p in leaves if p.startswith(key + ".")), "train.lr")
        raise UserError(f"--grid {key}: is a section of the recipe, not a key; name a key in it, e.g. {example}")
    close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [p for p in leaves if p.rsplit(".", 1)[-1] == last]
    hint = f"; did you mean {close[0]}?" if close else "; see the keys with vptool train RECIPE --dry-run"
    raise UserError(f"--grid {key}: unknown recipe key{hint}")


def parse_grid(items: list[str]) -> Grid:
    """Parse ``--grid KEY=V1,V2,...`` items into a ``Grid`` (the cross product of their values).

    Values are kept as the strings typed (split on commas, stripped) and later passed verbatim to ``--set``;
    ``check_grid_values`` validates them against the recipe schema.

    Args:
        items: the ``--grid`` options, e.g. ``["train.lr=0.5,0.25", "train.weight_decay=0,0.001"]``.

    Returns:
        The grid, keys in the order given.

    Raises:
        UserError: no item, an item without ``=``, an empty value list or an empty value, a value given twice,
            the same key twice, an unknown key (with a did-you-mean), or ``output.dir``/``output.name`` (one line
            naming the key and the fix).
    """
    if not items:
        raise UserError("--grid: missing; give at least one, e.g. --grid train.lr=0.5,0.25 (repeat --grid for a "
                        "cross product)")
    keys: list[str] = []
    values: list[list[str]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid {item[:80]!r}: expected KEY=V1,V2,..., e.g. --grid train.lr=0.5,0.25")
        vals = [v.strip() for v in text.split(",")]
        if not any(vals):
            raise UserError(f"--grid {key}: no values; give them comma-separated, e.g. --grid {key}=V1,V2")
        if not all(vals):
            raise UserError(f"--grid {key}: an empty value in {text[:80]!r}; give the values comma-separated, "
                            f"without an empty one, e.g. --grid {key}=V1,V2")
        dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
        if dup is not None:
            raise UserError(f"--grid {key}: value {dup[:80]!r} is given twice; list each value once")
        if key in keys:
            raise UserError(f"--grid {key}: given twice; put all its values in one --grid {key}=V1,V2,...")
        _check_grid_key(key)
        keys.append(key)
        values.append(vals)
    return Grid(keys, values)


def check_grid_values(recipe_path: str | Path, grid: Grid, sets: list[str]) -> None:
    """Validate every grid value, and every grid point, against the recipe schema before any trial starts.

    Each value is checked with the recipe and ``sets`` alone (``--grid train.lr=abc: ...``), then each point whose
    values all passed is checked whole, for the rules that join keys (``--grid point 001-lr0.5-warmup_epochs9:
    ...``).

    Raises:
        RecipeError: one line per problem (each distinct problem once), naming the key and the value.
    """
    raw = read_yaml(recipe_path)  # read once; each check resolves a copy

    def problems(overrides: list[str]) -> list[str]:
        try:
            resolve(copy.deepcopy(raw), parse_overrides([*sets, *overrides]), source=str(recipe_path))
        except RecipeError as exc:
            return list(exc.problems)
        except UserError as exc:
            return [str(exc).splitlines()[0] if str(exc) else type(exc).__name__]
        return []

    found: list[str] = []
    for key, values in zip(grid.keys, grid.values):
        for v in values:
            found += [f"--grid {key}={v}: {line}" for line in problems([f"{key}={v}"])]
    if not found:
        for i in range(len(grid)):
            for line in problems(grid.overrides(i)):
                found.append(f"--grid point {grid.name(i)}: {line}")
    unique = list(dict.fromkeys(found))
    if unique:
        raise RecipeError(unique[:20] + ([f"... and {len(unique) - 20} more"] if len(unique) > 20 else []))


def yaml_str(text: str) -> str:
    """``text`` as a ``--set`` value that reads back exactly ``text``: as is when YAML reads it as that string,
    else single-quoted."""
    try:
        if load_yaml_text(text) == text:
            return text
    except Exception:
        pass
    return "'" + text.replace("'", "''") + "'"


def display_value(text: str):
    """A grid value parsed as recipe YAML (safe), for display and plots only."""
    try:
        value = load_yaml_text(text)
    except Exception:
        return text
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


# --------------------------------------------------------------------------------------------------- points
@dataclass
class GridPoint:
    """What the study says about one grid point: the Optuna trials (``FrozenTrial``) with its parameters."""

    index: int
    trials: list = field(default_factory=list)

    def _of(self, *states):
        return [t for t in self.trials if t.state.name in states]

    @property
    def complete(self):
        done = self._of("COMPLETE")
        return min(done, key=lambda t: t.number) if done else None

    @property
    def failed(self):
        bad = [t for t in self._of("FAIL") if "error" in t.user_attrs]
        return min(bad, key=lambda t: t.number) if bad else None

    @property
    def final(self) -> bool:
        return self.complete is not None or self.failed is not None

    @property
    def running(self) -> list:
        return self._of("RUNNING")

    @property
    def waiting(self) -> list:
        return self._of("WAITING")

    @property
    def killed(self) -> int:
        return sum(1 for t in self.trials if "killed" in t.user_attrs)

    @property
    def available(self) -> bool:
        """Whether a trial could do something for this point now (no result, and nobody running it)."""
        return not self.final and (bool(self.waiting) or not self.running)

    @property
    def state(self) -> str:
        if self.complete is not None:
            return "COMPLETE"
        if self.failed is not None:
            return "FAIL"
        return "RUNNING" if self.running else "PENDING"


def grid_points(grid: Grid, trials: list) -> list[GridPoint]:
    """The point table: one ``GridPoint`` per grid point (grid order) holding the trials with its parameters."""
    points = [GridPoint(i) for i in range(len(grid))]
    for t in trials:
        i = grid.index(t.params)
        if i is not None:
            points[i].trials.append(t)
    return points
