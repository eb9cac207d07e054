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
``swin``    ``SwinTransformer``                         ``swin.py``: prompts inside every window (VPT Table 2); owns
                                                       its forward (hierarchical stages, ``Family.owns_forward``)
``convnext`` ``ConvNeXt``                               ``convnext.py``: pad prompts (VPT Table 5), no tokens
``resnet``  ``ResNet``                                  ``resnet.py``: pad prompts, as ``convnext.py``
==========  =========================================  ==========================================================

The ConvNet families own their forward (``Family.owns_forward``): there is no token sequence, so ``PromptedCore``
hands them the prompt module, ``forward_features`` and ``pool`` (the hooks at the end of ``Family``, whose defaults
are the token families' and leave ViT and BEiT unchanged).

Besides its ops, a family file holds everything else that is specific to the family, as one ``FamilySpec`` named
``FAMILY`` at its end: the timm class, its checkpoint formats (``CheckpointFormat``: converter, detection rule,
signature, normalisation, implied pretraining), the constructor kwargs a format needs, the pretraining rule for
names, and the readout conventions per pretraining. ``family_table()`` lists them; the generic modules
(``vptool.backbones.build``/``convert``, ``vptool.conventions``) read that table and name no family or format.

Adding a family: write one file ``vptool/prompting/families/<name>.py`` holding its ``Family`` ops subclass, its
``<name>_problem`` check, its converters with their detection, its constructor kwargs, its pretraining rule and
readout rows, all gathered in ``FAMILY = FamilySpec(...)``; then register it with one line, its file name and
format names in ``vptool.options.BACKBONE_FAMILIES`` (which also makes the formats valid ``backbone.format``
values; and drop its class from ``KNOWN_UNSUPPORTED``). Until then a family (EVA, Swin V2, ...) is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from vptool.errors import UserError
from vptool.options import BACKBONE_FAMILIES
from vptool.prompting.layout import RowLayout


class Family:
    """The ops one backbone family needs; ``vit.VitOps`` and ``beit.BeitOps`` implement it.

    Shapes: B images, T tokens, Np prefix prompts, D width, H heads, N patches.
    """

    name = ""

    def embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, n_prefix + N, D) tokens entering block 1."""
        raise NotImplementedError

    def embed_patches(self, backbone: nn.Module, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """What ``embed`` does after the patch projection: (B, N, D) patch embeddings on a ``grid`` (h, w) patch grid
        (None: the backbone's own) -> (B, n_prefix + N, D). The pixel-level prompt locations
        (``vptool.prompting.locations``) project the pixels themselves and hand the tokens here.

        Raises:
            UserError: a grid other than the backbone's where the family cannot place positions on it.
        """
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

    # --------------------------------------------------------------------------------------------------------
    # Families that own the prompted forward (hierarchical backbones, ``swin.py``). ``PromptedCore`` asks
    # ``owns_forward``: when True it takes the sizes, the option check, the prompt tensors, the forward and the
    # readout from the methods below instead of its own token-sequence path. ViT and BEiT (False) never reach
    # them, so their behaviour is unchanged; ``sizes`` and ``memory_terms`` are read on both paths.
    # --------------------------------------------------------------------------------------------------------
    owns_forward = False

    def sizes(self, backbone: nn.Module) -> tuple[int, int, int]:
        """(D, the width the readout and head see; L, the blocks; the prefix tokens: CLS and registers)."""
        return int(backbone.embed_dim), len(backbone.blocks), int(backbone.num_prefix_tokens)

    def memory_terms(self, backbone: nn.Module, mode, Np: int, blocks: str | None,
                     extra: int) -> tuple[int, int, list[int]]:
        """What ``vptool.engine.setup.estimate_memory`` sizes, from shapes alone: (T rows per image: prefix +
        patches + Np prompts + ``extra`` ([MASK]); the trained prompt values (``mode.trained_values``); rows x width
        one image keeps per block, L values). Np is 0 for a mode without prompts."""
        D, L = int(backbone.embed_dim), len(backbone.blocks)
        n_patches = int(getattr(backbone.patch_embed, "num_patches", 0))
        T = int(getattr(backbone, "num_prefix_tokens", 1)) + n_patches + Np + extra
        return T, mode.trained_values(L, Np, D, blocks), [T * D] * L

    def check_config(self, backbone: nn.Module, config) -> None:
        """Raise ``UserError`` naming the key of an option this family cannot run (``ModelConfig``)."""

    def build_prompts(self, model, config, values: torch.Tensor | None, generator: torch.Generator | None):
        """The prompt module (``set(i, B)``, ``length``, ``dropout``) of ``model``'s mode on this backbone."""
        raise NotImplementedError

    def forward_features(self, model, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, T, D) rows after the last block, before any norm."""
        raise NotImplementedError

    def pool(self, model, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) rows -> (B, D), before the ``fresh`` readout norm (``PromptedCore.pool``)."""
        raise NotImplementedError

    def norm_pooled(self, model, z: torch.Tensor) -> torch.Tensor:
        """(B, D) pooled -> (B, D) head input (``PromptedCore.norm_pooled``)."""

    def input_size(self, backbone: nn.Module) -> tuple[int, int, int]:
        """(3, H, W), the image size the backbone was built for (ViT, BEiT: ``patch_embed.img_size``)."""
        return (3, *backbone.patch_embed.img_size)
        raise NotImplementedError


@functools.cache
def _families() -> tuple[tuple[type, Family, Callable[[nn.Module], str | None]], ...]:
    """(timm class, its ops, the check that says why a model of that class cannot be prompted), one per family."""
    return tuple((spec.timm_cls(), spec.ops, spec.problem) for spec in family_table())


#: timm model classes that are known and refused, with the reason (one line each).
KNOWN_UNSUPPORTED = {
    "Eva": "the EVA family (rotary position embedding, SwiGLU blocks) has no ops file in vptool.prompting.families "
           "yet",
    "SwinTransformerV2": "Swin V2 (scaled cosine attention, log-spaced continuous position bias) has no ops file "
                         "in vptool.prompting.families yet; Swin V1 (SwinTransformer) is supported",
}

SUPPORTED_TEXT = ("vptool prompts timm VisionTransformer models with standard pre-norm blocks (e.g. "
                  "vit_base_patch16_224, vit_small_patch14_reg4_dinov2), timm BEiT models (e.g. "
                  "beitv2_base_patch16_224), timm Swin models (e.g. swin_base_patch4_window7_224) and, with pad "
                  "prompts, timm ConvNeXt and ResNet models")


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


# ------------------------------------------------------------------------------------------------------------
# The family table: everything a family brings besides its ops, one ``FamilySpec`` per family file.
# ------------------------------------------------------------------------------------------------------------

#: The family files, in table order, as registered in ``vptool.options.BACKBONE_FAMILIES`` (``detect_format``
#: orders formats by ``detect_rank``; ``pretraining_of`` tries the families' name rules in this order).
FAMILY_FILES = tuple(BACKBONE_FAMILIES)


@dataclass(frozen=True)
class CheckpointFormat:
    """One on-disk checkpoint layout a family reads (a ``backbone.format`` value).

    Attributes:
        name: the format name (``backbone.format``, ``BackboneInfo.format``).
        convert: the pure converter ``raw sd -> (timm_sd, extras, ignored_keys)`` (``vptool.backbones.convert``).
        signature: the keys an explicitly chosen format must find in a file (may be looser than ``detect``).
        wants: what ``signature`` looks for, for the error message.
        detect: ``detect_format``'s rule for the format (None: ``signature``).
        detect_rank: where the rule is tried in ``detect_format``, over all families (lower first; each format's
            marker keys occur in no format tried after it).
        normalization: ``(mean, std)`` the pretraining used, or None (the timm model's own pretrained cfg).
        pretraining: ``supervised``/``mae``/... the format implies, or None (the name decides).
        own_models_only: only this family's timm models (``FamilySpec.timm_module``) can hold the file.
        title: the format in words, for messages (``BEiT v2 pretraining``).
        after_auto_load: ``(name, raw sd, path, recipe key, data config) -> None``, run after a file detected as
            this format (``format: auto``) is loaded: may log a warning about a likely mis-detection.
    """

    name: str
    convert: Callable[[dict], tuple[dict, dict, list]]
    signature: Callable[[dict], bool]
    wants: str
    detect: Callable[[dict], bool] | None = None
    detect_rank: int = 100
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    pretraining: str | None = None
    own_models_only: bool = False
    title: str = ""
    after_auto_load: Callable[..., None] | None = None

    def detects(self, sd: dict) -> bool:
        """``detect_format``'s rule for this format matches ``sd``."""
        return (self.detect or self.signature)(sd)


@dataclass(frozen=True)
class FamilySpec:
    """A backbone family: its timm class and ops, checkpoint formats, constructor kwargs, pretraining rules and
    readout conventions (one per family file, as its ``FAMILY``).

    Attributes:
        name: the family name (``vit``, ``beit``, ``swin``; ``Family.name`` of its ops).
        timm_class: dotted path of the timm model class (matched exactly by ``family_for``).
        ops: the family's ``Family`` ops.
        problem: ``model -> why it cannot be prompted, or None``.
        formats: the checkpoint formats the family file converts.
        pretrainings: the pretraining names the family brings (``vptool.conventions.PRETRAINING``).
        pretraining: ``(backbone name, family name or None) -> pretraining or None``: the family's name rule,
            tried in table order after the checkpoint format and an embedded backbone's record.
        readout: ``(convention, pretraining) -> (pool, norm)`` for each of ``pretrainings`` and every
            convention (``vptool.conventions.readout_defaults``).
        constructor_kwargs: ``(format, user kwargs) -> kwargs`` timm's ``create_model`` gets for a file of one
            of the family's formats (raises ``UserError`` on a conflicting user kwarg).
        check_loaded: ``(model, raw sd, source) -> None`` run after a file is loaded into a model of this
            family (raises ``UserError``), or None.
        timm_module: the timm module whose models hold an ``own_models_only`` format (``timm.list_models``).
        models: which models those are, in words, for messages.
    """

    name: str
    timm_class: str
    ops: Family
    problem: Callable[[nn.Module], str | None]
    formats: tuple[CheckpointFormat, ...] = ()
    pretrainings: tuple[str, ...] = ()
    pretraining: Callable[[str, str | None], str | None] = lambda name, family: None
    readout: Mapping[tuple[str, str], tuple[str, str]] = field(default_factory=dict)
    constructor_kwargs: Callable[[str, dict], dict] = lambda format, kwargs: kwargs
    check_loaded: Callable[[nn.Module, dict, str], None] | None = None
    timm_module: str = ""
    models: str = ""

    @property
    def converters(self) -> dict[str, tuple[Callable[[dict], bool], Callable]]:
        """format name -> (detect, convert)."""
        return {f.name: (f.detects, f.convert) for f in self.formats}

    def timm_cls(self) -> type:
        """The timm class ``timm_class`` names (imports timm)."""
        import importlib

        module, _, cls = self.timm_class.rpartition(".")
        return getattr(importlib.import_module(module), cls)


@functools.cache
def family_table() -> tuple[FamilySpec, ...]:
    """Every family's ``FAMILY``, in ``FAMILY_FILES`` order (imports the family files, hence torch and timm)."""
    import importlib

    return tuple(importlib.import_module(f"{__name__}.{f}").FAMILY for f in FAMILY_FILES)


def family_named(name: str) -> FamilySpec:
    """The family called ``name`` (``vit``, ``beit``); KeyError for another."""
    for spec in family_table():
        if spec.name == name:
            return spec
    raise KeyError(name)


def checkpoint_formats() -> dict[str, tuple[FamilySpec, CheckpointFormat]]:
    """format name -> (its family, the format), families in table order, each family's formats in its order."""
    return {f.name: (spec, f) for spec in family_table() for f in spec.formats}
