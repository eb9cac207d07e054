"""``vptool sweep``: grid parsing and bad input (fast, no training), and real sweeps of tiny digits trials (slow):
two workers sharing one SQLite study, a stopped / killed / restarted worker, a failing trial, a rerun that runs
nothing. Every check is made against what the trials wrote themselves (summary.json, metrics.jsonl, recipe.yaml,
the per-trial logs) and against the Optuna study, never against the sweep's own report alone."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import invoke_cli, tiny_recipe, write_recipe

from vptool.engine.sweep import best_row, parse_grid
from vptool.errors import UserError


# --------------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, bytes | None]:
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def start(tmp: Path, *args: str, tag: str) -> subprocess.Popen:
    """``python -m vptool sweep ARGS`` in the background, stdout/stderr into tmp/<tag>.out / .err."""
    out = open(tmp / f"{tag}.out", "w")
    err = open(tmp / f"{tag}.err", "w")
    return subprocess.Popen([sys.executable, "-m", "vptool", "sweep", *args], cwd=tmp, stdout=out, stderr=err,
                            env={**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}, text=True)


def finish(tmp: Path, proc: subprocess.Popen, tag: str, timeout: float = 300) -> tuple[int, str, str]:
    rc = proc.wait(timeout=timeout)
    return rc, (tmp / f"{tag}.out").read_text(), (tmp / f"{tag}.err").read_text()


def wait_for(cond, timeout: float = 240, what: str = "") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric_epochs(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]


def attempts(log: Path) -> list[str]:
    """The ``=== attempt`` headers of a trial log: one per train process the sweep started."""
    return [ln for ln in log.read_text().splitlines() if ln.startswith("=== attempt")] if log.is_file() else []


def load_study(sweep: Path, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep / 'study.db'}")


def complete_params(study) -> list[tuple]:
    return sorted(tuple(sorted(t.params.items())) for t in study.trials if t.state.name == "COMPLETE")


# --------------------------------------------------------------------------------------------------- fast
def test_grid_cross_product_names_and_overrides():
    g = parse_grid(["train.lr=0.5, 0.25", "train.weight_decay=0,1e-3"])
    assert g.keys == ("train.lr", "train.weight_decay") and len(g) == 4
    assert g.points == [("0.5", "0"), ("0.5", "1e-3"), ("0.25", "0"), ("0.25", "1e-3")]  # last key fastest
    names = [g.name(i) for i in range(4)]
    assert names == ["000-lr0.5-weight_decay0", "001-lr0.5-weight_decay1e-3", "002-lr0.25-weight_decay0",
                     "003-lr0.25-weight_decay1e-3"]
    assert [g.name(i) for i in range(4)] == [parse_grid(["train.lr=0.5,0.25", "train.weight_decay=0,1e-3"]).name(i)
                                             for i in range(4)]  # every worker derives the same names
    assert g.overrides(1) == ["train.lr=0.5", "train.weight_decay=1e-3"]  # the strings typed, verbatim
    assert all(g.index(g.params(i)) == i for i in range(4))
    assert g.index({"train.lr": "0.1", "train.weight_decay": "0"}) is None
    assert g.search_space() == {"train.lr": ["0.5", "0.25"], "train.weight_decay": ["0", "1e-3"]}
    odd = parse_grid(["data.dataset=torchvision:CIFAR10,digits", "backbone.kwargs.depth=2"])
    assert [odd.name(i) for i in range(2)] == ["000-datasettorchvision_CIFAR10-depth2", "001-datasetdigits-depth2"]
    assert len(parse_grid([f"seed={','.join(map(str, range(1001)))}"]).name(1000)) == len("1000-seed1000")


def test_best_row_selects_on_validation_not_test():
    rows = [
        {"index": 0, "state": "COMPLETE", "val_acc": 80.0, "test_top1": 99.0},
        {"index": 1, "state": "COMPLETE", "val_acc": 90.0, "test_top1": 50.0},
        {"index": 2, "state": "COMPLETE", "val_acc": 90.0, "test_top1": 70.0},  # a tie on val: the lower index wins
        {"index": 3, "state": "FAIL", "val_acc": None, "test_top1": None},
    ]
    assert best_row(rows)["index"] == 1
    assert best_row(rows[3:]) is None


def test_sweep_figure_heatmap_holds_val_acc_per_point():
    import numpy as np

    from vptool.engine.sweep import sweep_figure

    g = parse_grid(["train.lr=0.5,0.1,0.05", "train.weight_decay=0,0.001"])
    vals = [91.0, 93.5, None, 88.0, 90.0, 85.0]
    rows = [{"index": i, "trial": g.name(i), "state": "COMPLETE" if v is not None else "FAIL", "val_acc": v}
            for i, v in enumerate(vals)]
    fig = sweep_figure(g, rows, best_row(rows))
    data = fig.axes[0].images[0].get_array()
    assert data.shape == (3, 2)  # train.lr down, train.weight_decay across
    expected = np.ma.masked_invalid(np.array([v if v is not None else np.nan for v in vals]).reshape(3, 2))
    assert (data.mask == expected.mask).all() and np.allclose(data.compressed(), expected.compressed())
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["0.5", "0.1", "0.05"]
    bars = sweep_figure(parse_grid(["train.lr=0.5,-1"]), rows[:2], rows[1])  # one key: bars
    assert [p.get_height() for p in bars.axes[0].patches] == [91.0, 93.5]


@pytest.fixture
def recipe_dir(tmp_path) -> Path:
    write_recipe(tmp_path, tiny_recipe(tmp_path, train={"epochs": 1, "warmup_epochs": 0}))
    return tmp_path


BAD = [
    (["--grid", "train.lrr=0.5,0.1"], ["--grid train.lrr", "did you mean train.lr?"]),
    (["--grid", "train.lr="], ["--grid train.lr", "no values"]),
    (["--grid", "train.lr=,"], ["--grid train.lr", "no values"]),
    (["--grid", "train.lr=0.5,,0.1"], ["--grid train.lr", "empty value"]),
    (["--grid", "train.lr=0.5,0.5"], ["--grid train.lr", "twice"]),
    (["--grid", "train.lr"], ["--grid 'train.lr'", "KEY=V1,V2"]),
    (["--grid", "train.lr=0.5", "--grid", "train.lr=0.1"], ["--grid train.lr", "given twice"]),
    (["--grid", "output.dir=a,b"], ["--grid output.dir", "--set output.dir"]),
    (["--grid", "output.name=a"], ["--grid output.name"]),
    (["--grid", "train=1"], ["--grid train", "section"]),
    ([], ["--grid", "missing"]),
    (["--grid", "train.lr=0.5", "--storage", "not a url"], ["--storage", "not a url"]),
    (["--grid", "train.lr=0.5", "--trial-command", "'unbalanced"], ["--trial-command"]),
    (["--grid", "train.lr=0.5", "--trial-command", "no-such-program-xyz -m vptool"], ["no-such-program-xyz"]),
    (["--grid", "train.lr=0.5", "--set", "train.epochz=3"], ["train.epochz"]),
]


@pytest.mark.parametrize("args,needles", BAD, ids=[" ".join(a) or "no-grid" for a, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(recipe_dir, args, needles):
    before = snapshot(recipe_dir)
    res = invoke_cli("sweep", "tiny.yaml", *args, cwd=recipe_dir)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert res.stdout == ""
    assert snapshot(recipe_dir) == before  # no sweep directory, no study


def test_optuna_missing_names_the_extra(recipe_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError
    res = invoke_cli("sweep", "tiny.yaml", "--grid", "train.lr=0.5,0.1", cwd=recipe_dir)
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and 'pip install -e ".[sweep]"' in lines[0], res.stderr
    assert not (recipe_dir / "runs").exists()


def test_parse_grid_raises_user_error():
    with pytest.raises(UserError, match="did you mean train.weight_decay"):
        parse_grid(["train.weight_decy=0"])
    parse_grid(["backbone.kwargs.depth=2,4"])  # free-form timm kwargs are keys too


def test_help_lists_examples():
    res = invoke_cli("sweep", "--help")
    assert res.exit_code == 0
    assert "--grid" in res.stdout and "--trial-command" in res.stdout and "vptool sweep recipes/" in res.stdout


# --------------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_two_workers_train_each_point_exactly_once(tmp_path):
    """Two workers started together on one SQLite study: 4 run directories, each trained once, one COMPLETE
    trial per point; the best is the val_acc argmax recomputed from the summaries; recipe.yaml holds the overrides."""
    write_recipe(tmp_path, tiny_recipe(tmp_path, train={"epochs": 1, "warmup_epochs": 0}))
    args = ("tiny.yaml", "--grid", "train.lr=0.5,0.05", "--grid", "train.weight_decay=0,0.001", "--json")
    procs = [start(tmp_path, *args, tag=f"w{k}") for k in range(2)]
    results = [finish(tmp_path, p, f"w{k}") for k, p in enumerate(procs)]
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]

    sweep = tmp_path / "runs" / "tiny-sweep"
    grid = parse_grid(list(args[2:5:2]))
    names = [grid.name(i) for i in range(4)]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "logs") == names
    summaries, pids = {}, set()
    for i, name in enumerate(names):
        run = sweep / name
        summaries[name] = json.loads((run / "summary.json").read_text())
        assert metric_epochs(run) == [1]
        heads = attempts(sweep / "logs" / f"{name}.log")
        assert len(heads) == 1, heads  # one train process per grid point, over both workers
        pids.add(heads[0].split("worker pid ")[1].split(":")[0])
        saved = yaml.safe_load((run / "recipe.yaml").read_text())  # the trial's overrides are in its recipe
        lr, wd = grid.points[i]
        assert saved["train"]["lr"] == float(lr) and saved["train"]["weight_decay"] == float(wd)
        assert saved["train"]["epochs"] == 1 and saved["output"]["name"] == name
    assert len(pids) == 2, "both workers should have trained"

    study = load_study(sweep, "tiny")
    assert complete_params(study) == sorted(tuple(sorted(grid.params(i).items())) for i in range(4))
    assert not [t for t in study.trials if t.state.name == "FAIL"]

    vals = [summaries[n]["val_acc"] for n in names]
    expected = max(range(4), key=lambda i: (vals[i], -i))  # argmax of val_acc, ties to the lower index
    report = json.loads((sweep / "sweep.json").read_text())
    assert report["best"]["trial"] == names[expected]
    assert report["best"]["test_top1"] == summaries[names[expected]]["test_top1"]
    assert report["grid"] == grid.search_space() and report["study"] == "tiny" and "study.db" in report["storage"]
    assert [r["val_acc"] for r in report["rows"]] == vals and {r["state"] for r in report["rows"]} == {"COMPLETE"}
    with open(sweep / "sweep.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["trial"] for r in rows] == names
    assert [float(r["val_acc"]) for r in rows] == pytest.approx(vals, abs=1e-3)
    assert rows[1]["overrides"] == "train.lr=0.5 train.weight_decay=0.001"
    for _, out, _ in results:
        printed = json.loads(out)
        assert printed["trial"] == names[expected] and printed["val_acc"] == vals[expected]
        assert Path(printed["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stop_kill_resume_fail_and_rerun(tmp_path):
    """One grid point fails (train.lr=1e38: a non-finite loss), one finishes; the third is stopped by SIGTERM (exit
    143), then its worker is SIGKILLed mid-run; restarts resume it without retraining the finished one or retrying
    the failure; a rerun runs nothing; another grid on the same study is refused."""
    # 4 epochs of 158 steps: the signals below land with two epochs (>1 s) to spare
    write_recipe(tmp_path, tiny_recipe(tmp_path, data={"batch_size": 8}, train={"epochs": 4, "warmup_epochs": 1}))
    args = ("tiny.yaml", "--grid", "train.lr=0.5,1e38,0.25")
    sweep = tmp_path / "runs" / "tiny-sweep"
    trained = {"000-lr0.5", "002-lr0.25"}

    def state():
        done = {n for n in trained if (sweep / n / "summary.json").is_file()}
        going = {n for n in trained - done if metric_epochs(sweep / n)}
        return done, going

    # 1: SIGTERM while the second trained point is past its first epoch: exit 143, the trial checkpointed
    proc = start(tmp_path, *args, tag="run1")
    wait_for(lambda: all(state()), what="one finished trial and one past its first epoch")
    (finished,), (victim,) = state()
    proc.send_signal(signal.SIGTERM)
    rc, _, err = finish(tmp_path, proc, "run1")
    assert rc == 143, err[-2000:]
    assert "rerun" in err.strip().splitlines()[-1]
    assert (sweep / victim / "checkpoints" / "last.pt").is_file() and not (sweep / victim / "summary.json").exists()
    kept = sweep / finished / "summary.json"
    kept_bytes, kept_mtime = kept.read_bytes(), kept.stat().st_mtime_ns
    epochs_after_stop = len(metric_epochs(sweep / victim))

    # 2: a restarted worker resumes it; SIGKILL it once another epoch is written (its train gets SIGTERM)
    proc = start(tmp_path, *args, tag="run2")
    wait_for(lambda: len(metric_epochs(sweep / victim)) > epochs_after_stop, what="the resumed trial's next epoch")
    proc.kill()
    proc.wait(timeout=30)
    wait_for(lambda: not (sweep / f".{victim}.lock").exists(), timeout=60, what="the orphaned train to checkpoint")
    assert not (sweep / victim / "summary.json").exists()

    # 3: restarted again: it finishes the grid
    proc = start(tmp_path, *args, "--json", tag="run3")
    rc, out, err = finish(tmp_path, proc, "run3")
    assert rc == 0, err[-2000:]
    assert kept.read_bytes() == kept_bytes and kept.stat().st_mtime_ns == kept_mtime  # never retrained
    assert len(attempts(sweep / "logs" / f"{finished}.log")) == 1
    victim_log = (sweep / "logs" / f"{victim}.log").read_text()
    assert len(attempts(sweep / "logs" / f"{victim}.log")) == 3 and victim_log.count("note: resuming") == 2
    assert metric_epochs(sweep / victim) == [1, 2, 3, 4]  # continued, not restarted: each epoch once
    failed_log = sweep / "logs" / "001-lr1e38.log"
    assert len(attempts(failed_log)) == 1 and not (sweep / "001-lr1e38" / "summary.json").exists()

    study = load_study(sweep, "tiny")
    assert complete_params(study) == [(("train.lr", "0.25"),), (("train.lr", "0.5"),)]
    fails = [t for t in study.trials if t.state.name == "FAIL" and "error" in t.user_attrs]
    assert len(fails) == 1 and fails[0].params == {"train.lr": "1e38"}
    assert "train.lr" in fails[0].user_attrs["error"] and "non-finite" in fails[0].user_attrs["error"]
    last_error = [ln for ln in failed_log.read_text().splitlines() if ln.startswith("error:")][-1]
    assert fails[0].user_attrs["error"] == last_error[len("error:"):].strip()
    report = json.loads((sweep / "sweep.json").read_text())
    by_name = {r["trial"]: r for r in report["rows"]}
    assert by_name["001-lr1e38"]["state"] == "FAIL" and by_name["001-lr1e38"]["error"] == fails[0].user_attrs["error"]
    summaries = {n: json.loads((sweep / n / "summary.json").read_text()) for n in trained}
    names = ["000-lr0.5", "002-lr0.25"]
    best = max(names, key=lambda n: (summaries[n]["val_acc"], -names.index(n)))
    assert json.loads(out)["trial"] == best == report["best"]["trial"]

    # 4: a rerun starts nothing: no new optuna trial, no train process, exit 0
    n_trials = len(study.trials)
    logs = {p.name: p.read_bytes() for p in (sweep / "logs").iterdir()}
    proc = start(tmp_path, *args, tag="run4")
    rc, out, err = finish(tmp_path, proc, "run4")
    assert rc == 0, err[-2000:]
    assert len(load_study(sweep, "tiny").trials) == n_trials
    assert {p.name: p.read_bytes() for p in (sweep / "logs").iterdir()} == logs
    assert best in out

    # 5: the same study with another grid: exit 2, one line
    proc = start(tmp_path, "tiny.yaml", "--grid", "train.lr=0.5,0.1", tag="run5")
    rc, out, err = finish(tmp_path, proc, "run5")
    assert rc == 2 and len(err.splitlines()) == 1 and "--study" in err and "another grid" in err, err


BAD_VALUES = [
    (["--grid", "train.lr=abc,0.1"], ["--grid train.lr=abc", "train.lr"]),
    (["--grid", "train.lr=-1,0.1", "--grid", "train.epochs=x"], ["--grid train.lr=-1", "--grid train.epochs=x"]),
    (["--set", "train.epochs=10", "--grid", "train.epochs=2,10", "--grid", "train.warmup_epochs=0,3"],
     ["--grid point 001-epochs2-warmup_epochs3", "train.warmup_epochs"]),
]


@pytest.mark.parametrize("args,needles", BAD_VALUES, ids=["abc", "two-keys", "point"])
def test_grid_values_are_checked_before_anything_is_written(recipe_dir, args, needles):
    """Every bad value is named at once (one line each), exit 2, and nothing exists afterwards: no sweep folder,
    no study file."""
    before = snapshot(recipe_dir)
    res = invoke_cli("sweep", "tiny.yaml", *args, cwd=recipe_dir)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    lines = res.stderr.splitlines()
    assert lines and all(ln.startswith("error: --grid ") for ln in lines), res.stderr
    for n in needles:
        assert any(n in ln for ln in lines), (n, res.stderr)
    assert len(lines) == sum(1 for n in needles if n.startswith("--grid")), res.stderr  # one line per bad value
    assert res.stdout == "" and snapshot(recipe_dir) == before


@pytest.mark.slow
def test_exit_status_counts_failed_trials(tmp_path):
    """0 when every point has a result and one completed (--json counts the FAIL); 1 when every trial failed, with
    the same --json object."""
    write_recipe(tmp_path, tiny_recipe(tmp_path, train={"epochs": 1, "warmup_epochs": 0}))
    res = invoke_cli("sweep", "tiny.yaml", "--grid", "train.lr=0.5,1e38", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["counts"]["COMPLETE"] == 1 and out["counts"]["FAIL"] == 1 and out["trial"] == "000-lr0.5"
    res = invoke_cli("sweep", "tiny.yaml", "--grid", "train.lr=1e38,1e37", "--set", "output.name=nan", "--json",
                     cwd=tmp_path)
    assert res.exit_code == 1, res.stderr
    out = json.loads(res.stdout)
    assert out["counts"]["COMPLETE"] == 0 and out["counts"]["FAIL"] == 2 and out["trial"] is None
    assert "every trial failed" in res.stderr.strip().splitlines()[-1]
