"""Ops file of the timm ``SwinTransformer`` family: VPT on Swin (Jia et al. 2022, §4.2 "VPT on hierarchical
Transformers", Table 2; Appendix A.1).

Swin (Liu et al. 2021) has no class token and no global token sequence: stage s holds an (H_s, W_s) grid of width
D_s (D_s = 2^s D_0), every block attends within local windows of ws x ws patches (every second block on windows
shifted by ws/2, with a mask keeping the wrapped-around regions apart), and a patch merging layer (2x2 neighbours
concatenated, LayerNorm, Linear 4D -> 2D) starts every stage after the first (timm's layout). So this family owns
its prompted forward (``Family.owns_forward``), instead of running the token-sequence path of ViT/BEiT:

- **prompts inside every window** (paper: "the prompts are attended within the local windows"): each window's
  attention gets the Np prompts as extra rows (keys, values and, where their outputs are used, queries), the same
  prompts in every window. The relative position bias and the shifted-window mask are zero for every pair
  involving a prompt (official code: both are padded with zeros).
- **the prompt rows' output** of a block: their attention outputs, one per window, are averaged over the windows
  (the paper is silent; the official code averages), then the block's residuals and MLP as for a patch token.
- **patch merging** (``prompt.swin_merge``): ``drop`` (default, the paper: prompts "are ignored during patch
  merging stages"): the prompt rows do not go through merging, so shallow prompts (Np, D_0) live in stage 1 only;
  ``official`` (the official code): the prompt rows are tiled 4x along the width and go through the merging's norm
  and reduction, (Np, D_s) -> (Np, D_{s+1}), so shallow prompts reach the last stage. Deep sets replace the prompt
  rows at every block (the official code too, at stage boundaries included), so the rule changes nothing for them.
  The official code's whole forward is ``swin_merge: official`` with ``readout.pool: avg_all``.
- **shallow** (VPT eq. 4-5): one set (Np, D_0) ``prompts.shallow`` enters the first block and is carried as rows.
- **deep** (VPT eq. 7): one set per block with its stage's width: block j of stage s gets set j of
  ``prompts.deep.<s>`` (depth_s, Np, D_s); the block's prompt outputs are dropped (so a set adds keys and values
  only, except after the last block when the readout pools the prompts). The official code names the first
  block's set its shallow prompt; the sets and the forward are the same. Initialisation (xavier, VPT code):
  uniform(-v, v), v = sqrt(6 / (3 P^2 + D_0)) for every stage (the official code computes v once, with D_0).
- **readout** (paper footnote 2: Swin "treat[s] global pooled E_N as input for Head"; timm's ``forward_head``):
  ``readout.norm: pretrained`` applies Swin's final norm to every token, then ``readout.pool: avg`` averages the
  last stage's patch tokens, as timm's ``forward_head(forward_features(x), pre_logits=True)``; ``avg_all`` also
  averages the prompt rows present after the last block (the official code's pool over every row). ``fresh`` is a
  new LayerNorm after the average (MAE's ``fc_norm``), ``none`` no norm. ``auto`` resolves to ``avg`` +
  ``pretrained`` (a supervised backbone without a class token, ``vptool.conventions``).

A grid that windows do not divide is padded as timm pads it (zero tokens after ``norm1``, keys of their window);
the official code needs divisible grids.

Not built on Swin (refused in one line naming the key): gated prompts, a [MASK] token, token orders, prompt
locations other than prepend, ``prompt.blocks``, a learnable temperature, prompt init other than xavier/zeros (SPT
strategies and ``init-prompts`` files; ``init-prompts`` and ``probe-nmi`` read a token sequence per block),
readouts other than ``avg``/``avg_all``.

Shapes: B images, (H, W) a stage's patch grid, C (= D_s) its width, nW windows, n = ws^2 patches per window, Np
prompts, Hh heads, dh head width.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from vptool.backbones.statedict import Converted
from vptool.errors import UserError
from vptool.prompting.families import CheckpointFormat, Family, FamilySpec
from vptool.prompting.init import init_prompts
from vptool.prompting.layout import default_order
from vptool.prompting.modes import PromptTokens, mode_for

#: the readouts a Swin has: the average of the last stage's patch tokens, or of every row (prompts included).
SWIN_POOLS = ("avg", "avg_all")


def swin_problem(model: nn.Module) -> str | None:
    """Why a ``SwinTransformer`` cannot be prompted by this ops file, or None."""
    from timm.models import swin_transformer as st

    for stage in model.layers:
        if not all(type(b) is st.SwinTransformerBlock and type(b.attn) is st.WindowAttention for b in stage.blocks):
            return "has blocks other than timm's SwinTransformerBlock/WindowAttention"
        if not isinstance(stage.downsample, (nn.Identity, st.PatchMerging)):
            return "has a downsampling layer other than timm's PatchMerging"
    if getattr(model, "global_pool", "avg") != "avg":
        return f"pools with global_pool={model.global_pool!r}; vptool reads Swin out by the average (avg)"
    return None


class StagePrompts(nn.Module):
    """Deep prompts of a hierarchical backbone: one (depth_s, Np, D_s) tensor per stage, saved as
    ``prompts.deep.<s>``, with prompt dropout (train mode only) on each set when it is inserted.

    Args:
        init: the initial tensors, stage by stage, each (depth_s, Np, D_s).
        dropout: the prompt dropout probability (VPT-deep: 0.1).
    """

    mode = "deep"

    def __init__(self, init: list[torch.Tensor], dropout: float = 0.0):
        super().__init__()
        self.length = init[0].shape[-2]  # Np
        self.deep = nn.ParameterList([nn.Parameter(t) for t in init])
        self.at = [(s, j) for s, t in enumerate(init) for j in range(t.shape[0])]  # block i -> (stage, row)
        self.dropout = nn.Dropout(dropout)

    def set(self, i: int, B: int) -> torch.Tensor:
        """The set entering block i (0-based over every stage): (B, Np, D_s) in train mode with dropout, else
        (1, Np, D_s)."""
        s, j = self.at[i]
        p = self.deep[s][j].unsqueeze(0)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(B, -1, -1))
        return p


def window_attention(attn: nn.Module, xw: torch.Tensor, hp: torch.Tensor | None, mask: torch.Tensor | None,
                     keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A timm ``WindowAttention`` over every window with the prompts added to each (VPT §4.2).

    Args:
        attn: the block's ``WindowAttention`` (``qkv``, ``num_heads``, ``scale``, relative position bias, ``proj``).
        xw: (B, nW, n, C) the normalised (``norm1``) patch tokens of each window.
        hp: (B or 1, Np, C) the normalised prompts, the same for every window, or None.
        mask: (nW, n, n) the shifted-window mask (0 / -100), or None.
        keep: compute the prompt rows' outputs (their queries); otherwise the prompts add keys and values only.

    Returns:
        ``(patch outputs (B, nW, n, C), prompt outputs (B, Np, C) averaged over the windows, or None)``, after the
        output projection. Every pair involving a prompt gets zero position bias and zero mask.
    """
    B, nW, n, C = xw.shape
    Hh = attn.num_heads
    q, k, v = attn.qkv(xw).reshape(B, nW, n, 3, Hh, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)  # (B, nW, Hh, n, dh)
    bias = attn._get_rel_pos_bias()  # timm's own table lookup, (1, Hh, n, n)
    if mask is not None:
        bias = bias + mask.unsqueeze(1).to(bias.dtype)  # (nW, Hh, n, n)
    Np = 0 if hp is None else hp.shape[1]
    if hp is not None:
        pq, pk, pv = attn.qkv(hp).reshape(hp.shape[0], 1, Np, 3, Hh, -1).permute(3, 0, 1, 4, 2, 5).unbind(0)
        shape = (B, nW, Hh, Np, pk.shape[-1])
        k, v = torch.cat([pk.expand(shape), k], dim=-2), torch.cat([pv.expand(shape), v], dim=-2)
        bias = F.pad(bias, (Np, 0))  # zero bias and mask from every row to the prompt keys
        if keep:
            q = torch.cat([pq.expand(shape), q], dim=-2)
            bias = F.pad(bias, (0, 0, Np, 0))  # ... and from the prompt queries to every key
    # 4-D for the attention kernels (and ONNX): windows x heads as one axis, the bias shared by the B images
    Tq, Tk = q.shape[-2], k.shape[-2]
    bias = bias.expand(nW, Hh, Tq, Tk).reshape(1, nW * Hh, Tq, Tk).to(q.dtype)
    o = F.scaled_dot_product_attention(q.reshape(B, nW * Hh, Tq, -1), k.reshape(B, nW * Hh, Tk, -1),
                                       v.reshape(B, nW * Hh, Tk, -1), attn_mask=bias, scale=attn.scale)
    o = attn.proj_drop(attn.proj(o.reshape(B, nW, Hh, Tq, -1).transpose(2, 3).reshape(B, nW, Tq, -1)))
    if hp is None or not keep:
        return o, None
    return o[:, :, Np:], o[:, :, :Np].mean(dim=1)


def swin_block(blk: nn.Module, x: torch.Tensor, p: torch.Tensor | None,
               keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timm ``SwinTransformerBlock`` with prompts in every window (its ``_attn``: cyclic shift, padding to
    whole windows, window partition, attention, reverse; then the MLP branch).

    Args:
        blk: the block.
        x: (B, H, W, C) patch tokens.
        p: (B or 1, Np, C) prompt rows, or None.
        keep: return the prompt rows' outputs (``window_attention``).

    Returns:
        ``(x (B, H, W, C), prompt rows (B, Np, C) or None)``.
    """
    from timm.models.swin_transformer import window_partition, window_reverse

    B, H, W, C = x.shape
    ws, ss = blk.window_size, blk.shift_size
    h = blk.norm1(x)
    if any(ss):
        h = torch.roll(h, shifts=(-ss[0], -ss[1]), dims=(1, 2))
    h = F.pad(h, (0, 0, 0, (ws[1] - W % ws[1]) % ws[1], 0, (ws[0] - H % ws[0]) % ws[0]))
    Hp, Wp = h.shape[1], h.shape[2]
    mask = blk.get_attn_mask(h) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    xw = window_partition(h, ws).view(B, -1, ws[0] * ws[1], C)
    ow, op = window_attention(blk.attn, xw, None if p is None else blk.norm1(p), mask, keep)
    o = window_reverse(ow.reshape(-1, ws[0], ws[1], C), ws, Hp, Wp)[:, :H, :W]
    if any(ss):
        o = torch.roll(o, shifts=ss, dims=(1, 2))
    x = x + blk.drop_path1(o)
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    if op is None:
        return x, None
    p = p + blk.drop_path1(op)
    return x, p + blk.drop_path2(blk.mlp(blk.norm2(p)))


def merge_prompts(merge: nn.Module, p: torch.Tensor) -> torch.Tensor:
    """The official code's prompts through a patch merging layer: tiled 4x along the width, then the layer's norm
    and reduction, (B, Np, C) -> (B, Np, 2C) (``prompt.swin_merge: official``)."""
    return merge.reduction(merge.norm(torch.cat([p, p, p, p], dim=-1)))


def stage_sizes(backbone: nn.Module) -> list[tuple[int, int]]:
    """(depth_s, D_s) per stage."""
    return [(len(stage.blocks), stage.blocks[0].dim) for stage in backbone.layers]


class SwinOps(Family):
    """The prompted forward and readout of timm ``SwinTransformer`` (see the module doc)."""

    name = "swin"
    owns_forward = True

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, N, D_0) patch tokens entering stage 1 (no prefix tokens)."""
        return backbone.patch_embed(x).flatten(1, 2)

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return backbone.norm

    def sizes(self, backbone: nn.Module) -> tuple[int, int, int]:
        """(D, the last stage's width the head reads; L, blocks over every stage; 0 prefix tokens)."""
        return int(backbone.num_features), sum(d for d, _ in stage_sizes(backbone)), 0

    def check_config(self, backbone: nn.Module, c) -> None:
        """Refuse, in one line naming the key, an option that has no meaning on Swin (the module doc's list)."""
        def no(key: str, value, fix: str) -> UserError:
            return UserError(f"{key}: {value!r} is not built for Swin (VPT §4.2 prompts inside windows); {fix}")

        mode = mode_for(c.prompt_mode)
        if mode.rows and mode.extras(1, c):  # rows carried through the blocks with modules of its own: GateVPT
            raise no("prompt.mode", c.prompt_mode, "use shallow or deep")
        if c.prompt_blocks is not None:
            raise no("prompt.blocks", c.prompt_blocks, "drop prompt.blocks (every block gets a set)")
        if c.mask_token != "none":
            raise no("tokens.mask", c.mask_token, "use none")
        if c.token_order not in (None, default_order(mode.has_prompts, False)):
            raise no("tokens.order", c.token_order, "drop tokens.order (prompts sit inside every window)")
        if c.readout_pool not in (*SWIN_POOLS, "auto"):
            raise no("readout.pool", c.readout_pool, "use avg (Swin's pooled readout) or avg_all")
        if c.temperature != "fixed":
            raise no("attention.temperature", c.temperature, "use fixed")
        if mode.has_prompts and c.prompt_location != "prepend":
            raise no("prompt.location", c.prompt_location, "use prepend")
        if mode.has_prompts and c.prompt_init not in ("xavier", "zeros"):  # SPT strategies and init-prompts files
            raise no("prompt.init", c.prompt_init, "use xavier or zeros")

    def build_prompts(self, model, c, values: torch.Tensor | None, generator: torch.Generator | None):
        """``prompts.shallow`` (Np, D_0) (a ``PromptTokens``), or the deep sets ``prompts.deep.<s>``
        (depth_s, Np, D_s) (a ``StagePrompts``), xavier or zeros (``prompt.init``), every stage with the xavier bound
        of D_0 (official code: v = sqrt(6 / (3 P^2 + D_0)) computed once).

        Raises:
            UserError: initial ``values`` given (an SPT init; not built for Swin).
        """
        if values is not None:
            raise UserError("prompt.init: initial prompt values (an SPT init) are not built for Swin; use xavier or "
                            "zeros")
        patch = tuple(model.backbone.patch_embed.patch_size)
        sizes = stage_sizes(model.backbone)
        D0, Np = sizes[0][1], c.prompt_length
        if model.mode.rows:  # one set carried as rows (VPT-shallow)
            return PromptTokens("shallow", init_prompts((Np, D0), c.prompt_init, patch, D0, generator),
                                c.prompt_dropout)
        return StagePrompts([init_prompts((d, Np, D), c.prompt_init, patch, D0, generator) for d, D in sizes],
                            c.prompt_dropout)

    def forward_features(self, model, x: torch.Tensor) -> torch.Tensor:
        """The prompted Swin (the module doc): (B, 3, H, W) images -> (B, Np' + N, D) rows after the last block,
        before any norm: the prompt rows still present (``output_prompt_rows``: Np or 0) then the last stage's N
        patch tokens in raster order."""
        bb = model.backbone
        x = bb.patch_embed(x)  # (B, H, W, D_0)
        B = x.shape[0]
        deep = isinstance(model.prompts, StagePrompts)  # a set per block; else shallow rows or no prompts
        p = model.prompts.set(None, B).to(x.dtype) if model.prompts is not None and not deep else None
        last = sum(d for d, _ in stage_sizes(bb)) - 1
        i = 0
        for stage in bb.layers:
            if not isinstance(stage.downsample, nn.Identity):
                x = stage.downsample(x)
                p = None if p is None or model.config.swin_merge == "drop" else merge_prompts(stage.downsample, p)
            for blk in stage.blocks:
                if deep:  # VPT eq. 7: the block's own set replaces the prompt rows
                    p = model.prompts.set(i, B).to(x.dtype)
                keep = p is not None and (not deep or (i == last and model.readout_pool == "avg_all"))
                x, p = swin_block(blk, x, p, keep)
                i += 1
        tokens = x.flatten(1, 2)
        return tokens if p is None else torch.cat([p.expand(B, -1, -1), tokens], dim=1)

    def output_prompt_rows(self, model) -> int:
        """How many prompt rows ``forward_features``' output holds: Np for shallow prompts that reach the last
        stage (``swin_merge: official``, or one stage) and for deep prompts under ``avg_all``, else 0."""
        if model.prompts is None:
            return 0
        if isinstance(model.prompts, StagePrompts):
            return model.prompts.length if model.readout_pool == "avg_all" else 0
        one_stage = len(model.backbone.layers) == 1
        return model.prompts.length if one_stage or model.config.swin_merge == "official" else 0

    def pool(self, model, x: torch.Tensor) -> torch.Tensor:
        """(B, Np' + N, D) rows -> (B, D): Swin's final norm on every row (``readout.norm: pretrained``, as timm's
        ``forward_features``), then the average of the patch rows (``avg``) or of every row (``avg_all``)."""
        if model.readout_norm == "pretrained":
            x = model.backbone.norm(x)
        return (x if model.readout_pool == "avg_all" else x[:, self.output_prompt_rows(model):]).mean(dim=1)

    def norm_pooled(self, model, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D): a fresh LayerNorm after the average (``fresh``); ``pretrained`` was applied per token
        in ``pool``."""
        return model.fc_norm(z) if model.readout_norm == "fresh" else z

    def memory_terms(self, backbone: nn.Module, mode, Np: int, blocks: str | None,
                     extra: int) -> tuple[int, int, list[int]]:
        """(rows entering stage 1: N_0 + Np; trained prompt values: Np D_0 shallow, sum_s depth_s Np D_s deep;
        rows x width one image keeps per block: N_s D_s, plus Np D_0 in stage 1) for
        ``vptool.engine.setup.estimate_memory`` (a lower bound: prompts counted in stage 1 only)."""
        sizes = stage_sizes(backbone)
        Np = Np if mode.has_prompts else 0
        values = 0 if not Np else (Np * sizes[0][1] if mode.rows else sum(d * Np * D for d, D in sizes))
        per_block = []
        for s, stage in enumerate(backbone.layers):
            H, W = stage.output_resolution
            per_block += [(H * W + (Np if s == 0 else 0)) * stage.blocks[0].dim] * len(stage.blocks)
        H0, W0 = backbone.layers[0].output_resolution
        return H0 * W0 + Np, values, per_block


# ------------------------------------------------------------------------------------------------------------
# Checkpoints and pretraining of the Swin family (registered as ``FAMILY``). Files in timm's own Swin layout load
# as the ``timm`` format (``vit.py``'s identity converter). ``swin-microsoft``: Microsoft's release
# (``swin_base_patch4_window7_224_22k.pth``, ``{'model': sd}``), the file the official VPT code loads for Table 2.
# ------------------------------------------------------------------------------------------------------------

#: the marker of Microsoft's layout: patch merging at the end of a stage, so stage 0 has one (timm: at the start).
MICROSOFT_MARKER = "layers.0.downsample.reduction.weight"
MICROSOFT_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")
#: buffers timm recomputes (non-persistent), and the 21841-class (in22k) or 1000-class head.
MICROSOFT_IGNORED = ("relative_position_index", "attn_mask")


def is_swin_microsoft(sd: dict) -> bool:
    """A ``layers.0.downsample.reduction.weight`` key (Microsoft's Swin layout)."""
    return MICROSOFT_MARKER in sd


def convert_swin_microsoft(sd: dict[str, torch.Tensor]) -> Converted:
    """Microsoft's Swin checkpoint -> timm ``SwinTransformer``.

    Microsoft's stage i ends with the patch merging that timm's stage i + 1 starts with:
    ``layers.{i}.downsample.{norm,reduction}.*`` -> ``layers.{i+1}.downsample.*`` (as timm's own
    ``checkpoint_filter_fn``). The 2x2 neighbours are concatenated in the same order in both. Every other key
    (``patch_embed.*``, ``layers.*.blocks.*``, ``norm.*``) already has timm's name and shape.

    Returns:
        ``(timm_sd, {}, ignored_keys)``: ``ignored_keys`` lists the ``relative_position_index`` and
        ``attn_mask`` buffers and the classifier ``head.*``.
    """
    timm_sd: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for k, v in sd.items():
        if k.startswith("head.") or k.rsplit(".", 1)[-1] in MICROSOFT_IGNORED:
            ignored.append(k)
            continue
        m = MICROSOFT_DOWNSAMPLE.match(k)
        timm_sd[f"layers.{int(m.group(1)) + 1}.downsample.{k[m.end():]}" if m else k] = v
    return timm_sd, {}, ignored


def swin_pretraining(name: str, family: str | None) -> str | None:
    """``supervised`` for a model of this family (timm's Swin weights and Microsoft's are ImageNet-1k/22k
    classification; VPT Table 2 uses the in22k one), else None."""
    return "supervised" if family == SwinOps.name else None


def swin_constructor_kwargs(format: str, kwargs: dict) -> dict:
    """Swin formats need no constructor kwargs: the user's ``backbone.kwargs`` as they are (Microsoft's and timm's
    files differ in key names only)."""
    return kwargs


#: the Swin family: timm ``SwinTransformer`` and Microsoft's checkpoint layout. Readout: no rows of its own (a
#: supervised backbone without a class token: ``auto`` is ``avg`` + ``pretrained``, ``vptool.conventions``).
FAMILY = FamilySpec(
    name="swin",
    timm_class="timm.models.swin_transformer.SwinTransformer",
    ops=SwinOps(),
    problem=swin_problem,
    formats=(
        CheckpointFormat("swin-microsoft", convert_swin_microsoft, is_swin_microsoft, f"{MICROSOFT_MARKER} key",
                         detect_rank=60, pretraining="supervised", own_models_only=True,
                         title="Microsoft Swin"),
    ),
    pretraining=swin_pretraining,
    constructor_kwargs=swin_constructor_kwargs,
    timm_module="swin_transformer",
    models="a timm Swin model, e.g. swin_base_patch4_window7_224",
)
