"""Shared fixtures: tiny ViT configurations and recipe files written into tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

torch.set_num_threads(min(2, os.cpu_count() or 1))

#: a tiny timm ViT that trains in seconds on CPU (digits resized to 16 px, 16 patch tokens).
TINY_KWARGS = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
TINY_NAME = "vit_tiny_patch16_224"


@pytest.fixture
def tiny_backbone():
    """A frozen tiny ViT with random weights (seeded)."""
    from vptool.backbones.build import build_backbone

    torch.manual_seed(0)
    model, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    return model


def tiny_recipe(tmp_path: Path, **sections) -> dict:
    """A recipe dict for a tiny 2-epoch VPT-deep run on digits, sections merged over the defaults."""
    from vptool.recipe import deep_merge

    base = {
        "method": "vpt-deep",
        "seed": 0,
        "backbone": {"name": TINY_NAME, "pretrained": False, "kwargs": dict(TINY_KWARGS)},
        "data": {"dataset": "digits", "batch_size": 64},
        "prompt": {"length": 4},
        "train": {"epochs": 2, "lr": 0.5, "warmup_epochs": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    return deep_merge(base, sections)


def write_recipe(tmp_path: Path, recipe: dict, name: str = "tiny.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m vptool ARGS`` in a fresh process (the real entry point, exit codes and streams), with
    ``input`` on stdin."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "vptool", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600, input=input)


def assert_one_line_naming(exc: pytest.ExceptionInfo, *needles: str) -> str:
    """The raised error's message is one line and names every needle (key, path, value)."""
    msg = str(exc.value)
    assert "\n" not in msg, f"UserError message spans several lines: {msg!r}"
    for n in needles:
        assert n in msg, f"{n!r} not named in {msg!r}"
    return msg


def invoke_cli(*args: str, cwd: Path | None = None):
    """Run the CLI in this process (typer's CliRunner): exit code, stdout and stderr as the real entry point.

    For tests that call the CLI many times (every shipped recipe), where a fresh interpreter per call would
    dominate the run time; ``run_cli`` stays the check of the real entry point.
    """
    from typer.testing import CliRunner

    from vptool.cli import app

    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    finally:
        os.chdir(old)


RECIPES = Path(__file__).resolve().parent.parent / "recipes"
#: epochs of the shared quickstart runs: enough for the digits to be learnt (warm-up is 2 epochs), short for CI.
QUICKSTART_EPOCHS = 3


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """``quickstart_run(stem)`` trains ``recipes/<stem>.yaml`` once per session (``QUICKSTART_EPOCHS`` epochs, in
    this process) and returns its run directory; the export and predict tests share these runs."""
    runs: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("quickstart")

    def get(stem: str) -> Path:
        if stem not in runs:
            res = invoke_cli("train", str(RECIPES / f"{stem}.yaml"), "--set", f"train.epochs={QUICKSTART_EPOCHS}",
                             "--set", f"output.dir={root}", "--json")
            assert res.exit_code == 0, res.output
            runs[stem] = root / stem
        return runs[stem]

    return get


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory) -> Path:
    """An adapter folder of an untrained tiny VPT-deep model (random-init ViT, 3 classes), for tests of the
    commands' input handling: built in a second, no training."""
    import vptool

    model = vptool.from_preset("vpt-deep", TINY_NAME, 3, class_names=["cat", "dog", "emu"], pretrained=False,
                               backbone_kwargs=dict(TINY_KWARGS), prompt_length=2)
    out = tmp_path_factory.mktemp("tiny_adapter") / "tiny"
    model.save_pretrained(out)
    return out
