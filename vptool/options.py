"""The option space's choices, one ``Literal`` table per option (no torch).

The recipe schema (``vptool.recipe``) and the library (``vptool.prompting.model.PromptedViT``,
``vptool.from_preset``) validate against the same tables, so a value the recipe refuses is refused in Python
too, with the same allowed values named (DESIGN.md §1; STYLE.md: ``str`` choices, checked where they enter).
"""

from __future__ import annotations

import typing
from typing import Literal

#: the prompt modes, each a unit in its own file: name -> ``vptool/prompting/modes/<file>.py`` (register a new mode
#: here: one line; ``vptool.prompting.modes``)
PROMPT_MODES = {"none": "none", "shallow": "shallow", "deep": "deep", "gated": "gated"}
PromptMode = Literal[tuple(PROMPT_MODES)]  # the choices are the registered modes
#: where the prompts enter (VPT Fig. 5; official ``MODEL.PROMPT.LOCATION`` in brackets): prepend (prepend) | add
#: (add) | add-1 (add-1) | prepend-pixel (prepend-pixel) | concat-channel (below) | pad (pad)
PromptLocation = Literal["prepend", "add", "add-1", "prepend-pixel", "concat-channel", "pad"]
#: where the paper and the official VPT code differ on a prompt location, which one to follow
#: (``vptool.prompting.locations``: add/add-1 on the class token too, concat-channel's tuned patch embedding, pad's
#: pixel space)
LocationForm = Literal["paper", "official"]
PromptInit = Literal["xavier", "zeros", "file", "kmeans", "mean-pool", "max-pool", "random"]
InitSource = Literal["same", "first", "last"]
InitForm = Literal["paper", "official"]
GateKind = Literal["soft", "hard"]
Temperature = Literal["fixed", "learnable"]
MaskToken = Literal["none", "auto", "pretrained", "learnable"]
ReadoutPool = Literal["cls", "avg", "avg_all", "prompt", "mask"]
ReadoutNorm = Literal["pretrained", "fresh", "none"]
#: the recipe's readout keys also take ``auto``: resolved from the method and the backbone (``vptool.conventions``)
ReadoutPoolSetting = Literal["auto", "cls", "avg", "avg_all", "prompt", "mask"]
ReadoutNormSetting = Literal["auto", "pretrained", "fresh", "none"]
HeadType = Literal["linear", "verbalizer", "mlp1", "mlp2"]
HeadInit = Literal["trunc_normal", "official"]
Tune = Literal["prompts", "head", "all"]
DeepForm = Literal["prefix", "concat"]
TrainTransform = Literal["vtab", "fgvc"]
Optimizer = Literal["sgd", "adamw"]
LrScaling = Literal["none", "linear"]
Precision = Literal["auto", "fp32", "bf16"]
FeatureCache = Literal["auto", "off"]
#: ``data.cache``: auto (decoded-image cache for file datasets, ``vptool.data.cache``) | off
DataCache = Literal["auto", "off"]
#: ``data.num_workers``: a count, or auto (``vptool.data.loading.resolve_num_workers``)
NumWorkers = typing.Union[int, Literal["auto"]]
#: ``train.activation_checkpointing``: recompute each block in the backward pass; auto = on when the memory estimate
#: without it exceeds the device's memory (``vptool.engine.setup.runtime_options``)
Checkpointing = Literal["off", "auto", "on"]
#: ``train.compile``: auto = torch.compile when training on CUDA, eager on the CPU
CompileSetting = Literal["auto", True, False]
#: the dtype the frozen backbone weights are stored in (``vptool.prompting.lowp``); the recipe's
#: ``backbone.dtype`` adds ``auto`` (bf16 on a CUDA device with bf16 autocast, else fp32)
BackboneDtype = Literal["fp32", "bf16", "fp16"]
BackboneDtypeSetting = Literal["auto", "fp32", "bf16", "fp16"]
#: the backbone families, each one file ``vptool/prompting/families/<name>.py``, with the checkpoint formats it
#: converts (register a new family here: one line; ``vptool.prompting.families``)
BACKBONE_FAMILIES = {"vit": ("timm", "mae", "mocov3", "mocov3-linear", "jax-npz"), "beit": ("beitv2-pretrain",),
                     "swin": ("swin-microsoft",), "convnext": (), "resnet": ()}
BackboneFormat = Literal[("auto", *(f for formats in BACKBONE_FAMILIES.values() for f in formats))]
#: Swin: what patch merging does with the prompt rows (VPT §4.2): drop (the paper: prompts are ignored by merging) |
#: official (the official code: tiled 4x through the merging's norm and reduction)
SwinMerge = Literal["drop", "official"]
VtabSplit = Literal["final", "tune"]
InitTransform = Literal["auto", "eval", "train"]


class Blocks(str):
    """The type of ``prompt.blocks``: blocks in the paper's 1-based notation, a range ``1-6``, one block ``12``,
    or a list ``[1, 5, 9]`` (``vptool.config.blocks_spec`` reads it into its canonical string, ``1-6``)."""


def choices(table) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` table, in their documented order."""
    return typing.get_args(table)


def check_choice(name: str, value, table) -> str:
    """``value`` when it is one of ``table``'s values.

    Raises:
        ValueError: one line naming the option, the bad value and every allowed value, e.g.
            ``readout_pool='mean' is not one of 'cls', 'avg', 'avg_all', 'prompt', 'mask'``.
    """
    allowed = choices(table)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(repr(a) for a in allowed)}")
    return value
