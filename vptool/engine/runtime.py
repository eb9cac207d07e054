"""What every engine command needs before it builds anything: the device, the autocast dtype and the seeds.

Only ``vptool.errors`` and the torch-free ``vptool.hardware`` are imported here, so ``init_prompts``, ``setup``,
``evaluate``, ``train`` and ``inference`` can all use these helpers without importing each other.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from vptool.errors import UserError


def resolve_device(spec: str | torch.device, key: str = "train.device") -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``.

    Raises:
        UserError: an unknown device, or CUDA asked for but not available (one line naming ``key``).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise UserError(f"{key}: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{key}: {spec!r} but no CUDA device is available; use auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"{key}: {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif dev.type != "cpu":
        raise UserError(f"{key}: {spec!r} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``train.precision``: ``bf16`` is bf16 autocast on any device (on a CPU without
    native bf16 it runs emulated and slowly: ``precision_warning``); ``auto`` is bf16 on a CUDA device that
    supports it (``torch.cuda.is_bf16_supported``: Ampere and newer) and fp32 (no autocast) elsewhere, the CPU
    included; ``fp32`` is no autocast."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda" and _cuda_bf16(device):
        return torch.bfloat16
    return None


def _cuda_bf16(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def compile_wanted(setting: bool | str, device: torch.device) -> bool:
    """``train.compile``: ``true`` / ``false`` as given; ``auto`` compiles when training on CUDA (where the compile's
    tens of seconds pay off) and not on the CPU."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def precision_warning(precision: str, device: torch.device) -> str | None:
    """One line when ``precision`` will be slow on ``device`` (bf16 on a CPU without avx512_bf16/amx_bf16,
    ``vptool.hardware``), else None."""
    from vptool.hardware import bf16_cpu_warning

    return bf16_cpu_warning(precision, device.type)


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
