"""Build everything a run needs from a recipe: device, backbone, data splits, the prompted model."""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from vptool.backbones.build import BackboneInfo, build_backbone
from vptool.data import Splits, build_splits
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT
from vptool.recipe import Recipe


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        UserError: CUDA was asked for but is not available.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"train.device: {spec!r} but no CUDA device is available; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"train.device: {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: ``auto`` is bf16 on CUDA and fp32 (no autocast) on CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """What ``prepare`` built."""

    model: PromptedViT
    splits: Splits
    backbone: BackboneInfo
    device: torch.device
    amp_dtype: torch.dtype | None


def prepare(recipe: Recipe, device: torch.device | None = None) -> Setup:
    """Build backbone, data and model for ``recipe`` (model on ``device``, seeded by ``recipe.seed``).

    Raises:
        UserError: any bad key, path or value found while building.
    """
    device = device or resolve_device(recipe.train.device)
    b = recipe.backbone
    seed_everything(recipe.seed)  # a backbone without weights (pretrained: false) is then rebuilt identically
    backbone, info = build_backbone(b.name, b.pretrained, b.checkpoint, b.kwargs)
    splits = build_splits(recipe.data, info.data_config)
    seed_everything(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    p = recipe.prompt
    model = PromptedViT(backbone, num_classes=len(splits.classes), prompt_mode=p.mode, prompt_length=p.length,
                        prompt_init=p.init, prompt_file=p.file, prompt_dropout=p.dropout,
                        prompt_trainable=p.trainable, readout_pool=recipe.readout.pool,
                        readout_norm=recipe.readout.norm, tune=recipe.train.tune, generator=g)
    model.to(device)
    return Setup(model, splits, info, device, autocast_dtype(recipe.train.precision, device))
