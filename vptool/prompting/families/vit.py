"""Ops file of the timm ``VisionTransformer`` family: supervised (in21k), MAE, MoCo v3 and DINOv2 ViTs.

Blocks are timm's pre-norm ``Block`` with the standard ``Attention``:
``x + ls1(proj(norm(attn(norm1(x)))))`` then ``x + ls2(mlp(norm2(x)))``. Positions are absolute
(``_pos_embed``); prefix tokens are CLS and, for DINOv2 with registers, the register tokens
(``num_prefix_tokens`` = 1 + registers), which ``_pos_embed`` places after CLS (without a position embedding when
``no_embed_class``). Prompts go after all prefix tokens (VPT eq. 4 with C = every prefix token).
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.prompting.attention import prompted_attention
from vptool.prompting.families import Family
from vptool.prompting.layout import RowLayout


def vit_problem(model: nn.Module) -> str | None:
    """Why a ``VisionTransformer`` cannot be prompted by this ops file, or None."""
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    if not all(type(b) is Block and type(b.attn) is Attention for b in model.blocks):
        kinds = sorted({f"{type(b).__name__}/{type(getattr(b, 'attn', None)).__name__}" for b in model.blocks})
        return f"has blocks other than timm's standard Block/Attention ({', '.join(kinds)})"
    if getattr(model, "attn_pool", None) is not None:
        return "uses attention pooling (global_pool='map'), not supported"
    return None


class VitOps(Family):
    """Embedding and block forward of timm ``VisionTransformer`` (see the module doc)."""

    name = "vit"

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = backbone.patch_embed(x)
        x = backbone._pos_embed(x)  # timm's: prefix tokens (CLS, registers) and the absolute position embedding
        x = backbone.patch_drop(x)
        return backbone.norm_pre(x)

    def block(self, blk: nn.Module, x: torch.Tensor, layout: RowLayout, prefix: torch.Tensor | None = None,
              temperature: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
        """timm's block; absolute positions only, so the layout needs no position signal here."""
        if prefix is None and temperature is None:
            return blk(x)  # timm's own forward (fused attention)
        attn = blk.attn
        h = blk.norm1(x)
        o = prompted_attention(attn, h, attn.qkv.weight, attn.qkv.bias,
                               None if prefix is None else blk.norm1(prefix), temperature, None)
        o = attn.norm(o)
        if getattr(attn, "gate", None) is not None:
            o = o * attn.gate(h).sigmoid()
        o = attn.proj_drop(attn.proj(o))
        x = x + blk.drop_path1(blk.ls1(o))
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
