"""Where researchers look at a run: each epoch's ``metrics.jsonl`` record, written beside it to TensorBoard event
files and to an MLflow tracking store when the recipe's ``log`` section asks (``log.tensorboard: true``,
``log.mlflow: URI``); and ``log_table_mlflow``, one MLflow parent run per table with a child run per cell.

What is logged (names as in ``metrics.jsonl`` and ``summary.json``; step = the 1-based epoch):

- each epoch: every number of the record (``lr``, ``train_loss``, ``train_acc``, ``val_acc`` in percent,
  ``seconds``) and, for gated prompts, ``gates/layer_LL`` (GateVPT eq. 10: the gate of block l = 1..L-1 as
  evaluation uses it, at the epoch's end);
- at the end: ``test_top1``, ``test_top5``, ``best_val_acc`` (percent) and ``best_epoch``, at the step of the last
  epoch trained;
- MLflow only: the resolved recipe as params (``vptool.recipe.flat_keys``: ``train.lr``, ``prompt.length``, ...).

Resuming (``vptool train --resume``): the MLflow run id is kept in ``<run>/mlflow_run_id`` and the same run goes
on; epochs it already holds are not logged again (records are logged only after ``checkpoints/last.pt`` holds
them, and the resumed attempt first logs the checkpoint's records the store lacks). TensorBoard: a resumed attempt
writes a new event file that starts with a purge marker at epoch 1 and the checkpoint's records again; TensorBoard
(and ``EventAccumulator``) drop the older events from that step on, so readers see one value per step, the last.

tensorboard and mlflow are optional (the ``log`` extra) and imported only here, inside functions. Only rank 0
logs (``vptool.engine.loop``). A logger that fails (store unreachable, disk full) is turned off with one line to
``warn``; the training run goes on.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from vptool.paths import write_text_atomically
from vptool.recipe import Recipe, flat_keys

TB_DIR = "tensorboard"  #: the event files' folder inside the run directory
RUN_ID_FILE = "mlflow_run_id"  #: the MLflow run id of the run directory (one line)
DEFAULT_EXPERIMENT = "vptool"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: C:\... is a Windows path
_PARAM_CHARS = 500  # the shortest value limit across MLflow versions


def tracking_uri(value: str, cwd: str | Path | None = None) -> str:
    """``log.mlflow`` as an MLflow tracking URI; relative paths are resolved against ``cwd`` (default: the working
    directory).

    - a folder (``mlruns``, ``/data/mlflow``): a SQLite store ``<folder>/mlflow.db`` (the folder is made);
    - ``*.db`` or ``sqlite:///path.db``: that SQLite store (MLflow 3's recommended local store);
    - ``file:./mlruns``: MLflow's file store (MLflow 3.7+ refuses it unless ``MLFLOW_ALLOW_FILE_STORE=true``);
    - any other URI (``http://host:5000``, ``databricks``, ``postgresql://...``): as given.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    if value.startswith("sqlite:///"):
        return "sqlite:///" + str(base / value[len("sqlite:///"):])  # an absolute path stays absolute
    if value.startswith("file:"):
        rest = value[len("file:"):]
        rest = rest[2:] if rest.startswith("//") else rest  # file:///abs -> /abs
        rest = rest[len("localhost"):] if rest.startswith("localhost/") else rest
        return (base / rest).resolve().as_uri()
    if _SCHEME.match(value):
        return value
    path = (base / value).resolve()
    if path.suffix != ".db":
        path.mkdir(parents=True, exist_ok=True)
        path = path / "mlflow.db"
    return "sqlite:///" + str(path)


def _artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store, ``artifacts/`` (MLflow's default would be ``./mlruns`` of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    """The id of experiment ``name``, created when missing (two workers at once: the loser reads the winner's)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(uri))
    except Exception:
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _params(params: dict) -> dict[str, str]:
    return {k: str(v)[:_PARAM_CHARS] for k, v in params.items()}


def _log_params(client, run_id: str, params: dict[str, str], have: dict[str, str]) -> None:
    """``params`` the run lacks, 100 per batch (MLflow's limit); a value that differs from the logged one (MLflow
    refuses to change a param; e.g. ``train.epochs`` raised on resume) becomes the tag ``vptool.changed.<key>``."""
    from mlflow.entities import Param

    new = [Param(k, v) for k, v in params.items() if k not in have]
    for i in range(0, len(new), 100):
        client.log_batch(run_id, params=new[i:i + 100])
    for k, v in params.items():
        if k in have and have[k] != v:
            client.set_tag(run_id, f"vptool.changed.{k}", v)


def _log_metrics(client, run_id: str, values: dict[str, float], step: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a ``metrics.jsonl`` record other than ``epoch`` (the step), as floats."""
    return {k: float(v) for k, v in record.items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def gate_scalars(model) -> dict[str, float]:
    """``{"gates/layer_01": g_1, ...}`` for a gated model (the values evaluation uses, ``vptool.analysis.gates``),
    else ``{}``."""
    from vptool.analysis.gates import gate_report

    report = gate_report(model)
    if report is None:
        return {}
    return {f"gates/layer_{i:02d}": g for i, g in enumerate(report["gates"], start=1)}


class _TensorBoard:
    def __init__(self, folder: Path, records: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step 1 on a resumed attempt: readers drop what earlier attempts wrote; its records are rewritten
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=1 if records else None)
        for r in records:
            self.epoch(r, {})

    def epoch(self, record: dict, extra: dict[str, float]) -> None:
        for k, v in {**scalars(record), **extra}.items():
            self.writer.add_scalar(k, v, global_step=record["epoch"])
        self.writer.flush()

    def summary(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self, status: str) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, recipe: Recipe, run: Path, final: Path, records: list[dict]):
        self.uri = tracking_uri(recipe.log.mlflow)
        self.client = client = _client(self.uri)
        id_file = run / RUN_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        got = None
        if run_id:
            try:
                got = client.get_run(run_id)
            except Exception:  # the store no longer holds it (deleted, another store): a new run
                got = None
        if got is not None:
            client.update_run(run_id, status="RUNNING")
            have = dict(got.data.params)
        else:
            exp = _experiment_id(client, recipe.log.mlflow_experiment or DEFAULT_EXPERIMENT, self.uri)
            run_id = client.create_run(exp, run_name=final.name, tags={"vptool.method": recipe.method,
                                                                       "vptool.run_dir": str(final)}).info.run_id
            write_text_atomically(id_file, run_id + "\n")
            have = {}
        self.run_id = run_id
        _log_params(client, run_id, _params(flat_keys(recipe.to_dict())), have)
        self.logged = {m.step for m in client.get_metric_history(run_id, "train_loss")} if got else set()
        for r in records:  # epochs in the checkpoint that a killed attempt did not log
            self.epoch(r, {})

    def epoch(self, record: dict, extra: dict[str, float]) -> None:
        if record["epoch"] in self.logged:
            return
        _log_metrics(self.client, self.run_id, {**scalars(record), **extra}, record["epoch"])
        self.logged.add(record["epoch"])

    def summary(self, values: dict[str, float], step: int) -> None:
        _log_metrics(self.client, self.run_id, values, step)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=status)


class RunLoggers:
    """The run's TensorBoard and MLflow loggers (none, one or both), as the recipe's ``log`` section asks.

    Args:
        recipe: the resolved recipe (``log``, and the params MLflow records).
        run: the run directory being written (event files in ``<run>/tensorboard/``, ``<run>/mlflow_run_id``).
        final: the name ``run`` will have (``--overwrite`` writes beside it): MLflow's run name and ``vptool.run_dir``.
        records: the epochs a resumed run already has (from ``checkpoints/last.pt``); ``[]`` for a fresh run.
        warn: where a failing logger's one line goes (the CLI prints it on stderr).

    A logger that raises, when opened or later, is turned off with one line to ``warn``; nothing here stops the
    training run.
    """

    def __init__(self, recipe: Recipe, run: Path, final: Path, records: list[dict], warn: Callable[[str], None]):
        self.warn = warn
        self.active: dict[str, object] = {}
        opened = []
        if recipe.log.tensorboard:
            opened.append(("log.tensorboard", lambda: _TensorBoard(run / TB_DIR, records)))
        if recipe.log.mlflow is not None:
            opened.append(("log.mlflow", lambda: _MLflow(recipe, run, final, records)))
        for key, make in opened:
            self._call(key, make)

    @classmethod
    def off(cls) -> RunLoggers:
        """Loggers that log nothing (ranks other than 0, or no ``log`` section)."""
        obj = cls.__new__(cls)
        obj.warn, obj.active = (lambda text: None), {}
        return obj

    def _call(self, key: str, fn) -> None:
        try:
            out = fn()
        except Exception as exc:  # a logger never loses the training run
            self.active.pop(key, None)
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            self.warn(f"{key}: logging failed ({type(exc).__name__}: {first}); it is off for the rest "
                      "of this run, the training goes on")
            return
        if key not in self.active and out is not None:
            self.active[key] = out

    def log_epoch(self, record: dict, model=None) -> None:
        """One ``metrics.jsonl`` record (step = ``record["epoch"]``), with the gate values of ``model`` when
        gated."""
        if not self.active:
            return
        extra = gate_scalars(model) if model is not None else {}
        for key, logger in list(self.active.items()):
            self._call(key, lambda lg=logger: lg.epoch(record, extra))

    def log_summary(self, summary: dict, step: int) -> None:
        """The run's result (``summary.json``): ``test_top1``, ``test_top5``, ``best_val_acc``, ``best_epoch``,
        at ``step`` (the last epoch trained)."""
        values = {"test_top1": summary["test_top1"], "test_top5": summary["test_top5"],
                  "best_val_acc": summary["val_acc"], "best_epoch": summary["best_epoch"]}
        for key, logger in list(self.active.items()):
            self._call(key, lambda lg=logger: lg.summary(values, step))

    def close(self, status: str = "FINISHED") -> None:
        """Flush and close; MLflow's run ends with ``status`` (``FINISHED``, ``KILLED`` when stopped, ``FAILED``)."""
        for key, logger in list(self.active.items()):
            self._call(key, lambda lg=logger: lg.close(status))
        self.active = {}


def _search_all(client, exp: str, query: str) -> list:
    out, token = [], None
    while True:
        page = client.search_runs([exp], query, max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _first_parent(runs) -> str | None:
    parents = sorted((r for r in runs if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: (r.info.start_time, r.info.run_id))
    return parents[0].info.run_id if parents else None


def log_table_mlflow(uri: str, experiment: str, table_name: str, params: dict, cells: list[dict]) -> str:
    """Log a table of runs to MLflow: one parent run tagged ``vptool.table=<table_name>``, a child run per cell.

    Get-or-create throughout, so a rerun or a second worker adds nothing twice: the parent is found by its tag,
    each child by its parent and ``vptool.cell`` tag, and a child's params and metrics are logged only when it is
    created.

    Args:
        uri: ``log.mlflow``'s forms (``tracking_uri``): a folder, ``*.db``, ``sqlite:///``, ``file:`` or a server.
        experiment: the experiment name (created when missing).
        table_name: the table's name (the parent's run name and tag).
        params: the parent's params (e.g. the table's shared recipe keys).
        cells: ``{"name": "row/col", "params": {...}, "metrics": {"val_acc": ..., "test_top1": ...}}`` each;
            metrics in percent as in ``summary.json``.

    Returns:
        The parent run's id.

    Raises:
        UserError: mlflow is not installed, or a cell has no ``name``.
        MlflowException: the store refuses (unreachable server, refused file store).
    """
    from vptool.errors import UserError

    try:
        import mlflow.tracking  # noqa: F401
    except ImportError:
        raise UserError('log_table_mlflow needs the mlflow package: pip install "vptool[log]"') from None
    for i, cell in enumerate(cells):
        if not isinstance(cell, dict) or not isinstance(cell.get("name"), str):
            raise UserError(f"cells[{i}]: expected a mapping with a string name, got {str(cell)[:80]}")
    full = tracking_uri(uri)
    client = _client(full)
    exp = _experiment_id(client, experiment, full)
    query = "tags.`vptool.table` = '{}'".format(table_name.replace("'", "\\'"))
    found = _search_all(client, exp, query)
    parent = _first_parent(found)
    if parent is None:
        parent = client.create_run(exp, run_name=table_name, tags={"vptool.table": table_name}).info.run_id
        _log_params(client, parent, _params(params), {})
        client.set_terminated(parent)
        found = _search_all(client, exp, query)
        first = _first_parent(found)  # two workers created one at once: the earlier one wins, the other goes
        if first != parent:
            client.delete_run(parent)
            parent = first
    children = {r.data.tags.get("vptool.cell"): r.info.run_id for r in found
                if r.data.tags.get("mlflow.parentRunId") == parent}
    for cell in cells:
        if cell["name"] not in children:
            children[cell["name"]] = _table_cell(client, exp, parent, table_name, cell)
    return parent


def _table_cell(client, exp: str, parent: str, table_name: str, cell: dict) -> str:
    """A new child run of ``parent`` for ``cell``, its params and numeric metrics (step 0) logged; its id."""
    child = client.create_run(exp, run_name=cell["name"], tags={
        "mlflow.parentRunId": parent, "vptool.table": table_name, "vptool.cell": cell["name"]}).info.run_id
    _log_params(client, child, _params(cell.get("params") or {}), {})
    values = {k: v for k, v in (cell.get("metrics") or {}).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if values:
        _log_metrics(client, child, values, 0)
    client.set_terminated(child)
    return child
