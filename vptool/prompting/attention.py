"""A timm ``Block`` evaluated with extra keys/values from deep prompts (the prefix form of VPT-deep).

In VPT-deep (Jia et al. 2022, eq. 7) prompt set ``P_i`` enters block ``i+1`` next to CLS and the patch tokens,
and the block's outputs at the prompt rows are thrown away. The CLS/patch rows therefore only see the prompts as
extra keys and values::

    K_i = LN1(P_i) W_k + b_k,    V_i = LN1(P_i) W_v + b_v

so the block can be computed without the prompt rows' queries, attention outputs and MLP. This is exactly the
concatenated form ``Block([x, P_i, E])`` restricted to the CLS/patch rows (softmax over keys does not depend on
their order), at a cost that grows with ``N * (N + Np)`` instead of ``(N + Np)^2``.

Everything is computed with the block's own modules (``norm1``, ``attn.qkv``, ``q_norm``, ``k_norm``,
``attn.norm``, ``attn.proj``, ``ls1``, ``norm2``, ``mlp``, ``ls2``); no weight is copied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def prefix_block_forward(block: nn.Module, x: torch.Tensor, prompts: torch.Tensor,
                         temperature: torch.Tensor | None = None) -> torch.Tensor:
    """One timm ``Block`` on ``x`` with ``prompts`` contributing keys and values only.

    Args:
        block: a timm ``vision_transformer.Block`` (pre-norm, standard ``Attention``).
        x: (B, T, D) CLS/prefix and patch tokens entering the block.
        prompts: (B, Np, D) or (1, Np, D) prompt tokens entering the block (after prompt dropout).
        temperature: optional scalar tensor tau; attention logits are divided by it (GateVPT eq. 9).

    Returns:
        (B, T, D) the block's outputs at the rows of ``x``; equal to the concatenated form's rows.
    """
    attn = block.attn
    B, T, C = x.shape
    H, dh, A = attn.num_heads, attn.head_dim, attn.attn_dim
    h = block.norm1(x)
    q, k, v = attn.qkv(h).reshape(B, T, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, dh)
    hp = block.norm1(prompts)
    b, Np = hp.shape[:2]
    w_kv = attn.qkv.weight[A:]
    b_kv = attn.qkv.bias[A:] if attn.qkv.bias is not None else None
    kp, vp = F.linear(hp, w_kv, b_kv).reshape(b, Np, 2, H, dh).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, kp = attn.q_norm(q), attn.k_norm(k), attn.k_norm(kp)
    k = torch.cat([kp.expand(B, -1, -1, -1), k], dim=2)
    v = torch.cat([vp.expand(B, -1, -1, -1), v], dim=2)
    if temperature is None:
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    else:
        o = _sdpa_scaled(q, k, v, attn.scale / temperature)
    o = o.transpose(1, 2).reshape(B, T, A)
    o = attn.norm(o)
    if attn.gate is not None:
        o = o * attn.gate(h).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    x = x + block.drop_path1(block.ls1(o))
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x


def _sdpa_scaled(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * scale) v with a tensor ``scale`` (differentiable, e.g. a learnable temperature)."""
    logits = (q @ k.transpose(-2, -1)) * scale
    return logits.softmax(dim=-1) @ v
