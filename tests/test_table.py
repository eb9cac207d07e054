"""``vptool table``: the table file, the papers' protocol (selection on val, the VTAB-1k retrain), the reports, the
dry run, and (slow) the shipped digits table end to end: two workers on one SQLite storage, a SIGKILLed command
resumed by rerunning it.

Every check is made against what the trials wrote themselves (``summary.json``, ``recipe.yaml``, ``metrics.jsonl``,
the sweeps' logs) and the Optuna storage, recomputed here from the protocol's definition, never against the
table's own report alone. The fast tests drive the real table and sweep machinery with a stand-in ``train`` (a
script given as ``--trial-command``) whose val and test numbers are planted."""

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
from conftest import RECIPES, invoke_cli

TABLES = RECIPES / "tables"

# --------------------------------------------------------------------------------------------------- stand-in train
FAKE_TRAIN = r'''
import json, pathlib, sys, yaml
args = sys.argv[2:]
recipe, sets = args[0], {}
for i, a in enumerate(args):
    if a == "--set":
        k, _, v = args[i + 1].partition("=")
        sets[k] = yaml.safe_load(v)
run = pathlib.Path(sets["output.dir"]) / sets["output.name"]
run.mkdir(parents=True, exist_ok=True)
with open(pathlib.Path(__file__).with_name("calls.jsonl"), "a") as f:
    f.write(json.dumps({"run": str(run), "sets": sets}) + "\n")
plant = json.loads(pathlib.Path(__file__).with_name("plant.json").read_text())
task = str(sets.get("data.task") or sets.get("data.dataset"))
stage = sets.get("data.vtab_split") or "fgvc"
key = f"{task}|{stage}|{sets['train.lr']}"
if key not in plant:
    print("error: planted failure for " + key, file=sys.stderr)
    sys.exit(1)
val, test = plant[key]
(run / "recipe.yaml").write_text(yaml.safe_dump({"planted": True}))
summary = {"best_epoch": 1, "val_acc": val, "test_top1": test, "test_top5": 100.0, "trainable_params": 1000,
           "total_params": 101000, "backbone_params": 100000, "seconds": 0.0, "run_dir": str(run)}
(run / "summary.json").write_text(json.dumps(summary))
print(json.dumps(summary))
'''


def write_table(tmp: Path, doc: dict, name: str = "t.yaml") -> Path:
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def small_table(rows: list[dict] | None = None) -> dict:
    """Two groups: an FGVC-protocol column (digits: it has a val split) and two VTAB-1k columns."""
    vtab = {"dataset": "vtab-1k", "root": "vtab", "num_classes": 10}
    return {
        "table": "t", "title": "planted", "source": "none",
        "groups": [{"name": "FG", "protocol": "fgvc"}, {"name": "VT", "protocol": "vtab-1k"}],
        "search": {"train.lr": [2.0, 0.5]},
        "columns": [{"name": "dig", "group": "FG", "data": {"dataset": "digits"}},
                    {"name": "a", "group": "VT", "data": {**vtab, "task": "a"}},
                    {"name": "b", "group": "VT", "data": {**vtab, "task": "b"}}],
        "rows": rows or [{"name": "VPT-deep", "recipe": str(RECIPES / "quickstart.yaml"),
                          "paper": {"dig": 50.0, "VT": 60.0, "total_params": 1.0}}],
    }


def fake_trainer(tmp: Path, plant: dict) -> str:
    (tmp / "fake").mkdir(exist_ok=True)
    (tmp / "fake" / "train.py").write_text(FAKE_TRAIN)
    (tmp / "fake" / "plant.json").write_text(json.dumps(plant))
    return f"{sys.executable} {tmp / 'fake' / 'train.py'}"


def calls(tmp: Path) -> list[dict]:
    path = tmp / "fake" / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------- fast
def test_selection_is_on_val_and_vtab_reports_the_retrain(tmp_path):
    """Planted: lr 2.0 has the worse val and the better test everywhere; the table must report lr 0.5's numbers
    (FGVC: its test; VTAB-1k: the test of lr 0.5 retrained on train800val200)."""
    plant = {"digits|fgvc|2.0": [50.0, 99.0], "digits|fgvc|0.5": [90.0, 10.0],
             "a|tune|2.0": [40.0, 98.0], "a|tune|0.5": [80.0, 20.0], "a|final|0.5": [81.0, 33.0],
             "a|final|2.0": [41.0, 97.0],
             "b|tune|2.0": [85.0, 11.0], "b|tune|0.5": [30.0, 96.0], "b|final|2.0": [86.0, 44.0],
             "b|final|0.5": [31.0, 95.0]}
    cmd = fake_trainer(tmp_path, plant)
    table = write_table(tmp_path, small_table())
    r = invoke_cli("table", str(table), "--trial-command", cmd, "--output-dir", str(tmp_path / "out"), "--json",
                   cwd=tmp_path)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["counts"] == {"done": 3, "running": 0, "pending": 0, "failed": 0}
    # what ran: the FGVC cell two points, each VTAB cell two tune points and ONE retrain, of the val-selected lr
    ran = [(Path(c["run"]).parent.name, c["sets"].get("data.vtab_split"), c["sets"]["train.lr"])
           for c in calls(tmp_path)]
    assert sorted(x for x in ran if x[0] == "a-final-sweep") == [("a-final-sweep", "final", 0.5)]
    assert sorted(x for x in ran if x[0] == "b-final-sweep") == [("b-final-sweep", "final", 2.0)]
    assert len(ran) == 2 + 3 + 3
    rows = {(r["column"], r["kind"]): r for r in read_csv(tmp_path / "out" / "t-table" / "table.csv")}
    assert float(rows[("dig", "task")]["top1"]) == 10.0 and float(rows[("dig", "task")]["val_acc"]) == 90.0
    assert float(rows[("a", "task")]["top1"]) == 33.0 and rows[("a", "task")]["selected"] == "train.lr=0.5"
    assert float(rows[("b", "task")]["top1"]) == 44.0 and rows[("b", "task")]["selected"] == "train.lr=2.0"
    means = {r["group"]: r for r in read_csv(tmp_path / "out" / "t-table" / "table.csv") if r["kind"] == "group_mean"}
    assert float(means["VT"]["top1"]) == pytest.approx((33.0 + 44.0) / 2)
    assert float(means["VT"]["delta"]) == pytest.approx((33.0 + 44.0) / 2 - 60.0)
    assert float(means["FG"]["paper"]) == 50.0  # from the per-task paper number (the group has one task)
    total = next(r for r in read_csv(tmp_path / "out" / "t-table" / "table.csv") if r["kind"] == "total_params")
    assert float(total["top1"]) == pytest.approx((100000 + 3 * 1000) / 100000)  # frozen 100k once + 3 x 1k, / 100k


def test_failed_and_unfinished_cells_are_marked_never_averaged(tmp_path):
    """A cell whose every grid point fails is FAILED; its group has no mean; a rerun does not retry it."""
    plant = {"digits|fgvc|2.0": [50.0, 99.0], "digits|fgvc|0.5": [90.0, 10.0],
             "a|tune|2.0": [40.0, 98.0], "a|tune|0.5": [80.0, 20.0], "a|final|0.5": [81.0, 33.0]}
    cmd = fake_trainer(tmp_path, plant)  # column b: every call fails
    table = write_table(tmp_path, small_table())
    args = ["table", str(table), "--trial-command", cmd, "--output-dir", str(tmp_path / "out")]
    r = invoke_cli(*args, cwd=tmp_path)
    assert r.exit_code == 0, r.output
    lines = read_csv(tmp_path / "out" / "t-table" / "table.csv")
    b = next(x for x in lines if x["column"] == "b")
    assert b["state"] == "failed" and b["top1"] == ""
    vt = next(x for x in lines if x["kind"] == "group_mean" and x["group"] == "VT")
    assert vt["top1"] == "" and vt["state"] == "1/2 done"
    assert "FAILED" in (tmp_path / "out" / "t-table" / "table.md").read_text()
    n = len(calls(tmp_path))
    assert invoke_cli(*args, cwd=tmp_path).exit_code == 0
    assert len(calls(tmp_path)) == n  # nothing trained again: every cell has a result


def test_override_order(tmp_path):
    """recipe < table set < group set < column set < row set < cell set < --set < protocol (module docstring)."""
    from vptool.engine.table import Cell
    from vptool.engine.table_file import read_table
    from vptool.recipe import load_recipe

    doc = small_table([{"name": "R", "recipe": str(RECIPES / "quickstart.yaml"), "set": {"train.epochs": 5,
                        "seed": 7}, "cells": {"a": {"set": {"train.epochs": 6}}}}])
    doc["set"] = {"train.epochs": 2, "train.momentum": 0.5, "seed": 1, "train.weight_decay": 0.1}
    doc["groups"][1]["set"] = {"train.epochs": 3, "train.momentum": 0.6}
    doc["columns"][1]["set"] = {"train.epochs": 4, "data.vtab_split": "tune"}
    spec = read_table(write_table(tmp_path, doc))
    row = spec.rows[0]
    a = Cell(spec, row, spec.columns[1], ["train.weight_decay=0.2"], tmp_path / "o")
    rec = load_recipe(row.recipe, a.stage_sets("final"))
    assert (rec.train.epochs, rec.train.momentum, rec.seed, rec.train.weight_decay) == (6, 0.6, 7, 0.2)
    assert rec.data.vtab_split == "final" and rec.data.task == "a" and rec.data.num_classes == 10
    assert rec.output.name == "a-final" and Path(rec.output.dir) == tmp_path / "o" / "r"
    b = Cell(spec, row, spec.columns[2], [], tmp_path / "o")
    rec = load_recipe(row.recipe, b.stage_sets("tune"))
    assert (rec.train.epochs, rec.train.momentum, rec.train.weight_decay) == (5, 0.6, 0.1)
    dig = load_recipe(row.recipe, Cell(spec, row, spec.columns[0], [], tmp_path / "o").stage_sets("tune"))
    assert (dig.train.epochs, dig.train.momentum, dig.data.dataset, dig.data.vtab_split) == (5, 0.5, "digits", "final")


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda d: d.update(colums=[]), "colums"),
    (lambda d: d["columns"].append(dict(d["columns"][0])), "'dig' appears twice"),
    (lambda d: d["columns"][0].update(group="XX"), "columns[0].group"),
    (lambda d: d["groups"][0].update(protocol="vtab"), "groups[0].protocol"),
    (lambda d: d["rows"][0]["paper"].update(cifar=1.0), "rows[0].paper"),
    (lambda d: d["rows"][0].update(recipe="no_such_recipe"), "rows[0].recipe"),
    (lambda d: d.update(table="Bad Name"), "table"),
    (lambda d: d["rows"][0].update(set={"train.lrr": 1}), "train.lrr"),
    (lambda d: d.update(search={"train.lr": []}), "search.train.lr"),
])
def test_bad_table_file_one_line_exit_2(tmp_path, edit, needle):
    doc = small_table()
    edit(doc)
    table = write_table(tmp_path, doc)
    r = invoke_cli("table", str(table), "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # nothing written


def _expected_missing(table: Path) -> set[str]:
    """Independently: every column's data.root and every row recipe's backbone.checkpoint (the table's and the
    row's ``set`` may override it), none of which exists in an empty working directory."""
    doc = yaml.safe_load(table.read_text())
    out = {c["data"]["root"] for c in doc["columns"] if c["data"].get("root")}
    for row in doc["rows"]:
        rec = row["recipe"]
        path = next(p for p in (table.parent / rec, table.parent / f"{rec}.yaml", table.parent.parent / f"{rec}.yaml",
                                table.parent.parent / rec) if p.is_file())
        ckpt = (yaml.safe_load(path.read_text()).get("backbone") or {}).get("checkpoint")
        for layer in (doc.get("set") or {}, row.get("set") or {}):
            ckpt = layer.get("backbone.checkpoint", ckpt)
        if ckpt:
            out.add(ckpt)
    return out


@pytest.mark.parametrize("table", sorted(TABLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_dry_run_names_exactly_the_missing_inputs(tmp_path, table):
    r = invoke_cli("table", str(table), "--dry-run", "--json", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    plan = json.loads(r.stdout)
    assert plan["ready"] is False
    assert {m["path"] for m in plan["missing"]} == _expected_missing(table)
    assert plan["cells"] == len(yaml.safe_load(table.read_text())["rows"]) * len(
        yaml.safe_load(table.read_text())["columns"])
    assert not (tmp_path / "runs").exists()


def test_dry_run_names_a_missing_list_file(tmp_path):
    from vptool.data.digits_vtab import write_digits_vtab

    write_digits_vtab(tmp_path / "data" / "digits-vtab-1k")
    (tmp_path / "data" / "digits-vtab-1k" / "digits_rot90" / "train800val200.txt").unlink()
    r = invoke_cli("table", str(TABLES / "digits_vtab.yaml"), "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(r.stdout)
    assert r.exit_code == 0 and plan["ready"] is False
    assert [m["path"] for m in plan["missing"]] == ["data/digits-vtab-1k/digits_rot90/train800val200.txt"]
    assert len(plan["missing"][0]["cells"]) == 3
    (tmp_path / "data" / "digits-vtab-1k" / "digits_rot90" / "train800val200.txt").write_text("")
    plan = json.loads(invoke_cli("table", str(TABLES / "digits_vtab.yaml"), "--dry-run", "--json",
                                 cwd=tmp_path).stdout)
    assert plan["ready"] is True and plan["trainings"] == 3 * 3 * (2 + 1)


def test_digits_vtab_layout(tmp_path):
    """The stand-in tasks: VTAB-1k's four list files, train800val200 = train800 + val200, disjoint from test,
    labels in range, images as the digits (rotated / subset) read back."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from vptool.data.digits_vtab import TASKS, write_digits_vtab

    root = write_digits_vtab(tmp_path / "v")
    d = load_digits()
    for task, k in TASKS.items():
        lists = {n: [ln.split() for ln in (root / task / f"{n}.txt").read_text().splitlines()]
                 for n in ("train800", "val200", "train800val200", "test")}
        assert lists["train800val200"] == lists["train800"] + lists["val200"]
        names = [set(p for p, _ in lists[n]) for n in ("train800", "val200", "test")]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
        for path, y in lists["train800val200"][:20] + lists["test"][:20]:
            i = int(Path(path).stem)
            img = np.asarray(Image.open(root / task / path))
            want = np.rint(d.images[i] / 16 * 255)
            want = np.rot90(want) if task == "digits_rot90" else want
            assert np.array_equal(img, want)
            assert int(y) == d.target[i] - (5 if task == "digits_5to9" else 0) and 0 <= int(y) < k
    with pytest.raises(FileExistsError):
        write_digits_vtab(root)


# --------------------------------------------------------------------------------------------------- slow: digits
SETS = ["--set", "train.epochs=1", "--set", "output.save_every_steps=2"]


def _start(cwd: Path, tag: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "vptool", "table", str(TABLES / "digits_vtab.yaml"), *SETS,
                             *args], cwd=cwd, env=env, stdout=open(cwd / f"{tag}.out", "w"),
                            stderr=open(cwd / f"{tag}.err", "w"))


def _digits_dir(tmp: Path) -> Path:
    from vptool.data.digits_vtab import write_digits_vtab

    tmp.mkdir(parents=True, exist_ok=True)
    write_digits_vtab(tmp / "data" / "digits-vtab-1k")
    return tmp


def _recompute(table_dir: Path, doc: dict) -> list[list[str]]:
    """table.csv recomputed from the trials' own files: per cell the tune trial with the best val (ties: the lowest
    grid index), the retrain's test top-1; group means; tuned params; the Total params multiple."""
    def f(v):
        return "" if v is None else f"{v:.4f}"

    out = []
    for row in doc["rows"]:
        slug = row["name"].lower()
        cells = []
        for col in doc["columns"]:
            tune = sorted((table_dir / slug / f"{col['name']}-sweep").glob("0*/summary.json"))
            summaries = [json.loads(p.read_text()) for p in tune]
            best = max(range(len(summaries)), key=lambda i: (summaries[i]["val_acc"], -i))
            lr = yaml.safe_load((tune[best].parent / "recipe.yaml").read_text())["train"]["lr"]
            final = list((table_dir / slug / f"{col['name']}-final-sweep").glob("0*/summary.json"))
            assert len(final) == 1
            final_recipe = yaml.safe_load((final[0].parent / "recipe.yaml").read_text())
            assert final_recipe["train"]["lr"] == lr and final_recipe["data"]["vtab_split"] == "final"
            s = json.loads(final[0].read_text())
            cells.append((col, s, summaries[best]["val_acc"], lr))
            out.append([row["name"], col["name"], col["group"], "vtab-1k", "task", "done", f(s["test_top1"]), "", "",
                        f(summaries[best]["val_acc"]), f"train.lr={lr}", str(s["trainable_params"]),
                        final[0].parent.relative_to(table_dir).as_posix()])
        for g in doc["groups"]:
            vals = [s["test_top1"] for col, s, _, _ in cells if col["group"] == g["name"]]
            out.append([row["name"], "", g["name"], "vtab-1k", "group_mean", "done", f(sum(vals) / len(vals)), "", "",
                        "", "", "", ""])
        trainable = [s["trainable_params"] for _, s, _, _ in cells]
        s0 = cells[0][1]
        out.append([row["name"], "", "", "", "tuned_params_m", "done", f(sum(trainable) / len(trainable) / 1e6), "",
                    "", "", "", "", ""])
        frozen = s0["total_params"] - s0["trainable_params"]
        out.append([row["name"], "", "", "", "total_params", "done", f((frozen + sum(trainable)) /
                                                                      s0["backbone_params"]), "", "", "", "", "", ""])
    return out


def _exactly_once(table_dir: Path, doc: dict, storage: str) -> None:
    """Every grid point of every cell: one run directory, one COMPLETE trial in the storage, metrics.jsonl with
    each epoch once."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    names = set(optuna.get_all_study_names(storage))
    for row in doc["rows"]:
        slug = row["name"].lower()
        for col in doc["columns"]:
            for stage, points in (("", 2), ("/final", 1)):
                study = optuna.load_study(study_name=f"digits_vtab/{slug}/{col['name']}{stage}", storage=storage)
                complete = [t for t in study.trials if t.state.name == "COMPLETE"]
                assert len(complete) == points and len({tuple(t.params.items()) for t in complete}) == points
                names.discard(study.study_name)
                sweep = table_dir / slug / f"{col['name']}{'-final' if stage else ''}-sweep"
                runs = [p for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit()]
                assert len(runs) == points
                for run in runs:
                    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
                    assert epochs == [1], (run, epochs)
    assert not names  # no other study


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in (run / "metrics.jsonl").read_text()
            .splitlines()]


@pytest.mark.slow
def test_two_workers_one_sigkilled_and_rerun_train_each_point_once(tmp_path):
    """The shipped digits table, two `vptool table` commands started together on one SQLite storage; one is
    SIGKILLed while trials are mid-epoch and started again. Both finish; every grid point trained once (storage rows,
    run directories, metrics.jsonl epochs); both workers trained; table.csv equals what the trials' own files give;
    and every trial the kill interrupted equals the same trial trained without interruption (bitwise adapter,
    metrics), so table.csv is the uninterrupted table's."""
    tmp = _digits_dir(tmp_path / "w")
    table_dir = tmp / "runs" / "digits_vtab-table"
    storage = f"sqlite:///{tmp / 'shared.db'}"
    procs = [_start(tmp, f"w{i}", "--storage", storage, "--json") for i in range(2)]

    def unfinished() -> list[Path]:
        return [p.parent.parent for p in table_dir.glob("*/*-sweep/0*/checkpoints/last.pt")
                if not (p.parent.parent / "summary.json").exists()]

    end = time.monotonic() + 600
    while not (len(list(table_dir.glob("*/*-sweep/0*/summary.json"))) >= 6 and unfinished()):
        assert procs[0].poll() is None, (tmp / "w0.err").read_text()[-2000:]
        assert time.monotonic() < end, "no mid-epoch checkpoint seen"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGKILL)  # its train child gets SIGTERM (PR_SET_PDEATHSIG) and checkpoints
    procs[0].wait()
    time.sleep(3)
    killed = [r for r in unfinished()]
    assert killed, "the kill left no trial to resume"
    procs[0] = _start(tmp, "w0b", "--storage", storage, "--json")
    rcs = [p.wait(timeout=900) for p in procs]
    assert rcs == [0, 0], [(tmp / f"{t}.err").read_text()[-2000:] for t in ("w0b", "w1")]
    doc = yaml.safe_load((TABLES / "digits_vtab.yaml").read_text())
    assert not (table_dir / "table.db").exists()  # the studies are in the --storage file
    _exactly_once(table_dir, doc, storage)
    errs = [(tmp / f"{t}.err").read_text() for t in ("w0", "w0b", "w1")]
    trained = [e.count(": training (") + e.count(": resuming (") for e in errs]
    assert trained[1] + trained[2] >= 1 and trained[0] >= 1, trained  # both workers trained
    assert any(": resuming (" in e for e in errs)
    with open(table_dir / "table.csv", newline="") as f:
        assert list(csv.reader(f))[1:] == _recompute(table_dir, doc)
    for tag in ("w0b", "w1"):
        assert json.loads((tmp / f"{tag}.out").read_text())["counts"]["done"] == 9
    for run in killed:  # the uninterrupted training of each interrupted trial
        ref = tmp / "ref" / run.name
        r = subprocess.run([sys.executable, "-m", "vptool", "train", str(run / "recipe.yaml"), "--set",
                            f"output.dir={ref.parent}", "--set", f"output.name={ref.name}"], cwd=tmp,
                           capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        assert (run / "adapter.safetensors").read_bytes() == (ref / "adapter.safetensors").read_bytes(), run
        assert _metrics(run) == _metrics(ref)


def test_table_logs_one_mlflow_parent_and_a_child_per_cell(tmp_path):
    """--set log.mlflow=DIR: the table is one MLflow parent run, each cell a child whose test_top1 is table.csv's;
    a rerun adds no run (read back with mlflow's own client)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from vptool.engine.loggers import tracking_uri

    plant = {"digits|fgvc|2.0": [50.0, 99.0], "digits|fgvc|0.5": [90.0, 10.0],
             "a|tune|2.0": [40.0, 98.0], "a|tune|0.5": [80.0, 20.0], "a|final|0.5": [81.0, 33.0],
             "b|tune|2.0": [85.0, 11.0], "b|tune|0.5": [30.0, 96.0], "b|final|2.0": [86.0, 44.0]}
    cmd = fake_trainer(tmp_path, plant)
    table = write_table(tmp_path, small_table())
    args = ["table", str(table), "--trial-command", cmd, "--output-dir", str(tmp_path / "out"),
            "--set", f"log.mlflow={tmp_path / 'ml'}"]
    for _ in range(2):
        r = invoke_cli(*args, cwd=tmp_path)
        assert r.exit_code == 0, r.output
    client = MlflowClient(tracking_uri(str(tmp_path / "ml")))
    exp = client.get_experiment_by_name("t")
    runs = client.search_runs([exp.experiment_id])
    parents = [x for x in runs if x.data.tags.get("vptool.table") == "t" and "mlflow.parentRunId" not in x.data.tags]
    assert len(parents) == 1
    children = {x.data.tags["vptool.cell"]: x for x in runs if x.data.tags.get("mlflow.parentRunId") ==
                parents[0].info.run_id}
    want = {f"vpt-deep/{r['column']}": float(r["top1"]) for r in read_csv(tmp_path / "out" / "t-table" / "table.csv")
            if r["kind"] == "task"}
    assert {k: v.data.metrics["test_top1"] for k, v in children.items()} == want
    assert len(runs) == 1 + 3


def test_changed_table_is_refused_in_one_line(tmp_path):
    """The same storage, another grid for a cell that ran: exit 2, one line naming the cell and the way out."""
    plant = {"digits|fgvc|2.0": [50.0, 99.0], "digits|fgvc|0.5": [90.0, 10.0], "digits|fgvc|0.1": [1.0, 1.0]}
    cmd = fake_trainer(tmp_path, plant)
    doc = small_table()
    doc["columns"] = doc["columns"][:1]
    doc["groups"] = doc["groups"][:1]
    doc["rows"][0]["paper"] = {}
    args = ["table", str(write_table(tmp_path, doc)), "--trial-command", cmd, "--output-dir", str(tmp_path / "out")]
    assert invoke_cli(*args, cwd=tmp_path).exit_code == 0
    before = (tmp_path / "out" / "t-table" / "table.csv").read_bytes()
    doc["search"] = {"train.lr": [2.0, 0.5, 0.1]}
    write_table(tmp_path, doc)
    r = invoke_cli(*args, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error")]
    assert r.exit_code == 2 and len(lines) == 1 and "cell vpt-deep/dig" in lines[0] and "--output-dir" in lines[0]
    assert (tmp_path / "out" / "t-table" / "table.csv").read_bytes() == before


def test_table_by_shipped_name_and_unknown_name(tmp_path):
    r = invoke_cli("table", "digits_vtab", "--dry-run", "--json", cwd=tmp_path)
    assert r.exit_code == 0 and json.loads(r.stdout)["table"] == "digits_vtab"
    r = invoke_cli("table", "digits_vtb", "--dry-run", cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "digits_vtb" in lines[0] and "digits_vtab" in lines[0]
