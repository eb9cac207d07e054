"""One transformer block of a frozen timm backbone, evaluated with the extras prompting needs.

``block_forward`` runs a timm ``vision_transformer.Block`` or ``beit.Block`` with the block's own modules
(``norm1``, ``attn.qkv`` (+ BEiT ``q_bias``/``v_bias``), ``q_norm``/``k_norm``, ``attn.proj``, ``ls1``/``gamma_1``,
``norm2``, ``mlp``, ``ls2``/``gamma_2``); no weight is copied and the ViT is never forked. It adds three options:

- **prefix keys/values** (VPT-deep, Jia et al. 2022, eq. 7). Prompt set ``P_i`` enters block ``i+1`` and the
  block's outputs at the prompt rows are thrown away, so the CLS/patch rows only see the prompts as extra keys and
  values: ``K_i = LN1(P_i) W_k + b_k``, ``V_i = LN1(P_i) W_v + b_v``. Computing only those (never the prompt rows'
  queries, attention outputs or MLP) equals the concatenated form on every other row, at a cost growing with
  ``T * (T + Np)`` instead of ``(T + Np)^2``.
- **temperature** (GateVPT, Yoo et al. 2023, eq. 9): the attention logits of every token and head are divided by
  the block's ``tau``: ``softmax((q k^T * scale + bias) / tau)``. It is folded into the query and the bias
  (``q / tau``, ``bias / tau``) so the fused attention kernel still runs and ``tau`` gets a gradient.
- **an additive attention bias** (B or 1, H, T, Np + T): BEiT's relative position bias expanded to a sequence
  that also holds prompt and [MASK] tokens (zero bias for those; VPTM §4). The block's own per-block relative
  position bias (fine-tuned BEiT checkpoints) must already be included by the caller (``block_rel_pos_bias``).

Shapes: B images, T tokens in ``x`` (prefix tokens, patch tokens and any prompt / [MASK] rows), Np prefix prompts,
D width, H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _is_beit(block: nn.Module) -> bool:
    return hasattr(block, "gamma_1")


def block_rel_pos_bias(block: nn.Module) -> torch.Tensor | None:
    """The block's own relative position bias (1, H, 1+N, 1+N) (BEiT with per-block bias), else None."""
    attn = block.attn
    if getattr(attn, "relative_position_bias_table", None) is None:
        return None
    return attn._get_rel_pos_bias()


def _qkv_weights(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = attn.qkv.weight
    if getattr(attn, "q_bias", None) is not None:  # BEiT: q and v biases, the k bias is zero
        return w, torch.cat([attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias])
    return w, attn.qkv.bias


def block_forward(block: nn.Module, x: torch.Tensor, prefix: torch.Tensor | None = None,
                  temperature: torch.Tensor | None = None, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
    """One timm ``Block`` (ViT or BEiT) on ``x`` with prefix keys/values, a temperature and an attention bias.

    Args:
        block: a timm ``vision_transformer.Block`` (standard ``Attention``) or ``beit.Block``.
        x: (B, T, D) tokens entering the block.
        prefix: optional (B, Np, D) or (1, Np, D) tokens that contribute keys and values only (VPT-deep prefix
            form); their output rows are not computed.
        temperature: optional scalar tensor tau > 0 dividing the attention logits (GateVPT eq. 9).
        attn_bias: optional (B or 1, H, T, Np + T) additive logit bias; key order is ``[prefix, x]``.

    Returns:
        (B, T, D) the block's outputs at the rows of ``x``.
    """
    attn = block.attn
    B, T, _ = x.shape
    H = attn.num_heads
    w, b = _qkv_weights(attn)
    A = w.shape[0] // 3
    dh = A // H
    h = block.norm1(x)
    q, k, v = F.linear(h, w, b).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, dh)
    q_norm, k_norm = getattr(attn, "q_norm", nn.Identity()), getattr(attn, "k_norm", nn.Identity())
    q, k = q_norm(q), k_norm(k)
    if prefix is not None:
        hp = block.norm1(prefix)
        bp, Np = hp.shape[:2]
        kp, vp = F.linear(hp, w[A:], None if b is None else b[A:]).reshape(bp, Np, 2, H, dh).permute(
            2, 0, 3, 1, 4).unbind(0)
        k = torch.cat([k_norm(kp).expand(B, -1, -1, -1), k], dim=2)
        v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    if attn_bias is not None:
        attn_bias = attn_bias.to(q.dtype)
    if temperature is not None:
        q = q / temperature.to(q.dtype)
        if attn_bias is not None:
            attn_bias = attn_bias / temperature.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=attn.scale)
    o = o.transpose(1, 2).reshape(B, T, A)
    if _is_beit(block):
        o = attn.proj_drop(attn.proj(o))
        if block.gamma_1 is not None:
            o = block.gamma_1 * o
        x = x + block.drop_path1(o)
        m = block.mlp(block.norm2(x))
        x = x + block.drop_path2(m if block.gamma_2 is None else block.gamma_2 * m)
        return x
    o = attn.norm(o)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x

