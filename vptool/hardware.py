"""What the machine can do fast, read without importing torch: the CPU flags that decide fp32/bf16 speed.

A CPU runs bf16 matrix products natively with AVX-512 BF16 (``avx512_bf16``) or AMX (``amx_bf16``); without
either, PyTorch emulates them and a ViT-B VPT-deep train step in bf16 ran about 100x slower than in fp32 on an
AVX2-only machine (vptool issue 16). ``precision: auto`` therefore never picks bf16 on a CPU.
"""

from __future__ import annotations

from pathlib import Path

#: the flags a benchmark prints: vector width, VNNI, and native bf16 (AVX-512 BF16, AMX)
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "avx_vnni")
#: either one means the CPU computes bf16 products natively
NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def cpu_flags(names: tuple[str, ...] | None = FLAGS, cpuinfo: str | Path = "/proc/cpuinfo") -> list[str]:
    """The CPU's flags from ``cpuinfo`` (the first ``flags`` line), restricted to ``names`` in their order
    (``names=None``: all of them, sorted); ``[]`` when the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return sorted(have) if names is None else [f for f in names if f in have]


def cpu_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """True when the CPU has ``avx512_bf16`` or ``amx_bf16``, False when its flags lack both, None when the flags
    cannot be read (then nothing is claimed either way)."""
    flags = cpu_flags(None, cpuinfo)
    if not flags:
        return None
    return any(f in flags for f in NATIVE_BF16)


def bf16_cpu_warning(precision: str, device_type: str, cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The one-line warning for ``train.precision: bf16`` on a CPU without native bf16, else None."""
    if precision != "bf16" or device_type != "cpu" or cpu_native_bf16(cpuinfo) is not False:
        return None
    return ("train.precision: bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in its flags): it runs, "
            "emulated, about 10-100x slower than fp32 (a ViT-B train step measured ~100x on AVX2); use "
            "precision: auto or fp32 on this machine")
