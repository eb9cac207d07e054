"""The attention of one frozen transformer block, evaluated with the extras prompting needs.

``prompted_attention`` is the part every backbone family shares: the block's own ``qkv`` projection, optional
``q_norm``/``k_norm``, and scaled dot-product attention, with three additions. Each family's ops file
(``vptool.prompting.families``) wraps it with that family's residual branch (ViT: ``attn.norm``, ``ls1``/``ls2``;
BEiT: ``q_bias``/``v_bias``, ``gamma_1``/``gamma_2``). No weight is copied and the ViT is never forked.

- **prefix keys/values** (VPT-deep, Jia et al. 2022, eq. 7). Prompt set ``P_i`` enters block ``i+1`` and the
  block's outputs at the prompt rows are thrown away, so the CLS/patch rows only see the prompts as extra keys and
  values: ``K_i = LN1(P_i) W_k + b_k``, ``V_i = LN1(P_i) W_v + b_v``. Computing only those (never the prompt rows'
  queries, attention outputs or MLP) equals the concatenated form on every other row, at a cost growing with
  ``T * (T + Np)`` instead of ``(T + Np)^2``.
- **temperature** (GateVPT, Yoo et al. 2023, eq. 9): the attention logits of every token and head are divided by
  the block's ``tau``: ``softmax((q k^T * scale + bias) / tau)``. It is folded into the query and the bias
  (``q / tau``, ``bias / tau``) so the fused attention kernel still runs and ``tau`` gets a gradient.
- **an additive attention bias** (B or 1, H, T, Np + T): BEiT's relative position bias expanded to a sequence
  that also holds prompt and [MASK] tokens (zero bias for those; VPTM §4).

Shapes: B images, T tokens in ``x`` (prefix tokens, patch tokens and any prompt / [MASK] rows), Np prefix prompts,
D width, A = H * dh the attention width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prompted_attention(attn: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       prefix: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                       attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention of ``attn`` (a timm ``Attention`` or ``beit.Attention``) on normalised tokens.

    Args:
        attn: the block's attention module (``num_heads``, ``scale``, optional ``q_norm``/``k_norm``).
        h: (B, T, D) the block's ``norm1`` output.
        weight, bias: the qkv projection, (3A, D) and (3A,) or None.
        prefix: optional (B or 1, Np, D) normalised prompt tokens that contribute keys and values only.
        temperature: optional scalar tensor tau > 0 dividing the attention logits (GateVPT eq. 9).
        attn_bias: optional (B or 1, H, T, Np + T) additive logit bias; key order is ``[prefix, x]``.

    Returns:
        (B, T, A) attention outputs at the rows of ``h``, heads concatenated, before the output projection.
    """
    B, T, _ = h.shape
    H = attn.num_heads
    A = weight.shape[0] // 3
    dh = A // H
    q, k, v = F.linear(h, weight, bias).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, dh)
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())
    q, k = q_norm(q), k_norm(k)
    if prefix is not None:
        bp, Np = prefix.shape[:2]
        kp, vp = F.linear(prefix, weight[A:], None if bias is None else bias[A:]).reshape(
            bp, Np, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([k_norm(kp).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    if temperature is not None:
        q = q / temperature.to(q.dtype)
        if attn_bias is not None:
            attn_bias = attn_bias / temperature.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=attn.scale)
    return o.transpose(1, 2).reshape(B, T, A)
