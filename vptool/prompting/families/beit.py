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

from vptool.backbones.statedict import Converted
from vptool.errors import UserError
from vptool.prompting.attention import prompted_attention
from vptool.prompting.families import CheckpointFormat, Family, FamilySpec
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
        return self.embed_patches(backbone, backbone.patch_embed(x))

    def embed_patches(self, backbone: nn.Module, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The backbone's own grid only: the relative position bias is tied to the pretrained grid."""
        if grid is not None and tuple(grid) != tuple(backbone.patch_embed.grid_size):
            raise UserError(f"prompt.location: a {grid} patch grid, but BEiT's relative position bias is tied to its "
                            f"{tuple(backbone.patch_embed.grid_size)} grid; use prompt.location prepend-pixel")
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


# ------------------------------------------------------------------------------------------------------------
# Checkpoints, constructor arguments, pretraining and readout of the BEiT family (registered as ``FAMILY``).
# Format ``beitv2-pretrain``: BEiT v2 pretraining, ``beitv2_base_patch16_224_pt1k.pth`` (``shared/CHECKPOINTS.md``),
# and BEiT v1 pretraining (``beit_base_patch16_224_pt22k.pth``, DALL-E codebook; VPTM Table 6): the same keys, the
# same shared relative position bias and layer scale, without the ``cls_pt_layers`` (v2's CLS pretraining). The
# two differ in normalisation only (v1: mean = std = 0.5), which the timm name's config gives
# (``beit_base_patch16_224`` vs ``beitv2_base_patch16_224``).
# ------------------------------------------------------------------------------------------------------------


#: BEiT v2 pretraining keys that are kept aside as extras (the [MASK] embedding and the visual-token head).
BEITV2_EXTRAS = ("mask_token", "lm_head.weight", "lm_head.bias")
#: BEiT v2 pretraining keys that are dropped: the auxiliary CLS-pretraining blocks and the index buffer that
#: timm recomputes from the patch grid (``check_rel_pos_index`` checks the file's copy against timm's).
BEITV2_IGNORED_PREFIXES = ("cls_pt_layers.",)
BEITV2_INDEX_KEY = "rel_pos_bias.relative_position_index"


def is_beitv2(sd: dict) -> bool:
    """``mask_token`` and a shared ``rel_pos_bias.relative_position_bias_table`` (the keys an explicit
    ``beitv2-pretrain`` must find; a file without ``lm_head`` is accepted)."""
    return "mask_token" in sd and "rel_pos_bias.relative_position_bias_table" in sd


def is_beitv2_with_head(sd: dict) -> bool:
    """``detect_format``'s rule: ``is_beitv2`` and an ``lm_head.*`` key."""
    return is_beitv2(sd) and any(k.startswith("lm_head.") for k in sd)


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


def merge_constructor_kwargs(format: str, kwargs: dict) -> dict:
    """Merge the constructor kwargs a checkpoint layout requires (``beit_constructor_kwargs``) into the user's
    ``backbone.kwargs``.

    The layout kwargs win: a user kwarg that would change the layout (``use_abs_pos_emb``, ``use_rel_pos_bias``,
    ``use_shared_rel_pos_bias``, ``use_fc_norm``, ``qkv_bias``) to another value is an error, not silently
    overridden. ``init_values`` is the exception: any non-zero user value is kept (loading overwrites it).
    Size kwargs (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ...) pass through.

    Raises:
        UserError: a user kwarg contradicts the layout, naming ``backbone.kwargs.<key>``.
    """
    need = beit_constructor_kwargs(format)
    for k, v in kwargs.items():
        if k == "init_values":
            if not v:
                raise UserError(f"backbone.kwargs.init_values: {v!r} disables layer scale but the {format} "
                                "checkpoint has gamma_1/gamma_2; remove init_values or set it non-zero")
        elif k in need and v != need[k]:
            raise UserError(f"backbone.kwargs.{k}: {v!r} conflicts with the {format} checkpoint layout (needs "
                            f"{need[k]!r}); remove {k} from backbone.kwargs")
    return {**need, **kwargs}


def check_rel_pos_index(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """The file's ``rel_pos_bias.relative_position_index`` (if any) must equal the one timm recomputed.

    Raises:
        UserError: the indices differ in shape or value (the table would be read in a different order).
    """
    file_idx = sd.get(BEITV2_INDEX_KEY)
    rpb = getattr(model, "rel_pos_bias", None)
    if file_idx is None or rpb is None:
        return
    own = rpb.relative_position_index
    if file_idx.shape != own.shape or not torch.equal(file_idx.to(own.dtype), own):
        raise UserError(f"backbone.checkpoint: {source}: {BEITV2_INDEX_KEY} {tuple(file_idx.shape)} differs from "
                        f"the index timm computes for the model {tuple(own.shape)}; check backbone.kwargs "
                        "img_size/patch_size against the checkpoint")


FAMILY_NAME = BeitOps.name


def beit_pretraining(name: str, family: str | None) -> str | None:
    """``beit`` for a model of this family or a name starting with ``beit``, else None."""
    return "beit" if family == FAMILY_NAME or name.partition(".")[0].startswith("beit") else None

#: (convention, pretraining) -> (pool, norm) on BEiT: the class token after the pretrained norm, as on supervised
#: and MoCo v3 ViTs; VPTM reads h[MASK] after the final norm (eq. 7).
BEIT_READOUT: dict[tuple[str, str], tuple[str, str]] = {
    ("vpt", "beit"): ("cls", "pretrained"),
    ("gatevpt", "beit"): ("cls", "pretrained"),
    ("spt", "beit"): ("cls", "pretrained"),
    ("vptm", "beit"): ("mask", "pretrained"),
}

#: the BEiT family: timm ``Beit``, the BEiT v2 pretraining format, the ``beit`` pretraining and its readout rows.
FAMILY = FamilySpec(
    name=FAMILY_NAME,
    timm_class="timm.models.beit.Beit",
    ops=BeitOps(),
    problem=beit_problem,
    formats=(
        CheckpointFormat("beitv2-pretrain", convert_beitv2_pretrain, is_beitv2,
                         "mask_token and rel_pos_bias.relative_position_bias_table keys",
                         detect=is_beitv2_with_head, detect_rank=40, own_models_only=True,
                         title="BEiT v1/v2 pretraining"),
    ),
    pretrainings=("beit",),
    pretraining=beit_pretraining,
    readout=BEIT_READOUT,
    constructor_kwargs=merge_constructor_kwargs,
    check_loaded=check_rel_pos_index,
    timm_module="beit",
    models="a timm BEiT model, e.g. beitv2_base_patch16_224",
)
