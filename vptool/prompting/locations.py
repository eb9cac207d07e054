"""Prompt locations (``prompt.location``; VPT, Jia et al. 2022, Fig. 5 and §4.3): where the prompts enter.

Each location is one ``LocationUnit``: the tensors it trains (adapter names, shapes, init), how it changes the
tokens entering the blocks (``embed``, ``block``) and which prompt modes, readouts, inits and backbone families it
takes (``problem``: one line naming the key and the fix). ``PromptedCore`` asks the unit; no other model code
names a location. The prompt mode still decides which blocks get a set (``mode.sets``: block 1 for shallow, every
block or ``prompt.blocks`` for deep).

The locations (``prompt.location`` value: what enters; its adapter tensors; the prompt modes it takes):

- ``prepend`` (default; eq. 4-5, 7): Np rows after the prefix tokens; ``prompts.shallow`` (Np, D) or
  ``prompts.deep`` (S, Np, D); every mode.
- ``add`` (Fig. 5 "Add"): an (N, D) prompt added element-wise to the patch rows; ``prompts.add`` (N, D) or
  (S, N, D); shallow, deep.
- ``add-1`` (official code only): one (1, D) prompt added to every patch row; ``prompts.add`` (1, D) or
  (S, 1, D); shallow, deep.
- ``prepend-pixel`` (Fig. 5): Np pixel patches through the frozen patch embedding, as rows after the prefix
  tokens; ``prompts.pixels`` (Np, 3, P, P); shallow, gated.
- ``concat-channel`` (Fig. 5; official ``below``): Nc = Np learnable input channels, the patch embedding widened
  for them; ``prompts.channel`` (Nc, H, W) and the new weights (below); shallow.
- ``pad`` (official code only): learnable pixels, p = Np wide, around the image, the position embedding resampled
  to the larger grid; ``prompts.pad_top``/``pad_bottom`` (3, p, W + 2p), ``prompts.pad_left``/``pad_right``
  (3, H, p); shallow; ViT only.

The paper and the official code (``src/models/vit_prompt/vit_ablations.py``, ``MODEL.PROMPT.LOCATION``) differ in
places; ``prompt.location_form: paper`` (default) follows the paper, ``official`` the code:

- ``add``: the paper adds prompts "element-wise to [the] embeddings E_i" of the patches; the code adds a
  (1 + N, D) prompt to the class token too (every prefix row here). ``add-1`` likewise (official: every row).
  Deep (both): set j is added to the rows entering its block, on top of the previous block's outputs.
- ``concat-channel``: the paper concatenates "a new channel" (``prompt.length: 1``); the new channels' weights start
  at zero and train, the pretrained RGB weights and bias stay frozen (``prompts.channel_weight`` (D, Nc, P, P)).
  The code trains the whole widened patch embedding, new weights xavier-uniform (``prompts.embed_weight``
  (D, 3 + Nc, P, P), ``prompts.embed_bias`` (D,), initialised from the pretrained ones).
- ``pad`` (official only; the paper pads ConvNets, Table 5): paper form learns the pixels in the normalised input
  space (``prompt.init`` xavier: uniform(-v, v), zeros: the mean colour); official form learns [0, 1] pixel values,
  init uniform(0, 1), through ImageNet's mean/std as the code hard-codes. A patch grid that does not divide the
  padded image drops the last pixels, as the code's strided convolution does.
- ``prepend-pixel``: both: the official code's projection (with its bias), no position embedding, no dropout
  (``prompt.dropout`` applies to the embedded rows here; 0 by default).

Init (``prompt.init``): ``xavier`` is VPT's uniform(-v, v), v = sqrt(6 / (3 P^2 + D)) (``vptool.prompting.init``),
for tokens and pixels alike (official); ``zeros`` gives zeros. SPT strategies and ``file`` build prompt tokens and
are for ``prepend`` only.

Shapes: B images, N patches (h x w grid), Np ``prompt.length``, D width, P patch size, H x W the input size, S sets.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vptool.options import PromptLocation, check_choice
from vptool.prompting.init import init_prompts
from vptool.prompting.modes import mode_for

TOKEN_INITS = ("xavier", "zeros")  # the inits every location takes (SPT strategies and files build tokens)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the official pad's Normalize


class LocationUnit:
    """One prompt location (see the module doc). The defaults are ``prepend``'s: the prompt mode's own tensors
    (``PromptTokens``) as rows, the family's embedding, the mode's block.

    Attributes:
        name: the ``prompt.location`` value.
        rows: the prompts are rows of the sequence (the ``P`` of ``tokens.order``).
        modes: the prompt modes it takes; ``why_modes`` says why not the others.
        families: the backbone families it takes; ``why_families`` says why not the others.
        pixel: the prompts live in the input image (no prompt dropout).
        tokens: the prompts are the mode's own tokens (``prompts.shallow``/``prompts.deep``), the tensors SPT's
            init and ``init-prompts`` files build.
    """

    name = "prepend"
    rows = True
    tokens = True
    modes: tuple[str, ...] = ("shallow", "deep", "gated")
    why_modes = ""
    families: tuple[str, ...] = ("vit", "beit")
    why_families = ""
    pixel = False

    def problem(self, c, family: str) -> str | None:
        """One line naming the key and the fix when ``c`` (a ``ModelConfig``) cannot use this location on a
        ``family`` backbone, else None."""
        if self.tokens:
            return None  # every mode, readout and init (VPT eq. 4-5, 7)
        where = f"prompt.location {self.name!r}"
        if not mode_for(c.prompt_mode).has_prompts:
            return (f"prompt.location: {self.name!r} places prompts and prompt.mode none has none; set prompt.mode "
                    f"{self.modes[0]} or drop prompt.location")
        if c.prompt_mode not in self.modes:
            return (f"prompt.mode: {c.prompt_mode!r} with {where}: {self.why_modes}; use prompt.mode "
                    f"{' or '.join(self.modes)}, or prompt.location prepend")
        if family not in self.families:
            return f"prompt.location: {self.name!r} on a {family} backbone: {self.why_families}; use prepend"
        if c.readout_pool == "prompt" and not self.rows:
            return (f"readout.pool: 'prompt' pools prompt rows and {where} adds none to the sequence; use cls or "
                    "avg, or prompt.location prepend or prepend-pixel")
        if c.prompt_init not in TOKEN_INITS:
            return (f"prompt.init: {c.prompt_init!r} builds prompt tokens (SPT, init-prompts files) for "
                    f"prompt.location prepend; {where} trains other tensors; use xavier or zeros")
        if self.pixel and not self.rows and c.prompt_dropout > 0:
            return (f"prompt.dropout: {c.prompt_dropout:g} drops prompt tokens and {where} learns pixels (the "
                    "official code drops none); set prompt.dropout 0")
        return None

    def build(self, model, c, generator: torch.Generator | None) -> nn.Module | None:
        """The prompt tensors' module (``model.prompts``), or None for the prompt mode's own ``PromptTokens``."""
        return None

    def embed(self, model, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, n_prefix + N, D) tokens entering block 1 (the family's embedding)."""
        return model.family.embed(model.backbone, x)

    def block(self, model, step, i: int, blk: nn.Module, h: torch.Tensor, order: str) -> tuple[torch.Tensor, str]:
        """Block i on rows ``h`` (B, T, D) in ``order``: the prompt mode's block (``PromptModeUnit.block``)."""
        return model.mode.block(model, step, i, blk, h, order)

    def grid(self, model) -> tuple[int, int]:
        """The (h, w) patch grid of the tokens entering block 1."""
        return tuple(model.backbone.patch_embed.grid_size)


def xavier_or_zeros(shape: tuple[int, ...], how: str, model, generator: torch.Generator | None) -> torch.Tensor:
    """VPT's xavier-uniform (or zeros) tensor of ``shape`` with the backbone's patch size and width."""
    bb = model.backbone
    return init_prompts(shape, how, tuple(bb.patch_embed.patch_size), bb.embed_dim, generator)


# ------------------------------------------------------------------------------------------------------------ add
class AddPrompts(nn.Module):
    """``prompts.add``: (n, D) for one set or (S, n, D), n = 1 (``add-1``) or the rows it is added to, with prompt
    dropout (per image, train mode only) as ``PromptTokens``."""

    def __init__(self, init: torch.Tensor, deep: bool, on_prefix: bool, dropout: float = 0.0):
        super().__init__()
        self.add = nn.Parameter(init)
        self.deep, self.on_prefix = deep, on_prefix
        self.length = init.shape[-2]
        self.dropout = nn.Dropout(dropout)

    def set(self, j: int | None, B: int) -> torch.Tensor:
        """Set j (None or 0 for one set): (B, n, D) in train mode with dropout, else (1, n, D)."""
        p = (self.add[j or 0] if self.deep else self.add).unsqueeze(0)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(B, -1, -1))
        return p

    def added(self, parts: dict[str, torch.Tensor], p: torch.Tensor) -> dict[str, torch.Tensor]:
        """Row groups by letter (``PromptedCore.split``) with ``p`` (1 or B, n, D) added to the patch rows ``X``
        (and first to the prefix rows ``C``, ``on_prefix``); n = 1 broadcasts over them."""
        X = parts["X"]
        out = {**parts, "X": X + (p if p.shape[1] == 1 else p[:, p.shape[1] - X.shape[1]:])}
        if self.on_prefix:
            out["C"] = parts["C"] + p[:, :parts["C"].shape[1]]
        return out


class AddLocation(LocationUnit):
    """``add`` (Fig. 5 "Add"): an (N, D) prompt set added element-wise to the patch rows entering its block."""

    name = "add"
    rows = tokens = False
    modes = ("shallow", "deep")
    why_modes = "GateVPT's gates mix prompt rows and added prompts make none"

    def length(self, model, official: bool) -> int:
        """n, the rows of one set: N patches (+ the prefix rows in the official form)."""
        bb = model.backbone
        return bb.patch_embed.num_patches + (model.num_prefix_tokens if official else 0)

    def build(self, model, c, generator: torch.Generator | None) -> nn.Module:
        bb = model.backbone
        official = c.prompt_location_form == "official"
        shape = model.mode.shape(len(bb.blocks), self.length(model, official), bb.embed_dim, c.prompt_blocks)
        init = xavier_or_zeros(shape, c.prompt_init, model, generator)  # (n, D), or (S, n, D) for a set per block
        return AddPrompts(init, len(shape) == 3, official, c.prompt_dropout)

    def block(self, model, step, i: int, blk: nn.Module, h: torch.Tensor, order: str) -> tuple[torch.Tensor, str]:
        j = model.prompt_set_at.get(i)  # shallow: set 0 before block 1; deep: a set before each prompted block
        if j is not None:
            p = model.prompts.set(j, step.B).to(h.dtype)
            h = model.assemble(model.prompts.added(model.split(h, order, step.N), p), order)
        return model.run_block(step, blk, h, order), order


class AddOneLocation(AddLocation):
    """``add-1`` (official code only): one (1, D) prompt added to every patch row (every row, official form)."""

    name = "add-1"

    def length(self, model, official: bool) -> int:
        return 1


# ------------------------------------------------------------------------------------------------ prepend-pixel
class PixelPrompts(nn.Module):
    """``prompts.pixels`` (Np, 3, P, P): Np learnable pixel patches; ``set`` embeds them with the frozen patch
    projection (and its norm), no position embedding: (1 or B, Np, D) rows, prompt dropout as ``PromptTokens``."""

    def __init__(self, init: torch.Tensor, patch_embed: nn.Module, dropout: float = 0.0):
        super().__init__()
        self.pixels = nn.Parameter(init)
        object.__setattr__(self, "patch_embed", patch_embed)  # the frozen backbone's, kept out of this module
        self.length = init.shape[0]
        self.dropout = nn.Dropout(dropout)

    def set(self, i: int | None, B: int) -> torch.Tensor:
        pe = self.patch_embed
        p = pe.norm(pe.proj(self.pixels.to(pe.proj.weight.dtype)).flatten(1)).unsqueeze(0)  # (1, Np, D)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(B, -1, -1))
        return p


class PixelLocation(LocationUnit):
    """``prepend-pixel`` (Fig. 5): pixel patches embedded by the frozen patch embedding, as prompt rows."""

    name = "prepend-pixel"
    tokens = False
    modes = ("shallow", "gated")
    why_modes = "pixel prompts enter once, before the patch embedding"
    pixel = True

    def build(self, model, c, generator: torch.Generator | None) -> nn.Module:
        pe = model.backbone.patch_embed
        shape = (c.prompt_length, pe.proj.in_channels, *pe.patch_size)
        return PixelPrompts(xavier_or_zeros(shape, c.prompt_init, model, generator), pe, c.prompt_dropout)


# ----------------------------------------------------------------------------------------------- concat-channel
class ChannelPrompts(nn.Module):
    """``prompts.channel`` (Nc, H, W) and the widened patch projection's new part: ``channel_weight``
    (D, Nc, P, P) (paper form: RGB weights and bias frozen) or ``embed_weight`` (D, 3 + Nc, P, P) and
    ``embed_bias`` (D,) (official form: all of it trains)."""

    def __init__(self, channel: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, proj: nn.Module):
        super().__init__()
        self.channel = nn.Parameter(channel)
        self.official = bias is not None
        if self.official:
            self.embed_weight, self.embed_bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.channel_weight = nn.Parameter(weight)
        object.__setattr__(self, "proj", proj)  # the frozen backbone's projection, kept out of this module
        self.length = channel.shape[0]
        self.dropout = nn.Dropout(0.0)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images with the channels appended -> (B, D, h, w) patch embeddings."""
        ch = self.channel.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1, -1)
        if self.official:
            w, b = self.embed_weight, self.embed_bias
        else:
            w, b = torch.cat([self.proj.weight, self.channel_weight], dim=1), self.proj.bias
        return F.conv2d(torch.cat([x, ch], dim=1), w.to(x.dtype), None if b is None else b.to(x.dtype),
                        stride=self.proj.stride, padding=self.proj.padding)


class ChannelLocation(LocationUnit):
    """``concat-channel`` (Fig. 5; official ``below``): learnable input channels and a widened patch embedding."""

    name = "concat-channel"
    rows = tokens = False
    modes = ("shallow",)
    why_modes = "a channel enters once, with the image"
    pixel = True

    def build(self, model, c, generator: torch.Generator | None) -> nn.Module:
        """Paper form with ``prompt.init: zeros``: channel and new weights all zero, so neither gets a gradient
        (a loaded adapter overwrites them; recipes refuse it for training, ``vptool.recipe_checks``)."""
        pe = model.backbone.patch_embed
        proj, Nc = pe.proj, c.prompt_length
        channel = xavier_or_zeros((Nc, *pe.img_size), c.prompt_init, model, generator)
        new = (proj.out_channels, Nc, *pe.patch_size)
        if c.prompt_location_form == "paper":
            return ChannelPrompts(channel, torch.zeros(new), None, proj)
        w = torch.cat([proj.weight.detach().float(), xavier_or_zeros(new, "xavier", model, generator)], dim=1)
        b = proj.bias.detach().float() if proj.bias is not None else torch.zeros(proj.out_channels)
        return ChannelPrompts(channel, w, b.clone(), proj)

    def embed(self, model, x: torch.Tensor) -> torch.Tensor:
        pe = model.backbone.patch_embed
        t = pe.norm(model.prompts.project(x).flatten(2).transpose(1, 2))
        return model.family.embed_patches(model.backbone, t)


# ------------------------------------------------------------------------------------------------------------ pad
class PadPrompts(nn.Module):
    """``prompts.pad_top``/``pad_bottom`` (3, p, W + 2p) and ``pad_left``/``pad_right`` (3, H, p): pixels around
    the image (official form: [0, 1] values through ImageNet's mean/std, as the official code)."""

    def __init__(self, sides: dict[str, torch.Tensor], official: bool):
        super().__init__()
        for name, t in sides.items():
            setattr(self, f"pad_{name}", nn.Parameter(t))
        self.official = official
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(3, 1, 1), persistent=False)
        self.length = sides["left"].shape[-1]  # p
        self.dropout = nn.Dropout(0.0)

    def side(self, name: str, x: torch.Tensor) -> torch.Tensor:
        t = getattr(self, f"pad_{name}")
        t = (t - self.mean) / self.std if self.official else t
        return t.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1, -1)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H + 2p, W + 2p): left and right columns, then the top and bottom rows."""
        x = torch.cat([self.side("left", x), x, self.side("right", x)], dim=-1)
        return torch.cat([self.side("top", x), x, self.side("bottom", x)], dim=-2)


class PadLocation(LocationUnit):
    """``pad`` (official code; VPT Table 5 for ConvNets): learnable pixels around the image, the position embedding
    resampled to the larger patch grid (``VitOps.embed_patches``)."""

    name = "pad"
    rows = tokens = False
    modes = ("shallow",)
    why_modes = "pad pixels enter once, with the image"
    families = ("vit",)
    why_families = "its relative position bias is tied to the pretrained patch grid and pad enlarges the grid"
    pixel = True

    def build(self, model, c, generator: torch.Generator | None) -> nn.Module:
        H, W = model.backbone.patch_embed.img_size
        p, official = c.prompt_length, c.prompt_location_form == "official"
        shapes = {"top": (3, p, W + 2 * p), "bottom": (3, p, W + 2 * p), "left": (3, H, p), "right": (3, H, p)}
        if official and c.prompt_init == "xavier":  # the official code: uniform(0, 1) pixel values
            sides = {k: torch.empty(s).uniform_(0.0, 1.0, generator=generator) for k, s in shapes.items()}
        else:
            sides = {k: xavier_or_zeros(s, c.prompt_init, model, generator) for k, s in shapes.items()}
        return PadPrompts(sides, official)

    def embed(self, model, x: torch.Tensor) -> torch.Tensor:
        pe = model.backbone.patch_embed
        t = pe.proj(model.prompts.padded(x))  # (B, D, h', w')
        grid = tuple(t.shape[-2:])
        return model.family.embed_patches(model.backbone, pe.norm(t.flatten(2).transpose(1, 2)), grid)

    def grid(self, model) -> tuple[int, int]:
        pe, p = model.backbone.patch_embed, model.prompts.length
        return tuple((s + 2 * p - k) // st + 1 for s, k, st in zip(pe.img_size, pe.patch_size, pe.proj.stride))


UNITS = {u.name: u for u in (LocationUnit(), AddLocation(), AddOneLocation(), PixelLocation(), ChannelLocation(),
                              PadLocation())}


@functools.cache
def location_for(name: str) -> LocationUnit:
    """The unit of ``prompt.location`` ``name``.

    Raises:
        ValueError: ``name`` is not a location (the message names every one).
    """
    check_choice("prompt_location", name, PromptLocation)
    return UNITS[name]
