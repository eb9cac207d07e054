"""``torchrun`` data parallelism (``vptool.engine.dist``): 2 gloo processes against one, on CPU.

The reference is always a plain one-process run of the same recipe (the code path CI tests everywhere else);
the 2-process job must agree with it: every adapter tensor within 1e-5, every metric within 1e-4, the same test
top-1, the same files, also on splits whose sizes 2 does not divide.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli
from safetensors.torch import load_file

TIMEOUT_S = 60  # VPTOOL_DIST_TIMEOUT for these jobs: a rank that hangs is given up on after this


def recipe(tmp: Path, **sections) -> Path:
    from vptool.recipe import deep_merge

    base = {"method": "vpt-deep", "seed": 0,
            "backbone": {"name": TINY_NAME, "pretrained": False, "kwargs": dict(TINY_KWARGS)},
            "data": {"dataset": "digits", "batch_size": 64},
            "prompt": {"length": 4, "dropout": 0.0},
            "train": {"epochs": 2, "lr": 0.1, "warmup_epochs": 1},
            "output": {"dir": str(tmp / "runs"), "name": "r"}}
    path = tmp / "r.yaml"
    path.write_text(yaml.safe_dump(deep_merge(base, sections), sort_keys=False))
    return path


def torchrun(*args: str, nproc: int = 2, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node N -m vptool ARGS`` in a fresh process group."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "vptool", *args]
    full_env = {**os.environ, "VPTOOL_DIST_TIMEOUT": str(TIMEOUT_S), "COLUMNS": "200", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories of one recipe: adapters within 1e-5, metrics within 1e-4 (but seconds), same test
    top-1 and the same files."""
    ta, tb = load_file(a / "adapter.safetensors"), load_file(b / "adapter.safetensors")
    assert sorted(ta) == sorted(tb)
    for k in ta:
        diff = (ta[k] - tb[k]).abs().max().item()
        assert diff <= 1e-5, (k, diff)
    ma, mb = metrics(a), metrics(b)
    assert len(ma) == len(mb) and len(ma) > 0
    for ra, rb in zip(ma, mb):
        assert set(ra) == set(rb)
        for k in ra:
            if k != "seconds":
                assert abs(ra[k] - rb[k]) <= 1e-4, (ra["epoch"], k, ra[k], rb[k])
    sa, sb = (json.loads((r / "summary.json").read_text()) for r in (a, b))
    assert sa["test_top1"] == sb["test_top1"] and sa["best_epoch"] == sb["best_epoch"]
    assert files(a) == files(b)


def one_process(path: Path, *sets: str) -> Path:
    res = invoke_cli("train", str(path), *[x for s in sets for x in ("--set", s)], "--json")
    assert res.exit_code == 0, res.output
    return Path(json.loads(res.stdout)["run_dir"])


# --------------------------------------------------------------------------------------------------- bad input
def test_batch_that_does_not_divide_by_the_world_is_refused_before_anything(tmp_path, monkeypatch):
    path = recipe(tmp_path, data={"batch_size": 63})
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    res = invoke_cli("train", str(path))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert "data.batch_size" in lines[0] and "63" in lines[0] and "2 processes" in lines[0]
    assert not (tmp_path / "runs").exists()
    monkeypatch.setenv("RANK", "1")  # another rank raises the same error and prints nothing
    res = invoke_cli("train", str(path))
    assert res.exit_code == 2 and res.stderr.strip() == ""


def test_peer_failure_survives_torchruns_sigterm_until_its_line_is_printed(tmp_path):
    """torchrun SIGTERMs the other workers as soon as one dies. A rank that has seen the failure must still print
    its line naming the failed rank: from the failed collective on, SIGTERM is ignored (also after the training
    loop's StopSignals hands its handlers back), so the process ends by itself with its own exit code 1."""
    script = tmp_path / "peer.py"
    script.write_text(
        "import os, signal, sys\n"
        "from vptool.engine import dist\n"
        "from vptool.engine.runstate import StopSignals\n"
        "dist.failed_peers = lambda wait_s=3.0: 'rank 1 (pid 4242) died'\n"
        "def gone():\n"
        "    raise RuntimeError('[gloo] Connection closed by peer')\n"
        "try:\n"
        "    with StopSignals():\n"
        "        dist.collective('the step', gone)\n"
        "except Exception as exc:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)  # torchrun's SIGTERM, after the loop's handlers are gone\n"
        "    print('error:', exc, file=sys.stderr)\n"
        "    sys.exit(1)\n")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert "rank 1 (pid 4242) died during the step" in res.stderr


# --------------------------------------------------------------------------------------------------- training
@pytest.mark.slow
def test_two_processes_train_the_one_process_run_and_only_rank0_writes(tmp_path):
    """digits: 1,257 training images (odd: the last global batch is split 5/4 plus one padded, weight-0 image),
    180 val and 360 test images."""
    path = recipe(tmp_path)
    ref = one_process(path, f"output.dir={tmp_path / 'one'}")
    res = torchrun("train", str(path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout)  # one JSON object: rank 1 prints nothing
    assert summary["world_size"] == 2
    run = tmp_path / "runs" / "r"
    assert_same_run(run, ref)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]  # no lock left, nothing of rank 1's
    assert error_lines(res.stderr) == []


def _digit_tree(root: Path, counts: dict[str, int]) -> None:
    """root/<split>/<class>/N.png: 3 classes of real digit images (0, 1, 2), ``counts`` images per class."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    pools = {k: iter(np.flatnonzero(d.target == k)) for k in range(3)}
    for split, n in counts.items():
        for k in range(3):
            folder = root / split / f"c{k}"
            folder.mkdir(parents=True)
            for i in range(n):
                g = np.round(d.images[next(pools[k])] * 255 / 16).astype(np.uint8)
                Image.fromarray(np.stack([g, g, g], -1).repeat(2, 0).repeat(2, 1), "RGB").save(folder / f"{i}.png")


@pytest.mark.slow
def test_splits_that_do_not_divide_train_and_evaluate_exactly(tmp_path):
    """123 / 21 / 33 images (all odd): training, validation and the test accuracy match one process, and
    ``vptool eval`` under torchrun counts every image once (no padded duplicate)."""
    root = tmp_path / "images"
    _digit_tree(root, {"train": 41, "val": 7, "test": 11})
    path = recipe(tmp_path, data={"dataset": "imagefolder", "root": str(root), "batch_size": 16,
                                  "eval_batch_size": 4}, train={"epochs": 3})
    ref = one_process(path, f"output.dir={tmp_path / 'one'}")
    res = torchrun("train", str(path))
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    assert_same_run(run, ref)
    one = invoke_cli("eval", str(ref), "--split", "val", "--json", "--save-logits", str(tmp_path / "one.npy"))
    assert one.exit_code == 0, one.output
    two = torchrun("eval", str(run), "--split", "val", "--json", "--save-logits", str(tmp_path / "two.npy"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert a["images"] == b["images"] == 21
    assert a["top1"] == b["top1"] and a["top5"] == b["top5"]
    la, lb = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")  # dataset order, every image once
    assert la.shape == lb.shape == (21, 3) and np.abs(la - lb).max() <= 1e-5
    assert json.loads((run / "eval" / "val.json").read_text())["confusion_matrix"] == \
        json.loads((ref / "eval" / "val.json").read_text())["confusion_matrix"]


# --------------------------------------------------------------------------------------------------- failures
@pytest.mark.slow
def test_killed_rank_stops_the_other_naming_it_and_the_run_resumes(tmp_path):
    """SIGKILL of rank 1 at its 25th step (epoch 2): rank 0 exits non-zero well within the timeout with one line
    naming rank 1; the run keeps epoch 1's checkpoint and ``--resume`` under torchrun finishes it as the
    uninterrupted run."""
    path = recipe(tmp_path)
    t0 = time.time()
    res = torchrun("train", str(path), env={"VPTOOL_FAULT": "step:25:KILL@1"})
    took = time.time() - t0
    assert res.returncode != 0
    assert took < TIMEOUT_S, took
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "rank 1" in lines[0] and "died" in lines[0], res.stderr[-3000:]
    run = tmp_path / "runs" / "r"
    assert not (run / "summary.json").exists()
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and len(ck["rng_ranks"]) == 2
    # SIGTERM to rank 1 alone (its 13th step after resuming: epoch 2, step 13): the flag is all-reduced with the
    # step's metrics, so both ranks stop after the next step, rank 0 writes the checkpoint and prints one line
    res = torchrun("train", str(path), "--resume", env={"VPTOOL_FAULT": "step:13:TERM@1"})
    assert res.returncode != 0
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and "SIGTERM at epoch 2, step 14/20" in lines[0] and "--resume" in lines[0], \
        res.stderr[-3000:]
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 14)
    res = torchrun("train", str(path), "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    ref = one_process(path, f"output.dir={tmp_path / 'one'}")
    assert_same_run(run, ref)


# --------------------------------------------------------------------------------------------------- init-prompts
def _level0_tokens(path: Path) -> torch.Tensor:
    """Every training image's level-0 patch tokens, PatchEmbed(x) + E_pos (SPT eq. 9's input), computed here
    from timm's modules: (n, D)."""
    from vptool.backbones.build import build_backbone
    from vptool.data import build_splits
    from vptool.engine.setup import seed_everything
    from vptool.recipe import load_recipe

    r = load_recipe(path)
    seed_everything(r.seed)
    bb, info = build_backbone(r.backbone.name, False, None, r.backbone.kwargs)
    train = build_splits(r.data, info.data_config, train_eval_transform=True).train
    x = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        tok = bb.patch_embed(x) + bb.pos_embed[:, bb.num_prefix_tokens:]
    return tok.reshape(-1, tok.shape[-1]).double()


@pytest.mark.slow
def test_init_prompts_kmeans_on_two_ranks_matches_one(tmp_path):
    """Each rank streams half the images into its own summary; the merged summaries give prototypes whose
    inertia on the same tokens is within 1 % of one process's, and each prototype is the mean of its cell."""
    path = recipe(tmp_path, method="vpt-shallow", prompt={"mode": "shallow", "length": 6})
    one = invoke_cli("init-prompts", str(path), "--strategy", "kmeans", "-o", str(tmp_path / "one.safetensors"),
                     "--json")
    assert one.exit_code == 0, one.output
    res = torchrun("init-prompts", str(path), "--strategy", "kmeans", "-o", str(tmp_path / "two.safetensors"),
                   "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads(res.stdout)
    assert meta["world_size"] == 2 and meta["images"] == 1257
    tokens = _level0_tokens(path)
    assert meta["tokens_per_set"] == tokens.shape[0]

    def inertia_and_cells(file: Path):
        c = load_file(file)["prompts.shallow"].double()
        d = torch.cdist(tokens, c) ** 2
        a = d.argmin(1)
        means = torch.stack([tokens[a == j].mean(0) for j in range(c.shape[0])])
        spread = math.sqrt(float(d.min(1).values.mean()))  # rms distance of a token to its prototype
        return float(d.min(1).values.sum()), float((means - c).norm(dim=1).max()) / spread

    i1, cell1 = inertia_and_cells(tmp_path / "one.safetensors")
    i2, cell2 = inertia_and_cells(tmp_path / "two.safetensors")
    assert abs(i2 - i1) / i1 <= 0.01, (i1, i2)
    assert cell1 < 0.05 and cell2 < 0.05, (cell1, cell2)
