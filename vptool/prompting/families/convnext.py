"""Ops file of the timm ``ConvNeXt`` family, and the ConvNet prompting both ConvNet families share (``resnet.py``).

VPT on ConvNets (Jia et al. 2022, §4.4 "Apply VPT to ConvNets", Table 5; appendix A.1): a ConvNet has no token
sequence, so the prompts are learnable pixels padded around the image, p on every side (p = ``prompt.length``,
A.1 searches p in {1, 3, 5, 7, 9, 11}). The frozen backbone sees the padded image, (B, 3, H + 2p, W + 2p), as it is
(no resize back; official ``incorporate_prompt``), and a linear head reads the backbone's own pooled features
(timm's ``forward_head(pre_logits=True)``: ConvNeXt's global average pool and head norm, ResNet's global average
pool; official ``get_features``).

Prompt tensors (the official code's two, ``_setup_prompt_pad``), in [0, 1] pixel values:

- ``prompts.pad_tb`` (1, 3, 2p, W + 2p): rows ``[:p]`` above the image, rows ``[p:]`` below it (corners included);
- ``prompts.pad_lr`` (1, 3, H, 2p): columns ``[:p]`` left of the image, columns ``[p:]`` right of it.

They are normalised in the forward with the model's own mean/std (``PromptedViT.data_config``: the same
normalisation the image got), so they train as pixels, as in the official code, which normalises with ImageNet's
mean/std (the same values for ImageNet ConvNets; vptool never hard-codes them). Init (``prompt.init``): ``xavier``,
vptool's VPT default, is on ConvNets the official ``random`` init of pad prompts, uniform [0, 1] pixels (the
paper's xavier sentence in A.1 is about token prompts; it gives no rule for pixels); ``zeros`` gives black pixels.

Choices: ``prompt.location: pad`` must be given (a ConvNet has no sequence to ``prepend`` to; the saved config then
says what the model does); ``concat-channel`` (the official ``below``: extra input channels and a widened first
conv, which the official code also trains) is not built. Everything that needs tokens is refused in one line naming
its key: deep and gated prompts, ``prompt.blocks``, a [MASK] token, readout pools other than
``avg``, readout norms other than ``pretrained``, a token order other than the default (which the saved config
records), a learnable temperature, SPT inits and prompt dropout.

Shapes: B images, H, W the input size (``data_config``), p pixels of padding per side, D = ``head_hidden_size``.
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.errors import UserError
from vptool.prompting.families import Family, FamilySpec
from vptool.prompting.layout import default_order
from vptool.prompting.modes import mode_for
from vptool.prompting.modes.base import PromptModeUnit

#: the pretraining vptool gives a timm ConvNet (both families); its readout is timm's pooled features.
CONVNET_PRETRAINING = "convnet"
#: where the pad prompts come from, for messages.
SOURCE = "VPT §4.4, Table 5"


class PadPrompts(nn.Module):
    """Learnable pixels padded around the image (VPT §4.4, Table 5; official ``_setup_prompt_pad``).

    Args:
        p: pixels of padding on each side (``prompt.length``).
        size: (H, W), the input size the tensors are built for.
        init: ``xavier`` (uniform [0, 1] pixels, official ``random``) or ``zeros``.
        generator: RNG of the init.

    Input Shape:
        (B, 3, H, W) normalised images, and the per-channel mean/std (3,) they were normalised with.
    Output Shape:
        (B, 3, H + 2p, W + 2p).
    """

    def __init__(self, p: int, size: tuple[int, int], init: str = "xavier", generator: torch.Generator | None = None):
        super().__init__()
        H, W = size
        self.length = p
        self.size = (H, W)
        self.pad_tb = nn.Parameter(torch.zeros(1, 3, 2 * p, W + 2 * p))
        self.pad_lr = nn.Parameter(torch.zeros(1, 3, H, 2 * p))
        if init == "xavier":
            with torch.no_grad():
                self.pad_tb.uniform_(0.0, 1.0, generator=generator)
                self.pad_lr.uniform_(0.0, 1.0, generator=generator)
        self.dropout = nn.Dropout(0.0)  # pad pixels get no dropout (official); kept for the generic checks

    def frame(self, x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        """The padded image: (B, 3, H, W) -> (B, 3, H + 2p, W + 2p).

        Raises:
            ValueError: an input whose (H, W) is not the size the prompts were built for.
        """
        B, _, H, W = x.shape
        if (H, W) != self.size:
            raise ValueError(f"pad prompts are built for {self.size[0]}x{self.size[1]} images, got {H}x{W}; "
                             "resize the input to the model's data_config input_size")
        m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        p = self.length
        tb = ((self.pad_tb.to(x.dtype) - m) / s).expand(B, -1, -1, -1)
        lr = ((self.pad_lr.to(x.dtype) - m) / s).expand(B, -1, -1, -1)
        x = torch.cat([lr[..., :p], x, lr[..., p:]], dim=-1)
        return torch.cat([tb[:, :, :p], x, tb[:, :, p:]], dim=-2)


#: the readout norm of a ConvNet: the pooled features are already timm's ``forward_head(pre_logits=True)``.
NO_NORM = nn.Identity()


class ConvNetOps(Family):
    """A timm ConvNet that owns its forward: pad prompts, then timm's ``forward_features`` and
    ``forward_head(pre_logits=True)`` (see the module doc). Subclassed per timm class (``ConvNextOps``,
    ``resnet.ResNetOps``)."""

    name = ""
    owns_forward = True
    #: the model in words, for messages.
    title = "a ConvNet"

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        raise UserError(f"backbone.name: {self.title} has no token sequence; SPT prompt inits, probe-nmi and token "
                        "intermediates need one (a ViT or BEiT backbone)")

    def block(self, blk, x, layout, prefix=None, temperature=None, state=None) -> torch.Tensor:
        raise UserError(f"backbone.name: {self.title} has no transformer blocks to prompt")

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        return NO_NORM

    def sizes(self, backbone: nn.Module) -> tuple[int, int, int]:
        """(D, the pooled width the head reads; L = 0: no block gets prompts, gates or a temperature; 0 prefix
        tokens)."""
        return int(backbone.head_hidden_size), 0, 0

    def memory_terms(self, backbone: nn.Module, mode, Np: int, blocks: str | None,
                     extra: int) -> tuple[int, int, list[int]]:
        """(0 rows; the pad pixels 3 (2p (W + 2p) + 2p H); no per-block rows: a ConvNet's activations are not
        estimated) for ``vptool.engine.setup.estimate_memory``, which then counts weights and prompts only."""
        _, H, W = self.input_size(backbone)
        p = Np if mode.has_prompts else 0
        return 0, 3 * (2 * p * (W + 2 * p) + 2 * p * H), [0]

    def input_size(self, backbone: nn.Module) -> tuple[int, int, int]:
        """timm's data config input size (its pretrained cfg; ``backbone.kwargs.pretrained_cfg_overlay`` sets it)."""
        from timm.data import resolve_model_data_config

        return tuple(int(v) for v in resolve_model_data_config(backbone)["input_size"])

    def check_config(self, backbone: nn.Module, config) -> None:
        """Raise ``UserError`` with the first option a ConvNet cannot take, one line naming its key (the module
        doc's list)."""
        c, t, mode = config, self.title, mode_for(config.prompt_mode)
        prompts = mode.has_prompts
        checks = [
            (not input_only(mode),
             f"prompt.mode: {mode.name!r} needs transformer blocks; {t} takes pixel prompts at the input only "
             f"({SOURCE}); use shallow with prompt.location: pad, or none"),
            (prompts and c.prompt_location == "concat-channel",
             f"prompt.location: 'concat-channel' (official 'below') is not built for {t}; use pad ({SOURCE})"),
            (prompts and c.prompt_location != "pad",
             f"prompt.location: {c.prompt_location!r} needs a token sequence, {t} has none; set prompt.location: "
             f"pad (learnable pixels padded around the image, {SOURCE})"),
            (c.prompt_blocks is not None, f"prompt.blocks: {t} has no blocks to choose; drop prompt.blocks"),
            (c.mask_token != "none", f"tokens.mask: {c.mask_token!r} needs a token sequence, {t} has none; use none"),
            (c.token_order not in (None, default_order(prompts, False), default_order(False, False)),
             f"tokens.order: {c.token_order!r}: {t} has no token rows to order; drop tokens.order"),
            (c.readout_pool != "avg", f"readout.pool: {c.readout_pool!r}: {t} reads timm's own pooled features; "
                                      "use avg (or auto)"),
            (c.readout_norm != "pretrained", f"readout.norm: {c.readout_norm!r}: {t} reads timm's own pooled "
                                             "features (forward_head pre_logits); use pretrained (or auto)"),
            (c.temperature != "fixed", f"attention.temperature: {c.temperature!r}: {t} has no attention; use fixed"),
            (prompts and c.prompt_init not in ("xavier", "zeros"),
             f"prompt.init: {c.prompt_init!r}: pad prompts start from xavier (uniform [0, 1] pixels, official "
             "'random') or zeros; use xavier"),
            (prompts and c.prompt_dropout > 0, f"prompt.dropout: {c.prompt_dropout:g}: pad prompts get no dropout "
                                               "(official code); set 0"),
        ]
        problem = next((msg for bad, msg in checks if bad), None)
        if problem:
            raise UserError(problem)

    def build_prompts(self, model: nn.Module, config, values: torch.Tensor | None,
                      generator: torch.Generator | None) -> PadPrompts:
        """``PadPrompts`` of p = ``prompt.length`` for the backbone's input size.

        Raises:
            UserError: initial values given (an SPT init), or p < 1.
        """
        if values is not None:
            raise UserError(f"prompt.init: {self.title} takes no initial prompt values (SPT); use xavier")
        if config.prompt_length < 1:
            raise UserError(f"prompt.length: {config.prompt_length}: pad prompts need p >= 1 pixel per side")
        _, H, W = self.input_size(model.backbone)
        return PadPrompts(config.prompt_length, (H, W), config.prompt_init, generator)

    def forward_features(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> timm's ``forward_features`` of the padded image, (B, C, h, w)."""
        if model.prompts is not None:
            cfg = model.data_config
            x = model.prompts.frame(x, cfg["mean"], cfg["std"])
        return model.backbone.forward_features(x)

    def pool(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, D): timm's ``forward_head(pre_logits=True)`` (global pool, ConvNeXt's head norm)."""
        return model.backbone.forward_head(x, pre_logits=True)

    def norm_pooled(self, model: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, D) unchanged: ``pool`` already applied timm's head norm (``readout.norm: pretrained``)."""
        return z


def input_only(mode: PromptModeUnit) -> bool:
    """``mode`` has no prompts, or one set entering once with the default block forward and nothing beside it
    (``shallow``): what pixel prompts can be. Deep sets and gated prompts need blocks."""
    base = PromptModeUnit
    one_set = not mode.has_prompts or mode.sets(2) == (0,)  # of 2 blocks, only block 1 gets a set
    return one_set and type(mode).block is base.block and type(mode).extras is base.extras


class ConvNextOps(ConvNetOps):
    """timm ``ConvNeXt`` (VPT Table 5: ConvNeXt-B, ImageNet-21k)."""

    name = "convnext"
    title = "a ConvNeXt"


def convnext_problem(model: nn.Module) -> str | None:
    """Why a ``ConvNeXt`` cannot be prompted, or None: it must pool its features (``global_pool`` set)."""
    if not getattr(model.head, "global_pool", None) or not model.head.global_pool.pool_type:
        return "has no global pool (global_pool=''); build it with a pooling head"
    return None


def convnet_pretraining(name: str, family: str | None) -> str | None:
    """``convnet`` for a model of this family, else None."""
    return CONVNET_PRETRAINING if family == ConvNextOps.name else None


#: (convention, pretraining) -> (pool, norm) on a ConvNet: timm's pooled features (``avg``, the head's own norm)
#: for every convention (VPTM's [MASK] readout is refused: no tokens).
CONVNET_READOUT: dict[tuple[str, str], tuple[str, str]] = {
    (c, CONVNET_PRETRAINING): ("avg", "pretrained") for c in ("vpt", "gatevpt", "spt", "vptm")}


def convnext_kwargs(format: str, kwargs: dict) -> dict:
    """Files in timm's layout need no constructor kwargs: the user's ``backbone.kwargs`` as they are."""
    return kwargs


#: the ConvNeXt family: timm ``ConvNeXt`` in timm's own layout (the ``timm`` format reads its files).
FAMILY = FamilySpec(
    name=ConvNextOps.name,
    timm_class="timm.models.convnext.ConvNeXt",
    ops=ConvNextOps(),
    problem=convnext_problem,
    pretrainings=(CONVNET_PRETRAINING,),
    pretraining=convnet_pretraining,
    readout=CONVNET_READOUT,
    constructor_kwargs=convnext_kwargs,
    timm_module="convnext",
    models="a timm ConvNeXt model, e.g. convnext_base.fb_in22k",
)
