"""Backbone families: what differs between timm ViT-like models, behind one small interface.

A family's ops file says, for one timm model class, how to

- ``embed`` images into the token sequence (patch embedding, prefix tokens: CLS and any register tokens, and
  absolute position embeddings), (B, 3, H, W) -> (B, n_prefix + N, D);
- run one ``block`` on a sequence whose row layout it is told (``RowLayout``: class, patch, prompt and [MASK] rows),
  with prefix keys/values and a temperature (``vptool.prompting.attention.prompted_attention`` plus the family's
  residual branch), placing its own position signal (BEiT: the relative position bias) on those rows;
- name the backbone's final norm (the ``pretrained`` readout norm).

``family_for(backbone)`` picks the ops file by the backbone's class, at build time (``build_backbone`` and
``PromptedViT``), and refuses any other model in one line. Families today:

==========  =========================================  ==========================================================
name        timm class                                  ops file
==========  =========================================  ==========================================================
``vit``     ``VisionTransformer`` (standard ``Block``)  ``vit.py``: supervised, MAE, MoCo v3, DINOv2 (+registers)
``beit``    ``Beit``                                    ``beit.py``: BEiT v1/v2, shared or per-block position bias
==========  =========================================  ==========================================================

A new family (EVA, Swin, ...) gets its own ops file and a row in ``FAMILIES``; until then it is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from vptool.errors import UserError
from vptool.prompting.layout import RowLayout


class Family:
    """The ops one backbone family needs; ``vit.VitOps`` and ``beit.BeitOps`` implement it.

    Shapes: B images, T tokens, Np prefix prompts, D width, H heads, N patches.
    """

    name = ""

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, n_prefix + N, D) tokens entering block 1."""
        raise NotImplementedError

    def start(self, backbone: nn.Module) -> dict:
        """Per-forward state the blocks of one forward share (``block``'s ``state``): e.g. a position bias every
        block uses, computed once. Default: nothing."""
        return {}

    def block(self, blk: nn.Module, x: torch.Tensor, layout: RowLayout, prefix: torch.Tensor | None = None,
              temperature: torch.Tensor | None = None, state: dict | None = None) -> torch.Tensor:
        """One block on (B, T, D) tokens -> (B, T, D).

        Args:
            blk: the block.
            x: (B, T, D) rows laid out as ``layout`` says (class and patch tokens, prompt and [MASK] rows).
            layout: which rows are what (``vptool.prompting.layout.RowLayout``); the family places its position
                signal from it (e.g. BEiT's relative bias on the class and patch rows only).
            prefix: (B or 1, Np, D) prompts that add keys/values only (VPT-deep's prefix form).
            temperature: tau dividing the attention logits (GateVPT eq. 9).
            state: what ``start`` returned for this forward.
        """
        raise NotImplementedError

    def final_norm(self, backbone: nn.Module) -> nn.Module:
        """The backbone's final norm (``norm``, or ``fc_norm`` where ``norm`` is an Identity)."""
        return backbone.norm if not isinstance(backbone.norm, nn.Identity) else backbone.fc_norm


@functools.cache
def _families() -> tuple[tuple[type, Family, Callable[[nn.Module], str | None]], ...]:
    """(timm class, its ops, the check that says why a model of that class cannot be prompted), one per family."""
    from timm.models.beit import Beit
    from timm.models.vision_transformer import VisionTransformer

    from vptool.prompting.families.beit import BeitOps, beit_problem
    from vptool.prompting.families.vit import VitOps, vit_problem

    return ((VisionTransformer, VitOps(), vit_problem), (Beit, BeitOps(), beit_problem))


#: timm model classes that are known and refused, with the reason (one line each).
KNOWN_UNSUPPORTED = {
    "Eva": "the EVA family (rotary position embedding, SwiGLU blocks) has no ops file in vptool.prompting.families "
           "yet",
    "SwinTransformer": "Swin is a windowed, hierarchical transformer without a global token sequence to prompt",
    "SwinTransformerV2": "Swin is a windowed, hierarchical transformer without a global token sequence to prompt",
}

SUPPORTED_TEXT = ("vptool prompts timm VisionTransformer models with standard pre-norm blocks (e.g. "
                  "vit_base_patch16_224, vit_small_patch14_reg4_dinov2) and timm BEiT models (e.g. "
                  "beitv2_base_patch16_224)")


def family_for(backbone: nn.Module, name: str | None = None) -> Family:
    """The ops file for ``backbone``, chosen by its class (exactly: a subclass may change the forward).

    Args:
        backbone: a timm model.
        name: the backbone's name for the error message (default: its class name).

    Raises:
        UserError: one line naming ``backbone.name``, why the model is not supported and what is.
    """
    label = name if name is not None else type(backbone).__name__
    cls_name = type(backbone).__name__
    for cls, ops, problem in _families():
        if type(backbone) is cls:
            why = problem(backbone)
            if why:
                raise UserError(f"backbone.name: {label!r} {why}; {SUPPORTED_TEXT}")
            return ops
    if cls_name in KNOWN_UNSUPPORTED:
        raise UserError(f"backbone.name: {label!r} is not supported: {KNOWN_UNSUPPORTED[cls_name]}; {SUPPORTED_TEXT}")
    raise UserError(f"backbone.name: {label!r} ({cls_name}) is not supported yet; {SUPPORTED_TEXT}")
