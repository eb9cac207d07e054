"""One builder from a preset, a recipe or a saved config to a ``PromptedViT``.

Training (``vptool.engine.setup.build_model``: a recipe), ``vptool.load`` (an adapter folder's saved config) and
``vptool.from_preset`` (a method preset) each turn what they hold into a ``ModelConfig`` and a built backbone,
then call ``build_model`` here, which does the rest the same way for all three: the method's readout
convention for ``auto`` (``vptool.conventions``), the model, the backbone's data config and evaluation
transform, the backbone record ``save_pretrained`` writes, class names and provenance.
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.config import ModelConfig
from vptool.prompting.core import PromptedCore


def backbone_record(name: str, pretrained: bool, checkpoint: str | None, format: str, kwargs: dict, seed: int,
                    info) -> dict:
    """How to rebuild a backbone (``adapter_config.json`` "backbone"): what built it (the recipe's ``backbone``
    keys, and the seed a random init, ``pretrained: false``, draws from) and what was loaded (``file``, its
    ``checkpoint_sha256``, the ``detected_format``, the ``mean``/``std`` it implies), from a ``BackboneInfo``."""
    return {"name": name, "pretrained": bool(pretrained), "checkpoint": checkpoint, "format": format,
            "kwargs": dict(kwargs or {}), "seed": int(seed), "file": info.checkpoint,
            "checkpoint_sha256": info.checkpoint_sha256, "detected_format": info.format,
            "mean": info.data_config.get("mean"), "std": info.data_config.get("std")}


def backbone_pretraining(name: str, fmt: str | None, backbone: nn.Module) -> str:
    """``supervised`` / ``mae`` / ``mocov3`` / ``beit`` (``vptool.conventions.pretraining_of``) for a built
    backbone: ``fmt`` is the format its file was loaded as, or the explicit ``backbone.format``."""
    from vptool.conventions import pretraining_of
    from vptool.prompting.families import family_for

    return pretraining_of(name, None if fmt in (None, "auto") else fmt, family_for(backbone, name).name)


def resolve_readout_auto(config: ModelConfig, convention: str, backbone_name: str, fmt: str | None,
                         backbone: nn.Module) -> tuple[ModelConfig, str | None]:
    """``config`` with ``readout_pool`` / ``readout_norm: auto`` replaced by the method's official readout on
    this backbone's pretraining (``vptool.conventions.resolve_readout``), and why (``None`` when nothing was
    ``auto``), e.g. ``vpt convention, mae backbone``."""
    if "auto" not in (config.readout_pool, config.readout_norm):
        return config, None
    from vptool.conventions import resolve_readout

    pretraining = backbone_pretraining(backbone_name, fmt, backbone)
    pool, norm = resolve_readout(config.readout_pool, config.readout_norm, convention, pretraining,
                                 getattr(backbone, "cls_token", None) is not None)
    return config.replace(readout_pool=pool, readout_norm=norm), f"{convention} convention, {pretraining} backbone"


def build_model(config: ModelConfig, backbone: nn.Module, info=None, *, record: dict | None = None,
                generator: torch.Generator | None = None, prompt_values: torch.Tensor | None = None,
                pretrained_mask_token: torch.Tensor | None = None, class_names: list[str] | None = None,
                eval_transform: str = "vtab", adapter_info: dict | None = None,
                model_cls: type[PromptedCore] | None = None) -> PromptedCore:
    """The model of ``config`` (readout already resolved: see ``resolve_readout_auto``) on ``backbone``.

    Args:
        config: the options, ``num_classes`` included.
        backbone: the built, frozen backbone.
        info: its ``BackboneInfo`` (data config, the pretrained [MASK] token in ``extras``), or None for a
            backbone vptool did not build (timm's data config of the module is used).
        record: ``backbone_record`` of it (what ``save_pretrained`` writes), or None.
        generator: RNG of the prompt, head and [MASK] init (None: torch's global RNG).
        prompt_values: initial prompts, (Np, D) or (L, Np, D) (an SPT init).
        pretrained_mask_token: overrides ``info.extras["mask_token"]``.
        class_names: K names (index = label), or None.
        eval_transform: ``vtab`` or ``fgvc``, the transform ``predict`` applies.
        adapter_info: provenance for the model card (method, dataset, metrics, recipe).
        model_cls: the class to build: ``vptool.prompting.model.PromptedViT`` (the library face, what every
            caller in vptool passes) or, by default, ``PromptedCore`` (the builder sits below the face and is handed
            it, so no import runs back up).

    Raises:
        ValueError: an option outside its allowed values.
        UserError: an option the backbone cannot support.
    """
    extras = info.extras if info is not None else {}
    mask = pretrained_mask_token if pretrained_mask_token is not None else extras.get("mask_token")
    model = (model_cls or PromptedCore)(backbone, config, generator=generator, prompt_values=prompt_values,
                        pretrained_mask_token=mask)
    model.set_data_config(info.data_config if info is not None else model.data_config, eval_transform)
    model.backbone_config = record
    if class_names is not None:
        model.class_names = [str(c) for c in class_names]
    model.adapter_info = dict(adapter_info or {})
    return model
