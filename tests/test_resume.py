"""Runs survive faults: kill -9 at any point and --resume gives the uninterrupted run's files bit for bit (CPU);
SIGTERM/SIGINT stop with a checkpoint and exit 143/130; a NaN never becomes a saved model; one train per run
directory; --overwrite keeps the old run until the new one has finished.

The kills use the ``VPTOOL_FAULT`` hook (``vptool.engine.runstate.fault``): the process sends itself SIGKILL at a
chosen step, validation batch, or half-way through writing ``checkpoints/last.pt``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import invoke_cli, tiny_recipe, write_recipe
from safetensors.torch import load_file

#: 1257 digits / batch 64 -> 20 steps per epoch; 3 epochs (one warm-up) give a best epoch that moves
EPOCHS = 3
STEPS = 20


def recipe_file(tmp_path: Path, **sections) -> Path:
    from vptool.recipe import deep_merge

    r = tiny_recipe(tmp_path, **deep_merge({"train": {"epochs": EPOCHS, "lr": 0.5, "warmup_epochs": 1}}, sections))
    return write_recipe(tmp_path, r, "r.yaml")


def metrics_without_seconds(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("seconds")
    return rows


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in this process)."""
    tmp = tmp_path_factory.mktemp("reference")
    res = invoke_cli("train", str(recipe_file(tmp)))
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "r"


def assert_same_as_reference(run: Path, reference: Path) -> None:
    assert (run / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()
    assert metrics_without_seconds(run) == metrics_without_seconds(reference)
    a, b = json.loads((run / "summary.json").read_text()), json.loads((reference / "summary.json").read_text())
    for k in ("best_epoch", "val_acc", "test_top1", "test_top5"):
        assert a[k] == b[k], k
    ca, cb = (json.loads((r / "adapter_config.json").read_text()) for r in (run, reference))
    assert ca["model"] == cb["model"] and ca["metrics"] == cb["metrics"]  # a resumed run rebuilds the same model


# --- kill -9 at three points, then --resume: bitwise the uninterrupted run -----------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("point", ["step:27", "val:2", "checkpoint:2"])
def test_sigkill_then_resume_is_bitwise(tmp_path, reference, point):
    """Killed at global step 27 (epoch 2, step 7), in epoch 2's validation, or half-way through writing epoch 2's
    checkpoint: on disk is epoch 1's checkpoint, whole, and the resume reproduces the uninterrupted run."""
    path = recipe_file(tmp_path)
    env = {**os.environ, "VPTOOL_FAULT": point}
    proc = subprocess.run([sys.executable, "-m", "vptool", "train", str(path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    run = tmp_path / "runs" / "r"
    assert not (run / "summary.json").exists()
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 0)
    resumed = invoke_cli("train", str(path), "--resume")  # in this process: saves an interpreter start-up
    assert resumed.exit_code == 0, resumed.output
    assert_same_as_reference(run, reference)


# --- SIGTERM / SIGINT: stop after the step, checkpoint, exit 143 / 130, resume bitwise --------------------------------
@pytest.mark.parametrize("fault, code, where, position", [
    ("step:25:TERM", 143, "SIGTERM at epoch 2, step 5/20", (1, 5)),  # mid-epoch: 5 steps into epoch 2
    ("val:2:INT", 130, "SIGINT during validation of epoch 2", (1, STEPS)),  # epoch 2 trained, validation to redo
])
def test_signal_stops_with_checkpoint_then_resume_in_process(tmp_path, reference, monkeypatch, fault, code, where,
                                                            position):
    path = recipe_file(tmp_path)
    monkeypatch.setenv("VPTOOL_FAULT", fault)
    res = invoke_cli("train", str(path))
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and where in lines[0] and "vptool train" in lines[0] and "--resume" in lines[0]
    run = tmp_path / "runs" / "r"
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == position
    monkeypatch.delenv("VPTOOL_FAULT")
    res = invoke_cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    assert_same_as_reference(run, reference)


@pytest.mark.slow
def test_sigterm_from_outside_exits_143_and_resumes(tmp_path, reference):
    """A real preemption: SIGTERM from another process while the run trains (save every 3 steps)."""
    path = recipe_file(tmp_path, output={"dir": str(tmp_path / "runs"), "save_every_steps": 3})
    proc = subprocess.Popen([sys.executable, "-m", "vptool", "train", str(path)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    run = tmp_path / "runs" / "r"
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.pt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived (machine too fast for this timing)")
    assert proc.returncode == 143, err
    assert err.count("error:") == 1 and "--resume" in err
    resumed = invoke_cli("train", str(path), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_as_reference(run, reference)


@pytest.mark.slow
def test_second_sigint_exits_at_once(tmp_path):
    path = recipe_file(tmp_path, train={"epochs": 50, "warmup_epochs": 1})
    proc = subprocess.Popen([sys.executable, "-m", "vptool", "train", str(path)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    run = tmp_path / "runs" / "r"
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted again" in err or "stopped by SIGINT" in err


def test_save_every_steps_checkpoints_mid_epoch(tmp_path, reference, monkeypatch):
    path = recipe_file(tmp_path, output={"dir": str(tmp_path / "runs"), "save_every_steps": 7})
    seen = []
    import vptool.engine.runstate as rs

    real = rs.save_checkpoint

    def spy(p, state):
        seen.append((state["epoch"], state["step"]))
        return real(p, state)

    monkeypatch.setattr(rs, "save_checkpoint", spy)
    assert invoke_cli("train", str(path)).exit_code == 0
    # global steps 7, 14 in epoch 1; 21 (1+1), 28 (1+8), 35 (1+15) in epoch 2; 42 (2+2), 49, 56 in epoch 3
    assert seen == [(0, 7), (0, 14), (1, 0), (1, 1), (1, 8), (1, 15), (2, 0), (2, 2), (2, 9), (2, 16), (3, 0)]
    assert_same_as_reference(tmp_path / "runs" / "r", reference)  # checkpointing changes nothing


# --- the non-finite guard ------------------------------------------------------------------------------------------
def _all_finite_file(p: Path) -> bool:
    if p.suffix == ".safetensors":
        return all(torch.isfinite(t).all() for t in load_file(str(p)).values() if t.is_floating_point())
    if p.suffix == ".pt":
        bad = []

        def walk(x):
            if isinstance(x, torch.Tensor):
                if x.is_floating_point() and not torch.isfinite(x).all():
                    bad.append(x)
            elif isinstance(x, dict):
                for v in x.values():
                    walk(v)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v)
            elif isinstance(x, float) and not math.isfinite(x):
                bad.append(x)

        walk(torch.load(p, weights_only=True))
        return not bad
    if p.suffix in (".jsonl", ".json"):
        def refuse(c):
            raise ValueError(c)

        for line in p.read_text().splitlines() if p.suffix == ".jsonl" else [p.read_text()]:
            if line.strip():
                json.loads(line, parse_constant=refuse)
    return True


@pytest.mark.parametrize("sections", [{"train": {"lr": 1e38, "warmup_epochs": 0}},
                                      {"train": {"lr": 1e30, "warmup_epochs": 1}}], ids=["lr1e38", "lr1e30-warmup"])
def test_nan_stops_with_one_line_and_no_nonfinite_file(tmp_path, sections):
    r = tiny_recipe(tmp_path, **sections)
    r["train"]["epochs"] = EPOCHS
    res = invoke_cli("train", str(write_recipe(tmp_path, r, "r.yaml")))
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "non-finite" in lines[0] and "train.lr" in lines[0] and "epoch" in lines[0]
    run = tmp_path / "runs" / "r"
    files = [p for p in run.rglob("*") if p.is_file()]
    assert files and all(_all_finite_file(p) for p in files)
    assert not (run / "summary.json").exists()


def test_nan_after_a_good_epoch_keeps_the_best_adapter(tmp_path, monkeypatch):
    """A loss that turns NaN in epoch 2 leaves epoch 1's adapter intact (and finite)."""
    import torch.nn.functional as F

    import vptool.engine.train as tr

    calls = {"n": 0}
    real = F.cross_entropy

    def poisoned(logits, y, **kw):
        calls["n"] += 1
        loss = real(logits, y, **kw)
        return loss * float("nan") if calls["n"] == STEPS + 3 else loss

    monkeypatch.setattr(tr.F, "cross_entropy", poisoned)
    path = recipe_file(tmp_path)
    res = invoke_cli("train", str(path))
    assert res.exit_code == 1 and "epoch 2, step 3/20" in res.stderr, res.output
    run = tmp_path / "runs" / "r"
    meta = json.loads((run / "adapter.safetensors").read_bytes()[8:8 + int.from_bytes(
        (run / "adapter.safetensors").read_bytes()[:8], "little")])["__metadata__"]
    assert meta["epoch"] == "1" and _all_finite_file(run / "adapter.safetensors")
    assert len(metrics_without_seconds(run)) == 1


# --- one train per run directory; --overwrite never loses the old run -----------------------------------------------
@pytest.mark.slow
def test_two_simultaneous_trains_one_runs_the_other_exits_2(tmp_path):
    # long enough (30 epochs) that the second process starts while the first still trains
    path = recipe_file(tmp_path, train={"epochs": 30})
    cmd = [sys.executable, "-m", "vptool", "train", str(path)]
    a = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs"
    deadline = time.time() + 60
    while not (run / ".r.lock").exists() and time.time() < deadline:
        time.sleep(0.02)
    t0 = time.time()
    b = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    b_seconds = time.time() - t0
    _, a_err = a.communicate(timeout=300)
    assert a.returncode == 0, a_err
    assert b.returncode == 2 and b.stderr.count("\n") == 1 and "lock" in b.stderr, b.stderr
    assert b_seconds < 30  # at once: no waiting for the other run
    assert (run / "r" / "summary.json").is_file() and not (run / ".r.lock").exists()


def test_lock_held_in_this_process_refuses(tmp_path):
    import fcntl

    path = recipe_file(tmp_path)
    (tmp_path / "runs").mkdir()
    lock = tmp_path / "runs" / ".r.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        res = invoke_cli("train", str(path))
    finally:
        os.close(fd)
    assert res.exit_code == 2 and "locked by another vptool train (pid 4242" in res.stderr, res.output
    assert not (tmp_path / "runs" / "r").exists()


def test_overwrite_with_corrupt_new_data_keeps_old_run(tmp_path, reference):
    import shutil

    from PIL import Image

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "r")
    before = tree(runs / "r")
    root = tmp_path / "images"
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / split / c / f"{i}.png")
    (root / "test" / "a" / "0.png").write_bytes(b"not a png")  # found only by the final test evaluation
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(root),
                                                              "batch_size": 4, "val_fraction": 0.25},
                                              train={"epochs": 2, "warmup_epochs": 1}), "r.yaml")
    res = invoke_cli("train", str(path), "--overwrite")
    assert res.exit_code == 2 and "0.png" in res.stderr, res.output
    assert tree(runs / "r") == before  # byte-identical


def test_overwrite_swaps_in_the_finished_run(tmp_path, reference):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "r")
    path = recipe_file(tmp_path, seed=1)
    res = invoke_cli("train", str(path), "--overwrite")
    assert res.exit_code == 0, res.output
    assert (runs / "r" / "adapter.safetensors").read_bytes() != (reference / "adapter.safetensors").read_bytes()
    assert sorted(p.name for p in runs.iterdir()) == ["r"]  # no temporary folder or lock left
    assert json.loads((runs / "r" / "summary.json").read_text())["run_dir"] == str(runs / "r")


def test_interrupted_overwrite_resumes_with_overwrite_resume(tmp_path, reference, monkeypatch):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "r")
    (runs / "r" / "marker.txt").write_text("the old run")
    before = tree(runs / "r")
    path = recipe_file(tmp_path)
    monkeypatch.setenv("VPTOOL_FAULT", "step:30:TERM")
    res = invoke_cli("train", str(path), "--overwrite")
    assert res.exit_code == 143 and "--overwrite --resume" in res.stderr, res.output
    assert tree(runs / "r") == before  # the old run is untouched while the replacement is unfinished
    monkeypatch.delenv("VPTOOL_FAULT")
    res = invoke_cli("train", str(path), "--overwrite", "--resume")
    assert res.exit_code == 0, res.output
    assert_same_as_reference(runs / "r", reference)
    assert not (runs / "r" / "marker.txt").exists()  # replaced, now that the new run finished


def test_swap_interrupted_between_renames_is_repaired(tmp_path):
    from vptool.engine.runstate import overwrite_dir, recover_swap

    run = tmp_path / "r"
    old, new = tmp_path / ".r.replaced", overwrite_dir(run)
    old.mkdir()
    (old / "summary.json").write_text("{}")
    new.mkdir()
    (new / "recipe.yaml").write_text("x")  # unfinished replacement: the old run comes back
    recover_swap(run)
    assert (run / "summary.json").is_file() and not old.exists()
    os.replace(run, old)
    (new / "summary.json").write_text("{}")  # finished replacement: it goes in
    recover_swap(run)
    assert (run / "recipe.yaml").is_file() and not old.exists() and not new.exists()


# --- --resume rules ------------------------------------------------------------------------------------------------
def test_resume_refuses_a_changed_recipe_and_allows_more_epochs(tmp_path, reference):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(reference, runs / "r")
    path = recipe_file(tmp_path)
    res = invoke_cli("train", str(path), "--resume", "--set", "train.lr=0.3")
    assert res.exit_code == 2 and "train.lr (0.5 -> 0.3)" in res.stderr, res.output
    res = invoke_cli("train", str(path), "--resume")  # finished, same epochs: its summary, nothing rerun
    assert res.exit_code == 0 and "finished already" in res.stderr
    res = invoke_cli("train", str(runs / "r"), "--resume", "--set", f"train.epochs={EPOCHS + 1}")
    assert res.exit_code == 0 and "extending" in res.stderr, res.output
    rows = metrics_without_seconds(runs / "r")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[:3] == metrics_without_seconds(reference)
    assert (runs / "r" / "checkpoints" / "previous_summary.json").is_file()
    res = invoke_cli("train", str(runs / "r"), "--resume", "--set", "train.epochs=2")
    assert res.exit_code == 2 and "train.epochs" in res.stderr


def test_train_sampler_order_depends_only_on_seed_and_epoch():
    from vptool.engine.train import TrainSampler

    s = TrainSampler(50, seed=3)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start=20)
    assert list(s) == full[20:] and len(s) == 30
    g = torch.Generator().manual_seed(3 + 2)
    assert full == torch.randperm(50, generator=g).tolist()  # DistributedSampler's seeding rule
    s.set_epoch(3)
    assert list(s) != full and sorted(s) == list(range(50))


def test_train_sampler_shards_make_the_global_batches_with_padding_marked():
    """W ranks with B / W images each see exactly the one-process global batches; padding is index + N."""
    from vptool.engine.train import TrainSampler

    N, B, W = 23, 6, 3
    one = TrainSampler(N, seed=1)
    one.set_epoch(4)
    order = list(one)
    shards = []
    for r in range(W):
        s = TrainSampler(N, seed=1, world=W, rank=r)
        s.set_epoch(4)
        shards.append(list(s))
    assert {len(x) for x in shards} == {-(-N // W)}
    b = B // W
    for t in range(-(-N // B)):
        got = [i for x in shards for i in x[t * b:(t + 1) * b]]
        real = sorted(i for i in got if i < N)
        assert real == sorted(order[t * B:(t + 1) * B])
        assert all(i - N in order for i in got if i >= N)  # padding repeats real images, marked by + N
    assert sum(i >= N for x in shards for i in x) == W * -(-N // W) - N


def test_checkpoint_write_is_atomic_on_failure(tmp_path, monkeypatch):
    from vptool.engine.runstate import write_bytes_durably

    p = tmp_path / "f.bin"
    p.write_bytes(b"old")

    def boom(*a):
        raise OSError(28, "No space left on device", str(p))

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_bytes_durably(p, b"new" * 1000)
    assert p.read_bytes() == b"old" and [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_disk_full_is_one_line_exit_1(tmp_path, monkeypatch):
    import vptool.engine.runstate as rs

    def full(path, data, fault_point=None):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(rs, "write_bytes_durably", full)
    res = invoke_cli("train", str(recipe_file(tmp_path)))
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "last.pt" in lines[0] and "No space left on device" in lines[0]
    assert "Traceback" not in res.output
