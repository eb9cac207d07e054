"""Build a frozen timm ViT backbone and load checkpoints strictly.

A backbone is any timm ``VisionTransformer`` whose blocks are timm's standard pre-norm ``Block`` with the
standard ``Attention`` (the prompted forward in ``vptool.prompting`` reuses those modules' weights). It is named
either by an embedded name (``vit_digits_mae``, see ``embedded.py``) or by any timm model name, with
constructor kwargs so tests can build tiny configurations.

Checkpoints are read with ``safetensors`` or ``torch.load(weights_only=True)`` -- nothing in a file is executed --
and compared key by key with the model: every missing key, unexpected key and shape mismatch is reported.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from vptool.backbones.embedded import EMBEDDED
from vptool.errors import UserError

log = logging.getLogger(__name__)

#: checkpoint keys that are never part of the frozen feature extractor (the pretraining classifier head).
IGNORED_PREFIXES = ("head.",)


@dataclass
class BackboneInfo:
    """What a run records about its backbone (``summary.json``)."""

    name: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    data_config: dict


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

    A torch file may hold the state dict itself or wrap it as ``{"model": sd}`` / ``{"state_dict": sd}``.

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

    Raises:
        UserError: ``model`` is not a timm VisionTransformer with standard ``Block``/``Attention``.
    """
    from timm.layers import Attention
    from timm.models.vision_transformer import Block, VisionTransformer

    ok = isinstance(model, VisionTransformer) and all(
        type(b) is Block and type(b.attn) is Attention for b in model.blocks)
    if not ok:
        raise UserError(f"backbone.name: {name!r} is not supported yet; vptool prompts timm VisionTransformer "
                        "models with standard pre-norm blocks (e.g. vit_base_patch16_224)")
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


def build_backbone(name: str, pretrained: bool = True, checkpoint: str | None = None,
                   kwargs: dict | None = None) -> tuple[nn.Module, BackboneInfo]:
    """Build a frozen ViT backbone in eval mode.

    Args:
        name: embedded name (``vit_digits_mae``) or a timm model name.
        pretrained: load the embedded weights, or timm's pretrained weights (ignored when ``checkpoint`` is set).
        checkpoint: path of a timm-layout state dict to load strictly instead.
        kwargs: extra constructor kwargs (``img_size``, ``depth``, ``embed_dim``, ...).

    Returns:
        ``(model, info)``: the backbone with ``requires_grad=False`` everywhere, and what a run records about it.

    Raises:
        UserError: unknown name, bad kwargs, missing/mismatched checkpoint, unsupported architecture.
    """
    from timm.data import resolve_model_data_config
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(kwargs or {})
    ckpt_path = None
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
    if checkpoint is not None:
        ckpt_path = Path(checkpoint)
    sha = None
    if ckpt_path is not None:
        sd = read_state_dict(ckpt_path, "backbone.checkpoint" if checkpoint else "backbone.name")
        load_strict(model, sd, str(ckpt_path))
        sha = sha256_file(ckpt_path)
    model.requires_grad_(False)
    model.eval()
    cfg = resolve_model_data_config(model)
    cfg["input_size"] = (3, *model.patch_embed.img_size)  # the size the model was built for
    info = BackboneInfo(name=name, checkpoint=str(ckpt_path) if ckpt_path else None, checkpoint_sha256=sha,
                        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()})
    return model, info
