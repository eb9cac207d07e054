"""Checkpoint converters: one pure function per on-disk format, ``sd -> (timm_sd, extras, ignored_keys)``.

Each converter takes the raw state dict read from a file and returns

- ``timm_sd``: the tensors in the key layout of the timm model that ``build_backbone`` creates for the format,
  to be loaded strictly (every key must match in name and shape);
- ``extras``: pretrained tensors the timm model has no slot for but a method may need (name -> tensor), e.g.
  BEiT v2's ``mask_token`` (1, 1, D);
- ``ignored_keys``: keys dropped on purpose (auxiliary pretraining modules, buffers timm recomputes).

``detect_format`` recognises a format from the keys alone, like timm's ``checkpoint_filter_fn``. New formats
(mae-full, mocov3, jax-npz) add a detector branch, a converter in ``CONVERTERS`` and, if they need a different
model, its constructor kwargs (like ``beit_constructor_kwargs``). Layouts are documented in
``shared/CHECKPOINTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Converted = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]

#: BEiT v2 pretraining keys that are kept aside as extras (the [MASK] embedding and the visual-token head).
BEITV2_EXTRAS = ("mask_token", "lm_head.weight", "lm_head.bias")
#: BEiT v2 pretraining keys that are dropped: the auxiliary CLS-pretraining blocks and the index buffer that
#: timm recomputes from the patch grid (``build_backbone`` checks the file's copy against timm's).
BEITV2_IGNORED_PREFIXES = ("cls_pt_layers.",)
BEITV2_INDEX_KEY = "rel_pos_bias.relative_position_index"


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """Name the layout of a raw state dict from its keys.

    Returns:
        ``"beitv2-pretrain"`` when the keys hold ``mask_token``, a shared
        ``rel_pos_bias.relative_position_bias_table`` and an ``lm_head.*`` (BEiT v2 masked-image-modelling
        checkpoint, e.g. ``beitv2_base_patch16_224_pt1k.pth``); otherwise ``"timm"`` (loaded as is).
    """
    if ("mask_token" in sd and "rel_pos_bias.relative_position_bias_table" in sd
            and any(k.startswith("lm_head.") for k in sd)):
        return "beitv2-pretrain"
    return "timm"


def convert_timm(sd: dict[str, torch.Tensor]) -> Converted:
    """Identity: the file is already in the timm layout (no extras, nothing ignored here)."""
    return dict(sd), {}, []


def convert_beitv2_pretrain(sd: dict[str, torch.Tensor]) -> Converted:
    """BEiT v2 pretraining checkpoint -> timm ``Beit`` with a shared relative position bias.

    The remaining keys (``cls_token``, ``patch_embed.*``, ``rel_pos_bias.relative_position_bias_table``
    ((2Wh-1)(2Ww-1)+3, H), ``blocks.{i}.{gamma_1,gamma_2,norm1,norm2,attn.q_bias,attn.v_bias,attn.qkv.weight,
    attn.proj,mlp.fc1,mlp.fc2}``, ``norm.*``) already have timm's names and shapes and are returned unchanged.

    Returns:
        ``(timm_sd, extras, ignored_keys)``: ``extras`` holds ``mask_token`` (1, 1, D) as float32 and
        ``lm_head.weight`` (V, D) / ``lm_head.bias`` (V,) where present (V = 8192 visual tokens);
        ``ignored_keys`` lists ``rel_pos_bias.relative_position_index`` and every ``cls_pt_layers.*`` key.
    """
    timm_sd: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k in BEITV2_EXTRAS:
            extras[k] = v.float() if k == "mask_token" else v
        elif k == BEITV2_INDEX_KEY or k.startswith(BEITV2_IGNORED_PREFIXES):
            ignored.append(k)
        else:
            timm_sd[k] = v
    return timm_sd, extras, ignored


def beit_constructor_kwargs(format: str) -> dict:
    """The timm ``Beit`` constructor kwargs a checkpoint layout requires.

    For ``"beitv2-pretrain"``: no absolute position embedding, one relative position bias shared by all blocks
    (``rel_pos_bias.*``, not per-block tables), the final ``norm.*`` (no ``fc_norm``), separate q/v biases, and
    layer scale (``init_values`` only has to be non-zero so ``gamma_1``/``gamma_2`` exist; loading overwrites
    them). Other formats need nothing: ``{}``.
    """
    if format == "beitv2-pretrain":
        return dict(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                    use_fc_norm=False, qkv_bias=True, init_values=0.1)
    return {}


#: format name -> converter; ``detect_format`` returns one of these keys.
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor]], Converted]] = {
    "timm": convert_timm,
    "beitv2-pretrain": convert_beitv2_pretrain,
}
