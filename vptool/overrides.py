"""``--set`` overrides and recipe mappings (no torch): parse ``a.b=value`` items, merge and flatten mappings.

``vptool.recipe`` re-exports these names; the values are parsed as YAML by ``vptool.yamlio`` (safe: nothing in
an override is executed).
"""

from __future__ import annotations

import copy

import yaml

from vptool.errors import RecipeError
from vptool.yamlio import YamlProblem, load_yaml_text


def flat_keys(d: dict, prefix: str = "") -> dict:
    """A recipe mapping as ``{dotted key: value}`` (``backbone.kwargs`` stays one value)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """Return ``base`` updated by ``over`` recursively (nested mappings merged, other values replaced)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def parse_overrides(items: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested mapping; values are parsed as YAML by ``RecipeLoader`` (safe;
    ``1e-3`` and ``.5`` are floats).

    Raises:
        RecipeError: an item has no ``=`` or an empty key.
    """
    out: dict = {}
    problems = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"{item!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=0.05")
            continue
        try:
            value = load_yaml_text(text) if text.strip() else None
        except YamlProblem as exc:
            problems.append(f"{key}: {exc.message}")
            continue
        except (yaml.YAMLError, RecursionError):
            value = text
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                problems.append(f"{item!r}: {part} is set twice, once as a value")
                break
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(problems, source="--set")
    return out
