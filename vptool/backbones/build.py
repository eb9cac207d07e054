"""Build a frozen timm ViT backbone and load checkpoints strictly.

A backbone is any timm ``VisionTransformer`` whose blocks are timm's standard pre-norm ``Block`` with the
standard ``Attention``, or a timm ``Beit`` (BEiT v1/v2: relative position bias, layer scale) with its own
``Block``/``Attention`` (the prompted forward in ``vptool.prompting`` reuses those modules' weights), or a timm
``ConvNeXt`` / ``ResNet`` (pad prompts, VPT Table 5; ``vptool.prompting.families.convnext``). It is named
either by an embedded name (``vit_digits_mae``, see ``embedded.py``) or by any timm model name, with
constructor kwargs so tests can build tiny configurations.

Checkpoints are read with ``safetensors``, ``numpy.load(allow_pickle=False)`` (JAX ``.npz``) or
``torch.load(weights_only=True)`` -- nothing in a file is executed (only ``argparse.Namespace`` is allow-listed,
for the ``args`` of training dumps) -- their layout is detected from the keys or named by ``backbone.format``
and converted by a pure converter (``convert.py``), and the result is compared key by key with the model: the
first mismatching tensor, every missing key, unexpected key and shape mismatch is reported.

Weights of timm models hosted on the Hugging Face Hub (``pretrained: true`` without a checkpoint) go through the
same path: the file is found in the local Hugging Face cache (``$HF_HUB_CACHE``), downloaded only when
``HF_HUB_OFFLINE`` is unset, and loaded strictly -- never by timm's non-strict fallback.
Reading a file and finding the Hub file live in ``vptool.backbones.weights`` (re-exported here).

Normalisation: the data config (``mean``/``std``) follows the checkpoint's pretraining. Formats that imply one
(``convert.FORMAT_NORMALIZATION``: MAE and MoCo v3 -> ImageNet mean/std, JAX in21k ``.npz`` -> 0.5/0.5) replace
the timm model's own values (logged when they differ); ``timm`` and ``beitv2-pretrain`` keep the model's cfg.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from vptool.backbones.convert import CONVERTERS, FORMAT_NORMALIZATION, SIGNATURES, detect_format
from vptool.backbones.embedded import EMBEDDED
from vptool.backbones.kwargs import backbone_kwargs_problems
from vptool.backbones.weights import HUB_FILENAMES, hub_file, hub_source, read_state_dict, sha256_file
from vptool.errors import UserError
from vptool.prompting.families import FamilySpec, checkpoint_formats, family_for, family_named
from vptool.prompting.families.vit import MAE_ENCODER_KEYS, looks_like_mae_encoder

__all__ = ["IGNORED_PREFIXES", "MAE_ENCODER_KEYS", "BackboneInfo", "HUB_FILENAMES", "build_backbone",
           "check_supported", "load_strict", "looks_like_mae_encoder", "read_state_dict", "sha256_file"]

log = logging.getLogger(__name__)

#: checkpoint keys that are never part of the frozen feature extractor (the pretraining classifier head).
IGNORED_PREFIXES = ("head.",)


@dataclass
class BackboneInfo:
    """What a run records about its backbone (``summary.json``).

    Attributes:
        name: the backbone name as given (embedded or timm).
        checkpoint: path of the loaded weights file (``backbone.checkpoint``, the embedded weights, or the file
            resolved in the Hugging Face cache), or None (random init / timm's own pretrained loader).
        checkpoint_sha256: hex SHA-256 of that file, or None.
        data_config: timm data config (``input_size``, ``mean``, ``std``, ...), lists instead of tuples; ``mean``
            and ``std`` are the pretraining's (``convert.FORMAT_NORMALIZATION``) where the format implies them.
        format: the checkpoint layout the file was loaded as (a key of ``convert.CONVERTERS``: detected, or
            ``backbone.format``), or None when no file was loaded.
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


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str,
                key: str = "backbone.checkpoint", name: str | None = None) -> None:
    """Load ``sd`` into ``model``; every key must match in name and shape (pretraining heads are ignored: keys
    under ``head.`` or under the classifier timm's pretrained cfg names, e.g. a ResNet's ``fc.``, that the model,
    built with ``num_classes=0``, does not have).

    Args:
        model: the backbone.
        sd: a converted state dict (timm names).
        source: the file it came from (named in the error).
        key: the recipe key that gave the file.
        name: the backbone name (named in the error), or None.

    Raises:
        UserError: one line that starts with the first mismatching tensor in the model's key order (missing from
            the file, or its shape in the file and in the model; else the first unexpected key), then counts
            and the first few of each kind: missing keys, unexpected keys, shape mismatches. E.g. ``backbone.
            checkpoint: /x.pth does not match vit_base_patch16_224: first mismatch cls_token is (1, 1, 1024) in
            the file, (1, 1, 768) in the model; 148 shape mismatches: ...; 96 unexpected: ...; check ...``.
    """
    own = model.state_dict()
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")  # timm's name of it: head, head.fc, fc
    prefixes = IGNORED_PREFIXES + ((f"{classifier}.",) if isinstance(classifier, str) and classifier else ())
    ignored = [k for k in sd if k.startswith(prefixes) and k not in own]
    sd = {k: v for k, v in sd.items() if k not in ignored}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        first = next((k for k in own if k in missing or k in mismatched), None)
        if first is None:
            head = f"first mismatch {unexpected[0]} {_shape(sd[unexpected[0]])} is in the file, not in the model"
        elif first in missing:
            head = f"first mismatch {first} {_shape(own[first])} is in the model, missing from the file"
        else:
            head = f"first mismatch {first} is {_shape(sd[first])} in the file, {_shape(own[first])} in the model"
        shapes = [f"{k} {_shape(sd[k])} vs model {_shape(own[k])}" for k in mismatched]
        parts = [head]
        for label, items in (("shape mismatches", shapes), ("missing", missing), ("unexpected", unexpected)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {', '.join(items[:3])}{more}")
        target = name if name is not None else "the backbone"
        raise UserError(f"{key}: {source} does not match {target}: {'; '.join(parts)}; "
                        "check backbone.name/backbone.kwargs against the checkpoint")
    model.load_state_dict(sd, strict=True)
    if ignored:
        log.info("ignored checkpoint keys: %s", ", ".join(ignored))


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse a backbone the prompted forward has no ops file for (``vptool.prompting.families.family_for``).

    Supported: a timm ``VisionTransformer`` whose blocks are all the standard ``Block`` with ``Attention`` (CLS
    and any register tokens as prefix tokens), or a timm ``Beit`` whose blocks are all ``timm.models.beit.Block``
    with ``timm.models.beit.Attention`` (shared or per-block relative position bias), a timm ``SwinTransformer``
    whose blocks are ``SwinTransformerBlock`` with ``WindowAttention``, or a timm ``ConvNeXt`` or ``ResNet`` with a
    global pool (pad prompts). EVA, Swin V2 and every other class are refused.

    Raises:
        UserError: one line naming ``backbone.name``, why, and what is supported.
    """
    family_for(model, name)


def _kwargs_text(kwargs: dict) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no kwargs"
    return text if len(text) <= 120 else text[:117] + "..."


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
        if isinstance(exc, (ValueError, RuntimeError, AssertionError, ZeroDivisionError)):
            line = (str(exc).splitlines() or [type(exc).__name__])[0][:150]
            raise UserError(f"backbone.kwargs: timm cannot build {name!r} with {_kwargs_text(kwargs)} ({line}); "
                            "fix backbone.kwargs") from None
        raise


def _outside_family(name: str, family: FamilySpec) -> bool:
    """``name`` is embedded or a known timm model outside ``family``'s timm module (unknown names are not)."""
    import timm

    return name in EMBEDDED or (timm.is_model(name) and name not in timm.list_models(module=family.timm_module))


def _choose_format(sd: dict[str, torch.Tensor], format: str, source: Path, key: str) -> str:
    """The format to convert ``sd`` with: detected for ``"auto"``, else ``format`` once its keys are found.

    Raises:
        UserError: ``format`` is explicit but the file lacks its signature keys (``convert.SIGNATURES``); the
            message names ``backbone.format``, the file and the detected format.
    """
    detected = detect_format(sd)
    if format == "auto":
        return detected
    test, wants = SIGNATURES[format]
    if not test(sd):
        raise UserError(f"backbone.format: {format} but {source} ({key}) has no {wants} (looks like {detected}); "
                        f"set backbone.format: auto or {detected}")
    return format


def _data_config(model: nn.Module, fmt: str | None) -> dict:
    """timm's data config for ``model``, with the mean/std that ``fmt``'s pretraining used (if it implies one)."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    cfg["input_size"] = family_for(model).input_size(model)  # the size the model was built for
    if fmt in FORMAT_NORMALIZATION:
        mean, std = FORMAT_NORMALIZATION[fmt]
        if tuple(cfg.get("mean", ())) != tuple(mean) or tuple(cfg.get("std", ())) != tuple(std):
            log.info("%s weights: normalisation mean=%s std=%s replaces the model's mean=%s std=%s",
                     fmt, mean, std, cfg.get("mean"), cfg.get("std"))
        cfg["mean"], cfg["std"] = tuple(mean), tuple(std)
    return cfg


def _loaded_data_config(model: nn.Module, name: str, format: str, fmt: str | None,
                        sd: dict[str, torch.Tensor] | None, path: Path | None, key: str) -> dict:
    """The data config of the loaded ``model``: normalised as the loaded format ``fmt`` implies (else as an
    explicit ``format``), then the format's ``after_auto_load`` hook where the format was detected."""
    norm_fmt = fmt if fmt is not None else (None if format == "auto" else format)
    cfg = _data_config(model, norm_fmt)
    after_auto_load = checkpoint_formats()[fmt][1].after_auto_load if fmt is not None else None
    if sd is not None and format == "auto" and after_auto_load is not None:
        after_auto_load(name, sd, path, key, cfg)  # e.g. the ViT family's MAE-encoder normalisation hint
    return cfg


def build_backbone(name: str, pretrained: bool = True, checkpoint: str | None = None,
                   kwargs: dict | None = None, format: str = "auto") -> tuple[nn.Module, BackboneInfo]:
    """Build a frozen ViT backbone in eval mode.

    The weights file is ``checkpoint`` if given; else, with ``pretrained``, the embedded weights for an
    embedded name, or the timm model's Hugging Face file (``hf_hub_id`` in its pretrained cfg) found in the
    local cache (downloaded only when ``HF_HUB_OFFLINE`` is unset); timm models without a hub file keep timm's
    own pretrained loader. A file's layout is detected (``convert.detect_format``) unless ``format`` names it,
    converted (``convert.CONVERTERS``) and loaded strictly:

    - ``"timm"``, ``"mae"``, ``"mocov3"``, ``"mocov3-linear"``, ``"jax-npz"``: the model is built from
      ``name``/``kwargs`` and the converted state dict loaded (decoders, projectors, heads dropped);
    - ``"beitv2-pretrain"``: ``name`` must be a timm BEiT model (``beitv2_base_patch16_224``); it is built with
      ``families.beit.beit_constructor_kwargs`` merged over ``kwargs`` (no absolute position embedding, shared
      relative position bias, final norm, layer scale; a conflicting user kwarg is an error), and
      ``mask_token``/``lm_head.*`` are returned in ``info.extras``.

    ``info.data_config`` takes ``mean``/``std`` from ``convert.FORMAT_NORMALIZATION`` for formats that imply
    them (MAE, MoCo v3: ImageNet; ``jax-npz``: 0.5/0.5), else from the timm model's pretrained cfg. An explicit
    ``format`` with no file to load (``pretrained=False``, or timm's own loader) only sets that normalisation.

    Args:
        name: embedded name (``vit_digits_mae``) or a timm model name (with a pretrained tag, e.g.
            ``vit_base_patch16_224.mae``).
        pretrained: load the embedded weights, or the timm model's pretrained weights (ignored when
            ``checkpoint`` is set).
        checkpoint: path of a weights file (``.safetensors``, torch pickle, JAX ``.npz``) to load instead.
        kwargs: extra constructor kwargs (``img_size``, ``depth``, ``embed_dim``, ...).
        format: ``"auto"`` (detect from the keys) or a key of ``convert.CONVERTERS`` (``backbone.format``).

    Returns:
        ``(model, info)``: the backbone with ``requires_grad=False`` everywhere, and what a run records about it.

    Raises:
        UserError: unknown name or format, bad kwargs, missing/truncated/unreadable/mismatched checkpoint, an
            explicit format the file does not have, a checkpoint layout the named model cannot hold, weights
            not in the Hugging Face cache while offline, unsupported architecture.
    """
    kwargs = _checked_request(format, kwargs)
    ckpt_path, ckpt_key, timm_pretrained = _weights_file(name, pretrained, checkpoint, kwargs)
    sd = fmt = None
    if ckpt_path is not None:
        sd, fmt, kwargs = _read_file(name, ckpt_path, ckpt_key, format, kwargs)
    model = _construct(name, timm_pretrained, kwargs)
    check_supported(model, name)
    sha = None
    extras: dict[str, torch.Tensor] = {}
    if ckpt_path is not None:
        extras = _load_file(model, sd, fmt, ckpt_path, ckpt_key, name)
        sha = sha256_file(ckpt_path)
    model.requires_grad_(False)
    model.eval()
    cfg = _loaded_data_config(model, name, format, fmt, sd, ckpt_path, ckpt_key)
    info = BackboneInfo(name=name, checkpoint=str(ckpt_path) if ckpt_path else None, checkpoint_sha256=sha,
                        data_config={k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()},
                        format=fmt, extras=extras)
    return model, info


def _checked_request(format: str, kwargs: dict | None) -> dict:
    """A copy of ``kwargs`` once ``format`` is known and the kwargs pass ``kwargs.backbone_kwargs_problems``.

    Raises:
        UserError: an unknown ``backbone.format``, or the first problem with ``backbone.kwargs``.
    """
    if format != "auto" and format not in CONVERTERS:
        raise UserError(f"backbone.format: unknown format {format!r}; choose auto or one of {', '.join(CONVERTERS)}")
    kwargs = dict(kwargs or {})
    problems = backbone_kwargs_problems(kwargs)
    if problems:
        raise UserError(problems[0])
    return kwargs


def _weights_file(name: str, pretrained: bool, checkpoint: str | None,
                  kwargs: dict) -> tuple[Path | None, str, bool]:
    """Which weights to load: ``(file or None, the recipe key that named it, use timm's own pretrained loader)``.

    ``checkpoint`` wins; else with ``pretrained`` the embedded weights of an embedded name, or a timm model's
    Hugging Face file (``hub_source``/``hub_file``), or timm's own loader when the model has no hub file.

    Raises:
        UserError: the embedded weights are missing, or the hub file is not cached while offline.
    """
    import timm

    if checkpoint is not None:
        return Path(checkpoint), "backbone.checkpoint", False
    if not pretrained:
        return None, "backbone.checkpoint", False
    if name in EMBEDDED:
        path = EMBEDDED[name].path
        if not path.is_file():
            raise UserError(f"backbone.name: embedded weights {path} are missing; "
                            "reinstall vptool or run python -m vptool.backbones.pretrain_digits_mae")
        return path, "backbone.name", False
    if timm.is_model(name):
        hub = hub_source(name, kwargs)
        if hub is None:
            return None, "backbone.checkpoint", True
        return hub_file(name, *hub), "backbone.pretrained", False
    return None, "backbone.checkpoint", False  # an unknown name: _create_timm names it


def _read_file(name: str, path: Path, key: str, format: str,
               kwargs: dict) -> tuple[dict[str, torch.Tensor], str, dict]:
    """Read the weights file and choose its layout: ``(raw state dict, format, constructor kwargs)``.

    The kwargs are the format's family's ``constructor_kwargs`` for it: ``kwargs`` itself for a ViT format, for
    ``beitv2-pretrain`` the layout's kwargs merged over them (``families.beit.merge_constructor_kwargs``).

    Raises:
        UserError: an unreadable file (``read_state_dict``), an explicit format the file does not have, a file only
            its family's models can hold (BEiT v2 pretraining) under a name that is not one of them, or a user
            kwarg that contradicts the layout.
    """
    sd = read_state_dict(path, key)
    fmt = _choose_format(sd, format, path, key)
    family, spec = checkpoint_formats()[fmt]
    if spec.own_models_only and _outside_family(name, family):  # an unknown name: _create_timm's did-you-mean
        raise UserError(f"backbone.name: {name!r} cannot hold the {spec.title} checkpoint "
                        f"{path}; set backbone.name to {family.models}")
    return sd, fmt, family.constructor_kwargs(fmt, kwargs)


def _construct(name: str, timm_pretrained: bool, kwargs: dict) -> nn.Module:
    """The model for an embedded name (a timm ``VisionTransformer`` with its own data config) or a timm name.

    Raises:
        UserError: bad constructor kwargs, or an unknown timm name.
    """
    if name not in EMBEDDED:
        return _create_timm(name, timm_pretrained, kwargs)
    from timm.models.vision_transformer import VisionTransformer

    emb = EMBEDDED[name]
    try:
        model = VisionTransformer(**{**emb.arch, **kwargs})
    except TypeError as exc:
        raise UserError(f"backbone.kwargs: {exc}; fix the constructor kwargs for {name!r}") from None
    except (ValueError, RuntimeError, AssertionError, ZeroDivisionError) as exc:
        line = (str(exc).splitlines() or [type(exc).__name__])[0][:150]
        raise UserError(f"backbone.kwargs: cannot build {name!r} with {_kwargs_text(kwargs)} ({line}); "
                        "fix backbone.kwargs") from None
    size = model.patch_embed.img_size
    model.pretrained_cfg = dict(input_size=(3, *size), mean=emb.mean, std=emb.std, crop_pct=1.0,
                                interpolation="bilinear", num_classes=0)
    return model


def _load_file(model: nn.Module, sd: dict[str, torch.Tensor], fmt: str, path: Path, key: str,
               name: str) -> dict[str, torch.Tensor]:
    """Convert ``sd`` from ``fmt`` and load it strictly into ``model``; returns the converter's extras.

    Raises:
        UserError: a key or shape mismatch (``load_strict``), or the model's family's ``check_loaded`` (a BEiT
            position index that differs).
    """
    timm_sd, extras, ignored = CONVERTERS[fmt](sd)
    load_strict(model, timm_sd, str(path), key=key, name=name)
    check_loaded = family_named(family_for(model, name).name).check_loaded
    if check_loaded is not None:
        check_loaded(model, sd, str(path))
    if ignored:
        log.info("%s: %s checkpoint, ignored keys: %s", path, fmt, ", ".join(ignored))
    return extras
