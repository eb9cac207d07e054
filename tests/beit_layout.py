"""BEiT v2 pretraining checkpoints written in the official layout (shared by the BEiT and method tests).

Spelled out from ``shared/CHECKPOINTS.md`` -- not by saving a timm model -- including a relative position index
computed from BEiT's formula, plus a BEiT forward written from the raw file tensors.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

# tiny BEiT v2: 32 px input, 8 px patches -> 4x4 grid, N = 16 patch tokens (T = 17 with CLS), D = 32,
# 2 blocks, 2 heads (head_dim 16), MLP ratio 4, a 16-entry visual-token codebook, 2 auxiliary cls_pt blocks.
IMG, PATCH, DIM, DEPTH, HEADS, MLP, CODEBOOK = 32, 8, 32, 2, 2, 4, 16
GRID = IMG // PATCH
TINY = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS, mlp_ratio=MLP)
NAME = "beitv2_base_patch16_224"
INDEX_KEY = "rel_pos_bias.relative_position_index"


def block_layout(prefix: str, d: int = DIM, mlp_ratio: int = MLP) -> dict[str, tuple]:
    """Key -> shape of one BEiT v2 block (q/v biases, no k bias, no qkv bias, layer scale gamma_1/gamma_2)."""
    h = mlp_ratio * d
    return {
        prefix + "gamma_1": (d,), prefix + "gamma_2": (d,),
        prefix + "norm1.weight": (d,), prefix + "norm1.bias": (d,),
        prefix + "attn.q_bias": (d,), prefix + "attn.v_bias": (d,),
        prefix + "attn.qkv.weight": (3 * d, d),
        prefix + "attn.proj.weight": (d, d), prefix + "attn.proj.bias": (d,),
        prefix + "norm2.weight": (d,), prefix + "norm2.bias": (d,),
        prefix + "mlp.fc1.weight": (h, d), prefix + "mlp.fc1.bias": (h,),
        prefix + "mlp.fc2.weight": (d, h), prefix + "mlp.fc2.bias": (d,),
    }


def beitv2_pretrain_layout(d: int = DIM, depth: int = DEPTH, heads: int = HEADS, patch: int = PATCH,
                           grid: int = GRID, codebook: int = CODEBOOK, cls_pt: int = 2) -> dict[str, tuple]:
    """Key -> shape of a BEiT v2 pretraining checkpoint, written from CHECKPOINTS.md (no pos_embed)."""
    shapes = {
        "cls_token": (1, 1, d),
        "mask_token": (1, 1, d),
        "patch_embed.proj.weight": (d, 3, patch, patch),
        "patch_embed.proj.bias": (d,),
        "rel_pos_bias.relative_position_bias_table": ((2 * grid - 1) ** 2 + 3, heads),
    }
    for i in range(depth):
        shapes.update(block_layout(f"blocks.{i}.", d))
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    shapes["lm_head.weight"] = (codebook, d)
    shapes["lm_head.bias"] = (codebook,)
    for i in range(cls_pt):
        shapes.update(block_layout(f"cls_pt_layers.{i}.", d))
    return shapes


def beit_relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """BEiT's (Wh*Ww+1, Wh*Ww+1) int64 lookup into the bias table, one patch pair at a time.

    Patch i at (yi, xi) attending to patch j at (yj, xj): ``(yi-yj + Wh-1)*(2Ww-1) + (xi-xj + Ww-1)``; the CLS
    row (CLS -> patch) uses entry R-3, the CLS column (patch -> CLS) R-2, CLS -> CLS R-1, R = (2Wh-1)(2Ww-1)+3.
    """
    r = (2 * wh - 1) * (2 * ww - 1) + 3
    n = wh * ww
    idx = torch.empty(n + 1, n + 1, dtype=torch.int64)
    for i in range(n):
        yi, xi = divmod(i, ww)
        for j in range(n):
            yj, xj = divmod(j, ww)
            idx[i + 1, j + 1] = (yi - yj + wh - 1) * (2 * ww - 1) + (xi - xj + ww - 1)
    idx[0, :] = r - 3
    idx[:, 0] = r - 2
    idx[0, 0] = r - 1
    return idx


def random_beitv2_sd(seed: int = 0, **layout_kwargs) -> dict[str, torch.Tensor]:
    """Random tensors in the BEiT v2 pretraining layout (norm weights near 1, others ~ N(0, 0.2^2))."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in beitv2_pretrain_layout(**layout_kwargs).items():
        v = 0.2 * torch.randn(shape, generator=g)
        if "norm" in k and k.endswith(".weight"):
            v = v + 1.0
        sd[k] = v
    grid = layout_kwargs.get("grid", GRID)
    sd[INDEX_KEY] = beit_relative_position_index(grid, grid)
    return sd


def write_beitv2(sd: dict[str, torch.Tensor], path: Path, **extra) -> Path:
    """Write ``sd`` the way BEiT v2's training script dumps it (``args`` is an ``argparse.Namespace``)."""
    torch.save({"model": sd, "epoch": 3, "args": argparse.Namespace(lr=1e-3), **extra}, path)
    return path


def reference_forward_features(sd: dict[str, torch.Tensor], img: torch.Tensor, heads: int) -> torch.Tensor:
    """BEiT v2 encoder from the raw checkpoint tensors: (B, 3, H, W) image -> (B, 1 + N, D) normed tokens."""
    B = img.shape[0]
    w = sd["patch_embed.proj.weight"]
    D, P = w.shape[0], w.shape[-1]
    hd = D // heads
    x = F.conv2d(img, w, sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)  # B, N, D
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)  # B, T, D
    T = x.shape[1]
    bias = sd["rel_pos_bias.relative_position_bias_table"][sd[INDEX_KEY].reshape(-1)]
    bias = bias.reshape(T, T, heads).permute(2, 0, 1)  # H, T, T

    def ln(t, name):
        return F.layer_norm(t, (D,), sd[name + ".weight"], sd[name + ".bias"], eps=1e-6)

    for i in range(sum(k.startswith("blocks.") and k.endswith(".gamma_1") for k in sd)):
        b = f"blocks.{i}."
        h = ln(x, b + "norm1")
        qkv_bias = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
        qkv = h @ sd[b + "attn.qkv.weight"].T + qkv_bias  # B, T, 3D
        q, k, v = qkv.reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)  # each B, H, T, hd
        logits = q @ k.transpose(-2, -1) * hd ** -0.5 + bias
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
        o = o @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        x = x + sd[b + "gamma_1"] * o
        h = ln(x, b + "norm2")
        h = F.gelu(h @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        h = h @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
        x = x + sd[b + "gamma_2"] * h
    return ln(x, "norm")


# --- pure converter ---------------------------------------------------------------------------------------------
