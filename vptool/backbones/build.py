"""Build a frozen timm ViT backbone and load checkpoints strictly.

A backbone is any timm ``VisionTransformer`` whose blocks are timm's standard pre-norm ``Block`` with the
standard ``Attention``, or a timm ``Beit`` (BEiT v1/v2: relative position bias, layer scale) with its own
``Block``/``Attention`` (the prompted forward in ``vptool.prompting`` reuses those modules' weights). It is named
either by an embedded name (``vit_digits_mae``, see ``embedded.py``) or by any timm model name, with
constructor kwargs so tests can build tiny configurations.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` -- nothing in a file is executed
(only ``argparse.Namespace`` is allow-listed, for the ``args`` of training dumps) -- their layout is detected
from the keys and converted by a pure converter (``convert.py``), and the result is compared key by key with
the model: every missing key, unexpected key and shape mismatch is reported.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vptool.backbones.convert import BEITV2_INDEX_KEY, CONVERTERS, beit_constructor_kwargs, detect_format
from vptool.backbones.embedded import EMBEDDED
from vptool.errors import UserError

log = logging.getLogger(__name__)

#: checkpoint keys that are never part of the frozen feature extractor (the pretraining classifier head).
IGNORED_PREFIXES = ("head.",)


@dataclass
class BackboneInfo:
    """What a run records about its backbone (``summary.json``).

    Attributes:
        name: the backbone name as given (embedded or timm).
        checkpoint: path of the loaded weights file, or None (random init / timm's own pretrained weights).
        checkpoint_sha256: hex SHA-256 of that file, or None.
        data_config: timm data config (``input_size``, ``mean``, ``std``, ...), lists instead of tuples.
        format: the detected checkpoint layout (a key of ``convert.CONVERTERS``: ``"timm"``,
            ``"beitv2-pretrain"``), or None when no file was loaded.
        extras: pretrained tensors the timm model has no slot for, name -> tensor (never written to JSON),
            e.g. ``"mask_token"`` (1, 1, D) float32, ``"lm_head.weight"`` (V, D), ``"lm_head.bias"`` (V,) for
            ``beitv2-pretrain``; empty otherwise.
    """

    name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    data_config: dict
    format: str | None = None
    extras: dict = field(default_factory=dict, repr=False)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _reason(exc: Exception) -> str:
    """One plain line from a loader error (for torch's weights-only refusal: the rejected global)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("WeightsUnpickler error:"):
            return ln[len("WeightsUnpickler error:"):].strip()
    return lines[0] if lines else type(exc).__name__


def read_state_dict(path: str | Path, key: str = "backbone.checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch pickle loaded with ``weights_only=True``.

    A torch file may hold the state dict itself or wrap it as ``{"model": sd}`` / ``{"state_dict": sd}``; other
    entries of a training dump (optimizer, epoch, scaler, ``args`` as an ``argparse.Namespace``) are read and
    discarded. ``argparse.Namespace`` is the only class allow-listed beyond torch's weights-only set.

    Raises:
        UserError: the file is missing, unreadable, unsafe to unpickle, or holds no tensor mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{key}: {p} not found; point {key} at an existing .safetensors/.pth/.pt file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            # Namespace only restores attributes (no __reduce__/__setstate__ code), so allowing it runs nothing
            with torch.serialization.safe_globals([argparse.Namespace]):
                sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors / pickle errors have many types; all mean "cannot read this file"
        raise UserError(f"{key}: cannot read {p} as a weights-only checkpoint ({_reason(exc)}); "
                        "vptool never unpickles code: convert it to a plain state dict or .safetensors") from None
    if isinstance(sd, dict):
        for wrapper in ("model", "state_dict"):
            if wrapper in sd and isinstance(sd[wrapper], dict):
                sd = sd[wrapper]
                break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{key}: {p} holds no state dict of tensors (expected a timm-layout state dict)")
    return sd


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                key: str = "backbone.checkpoint") -> None:
    """Load ``sd`` into ``model``; every key must match in name and shape (pretraining heads are ignored).

    Raises:
        UserError: one line listing missing keys, unexpected keys and shape mismatches (first few of each).
    """
    own = model.state_dict()
    ignored = [k for k in sd if k.startswith(IGNORED_PREFIXES) and k not in own]
    sd = {k: v for k, v in sd.items() if k not in ignored}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        raise UserError(f"{key}: {source} does not match the backbone: {'; '.join(parts)}; "
                        "check backbone.name/backbone.kwargs against the checkpoint")
    model.load_state_dict(sd, strict=True)
    if ignored:
        log.info("ignored checkpoint keys: %s", ", ".join(ignored))


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse a backbone the prompted forward does not support.

    Supported: a timm ``VisionTransformer`` whose blocks are all the standard ``Block`` with ``Attention``, or a
    timm ``Beit`` whose blocks are all ``timm.models.beit.Block`` with ``timm.models.beit.Attention`` (shared or
    per-block relative position bias).

    Raises:
        UserError: ``model`` is neither of those, or uses attention pooling.
    """
    from timm.layers import Attention
    from timm.models import beit
    from timm.models.vision_transformer import Block, VisionTransformer

    if isinstance(model, beit.Beit):
        ok = all(type(b) is beit.Block and type(b.attn) is beit.Attention for b in model.blocks)
    else:
        ok = isinstance(model, VisionTransformer) and all(
            type(b) is Block and type(b.attn) is Attention for b in model.blocks)
    if not ok:
        raise UserError(f"backbone.name: {name!r} is not supported yet; vptool prompts timm VisionTransformer "
                        "models with standard pre-norm blocks (e.g. vit_base_patch16_224) and timm BEiT models "
                        "(e.g. beitv2_base_patch16_224)")
    if getattr(model, "attn_pool", None) is not None:
        raise UserError(f"backbone.name: {name!r} uses attention pooling (global_pool='map'), not supported")


def _create_timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, list(EMBEDDED) + timm.list_models(), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see timm.list_models() or the embedded names"
        raise UserError(f"backbone.name: unknown model {name!r}; {hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
    except TypeError as exc:
        raise UserError(f"backbone.kwargs: {exc}; fix the constructor kwargs for {name!r}") from None
    except Exception as exc:
        if pretrained:
            raise UserError(f"backbone.pretrained: could not load pretrained weights for {name!r} "
                            f"({type(exc).__name__}); offline, set backbone.checkpoint to a local file "
                            "or fill the Hugging Face cache") from None
        raise


def _is_other_model(name: str) -> bool:
    """``name`` is embedded or a known timm model outside ``timm.models.beit`` (unknown names are not)."""
    import timm

    return name in EMBEDDED or (timm.is_model(name) and name not in timm.list_models(module="beit"))


def _format_kwargs(fmt: str, kwargs: dict) -> dict:
    """Merge the constructor kwargs a checkpoint layout requires into the user's ``backbone.kwargs``.

    The layout kwargs win: a user kwarg that would change the layout (``use_abs_pos_emb``, ``use_rel_pos_bias``,
    ``use_shared_rel_pos_bias``, ``use_fc_norm``, ``qkv_bias``) to another value is an error, not silently
    overridden. ``init_values`` is the exception: any non-zero user value is kept (loading overwrites it).
    Size kwargs (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``, ...) pass through.

    Raises:
        UserError: a user kwarg contradicts the layout, naming ``backbone.kwargs.<key>``.
    """
    need = beit_constructor_kwargs(fmt)
    for k, v in kwargs.items():
        if k == "init_values":
            if not v:
                raise UserError(f"backbone.kwargs.init_values: {v!r} disables layer scale but the {fmt} checkpoint "
                                "has gamma_1/gamma_2; remove init_values or set it non-zero")
        elif k in need and v != need[k]:
            raise UserError(f"backbone.kwargs.{k}: {v!r} conflicts with the {fmt} checkpoint layout (needs "
                            f"{need[k]!r}); remove {k} from backbone.kwargs")
    return {**need, **kwargs}


def _check_rel_pos_index(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
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


def build_backbone(name: str, pretrained: bool = True, checkpoint: str | None = None,
                   kwargs: dict | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build a frozen ViT backbone in eval mode.

    When ``checkpoint`` is given the file is read first and its layout detected (``convert.detect_format``):

    - ``"timm"``: the model is built from ``name``/``kwargs`` and the file loaded strictly as is;
    - ``"beitv2-pretrain"``: ``name`` must be a timm BEiT model (``beitv2_base_patch16_224``); it is built with
      ``convert.beit_constructor_kwargs`` merged over ``kwargs`` (no absolute position embedding, shared
      relative position bias, final norm, layer scale; a conflicting user kwarg is an error), the file is
      converted, loaded strictly, and ``mask_token``/``lm_head.*`` are returned in ``info.extras``.

    Args:
        name: embedded name (``vit_digits_mae``) or a timm model name.
        pretrained: load the embedded weights, or timm's pretrained weights (ignored when ``checkpoint`` is set).
        checkpoint: path of a state dict (timm layout or a detected format) to load strictly instead.
        kwargs: extra constructor kwargs (``img_size``, ``depth``, ``embed_dim``, ...).

    Returns:
        ``(model, info)``: the backbone with ``requires_grad=False`` everywhere, and what a run records about it.

    Raises:
        UserError: unknown name, bad kwargs, missing/unreadable/mismatched checkpoint, a checkpoint layout the
            named model cannot hold, unsupported architecture.
    """
    from timm.data import resolve_model_data_config
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs or {})
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    sd = fmt = None
    if ckpt_path is not None:
        sd = read_state_dict(ckpt_path, "backbone.checkpoint")
        fmt = detect_format(sd)
        if fmt == "beitv2-pretrain":
            if _is_other_model(name):  # an unknown name falls through to _create_timm's did-you-mean
                raise UserError(f"backbone.name: {name!r} cannot hold the BEiT v2 pretraining checkpoint "
                                f"{ckpt_path}; set backbone.name to a timm BEiT model, e.g. beitv2_base_patch16_224")
            kwargs = _format_kwargs(fmt, kwargs)
    if name in EMBEDDED:
        emb = EMBEDDED[name]
        try:
            model = VisionTransformer(**{**emb.arch, **kwargs})
        except TypeError as exc:
            raise UserError(f"backbone.kwargs: {exc}; fix the constructor kwargs for {name!r}") from None
        size = model.patch_embed.img_size
        model.pretrained_cfg = dict(input_size=(3, *size), mean=emb.mean, std=emb.std, crop_pct=1.0,
                                    interpolation="bilinear", num_classes=0)
        if checkpoint is None and pretrained:
            ckpt_path = emb.path
            if not ckpt_path.is_file():
                raise UserError(f"backbone.name: embedded weights {ckpt_path} are missing; "
                                "reinstall vptool or run python -m vptool.backbones.pretrain_digits_mae")
    else:
        model = _create_timm(name, pretrained and checkpoint is None, kwargs)
    check_supported(model, name)
    sha = None
    extras: dict[str, torch.Tensor] = {}
    if ckpt_path is not None:
        if sd is None:  # the embedded weights
            sd = read_state_dict(ckpt_path, "backbone.name")
            fmt = detect_format(sd)
        timm_sd, extras, ignored = CONVERTERS[fmt](sd)
        load_strict(model, timm_sd, str(ckpt_path))
        _check_rel_pos_index(model, sd, str(ckpt_path))
        if ignored:
            log.info("%s: %s checkpoint, ignored keys: %s", ckpt_path, fmt, ", ".join(ignored))
        sha = sha256_file(ckpt_path)
    model.requires_grad_(False)
    model.eval()
    cfg = resolve_model_data_config(model)
    cfg["input_size"] = (3, *model.patch_embed.img_size)  # the size the model was built for
    info = BackboneInfo(name=name, checkpoint=str(ckpt_path) if ckpt_path else None, checkpoint_sha256=sha,
                        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                        format=fmt, extras=extras)
    return model, info
