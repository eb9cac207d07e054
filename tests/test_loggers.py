"""``log.tensorboard`` / ``log.mlflow``: each epoch's metrics.jsonl record, read back with TensorBoard's own reader
(``EventAccumulator``) and MLflow's own client, equals the file; gate values equal summary.json's; a resume adds
no step twice; a missing package is refused before training (exit 2, one line); a failing logger never loses the
run; ``log_table_mlflow`` is get-or-create."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import invoke_cli, tiny_recipe, write_recipe

SCALARS = ("lr", "train_loss", "train_acc", "val_acc", "seconds")


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``<run>/tensorboard``, as TensorBoard reads it: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def train(tmp_path: Path, *sets: str, **sections) -> tuple[Path, Path]:
    """A tiny digits run with both loggers on (the MLflow store in ``tmp_path/mlruns``): its run directory and
    the store."""
    from vptool.recipe import deep_merge

    store = tmp_path / "mlruns"
    r = tiny_recipe(tmp_path, **deep_merge({"log": {"tensorboard": True, "mlflow": str(store)}}, sections))
    res = invoke_cli("train", str(write_recipe(tmp_path, r, "r.yaml")), *sets)
    assert res.exit_code == 0, res.output
    return tmp_path / "runs" / "r", store


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory):
    """A tiny GateVPT run (2 epochs) logged to TensorBoard and MLflow."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    return train(tmp_path_factory.mktemp("gated"), method="gatevpt")


def test_tensorboard_scalars_equal_metrics_jsonl(gated_run):
    run, _ = gated_run
    got, rows = tb_scalars(run), metrics(run)
    for key in SCALARS:
        assert [s for s, _ in got[key]] == [r["epoch"] for r in rows], key
        assert [v for _, v in got[key]] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-6), key
    summary = json.loads((run / "summary.json").read_text())
    last = rows[-1]["epoch"]
    for key in ("test_top1", "test_top5"):
        assert got[key] == [(last, pytest.approx(summary[key], rel=1e-6))]


def test_mlflow_metrics_equal_metrics_jsonl(gated_run):
    run, store = gated_run
    client, rows = mlflow_client(store), metrics(run)
    run_id = (run / "mlflow_run_id").read_text().strip()
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "r"
    assert client.get_experiment(got.info.experiment_id).name == "vptool"
    for key in SCALARS:
        assert history(client, run_id, key) == [(r["epoch"], r[key]) for r in rows], key
    assert got.data.params["method"] == "gatevpt" and float(got.data.params["train.lr"]) == 0.5
    summary = json.loads((run / "summary.json").read_text())
    assert got.data.metrics["test_top1"] == summary["test_top1"]
    assert got.data.metrics["best_val_acc"] == summary["val_acc"]


def test_gate_scalars_equal_summary_gates(gated_run):
    """summary.json's gates are the best epoch's adapter: the logged gates at that step are the same values."""
    run, store = gated_run
    summary = json.loads((run / "summary.json").read_text())
    gates, best = summary["gates"], summary["best_epoch"]
    tb = tb_scalars(run)
    client = mlflow_client(store)
    run_id = (run / "mlflow_run_id").read_text().strip()
    assert len(gates) >= 1
    for layer, g in enumerate(gates, start=1):
        key = f"gates/layer_{layer:02d}"
        assert dict(tb[key])[best] == pytest.approx(g, rel=1e-6, abs=1e-7)
        assert dict(history(client, run_id, key))[best] == g


@pytest.mark.parametrize("module,key", [("tensorboard", "log.tensorboard"), ("mlflow", "log.mlflow"),
                                        ("sqlalchemy", "log.mlflow")])  # the SQLite store's
def test_missing_package_exits_2_with_one_line(tmp_path, monkeypatch, module, key):
    monkeypatch.setitem(sys.modules, module, None)  # `import tensorboard` now raises ImportError
    log = {"tensorboard": True} if module == "tensorboard" else {"mlflow": str(tmp_path / "mlruns")}
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, log=log))
    for args in (("train", str(path)), ("train", str(path), "--dry-run")):
        res = invoke_cli(*args)
        assert res.exit_code == 2, res.output
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and "vptool[log]" in lines[0], res.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()


def test_refused_file_store_exits_2_naming_log_mlflow(tmp_path, monkeypatch):
    mlflow_env = pytest.importorskip("mlflow.environment_variables")
    if not hasattr(mlflow_env, "MLFLOW_ALLOW_FILE_STORE"):
        pytest.skip("this MLflow allows its file store")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, log={"mlflow": "file:./mlruns"}))
    res = invoke_cli("train", str(path))
    assert res.exit_code == 2 and "log.mlflow: file:./mlruns" in res.stderr, res.output


def test_tracking_uri_forms(tmp_path):
    from vptool.engine.loggers import tracking_uri

    assert tracking_uri("mlruns", tmp_path) == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert (tmp_path / "mlruns").is_dir()
    assert tracking_uri("x/m.db", tmp_path) == f"sqlite:///{tmp_path / 'x' / 'm.db'}"
    assert tracking_uri("sqlite:///m.db", tmp_path) == f"sqlite:///{tmp_path / 'm.db'}"
    assert tracking_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert tracking_uri("file:./store", tmp_path) == (tmp_path / "store").as_uri()
    assert tracking_uri("file:///abs/store", tmp_path) == "file:///abs/store"
    assert tracking_uri("http://host:5000", tmp_path) == "http://host:5000"


def test_resume_adds_no_step_twice(tmp_path):
    """A finished 2-epoch run extended to 3 with --resume: the same MLflow run, steps 1..3 once each; TensorBoard
    reads one value per step; both equal metrics.jsonl."""
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    run, store = train(tmp_path, train={"epochs": 2, "warmup_epochs": 0})
    run_id = (run / "mlflow_run_id").read_text().strip()
    res = invoke_cli("train", str(run), "--resume", "--set", "train.epochs=3")
    assert res.exit_code == 0, res.output
    assert (run / "mlflow_run_id").read_text().strip() == run_id
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    client = mlflow_client(store)
    for key in SCALARS:
        assert history(client, run_id, key) == [(r["epoch"], r[key]) for r in rows], key
    assert len(client.search_runs([client.get_run(run_id).info.experiment_id])) == 1
    assert client.get_run(run_id).data.tags["vptool.changed.train.epochs"] == "3"
    tb = tb_scalars(run)
    for key in SCALARS:
        assert [s for s, _ in tb[key]] == [1, 2, 3], key
        assert [v for _, v in tb[key]] == pytest.approx([r[key] for r in rows], rel=1e-6, abs=1e-6), key


def test_resume_logs_the_epochs_a_killed_attempt_did_not(tmp_path):
    """An attempt killed after writing last.pt but before logging: the next attempt logs the checkpoint's records
    the MLflow run lacks, and none twice."""
    pytest.importorskip("mlflow")
    from vptool.engine.loggers import RUN_ID_FILE, RunLoggers
    from vptool.recipe import resolve

    store = tmp_path / "mlruns"
    recipe = resolve(tiny_recipe(tmp_path, log={"mlflow": str(store)}))
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    rows = [{"epoch": e, "lr": 0.1 * e, "train_loss": 1.0 / e, "train_acc": 10.0 * e, "val_acc": 5.0 * e,
             "seconds": 0.5} for e in (1, 2, 3)]
    first = RunLoggers(recipe, run, run, [], warn=pytest.fail)
    first.log_epoch(rows[0])  # killed after epoch 2's checkpoint, before logging epoch 2
    run_id = (run / RUN_ID_FILE).read_text().strip()
    second = RunLoggers(recipe, run, run, rows[:2], warn=pytest.fail)
    second.log_epoch(rows[2])
    second.close()
    client = mlflow_client(store)
    for key in SCALARS:
        assert history(client, run_id, key) == [(r["epoch"], r[key]) for r in rows], key


def test_a_failing_logger_never_loses_the_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from vptool.engine import loggers

    def broken(self, record, extra):
        raise OSError("disk full")

    monkeypatch.setattr(loggers._MLflow, "epoch", broken)
    store = tmp_path / "mlruns"
    r = tiny_recipe(tmp_path, train={"epochs": 2, "warmup_epochs": 0},
                    log={"tensorboard": True, "mlflow": str(store)})
    res = invoke_cli("train", str(write_recipe(tmp_path, r, "r.yaml")))
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if "log.mlflow" in ln]
    assert len(warnings) == 1 and "disk full" in warnings[0], res.stderr
    run = tmp_path / "runs" / "r"
    assert (run / "summary.json").is_file() and len(metrics(run)) == 2
    assert [s for s, _ in tb_scalars(run)["val_acc"]] == [1, 2]  # TensorBoard goes on


def test_log_table_mlflow_get_or_create(tmp_path):
    pytest.importorskip("mlflow")
    from vptool.engine.loggers import log_table_mlflow

    store = tmp_path / "mlruns"
    cells = [{"name": f"{row}/{col}", "params": {"method": row, "data.task": col},
              "metrics": {"val_acc": 50.0 + i, "test_top1": 40.0 + i}}
             for i, (row, col) in enumerate([("vpt-deep", "cifar"), ("vpt-deep", "dtd"), ("gatevpt", "cifar")])]
    parent = log_table_mlflow(str(store), "tables", "vtab", {"backbone.name": "vit_b16"}, cells[:2])
    again = log_table_mlflow(str(store), "tables", "vtab", {"backbone.name": "vit_b16"}, cells)  # a rerun, one more
    assert again == parent
    client = mlflow_client(store)
    exp = client.get_experiment_by_name("tables").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent]
    assert parents[0].data.tags["vptool.table"] == "vtab" and parents[0].data.params["backbone.name"] == "vit_b16"
    children = {r.data.tags["vptool.cell"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent}
    assert sorted(children) == sorted(c["name"] for c in cells)
    for cell in cells:
        child = children[cell["name"]]
        assert child.data.params == {k: str(v) for k, v in cell["params"].items()}
        for key, value in cell["metrics"].items():
            assert history(client, child.info.run_id, key) == [(0, value)]  # logged once, not again on the rerun
