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
"""

from __future__ import annotations

PRETRAINING = ("supervised", "mae", "mocov3", "beit")
CONVENTIONS = ("vpt", "gatevpt", "spt", "vptm")

_FORMAT_PRETRAINING = {"mae": "mae", "mocov3": "mocov3", "mocov3-linear": "mocov3", "jax-npz": "supervised",
                       "beitv2-pretrain": "beit"}

#: (convention, pretraining) -> (pool, norm); pretraining "other" covers supervised, MoCo v3 and BEiT.
READOUT_DEFAULTS = {
    ("vpt", "mae"): ("avg_all", "fresh"),
    ("vpt", "other"): ("cls", "pretrained"),
    ("gatevpt", "mae"): ("avg_all", "pretrained"),
    ("gatevpt", "other"): ("cls", "pretrained"),
    ("spt", "mae"): ("avg_all", "pretrained"),
    ("spt", "other"): ("cls", "pretrained"),
    ("vptm", "mae"): ("mask", "pretrained"),
    ("vptm", "other"): ("mask", "pretrained"),
}


def pretraining_of(name: str, format: str | None = None, family: str | None = None) -> str:
    """``supervised``, ``mae``, ``mocov3`` or ``beit`` for a backbone.

    Args:
        name: ``backbone.name`` (embedded or timm, with an optional ``.tag``).
        format: the checkpoint format the weights were loaded as (``BackboneInfo.format``), or the explicit
            ``backbone.format`` when no file was read; None or ``auto``/``timm`` when it says nothing.
        family: the backbone family (``vit``, ``beit``; ``vptool.prompting.families``), if known.
    """
    if format in _FORMAT_PRETRAINING:
        return _FORMAT_PRETRAINING[format]
    from vptool.backbones.embedded import EMBEDDED

    if name in EMBEDDED:
        return EMBEDDED[name].pretraining
    base, _, tag = name.partition(".")
    if tag and ("mae" in tag.split("_") or tag.startswith("mae")):
        return "mae"
    if family == "beit" or base.startswith("beit"):
        return "beit"
    return "supervised"


def readout_defaults(convention: str, pretraining: str, has_class_token: bool = True) -> tuple[str, str]:
    """(pool, norm) that ``auto`` resolves to (table in the module doc).

    Raises:
        ValueError: an unknown convention or pretraining.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}")
    if pretraining not in PRETRAINING:
        raise ValueError(f"pretraining={pretraining!r} is not one of {', '.join(PRETRAINING)}")
    pool, norm = READOUT_DEFAULTS[(convention, "mae" if pretraining == "mae" else "other")]
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
