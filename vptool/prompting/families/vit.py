"""Ops file of the timm ``VisionTransformer`` family: supervised (in21k), MAE, MoCo v3 and DINOv2 ViTs.

Blocks are timm's pre-norm ``Block`` with the standard ``Attention``:
``x + ls1(proj(norm(attn(norm1(x)))))`` then ``x + ls2(mlp(norm2(x)))``. Positions are absolute
(``_pos_embed``); prefix tokens are CLS and, for DINOv2 with registers, the register tokens
(``num_prefix_tokens`` = 1 + registers), which ``_pos_embed`` places after CLS (without a position embedding when
``no_embed_class``). Prompts go after all prefix tokens (VPT eq. 4 with C = every prefix token).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from timm.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_INCEPTION_MEAN,
    IMAGENET_INCEPTION_STD,
)
from torch import nn

from vptool.backbones.statedict import DDP_PREFIX, Converted
from vptool.prompting.attention import prompted_attention
from vptool.prompting.families import CheckpointFormat, Family, FamilySpec
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
        return self.embed_patches(backbone, backbone.patch_embed(x))

    def embed_patches(self, backbone: nn.Module, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """On another ``grid`` than the backbone's, the position embedding's grid part is resampled to it
        (bilinear, corners aligned: the official VPT code's ``ndimage.zoom(order=1)`` for ``pad``)."""
        if grid is None or tuple(grid) == tuple(backbone.patch_embed.grid_size):
            x = backbone._pos_embed(x)  # timm's: prefix tokens (CLS, registers) and the absolute position embedding
        else:
            x = resized_pos_embed(backbone, x, tuple(grid))
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


def resized_pos_embed(backbone: nn.Module, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """timm's ``_pos_embed`` for (B, h*w, D) patch tokens on another ``grid`` (h, w): the grid part of
    ``pos_embed`` resampled bilinearly with corners aligned, the prefix tokens (CLS, registers) placed as timm does
    (with their position embedding unless ``no_embed_class``) -> (B, n_prefix + h*w, D)."""
    import torch.nn.functional as F

    B, _, D = x.shape
    n_pos_prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
    pos = backbone.pos_embed
    prefix = [t.expand(B, -1, -1) for t in (backbone.cls_token, backbone.reg_token) if t is not None]
    if pos is None:
        return torch.cat([*prefix, x], dim=1)
    g = pos[:, n_pos_prefix:].reshape(1, *backbone.patch_embed.grid_size, D).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=grid, mode="bilinear", align_corners=True).permute(0, 2, 3, 1).reshape(1, -1, D)
    if backbone.no_embed_class:
        return backbone.pos_drop(torch.cat([*prefix, x + g], dim=1))
    return backbone.pos_drop(torch.cat([*prefix, x], dim=1) + torch.cat([pos[:, :n_pos_prefix], g], dim=1))


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, constructor arguments, pretraining and readout of the ViT family (registered as ``FAMILY``).
#
# Formats (layouts: ``shared/CHECKPOINTS.md``; D = width, H = heads, Dh = D / H, P = patch size, N = patches):
# ``timm`` (timm's own layout, also MAE's encoder-only ``mae_pretrain_vit_base.pth``), ``mae`` (with decoder),
# ``mocov3`` (pretraining), ``mocov3-linear`` (linear probe), ``jax-npz`` (Google's JAX ViT ``.npz``).
# ------------------------------------------------------------------------------------------------------------


log = logging.getLogger(__name__)

#: MAE decoder keys (``decoder_embed``, ``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``,
#: ``decoder_pos_embed``) all start with this; with ``mask_token`` (1, 1, decoder width) they are stripped.
MAE_DECODER_PREFIX = "decoder_"
MOCOV3_ENCODER = "module.base_encoder."
MOCOV3_DROPPED = ("module.momentum_encoder.", "module.predictor.")
JAX_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")

#: the keys of MAE's encoder-only release (``mae_pretrain_vit_base.pth``) beyond the blocks: CHECKPOINTS.md
MAE_ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                    "norm.bias")


def is_jax_npz(sd: dict) -> bool:
    """JAX '/' names: an ``embedding/kernel`` array or any ``Transformer/*`` array."""
    return "embedding/kernel" in sd or any(k.startswith("Transformer/") for k in sd)


def is_mocov3(sd: dict) -> bool:
    """Any ``module.base_encoder.*`` key."""
    return any(k.startswith(MOCOV3_ENCODER) for k in sd)


def is_mocov3_linear(sd: dict) -> bool:
    """A ``module.patch_embed.proj.weight`` key (timm layout behind ``module.``)."""
    return f"{DDP_PREFIX}patch_embed.proj.weight" in sd


def is_mae_full(sd: dict) -> bool:
    """Any ``decoder_*`` key (MAE's ``_full`` / ``visualize`` releases)."""
    return any(k.startswith(MAE_DECODER_PREFIX) for k in sd)


def is_mae_encoder(sd: dict) -> bool:
    """MAE's encoder keys ``cls_token`` and ``patch_embed.proj.weight`` (the plain or the ``_full`` release)."""
    return "cls_token" in sd and "patch_embed.proj.weight" in sd


def is_timm(sd: dict) -> bool:
    """A ``patch_embed.proj.weight`` key."""
    return "patch_embed.proj.weight" in sd


def is_any(sd: dict) -> bool:
    """``detect_format``'s last rule: any other state dict is read as ``timm`` (the plain MAE encoder file
    included) and then judged by the strict key check."""
    return True


def convert_timm(sd: dict[str, torch.Tensor]) -> Converted:
    """Identity: the file is already in the timm layout (no extras, nothing ignored here)."""
    return dict(sd), {}, []


def convert_mae(sd: dict[str, torch.Tensor]) -> Converted:
    """MAE pretraining checkpoint with decoder -> timm ``VisionTransformer``.

    Source: ``mae_pretrain_vit_base_full.pth`` / ``mae_visualize_vit_base.pth`` (``{'model': sd}``). The encoder
    keys (``cls_token`` (1, 1, D), ``pos_embed`` (1, 1+N, D), ``patch_embed.*``, ``blocks.*``, ``norm.*``) are
    timm's already. timm's own ``checkpoint_filter_fn`` is not used: it takes any ``mask_token`` key for DINOv2.

    Returns:
        ``(timm_sd, {}, ignored_keys)``: ``ignored_keys`` lists every ``decoder_*`` key (``decoder_embed``,
        ``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``, ``decoder_pos_embed``) and ``mask_token``
        (1, 1, decoder width).
    """
    timm_sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k.startswith(MAE_DECODER_PREFIX) or k == "mask_token":
            ignored.append(k)
        else:
            timm_sd[k] = v
    return timm_sd, {}, ignored


def convert_mocov3(sd: dict[str, torch.Tensor]) -> Converted:
    """MoCo v3 pretraining checkpoint -> timm ``VisionTransformer`` (the official conversion).

    Source: ``vit-b-300ep.pth.tar`` = ``{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}``. Keys
    ``module.base_encoder.<timm key>`` are kept with the prefix stripped; ``module.base_encoder.head.*`` (the
    projector MLP, with BatchNorm running stats and int64 ``num_batches_tracked``), ``module.momentum_encoder.*``
    and ``module.predictor.*`` are dropped.

    Returns:
        ``(timm_sd, {}, ignored_keys)``; other keys pass through unchanged for the strict check to report.
    """
    timm_sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k.startswith(MOCOV3_ENCODER):
            rest = k[len(MOCOV3_ENCODER):]
            if rest.startswith("head."):
                ignored.append(k)
            else:
                timm_sd[rest] = v
        elif k.startswith(MOCOV3_DROPPED):
            ignored.append(k)
        else:
            timm_sd[k] = v
    return timm_sd, {}, ignored


def convert_mocov3_linear(sd: dict[str, torch.Tensor]) -> Converted:
    """MoCo v3 linear-probe checkpoint -> timm ``VisionTransformer``.

    Source: ``linear-vit-b-300ep.pth.tar`` (VPT: ``mocov3_linear-vit-b-300ep.pth.tar``) =
    ``{'epoch', 'arch', 'state_dict', 'best_acc1', 'optimizer'}``; keys ``module.<timm key>``. The prefix is
    stripped and the linear classifier ``module.head.{weight (1000, D), bias (1000,)}`` dropped.

    Returns:
        ``(timm_sd, {}, ignored_keys)``; keys without the prefix pass through unchanged.
    """
    timm_sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        rest = k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k
        if rest.startswith("head."):
            ignored.append(k)
        else:
            timm_sd[rest] = v
    return timm_sd, {}, ignored


def jax_block(i: int, arrays: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
    """One JAX encoder block's arrays (names relative to ``Transformer/encoderblock_{i}/``) in timm's names.

    JAX dense layers compute ``y = x @ kernel``, torch ``Linear`` ``y = x @ W.T``: 2-D kernels are transposed.
    Attention kernels are per head: query/key/value ``kernel`` (D, H, Dh) flatten to (D, D) (input, output) and
    concatenate to ``attn.qkv.weight`` (3D, D), biases (H, Dh) to ``attn.qkv.bias`` (3D,); ``out/kernel``
    (H, Dh, D) flattens to (D, D). Returns the converted tensors and the JAX names consumed.
    """
    b, att, mlp = f"blocks.{i}.", "MultiHeadDotProductAttention_1/", "MlpBlock_3/"
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(name: str, key: str, fn=lambda t: t) -> None:
        if name in arrays:
            out[key] = fn(arrays[name]).contiguous()
            used.add(name)

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.t()

    for jax, tm in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
        take(f"{jax}/scale", b + tm + ".weight")
        take(f"{jax}/bias", b + tm + ".bias")
    qkv = [f"{att}{p}/{w}" for w in ("kernel", "bias") for p in ("query", "key", "value")]
    if all(n in arrays for n in qkv):
        kernels = [arrays[f"{att}{p}/kernel"] for p in ("query", "key", "value")]
        out[b + "attn.qkv.weight"] = torch.cat([k.reshape(k.shape[0], -1).t() for k in kernels]).contiguous()
        out[b + "attn.qkv.bias"] = torch.cat([arrays[f"{att}{p}/bias"].reshape(-1)
                                              for p in ("query", "key", "value")]).contiguous()
        used.update(qkv)
    take(f"{att}out/kernel", b + "attn.proj.weight", lambda t: t.reshape(-1, t.shape[-1]).t())
    take(f"{att}out/bias", b + "attn.proj.bias")
    take(f"{mlp}Dense_0/kernel", b + "mlp.fc1.weight", dense)
    take(f"{mlp}Dense_0/bias", b + "mlp.fc1.bias")
    take(f"{mlp}Dense_1/kernel", b + "mlp.fc2.weight", dense)
    take(f"{mlp}Dense_1/bias", b + "mlp.fc2.bias")
    return out, used


def convert_jax_npz(sd: dict[str, torch.Tensor]) -> Converted:
    """Google's JAX ViT ``.npz`` (flat '/'-separated float32 arrays) -> timm ``VisionTransformer``.

    Source: VPT's ``imagenet21k_ViT-B_16.npz`` (ImageNet-21k supervised). Mapping (JAX -> timm):

    - ``cls`` (1, 1, D) -> ``cls_token``; ``Transformer/posembed_input/pos_embedding`` (1, 1+N, D) -> ``pos_embed``;
    - ``embedding/kernel`` (P, P, 3, D), HWIO -> ``patch_embed.proj.weight`` (D, 3, P, P); ``embedding/bias``;
    - ``Transformer/encoderblock_{i}/``: ``LayerNorm_0`` / ``LayerNorm_2`` ``{scale, bias}`` -> ``norm1`` /
      ``norm2`` ``{weight, bias}``; ``MultiHeadDotProductAttention_1/{query,key,value}`` -> ``attn.qkv``;
      ``.../out`` -> ``attn.proj``; ``MlpBlock_3/Dense_0`` / ``Dense_1`` -> ``mlp.fc1`` / ``mlp.fc2``
      (see ``jax_block`` for the reshapes);
    - ``Transformer/encoder_norm/{scale, bias}`` -> ``norm.{weight, bias}``;
    - ``pre_logits/*`` and ``head/*`` (the 21843-class head; zero in the release) are dropped.

    Returns:
        ``(timm_sd, {}, ignored_keys)``; arrays not named above (or an incomplete q/k/v set) pass through under
        their JAX names for the strict check to report.
    """
    top = {"cls": "cls_token", "embedding/bias": "patch_embed.proj.bias",
           "Transformer/posembed_input/pos_embedding": "pos_embed",
           "Transformer/encoder_norm/scale": "norm.weight", "Transformer/encoder_norm/bias": "norm.bias"}
    timm_sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        m = JAX_BLOCK.match(k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k in top:
            timm_sd[top[k]] = v
        elif k == "embedding/kernel":
            timm_sd["patch_embed.proj.weight"] = v.permute(3, 2, 0, 1).contiguous() if v.dim() == 4 else v
        elif k.startswith(("pre_logits/", "head/")):
            ignored.append(k)
        else:
            timm_sd[k] = v
    for i in sorted(blocks):
        converted, used = jax_block(i, blocks[i])
        timm_sd.update(converted)
        timm_sd.update({f"Transformer/encoderblock_{i}/{n}": t for n, t in blocks[i].items() if n not in used})
    return timm_sd, {}, ignored


def looks_like_mae_encoder(sd: dict[str, torch.Tensor]) -> bool:
    """The keys are exactly MAE's encoder-only release: the common ViT layout with ``norm.*`` and nothing else
    (no ``head.*``, no ``fc_norm.*``, no decoder, no ``mask_token``), as ``mae_pretrain_vit_base.pth``."""
    if not all(k in sd for k in MAE_ENCODER_KEYS):
        return False
    return all(k in MAE_ENCODER_KEYS or k.startswith("blocks.") for k in sd)


def warn_mae_encoder(name: str, sd: dict[str, torch.Tensor], path: Path, key: str, cfg: dict) -> None:
    """One warning when a file with MAE's encoder keys loads under an untagged timm name with a normalisation
    other than ImageNet's (MAE was pretrained with ImageNet mean/std); ``key`` is the recipe key that named it.
    Run by ``build_backbone`` after a file detected (``format: auto``) as ``timm`` is loaded."""
    from vptool.backbones.embedded import EMBEDDED

    if name in EMBEDDED or "." in name or not looks_like_mae_encoder(sd):
        return
    mean, std = tuple(cfg.get("mean", ())), tuple(cfg.get("std", ()))
    if (mean, std) == (tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)):
        return
    log.warning("%s: %s has the keys of MAE's encoder release (mae_pretrain_vit_base.pth: no head, no fc_norm) "
                "and loads as a timm file with mean %s / std %s, but MAE was pretrained with ImageNet's mean/std; "
                "if it is MAE, set backbone.format: mae (or name it %s.mae), which also gives it the MAE readout "
                "under readout auto", key, path, short_values(mean), short_values(std), name)


def short_values(values) -> str:
    """``0.5/0.5/0.5``: a mean or std in a log line."""
    return "/".join(f"{v:g}" for v in values)


def vit_pretraining(name: str, family: str | None) -> str | None:
    """``mae`` for a timm pretrained tag containing ``mae`` (``vit_base_patch16_224.mae``), else None (the next
    family's rule, then ``supervised``)."""
    _, _, tag = name.partition(".")
    if tag and ("mae" in tag.split("_") or tag.startswith("mae")):
        return "mae"
    return None


def keep_kwargs(format: str, kwargs: dict) -> dict:
    """ViT formats need no constructor kwargs: the user's ``backbone.kwargs`` as they are."""
    return kwargs


#: (convention, pretraining) -> (pool, norm): what each method's official code reads out on these backbones
#: (``vptool.conventions``). MAE: VPT ``vit_mae.py`` averages every token after CLS into a fresh ``fc_norm``;
#: GateVPT ``vit_prompt/vit_mae.py`` and SPT ``Models/MAE_vpt.py`` average into the pretrained norm.
VIT_READOUT: dict[tuple[str, str], tuple[str, str]] = {
    ("vpt", "supervised"): ("cls", "pretrained"),
    ("gatevpt", "supervised"): ("cls", "pretrained"),
    ("spt", "supervised"): ("cls", "pretrained"),
    ("vptm", "supervised"): ("mask", "pretrained"),
    ("vpt", "mocov3"): ("cls", "pretrained"),
    ("gatevpt", "mocov3"): ("cls", "pretrained"),
    ("spt", "mocov3"): ("cls", "pretrained"),
    ("vptm", "mocov3"): ("mask", "pretrained"),
    ("vpt", "mae"): ("avg_all", "fresh"),
    ("gatevpt", "mae"): ("avg_all", "pretrained"),
    ("spt", "mae"): ("avg_all", "pretrained"),
    ("vptm", "mae"): ("mask", "pretrained"),
}

_IMAGENET = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)

#: the ViT family: timm ``VisionTransformer``, its five checkpoint formats, its pretrainings and readout rows.
#: ``detect_rank``: where each format's rule sits in ``detect_format``'s global order (BEiT's is 40).
FAMILY = FamilySpec(
    name="vit",
    timm_class="timm.models.vision_transformer.VisionTransformer",
    ops=VitOps(),
    problem=vit_problem,
    formats=(
        CheckpointFormat("timm", convert_timm, is_timm, "patch_embed.proj.weight key", detect=is_any, detect_rank=100,
                         after_auto_load=warn_mae_encoder),
        CheckpointFormat("mae", convert_mae, is_mae_encoder, "MAE encoder keys (cls_token, patch_embed.proj.weight)",
                         detect=is_mae_full, detect_rank=50, normalization=_IMAGENET, pretraining="mae"),
        CheckpointFormat("mocov3", convert_mocov3, is_mocov3, f"{MOCOV3_ENCODER}* keys", detect_rank=20,
                         normalization=_IMAGENET, pretraining="mocov3"),
        CheckpointFormat("mocov3-linear", convert_mocov3_linear, is_mocov3_linear, f"{DDP_PREFIX}patch_embed.* keys",
                         detect_rank=30, normalization=_IMAGENET, pretraining="mocov3"),
        CheckpointFormat("jax-npz", convert_jax_npz, is_jax_npz, "embedding/kernel or Transformer/* arrays",
                         detect_rank=10, normalization=(IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
                         pretraining="supervised"),
    ),
    pretrainings=("supervised", "mae", "mocov3"),
    pretraining=vit_pretraining,
    readout=VIT_READOUT,
    constructor_kwargs=keep_kwargs,
)
