"""Checkpoint converters: one pure function per on-disk format, ``sd -> (timm_sd, extras, ignored_keys)``.

Each converter takes the raw state dict read from a file (``build.read_state_dict``: a torch pickle already
unwrapped from ``{'model': sd}`` / ``{'state_dict': sd}``, a ``.safetensors`` file, or a JAX ``.npz`` whose
'/'-separated arrays became float32 tensors) and returns

- ``timm_sd``: the tensors in the key layout of the timm model that ``build_backbone`` creates for the format,
  to be loaded strictly (every key must match in name and shape);
- ``extras``: pretrained tensors the timm model has no slot for but a method may need (name -> tensor), e.g.
  BEiT v2's ``mask_token`` (1, 1, D);
- ``ignored_keys``: keys dropped on purpose (decoders, projectors, momentum encoders, classifier heads,
  buffers timm recomputes).

Keys a converter does not know are passed through unchanged, so the strict key check reports them instead of
their being dropped silently. Converters never modify their input.

Formats (layouts: ``shared/CHECKPOINTS.md``; D = width, H = heads, Dh = D / H, P = patch size, N = patches):

========================  ====================================================================================
``timm``                  timm ``VisionTransformer`` / ``Beit`` layout, loaded as is; also MAE's
                          ``mae_pretrain_vit_base.pth`` (encoder only, already timm's names)
``mae``                   MAE with its decoder: ``mae_pretrain_vit_base_full.pth``, ``mae_visualize_vit_base.pth``
``mocov3``                MoCo v3 pretraining: ``vit-b-300ep.pth.tar`` (``module.base_encoder.*``)
``mocov3-linear``         MoCo v3 linear probe: ``linear-vit-b-300ep.pth.tar`` (``module.*`` + ``module.head.*``)
``jax-npz``               Google's JAX ViT ``.npz``, e.g. VPT's ``imagenet21k_ViT-B_16.npz``
``beitv2-pretrain``       BEiT v2 pretraining: ``beitv2_base_patch16_224_pt1k.pth``; also BEiT v1's
                         ``beit_base_patch16_224_pt22k.pth`` (the same layout without ``cls_pt_layers``)
========================  ====================================================================================

``detect_format`` recognises each from the keys alone; ``SIGNATURES`` says which keys an explicitly chosen
format must find in a file; ``FORMAT_NORMALIZATION`` gives the input mean/std a format's pretraining used.

This module names no family and no format: each format, with its converter, detection rule, signature and
normalisation, is a ``CheckpointFormat`` in its family's file (``vptool.prompting.families.vit``: ``timm``, ``mae``,
``mocov3``, ``mocov3-linear``, ``jax-npz``; ``...beit``: ``beitv2-pretrain``), and the tables here are read from
the family table (``vptool.prompting.families.checkpoint_formats``). The converters and their constants are
re-exported under their old names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vptool.backbones.statedict import DDP_PREFIX, Converted
from vptool.prompting.families import checkpoint_formats
from vptool.prompting.families.beit import (
    BEITV2_EXTRAS,
    BEITV2_IGNORED_PREFIXES,
    BEITV2_INDEX_KEY,
    beit_constructor_kwargs,
    convert_beitv2_pretrain,
)
from vptool.prompting.families.vit import (
    JAX_BLOCK,
    MAE_DECODER_PREFIX,
    MOCOV3_DROPPED,
    MOCOV3_ENCODER,
    convert_jax_npz,
    convert_mae,
    convert_mocov3,
    convert_mocov3_linear,
    convert_timm,
)

__all__ = [
    "BEITV2_EXTRAS", "BEITV2_IGNORED_PREFIXES", "BEITV2_INDEX_KEY", "CONVERTERS", "Converted", "DDP_PREFIX",
    "FORMAT_NORMALIZATION", "JAX_BLOCK", "MAE_DECODER_PREFIX", "MOCOV3_DROPPED", "MOCOV3_ENCODER", "SIGNATURES",
    "beit_constructor_kwargs", "convert_beitv2_pretrain", "convert_jax_npz", "convert_mae", "convert_mocov3",
    "convert_mocov3_linear", "convert_timm", "detect_format",
]

_FORMATS = checkpoint_formats()


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """Name the layout of a raw state dict from its keys: the first format, over all families in ``detect_rank``
    order, whose rule (``CheckpointFormat.detect``) matches.

    Rules, tried in this order (each format's marker keys occur in no format tried after it):

    1. ``"jax-npz"``: an ``embedding/kernel`` array or any ``Transformer/*`` array (JAX '/' names);
    2. ``"mocov3"``: any ``module.base_encoder.*`` key;
    3. ``"mocov3-linear"``: a ``module.patch_embed.proj.weight`` key (timm layout behind ``module.``);
    4. ``"beitv2-pretrain"``: ``mask_token``, a shared ``rel_pos_bias.relative_position_bias_table`` and an
       ``lm_head.*`` key;
    5. ``"mae"``: any ``decoder_*`` key (MAE's ``_full`` / ``visualize`` releases);
    6. ``"timm"`` otherwise -- including the plain MAE encoder file -- and then judged by the strict key check.
    """
    for fmt in DETECT_ORDER:
        if fmt.detects(sd):
            return fmt.name
    raise ValueError("no checkpoint format detects every state dict")  # the family table lacks a catch-all rule


#: every format, in the order ``detect_format`` tries them.
DETECT_ORDER = tuple(sorted((f for _, f in _FORMATS.values()), key=lambda f: f.detect_rank))

#: format -> (test of a raw state dict, what it looks for): the keys an explicitly chosen format must find.
#: Looser than ``detect_format`` where a release exists in several shapes: ``mae`` accepts the plain encoder
#: file (``mae_pretrain_vit_base.pth``) as well as the ``_full`` one, ``beitv2-pretrain`` a file without
#: ``lm_head``.
SIGNATURES: dict[str, tuple[Callable[[dict], bool], str]] = {
    name: (f.signature, f.wants) for name, (_, f) in _FORMATS.items()}

#: format -> (mean, std) of the pretraining's input normalisation, for formats that imply one. MAE and MoCo v3
#: trained on ImageNet-1k with the ImageNet mean/std; Google's in21k ViTs scale pixels to [-1, 1] (0.5 / 0.5).
#: ``timm`` and ``beitv2-pretrain`` are absent: the timm model's own pretrained cfg applies.
FORMAT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    name: f.normalization for name, (_, f) in _FORMATS.items() if f.normalization is not None}

#: format name -> converter; ``detect_format`` returns one of these keys.
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], Converted]] = {
    name: f.convert for name, (_, f) in _FORMATS.items()}
