"""Checks of ``backbone.kwargs`` that need no model (no torch): the size arguments a ViT is built from.

``vptool.recipe`` re-exports these (recipe validation); ``vptool.backbones.build`` uses them before building, so the
backbone layer never imports the recipe layer.
"""

from __future__ import annotations

#: ViT size arguments that must be positive integers (img_size may also be a pair).
SIZE_KWARGS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans")


def short_repr(value, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, so an error line stays one readable line however big the
    value (a YAML alias bomb expands to megabytes)."""
    import reprlib

    r = reprlib.Repr()
    r.maxstring = r.maxother = r.maxlong = limit
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple = 2, 4, 4, 4
    text = r.repr(value)
    return text if len(text) <= limit + 10 else text[:limit] + "..."


def backbone_kwargs_problems(kwargs: dict) -> list[str]:
    """``backbone.kwargs`` size arguments that cannot build a ViT (``depth: -1``, ``embed_dim: 0``, ...): each
    must be a positive integer or a non-empty list of them (a pair for ``img_size``, per-stage lists elsewhere)."""
    out = []
    for k in SIZE_KWARGS:
        if k not in kwargs:
            continue
        v = kwargs[k]
        values = list(v) if isinstance(v, (list, tuple)) and len(v) > 0 else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
            out.append(f"backbone.kwargs.{k}: {short_repr(v)} must be a positive integer")
    mlp = kwargs.get("mlp_ratio")
    if mlp is not None and (isinstance(mlp, bool) or not isinstance(mlp, (int, float)) or not mlp > 0):
        out.append(f"backbone.kwargs.mlp_ratio: {short_repr(mlp)} must be a positive number")
    return out
