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
``beitv2-pretrain``       BEiT v2 pretraining: ``beitv2_base_patch16_224_pt1k.pth``
========================  ====================================================================================

``detect_format`` recognises each from the keys alone; ``SIGNATURES`` says which keys an explicitly chosen
format must find in a file; ``FORMAT_NORMALIZATION`` gives the input mean/std a format's pretraining used.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD

Converted = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]

#: BEiT v2 pretraining keys that are kept aside as extras (the [MASK] embedding and the visual-token head).
BEITV2_EXTRAS = ("mask_token", "lm_head.weight", "lm_head.bias")
#: BEiT v2 pretraining keys that are dropped: the auxiliary CLS-pretraining blocks and the index buffer that
#: timm recomputes from the patch grid (``build_backbone`` checks the file's copy against timm's).
BEITV2_IGNORED_PREFIXES = ("cls_pt_layers.",)
BEITV2_INDEX_KEY = "rel_pos_bias.relative_position_index"

#: MAE decoder keys (``decoder_embed``, ``decoder_blocks.*``, ``decoder_norm``, ``decoder_pred``,
#: ``decoder_pos_embed``) all start with this; with ``mask_token`` (1, 1, decoder width) they are stripped.
MAE_DECODER_PREFIX = "decoder_"
MOCOV3_ENCODER = "module.base_encoder."
MOCOV3_DROPPED = ("module.momentum_encoder.", "module.predictor.")
DDP_PREFIX = "module."
JAX_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")


def _is_jax_npz(sd: dict) -> bool:
    return "embedding/kernel" in sd or any(k.startswith("Transformer/") for k in sd)


def _is_mocov3(sd: dict) -> bool:
    return any(k.startswith(MOCOV3_ENCODER) for k in sd)


def _is_mocov3_linear(sd: dict) -> bool:
    return f"{DDP_PREFIX}patch_embed.proj.weight" in sd


def _is_beitv2(sd: dict) -> bool:
    return "mask_token" in sd and "rel_pos_bias.relative_position_bias_table" in sd


def _is_mae_full(sd: dict) -> bool:
    return any(k.startswith(MAE_DECODER_PREFIX) for k in sd)


def _is_mae_encoder(sd: dict) -> bool:
    return "cls_token" in sd and "patch_embed.proj.weight" in sd


def _is_timm(sd: dict) -> bool:
    return "patch_embed.proj.weight" in sd


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """Name the layout of a raw state dict from its keys.

    Rules, tried in this order (each format's marker keys occur in no format tried after it):

    1. ``"jax-npz"``: an ``embedding/kernel`` array or any ``Transformer/*`` array (JAX '/' names);
    2. ``"mocov3"``: any ``module.base_encoder.*`` key;
    3. ``"mocov3-linear"``: a ``module.patch_embed.proj.weight`` key (timm layout behind ``module.``);
    4. ``"beitv2-pretrain"``: ``mask_token``, a shared ``rel_pos_bias.relative_position_bias_table`` and an
       ``lm_head.*`` key;
    5. ``"mae"``: any ``decoder_*`` key (MAE's ``_full`` / ``visualize`` releases);
    6. ``"timm"`` otherwise -- including the plain MAE encoder file -- and then judged by the strict key check.
    """
    if _is_jax_npz(sd):
        return "jax-npz"
    if _is_mocov3(sd):
        return "mocov3"
    if _is_mocov3_linear(sd):
        return "mocov3-linear"
    if _is_beitv2(sd) and any(k.startswith("lm_head.") for k in sd):
        return "beitv2-pretrain"
    if _is_mae_full(sd):
        return "mae"
    return "timm"


#: format -> (test of a raw state dict, what it looks for): the keys an explicitly chosen format must find.
#: Looser than ``detect_format`` where a release exists in several shapes: ``mae`` accepts the plain encoder
#: file (``mae_pretrain_vit_base.pth``) as well as the ``_full`` one, ``beitv2-pretrain`` a file without
#: ``lm_head``.
SIGNATURES: dict[str, tuple[Callable[[dict], bool], str]] = {
    "timm": (_is_timm, "patch_embed.proj.weight key"),
    "mae": (_is_mae_encoder, "MAE encoder keys (cls_token, patch_embed.proj.weight)"),
    "mocov3": (_is_mocov3, f"{MOCOV3_ENCODER}* keys"),
    "mocov3-linear": (_is_mocov3_linear, f"{DDP_PREFIX}patch_embed.* keys"),
    "jax-npz": (_is_jax_npz, "embedding/kernel or Transformer/* arrays"),
    "beitv2-pretrain": (_is_beitv2, "mask_token and rel_pos_bias.relative_position_bias_table keys"),
}

#: format -> (mean, std) of the pretraining's input normalisation, for formats that imply one. MAE and MoCo v3
#: trained on ImageNet-1k with the ImageNet mean/std; Google's in21k ViTs scale pixels to [-1, 1] (0.5 / 0.5).
#: ``timm`` and ``beitv2-pretrain`` are absent: the timm model's own pretrained cfg applies.
FORMAT_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "mae": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "mocov3": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "mocov3-linear": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "jax-npz": (IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD),
}


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


def _jax_block(i: int, arrays: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], set[str]]:
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
      (see ``_jax_block`` for the reshapes);
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
        converted, used = _jax_block(i, blocks[i])
        timm_sd.update(converted)
        timm_sd.update({f"Transformer/encoderblock_{i}/{n}": t for n, t in blocks[i].items() if n not in used})
    return timm_sd, {}, ignored


def convert_beitv2_pretrain(sd: dict[str, torch.Tensor]) -> Converted:
    """BEiT v2 pretraining checkpoint -> timm ``Beit`` with a shared relative position bias.

    The remaining keys (``cls_token``, ``patch_embed.proj.*``, ``rel_pos_bias.relative_position_bias_table``
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
    "mae": convert_mae,
    "mocov3": convert_mocov3,
    "mocov3-linear": convert_mocov3_linear,
    "jax-npz": convert_jax_npz,
    "beitv2-pretrain": convert_beitv2_pretrain,
}
