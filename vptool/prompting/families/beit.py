"""Ops file of the timm ``Beit`` family: BEiT v1/v2 (VPTM's backbone).

Blocks: ``x + gamma_1 * proj(attn(norm1(x)))`` then ``x + gamma_2 * mlp(norm2(x))`` (layer scale ``gamma`` may be
None); the qkv projection has a q and a v bias and no k bias (``q_bias``/``v_bias``). Positions: an optional
absolute ``pos_embed`` and a relative position bias over CLS + patches, shared by all blocks
(``rel_pos_bias``: pretraining checkpoints) and/or per block (``attn.relative_position_bias_table``: fine-tuned
checkpoints), both (H, 1+N, 1+N). The prompted forward expands them to sequences with prompt and [MASK] rows,
with zero bias for every pair involving those (VPTM §4).
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.prompting.attention import prompted_attention
from vptool.prompting.families import Family
from vptool.prompting.layout import RowLayout


def beit_problem(model: nn.Module) -> str | None:
    """Why a ``Beit`` cannot be prompted by this ops file, or None."""
    from timm.models import beit

    if not all(type(b) is beit.Block and type(b.attn) is beit.Attention for b in model.blocks):
        return "has blocks other than timm's beit.Block/beit.Attention"
    return None


class BeitOps(Family):
    """Embedding, block forward and relative position biases of timm ``Beit`` (see the module doc)."""

    name = "beit"

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = backbone.patch_embed(x)
        x = torch.cat([backbone.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if backbone.pos_embed is not None:
            x = x + backbone.pos_embed
        return backbone.pos_drop(x)

    def start(self, backbone: nn.Module) -> dict:
        """The shared relative position bias (H, 1+N, 1+N) or None, and a cache of its expansions per layout."""
        return {"shared": self.shared_position_bias(backbone), "expanded": {}}

    def block(self, blk: nn.Module, x: torch.Tensor, layout: RowLayout, prefix: torch.Tensor | None = None,
              temperature: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
        state = state if state is not None else {"shared": None, "expanded": {}}
        attn = blk.attn
        w = attn.qkv.weight
        b = None if attn.q_bias is None else torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
        o = prompted_attention(attn, blk.norm1(x), w, b, None if prefix is None else blk.norm1(prefix),
                               temperature, self.attention_bias(blk, layout, state))
        o = attn.proj_drop(attn.proj(o))
        if blk.gamma_1 is not None:
            o = blk.gamma_1 * o
        x = x + blk.drop_path1(o)
        m = blk.mlp(blk.norm2(x))
        return x + blk.drop_path2(m if blk.gamma_2 is None else blk.gamma_2 * m)

    def attention_bias(self, blk: nn.Module, layout: RowLayout, state: dict) -> torch.Tensor | None:
        """The block's relative position bias (its own plus the shared one) laid out over ``layout``'s rows:
        (1, H, T, prefix + T), or None without one. The shared bias alone is expanded once per layout and
        forward (``state``)."""
        own, shared = self.block_position_bias(blk), state.get("shared")
        if own is None:
            if shared is None:
                return None
            cache = state.setdefault("expanded", {})
            if layout.key not in cache:
                cache[layout.key] = expand_position_bias(shared, layout)
            return cache[layout.key]
        return expand_position_bias(own if shared is None else own + shared, layout)

    def shared_position_bias(self, backbone: nn.Module) -> torch.Tensor | None:
        rpb = getattr(backbone, "rel_pos_bias", None)
        return None if rpb is None else rpb()  # timm's RelativePositionBias: (H, 1+N, 1+N)

    def block_position_bias(self, blk: nn.Module) -> torch.Tensor | None:
        if getattr(blk.attn, "relative_position_bias_table", None) is None:
            return None
        return blk.attn._get_rel_pos_bias()[0]  # timm's own (1, H, 1+N, 1+N) table lookup

    def has_block_position_bias(self, backbone: nn.Module) -> bool:
        return any(getattr(b.attn, "relative_position_bias_table", None) is not None for b in backbone.blocks)


def expand_position_bias(rel: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """Expand a (H, 1+N, 1+N) class + patch relative position bias to the rows of ``layout``.

    Returns (1, H, T, prefix + T): the bias between class/patch rows where they sit, zero for every pair involving
    a prompt or [MASK] row, and ``layout.prefix`` leading zero columns (deep prompts' keys; VPTM §4).
    """
    sl = layout.slices()
    idx = torch.cat([torch.arange(sl["C"].start, sl["C"].stop), torch.arange(sl["X"].start, sl["X"].stop)])
    idx = idx.to(rel.device)
    T, prefix = layout.rows, layout.prefix
    full = rel.new_zeros(rel.shape[0], T, prefix + T)
    full[:, idx[:, None], prefix + idx[None, :]] = rel
    return full.unsqueeze(0)
