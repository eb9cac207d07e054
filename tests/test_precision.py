"""Hardware-aware precision: ``precision: auto`` is bf16 autocast only on a CUDA device with bf16; ``bf16`` on a
CPU without avx512_bf16/amx_bf16 runs but warns in one line (``vptool.hardware``)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from vptool import hardware
from vptool.engine import runtime as st
from vptool.engine import setup
from vptool.engine.train import Observer
from vptool.recipe import resolve

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse avx avx2\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


def cpuinfo(tmp_path, text: str):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    return path


def test_cpu_flags_come_from_the_first_flags_line(tmp_path):
    assert hardware.cpu_flags(cpuinfo=cpuinfo(tmp_path, AVX2_ONLY)) == ["avx2"]
    assert hardware.cpu_flags(cpuinfo=cpuinfo(tmp_path, SAPPHIRE)) == ["avx2", "avx512f", "avx512_bf16", "amx_tile",
                                                                      "amx_bf16"]
    assert hardware.cpu_flags(cpuinfo=tmp_path / "missing") == []


@pytest.mark.parametrize("text, native", [(AVX2_ONLY, False), (SAPPHIRE, True), (None, None),
                                          ("flags\t: avx2 avx512_bf16\n", True)])
def test_native_bf16_needs_avx512_bf16_or_amx(tmp_path, text, native):
    path = cpuinfo(tmp_path, text) if text is not None else tmp_path / "missing"
    assert hardware.cpu_native_bf16(path) is native


def test_bf16_on_a_cpu_without_native_bf16_warns_in_one_line(tmp_path):
    slow = cpuinfo(tmp_path, AVX2_ONLY)
    line = hardware.bf16_cpu_warning("bf16", "cpu", slow)
    assert line is not None and "\n" not in line
    assert "train.precision: bf16" in line and "100x" in line and "fp32" in line
    for precision, device, info in (("fp32", "cpu", slow), ("auto", "cpu", slow), ("bf16", "cuda", slow),
                                    ("bf16", "cpu", cpuinfo(tmp_path, SAPPHIRE)), ("bf16", "cpu", tmp_path / "x")):
        assert hardware.bf16_cpu_warning(precision, device, info) is None, (precision, device, info)


def test_auto_precision_by_device(monkeypatch):
    cpu = torch.device("cpu")
    assert st.autocast_dtype("auto", cpu) is None
    assert st.autocast_dtype("fp32", cpu) is None
    assert st.autocast_dtype("bf16", cpu) is torch.bfloat16
    cuda = torch.device("cuda", 0)
    for has_bf16, want in ((True, torch.bfloat16), (False, None)):  # Ampere+ vs an older GPU (no device needed)
        monkeypatch.setattr(st, "_cuda_bf16", lambda device, v=has_bf16: v)
        assert st.autocast_dtype("auto", cuda) is want
        assert st.autocast_dtype("fp32", cuda) is None
        assert st.autocast_dtype("bf16", cuda) is torch.bfloat16


class Notes(Observer):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


@pytest.mark.parametrize("native, precision, warned", [(False, "bf16", True), (True, "bf16", False),
                                                       (False, "auto", False)])
def test_training_setup_states_the_slowdown_once(tmp_path, monkeypatch, native, precision, warned):
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda cpuinfo="/proc/cpuinfo": native)
    recipe = resolve(tiny_recipe(tmp_path, train={"epochs": 2, "warmup_epochs": 1, "precision": precision,
                                                  "device": "cpu"}))
    obs = Notes()
    s = setup.prepare(recipe, observer=obs)
    assert s.amp_dtype is (torch.bfloat16 if precision == "bf16" else None)
    slow = [n for n in obs.notes if "without native bf16" in n]
    assert len(slow) == (1 if warned else 0)
