"""CLI start-up: ``import vptool.cli``, ``--help`` and argument or recipe errors must not import torch, timm or
torchvision (they cost seconds; the commands that need them import them). Each check is a fresh interpreter, so
the test is in the slow lane."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "timm", "torchvision", "sklearn", "optuna", "matplotlib")

#: runs the CLI's entry point with ARGS, then reports which heavy modules were imported (stderr, last line)
PROBE = r"""
import atexit, json, sys
HEAVY = {heavy!r}
atexit.register(lambda: print(json.dumps(sorted(m for m in HEAVY if m in sys.modules)), file=sys.stderr))
sys.argv = ["vptool", *sys.argv[1:]]
if sys.argv[1:] == ["--import-only"]:
    import vptool.cli
    raise SystemExit(0)
from vptool.cli import main
main()
""".replace("{heavy!r}", repr(HEAVY))


def _run(*args: str, cwd=None) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]), "\n".join(lines[:-1])


@pytest.mark.slow
def test_help_and_input_errors_do_not_import_torch(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: vpt-deep\nprompt:\n  lenght: 3\n")
    cases = [
        (("--import-only",), 0, None),
        (("--help",), 0, None),
        (("train", "--help"), 0, None),
        (("sweep", "--help"), 0, None),
        (("train", "--bogus"), 2, "No such option: --bogus"),
        (("train", str(bad)), 2, "prompt.lenght: unknown key; did you mean prompt.length?"),
        (("train", str(tmp_path / "missing.yaml")), 2, "recipe not found"),
        (("init-prompts", str(bad), "-o", str(tmp_path / "p.safetensors")), 2, "prompt.lenght"),
        (("predict", str(tmp_path), "x.png", "--top-k", "0"), 2, "--top-k: 0 must be at least 1"),
        (("eval", str(tmp_path), "--split", "dev"), 2, "--split: 'dev' is not train, val or test"),
    ]
    for args, code, needle in cases:
        rc, heavy, err = _run(*args, cwd=tmp_path)
        assert rc == code, (args, rc, err)
        assert heavy == [], f"vptool {' '.join(args)} imported {heavy}"
        if needle is not None:
            lines = err.splitlines()  # a recipe's errors are one line each, all of them
            assert needle in err and lines and all(ln.startswith("error: ") for ln in lines), err
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.slow
def test_a_command_that_trains_does_import_torch(tmp_path):
    """The probe can fail: a dry run builds the model, so torch is in sys.modules then."""
    rc, heavy, err = _run("train", "recipes/quickstart.yaml", "--dry-run", "--json",
                          cwd=__import__("pathlib").Path(__file__).resolve().parent.parent)
    assert rc == 0, err
    assert "torch" in heavy and "timm" in heavy
