"""Readout conventions that follow the backbone (no torch): ``readout.pool: auto`` / ``readout.norm: auto``.

Papers and their official code read a prompted ViT out differently depending on how the backbone was pretrained
(``../README.md``, "Faithfulness"; CHECKPOINTS.md, "MAE"). ``auto`` picks, from the method's convention and the
backbone's pretraining, what the official code of that method does on that backbone:

=====================  ==============================  ============================================================
method (convention)    supervised / MoCo v3 / BEiT     MAE
=====================  ==============================  ============================================================
VPT, linear, full      cls + pretrained norm           avg_all + fresh norm (VPT ``vit_mae.py``: the mean of every
(``vpt``)                                              token after CLS, prompts included, then a new ``fc_norm``)
GateVPT (``gatevpt``)  cls + pretrained norm           avg_all + pretrained norm (GateVPT ``vit_prompt/vit_mae.py``)
                       (GateVPT ``vit_moco.py``)
SPT (``spt``)          cls + pretrained norm           avg_all + pretrained norm (SPT ``Models/MAE_vpt.py``)
VPTM (``vptm``)        mask + pretrained norm          mask + pretrained norm (h[MASK] after the final norm, eq. 7)
=====================  ==============================  ============================================================

A backbone without a class token reads ``avg`` instead of ``cls``. The pretraining comes from the checkpoint
format (``mae``; ``mocov3``/``mocov3-linear``; ``jax-npz`` is supervised; ``beitv2-pretrain`` is BEiT), else
from the name: an embedded backbone's own record, a timm pretrained tag containing ``mae`` (e.g.
``vit_base_patch16_224.mae``), a BEiT model; anything else counts as supervised.

The rows of the table, the pretraining names and the format and name rules belong to the backbone families
(``vptool.prompting.families``: each family file's ``FAMILY`` has ``pretrainings``, ``pretraining``, ``readout``
and its formats' ``pretraining``); this module reads them from the family table when first asked, so importing it
stays free of torch (``PRETRAINING`` and ``READOUT_DEFAULTS`` are computed on first access).
"""

from __future__ import annotations

CONVENTIONS = ("vpt", "gatevpt", "spt", "vptm")
#: the pretraining of a backbone no rule names.
FALLBACK_PRETRAINING = "supervised"


def pretrainings() -> tuple[str, ...]:
    """Every family's pretraining names, in family-table order: ``supervised``, ``mae``, ``mocov3``, ``beit``."""
    from vptool.prompting.families import family_table

    return tuple(p for spec in family_table() for p in spec.pretrainings)


def readout_table() -> dict[tuple[str, str], tuple[str, str]]:
    """(convention, pretraining) -> (pool, norm): every family's ``readout`` rows (the table in the module doc)."""
    from vptool.prompting.families import family_table

    return {row: value for spec in family_table() for row, value in spec.readout.items()}


def __getattr__(name: str):
    """``PRETRAINING`` (``pretrainings()``) and ``READOUT_DEFAULTS`` (``readout_table()``), read from the family
    table on access so that importing this module needs no torch."""
    if name == "PRETRAINING":
        return pretrainings()
    if name == "READOUT_DEFAULTS":
        return readout_table()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def pretraining_of(name: str, format: str | None = None, family: str | None = None) -> str:
    """``supervised``, ``mae``, ``mocov3`` or ``beit`` for a backbone.

    Rules, in order: the format's ``pretraining`` (its family file's ``CheckpointFormat``); an embedded backbone's
    own record; each family's name rule (``FamilySpec.pretraining``) in family-table order; ``supervised``.

    Args:
        name: ``backbone.name`` (embedded or timm, with an optional ``.tag``).
        format: the checkpoint format the weights were loaded as (``BackboneInfo.format``), or the explicit
            ``backbone.format`` when no file was read; None or ``auto``/``timm`` when it says nothing.
        family: the backbone family (``vit``, ``beit``; ``vptool.prompting.families``), if known.
    """
    from vptool.backbones.embedded import EMBEDDED
    from vptool.prompting.families import checkpoint_formats, family_table

    spec = checkpoint_formats().get(format) if format is not None else None
    if spec is not None and spec[1].pretraining is not None:
        return spec[1].pretraining
    if name in EMBEDDED:
        return EMBEDDED[name].pretraining
    for fam in family_table():
        found = fam.pretraining(name, family)
        if found is not None:
            return found
    return FALLBACK_PRETRAINING


def readout_defaults(convention: str, pretraining: str, has_class_token: bool = True) -> tuple[str, str]:
    """(pool, norm) that ``auto`` resolves to (table in the module doc).

    Raises:
        ValueError: an unknown convention or pretraining.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}")
    known = pretrainings()
    if pretraining not in known:
        raise ValueError(f"pretraining={pretraining!r} is not one of {', '.join(known)}")
    pool, norm = readout_table()[(convention, pretraining)]
    if pool == "cls" and not has_class_token:
        pool = "avg"
    return pool, norm


def resolve_readout(pool: str, norm: str, convention: str, pretraining: str,
                    has_class_token: bool = True) -> tuple[str, str]:
    """``(pool, norm)`` with each ``auto`` replaced by ``readout_defaults``; explicit values are kept.

    Raises:
        ValueError: an unknown convention or pretraining (``readout_defaults``).
    """
    want_pool, want_norm = readout_defaults(convention, pretraining, has_class_token)
    return (want_pool if pool == "auto" else pool), (want_norm if norm == "auto" else norm)
