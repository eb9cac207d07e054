"""``vptool table TABLE.yaml``: a paper's benchmark table (rows: methods, columns: tasks) run cell by cell with the
papers' protocol, on the sweep machinery, and reported beside the paper's numbers.

Protocol per column group (``vptool.engine.table_file``):

- ``fgvc`` (VPT §4.1, the official ``tune_fgvc.py``): the cell's grid is searched with train / val, the point with
  the best validation accuracy is selected, and its test top-1 is the cell's number. Test never selects.
- ``vtab-1k`` (VPT §4.1, SPT §4.1): the grid is searched on train800 / val200 (``data.vtab_split: tune``); the
  selected point is then trained again on train800val200 (``data.vtab_split: final``) and that run's test top-1
  is the cell's number. (The retrained run's ``val_acc`` is on val200, which it trained on: it selects nothing.)

Each stage is one ``vptool sweep`` (``vptool.engine.sweep``) in a study of one storage shared by every worker
(default ``sqlite:///<TABLE_DIR>/table.db``; ``--storage`` for many machines): ``<table>/<row>/<column>`` for the
search and ``<table>/<row>/<column>/final`` for the retrain. So every grid point of every cell trains exactly once
whatever the number of workers, and a killed worker's cell is resumed by rerunning the same command. A worker walks
the cells in order and never waits on a cell other workers are training: it moves on, and comes back.

Layout: ``<TABLE_DIR> = <output-dir>/<table>-table/``; cell (row, column) searches in
``<TABLE_DIR>/<row>/<column>-sweep/`` and retrains in ``<TABLE_DIR>/<row>/<column>-final-sweep/`` (one run directory
per grid point, as ``vptool sweep`` lays out). Reports (``vptool.engine.table_report``): ``table.md``, ``table.csv``,
``table.tex``, ``table.json`` in ``<TABLE_DIR>``, rewritten atomically after every cell and at the end.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path

from vptool.engine.table_file import Column, Row, TableSpec, read_table, yaml_scalar
from vptool.engine.table_report import TableReport, cell_result
from vptool.errors import RunError, UserError

#: seconds a worker sleeps when every unfinished cell is being trained by other workers
POLL_SECONDS = 1.0
TABLE_SUFFIX = "-table"


class Cell:
    """One (row, column) of the table: its ``--set`` items, its grid, and its one or two sweeps."""

    def __init__(self, table: TableSpec, row: Row, column: Column, sets: list[str], table_dir: Path):
        self.row, self.column = row, column
        self.group = table.group(column.group)
        self.protocol = self.group.protocol
        self.name = f"{row.slug}/{column.name}"
        self.study = f"{table.name}/{self.name}"
        self.sets = [*table.cell_sets(row, column), *sets]
        self.search = table.cell_search(row, column)
        self.out = [f"output.dir={yaml_scalar(str(table_dir / row.slug))}"]
        self.recipe = None  # the search stage's recipe (``check_cell``)
        self.tune = self.final = None
        self.tune_report = self.final_report = None
        self.done = False

    def stage_sets(self, stage: str) -> list[str]:
        """The cell's ``--set`` items for a stage (``tune`` / ``final``): the protocol's and the output's last."""
        split = [] if self.protocol == "fgvc" else [f"data.vtab_split={stage}"]
        name = self.column.name if stage == "tune" else f"{self.column.name}-final"
        return [*self.sets, *split, *self.out, f"output.name={name}"]

    def grid_items(self, recipe) -> list[str]:
        """``--grid`` items of the search (one point, ``train.lr`` as the recipe has it, when there is none)."""
        if not self.search:
            return [f"train.lr={yaml_scalar(recipe.train.lr)}"]
        return [f"{k}={','.join(yaml_scalar(v) for v in vs)}" for k, vs in self.search.items()]


class Table:
    """One worker of a table: ``run()`` trains cells until every one has a result; ``report()`` writes the files.

    Build it with ``plan_table``.
    """

    def __init__(self, spec: TableSpec, cells: list[Cell], table_dir: Path, storage: str, shown: str,
                 trial_command: str | None):
        self.spec, self.cells, self.table_dir = spec, cells, table_dir
        self.storage, self.shown, self.trial_command = storage, shown, trial_command
        self.say = _say_stderr
        self.poll = POLL_SECONDS
        self.reporter = TableReport(spec, table_dir)

    @property
    def trained(self) -> int:
        """``vptool train`` processes this worker started."""
        return sum(s.trained for c in self.cells for s in (c.tune, c.final) if s is not None)

    def run(self, say=None) -> dict:
        """Train every cell's grid (and retrain, for VTAB-1k) until each cell has a result; write the reports.

        Returns:
            The report (``TableReport.write``).

        Raises:
            SweepStopped: SIGINT/SIGTERM during a trial (exit 130/143): rerun the same command to continue.
            RunError: no cell has a number (every cell failed).
            UserError: a cell's storage or study refuses (e.g. it holds another grid: the table file changed).
        """
        if say is not None:
            self.say = say
        self.table_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"table {self.spec.name}: {len(self.cells)} cells ({len(self.spec.rows)} rows x "
                 f"{len(self.spec.columns)} columns); {self.table_dir}; storage {self.shown}")
        while True:
            before = self.trained
            for cell in self.cells:
                if not cell.done:
                    self._advance(cell)
                    if cell.done:
                        self.report()
            if all(c.done for c in self.cells):
                break
            if self.trained == before:
                time.sleep(self.poll)  # every open cell is being trained by another worker
        report = self.report()
        self.log_mlflow(report)
        if not any(r["state"] == "done" for r in report["cells"]):
            raise RunError(f"table {self.spec.name}: every cell failed; see the sweeps' logs/ under {self.table_dir}")
        return report

    def _sweep(self, cell: Cell, stage: str, grid_items: list[str]):
        from vptool.engine.sweep import plan_sweep

        sweep = plan_sweep(cell.row.recipe, grid_items, cell.stage_sets(stage), storage=self.storage,
                           study=cell.study if stage == "tune" else f"{cell.study}/final",
                           trial_command=self.trial_command)
        sweep.wait, sweep.plot = False, False
        return sweep

    def _advance(self, cell: Cell) -> None:
        """Run what this worker can of ``cell`` now (its search, then for VTAB-1k its retrain), without waiting."""
        from vptool.recipe import load_recipe

        prefix = f"[{cell.name}] "

        def say(line: str) -> None:
            if not line.startswith("sweep: waiting"):
                self.say(prefix + line)

        if cell.tune is None:
            recipe = cell.recipe or load_recipe(cell.row.recipe, cell.stage_sets("tune"))  # plan_table loaded it
            cell.tune = self._sweep(cell, "tune", cell.grid_items(recipe))
        cell.tune_report = self._sweep_once(cell, cell.tune, say)
        if not _final(cell.tune_report):
            return
        best = cell.tune_report["best"]
        if best is None or cell.protocol == "fgvc":
            cell.done = True
            return
        if cell.final is None:
            params = cell.tune.grid.params(best["index"])
            cell.final = self._sweep(cell, "final", [f"{k}={v}" for k, v in params.items()])
        cell.final_report = self._sweep_once(cell, cell.final, say)
        cell.done = _final(cell.final_report)

    def _sweep_once(self, cell: Cell, sweep, say) -> dict:
        """``sweep.run``; a study that holds another grid or other ``--set`` items (the table file or ``--set``
        changed since the table started) is named for the table, not the sweep."""
        try:
            return sweep.run(say=say)
        except UserError as exc:
            if "holds a sweep" not in str(exc):
                raise
            raise UserError(f"cell {cell.name}: {self.shown} holds this cell with another grid or other overrides "
                            "(the table file or --set changed since it ran); rerun with the same ones, or start a new "
                            "table with another --output-dir (and --storage)") from None

    def log_mlflow(self, report: dict) -> None:
        """With ``log.mlflow`` in the cells' recipe (e.g. ``--set log.mlflow=mlruns``): one MLflow parent run for the
        table and a child per cell with a number (``vptool.engine.loggers.log_table_mlflow``: get-or-create, so a
        rerun or a second worker logs nothing twice). A logging failure is one warning line; the table stands."""
        recipe = self.cells[0].recipe if self.cells else None
        uri = getattr(getattr(recipe, "log", None), "mlflow", None)
        if not uri:
            return
        from vptool.engine.loggers import log_table_mlflow

        cells = [{"name": c["row_slug"] + "/" + c["column"],
                  "params": {"row": c["row"], "column": c["column"], "group": c["group"], "protocol": c["protocol"],
                             "selected": " ".join(c["selected"] or []), "run_dir": str(c["run_dir"])},
                  "metrics": {k: c[k] for k in ("val_acc", "test_top1", "trainable_params")
                              if isinstance(c[k], (int, float))}}
                 for c in report["cells"] if c["state"] == "done"]
        try:
            log_table_mlflow(uri, recipe.log.mlflow_experiment or self.spec.name, self.spec.name,
                             {"title": self.spec.title, "source": self.spec.source, "storage": self.shown}, cells)
        except Exception as exc:  # the table's files are written; MLflow is a view of them
            self.say(f"warning: log.mlflow: the table was not logged ({type(exc).__name__}: {str(exc)[:160]})")

    def report(self) -> dict:
        """Write ``table.md``, ``table.csv``, ``table.tex`` and ``table.json`` from what the cells have now."""
        return self.reporter.write([cell_result(c) for c in self.cells], storage=self.shown)


@contextlib.contextmanager
def more_workers(n: int, argv: list[str], table: Table):
    """Run ``n`` more workers of the same table (``python -m vptool table ARGV --workers 1``, on the same storage)
    beside this one; on leaving, wait for them (they stop once every cell has a result). Each gets SIGTERM if this
    process dies (``PR_SET_PDEATHSIG``): its running trial writes its checkpoint, and a rerun resumes it."""
    from vptool.engine.sweep_procs import child_preexec

    procs = []
    table.table_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        procs.append(subprocess.Popen([sys.executable, "-m", "vptool", "table", *argv, "--workers", "1"],
                                      stdout=subprocess.DEVNULL, preexec_fn=child_preexec()))
        table.say(f"table {table.spec.name}: started worker {i + 2} (pid {procs[-1].pid})")
    try:
        yield procs
    except BaseException:
        for p in procs:  # this worker failed or was stopped: stop the others too (their trials checkpoint)
            p.terminate()
        raise
    finally:
        for p in procs:
            rc = p.wait()
            if rc != 0:
                table.say(f"table {table.spec.name}: worker pid {p.pid} exited {rc}")


def _final(report: dict) -> bool:
    counts = report["counts"]
    return counts["RUNNING"] == 0 and counts["PENDING"] == 0


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------- planning
def table_dir_of(spec: TableSpec, output_dir: str | Path) -> Path:
    """``<output_dir>/<table>-table``: the folder of the table's sweeps, storage and reports."""
    return Path(output_dir) / f"{spec.name}{TABLE_SUFFIX}"


def plan_table(path: str | Path, sets: list[str] | None = None, storage: str | None = None,
               output_dir: str | Path = "runs", trial_command: str | None = None) -> Table:
    """Read a table file and check every cell's recipe, without writing anything.

    Args:
        path: the table file.
        sets: ``--set`` items applied to every cell (after the table file's own overrides).
        storage: the SQLAlchemy URL every worker shares (default ``sqlite:///<TABLE_DIR>/table.db``).
        output_dir: the folder that holds ``<table>-table/``.
        trial_command: what runs ``train ...`` (``vptool sweep --trial-command``).

    Returns:
        The ``Table``; ``run()`` starts it.

    Raises:
        UserError / RecipeError: a bad table file, or a cell whose recipe does not load (names the cell).
    """
    from vptool.engine.sweep import parse_trial_command, require_optuna

    require_optuna()
    parse_trial_command(trial_command)
    spec = read_table(path)
    table_dir = table_dir_of(spec, output_dir)
    if table_dir.exists() and not table_dir.is_dir():
        raise UserError(f"--output-dir: {table_dir} is a file; the table writes a folder there")
    cells = [Cell(spec, r, c, list(sets or []), table_dir) for r in spec.rows for c in spec.columns]
    for cell in cells:
        cell.recipe = check_cell(cell)
    url = storage if storage is not None else f"sqlite:///{table_dir.resolve() / 'table.db'}"
    try:
        from sqlalchemy.engine import make_url

        shown = make_url(url).render_as_string(hide_password=True)
    except Exception as exc:
        raise UserError(f"--storage: {url[:120]!r} is not a database URL ({str(exc)[:80]}); e.g. "
                        "sqlite:///table.db or postgresql://user@host/db") from None
    return Table(spec, cells, table_dir, url, shown, trial_command)


def check_cell(cell: Cell):
    """Load the cell's recipe (both stages) and return it.

    Raises:
        UserError: the recipe does not load; the line names the cell.
    """
    from vptool.errors import RecipeError
    from vptool.recipe import load_recipe

    try:
        recipe = load_recipe(cell.row.recipe, cell.stage_sets("tune"))
        if cell.protocol == "vtab-1k":
            load_recipe(cell.row.recipe, cell.stage_sets("final"))
    except RecipeError as exc:
        raise UserError(f"cell {cell.name} ({cell.row.recipe}): {exc.problems[0]}") from None
    except UserError as exc:
        raise UserError(f"cell {cell.name} ({cell.row.recipe}): {str(exc).splitlines()[0]}") from None
    return recipe


def dry_run(path: str | Path, sets: list[str] | None = None, output_dir: str | Path = "runs") -> dict:
    """Check a table before anything trains: every cell's recipe and grid, and every input it reads.

    Returns:
        ``{"table", "title", "cells", "trainings" (the ``vptool train`` runs a full table starts), "ready",
        "missing": [{"key", "path", "cells"}], "table_dir"}``; ``missing`` names each data or checkpoint path that
        is not on disk (once, with the cells that need it).

    Raises:
        UserError / RecipeError: a bad table file, a cell whose recipe does not load, bad grid values.
    """
    from vptool.engine.sweep import check_grid_values, parse_grid

    spec = read_table(path)
    table_dir = table_dir_of(spec, output_dir)
    cells = [Cell(spec, r, c, list(sets or []), table_dir) for r in spec.rows for c in spec.columns]
    missing: dict[tuple[str, str], list[str]] = {}
    trainings, grids_checked = 0, set()
    for cell in cells:
        recipe = check_cell(cell)
        items = cell.grid_items(recipe)
        grid = parse_grid(items)
        key = (str(cell.row.recipe), tuple(items))
        if key not in grids_checked:
            check_grid_values(cell.row.recipe, grid, cell.stage_sets("tune"))
            grids_checked.add(key)
        trainings += len(grid) + (1 if cell.protocol == "vtab-1k" else 0)
        for k, p in cell_inputs(recipe, cell.protocol):
            missing.setdefault((k, p), []).append(cell.name)
    out = [{"key": k, "path": p, "cells": names} for (k, p), names in missing.items()]
    return {"table": spec.name, "title": spec.title, "source": spec.source, "cells": len(cells),
            "trainings": trainings, "ready": not out, "missing": out, "table_dir": str(table_dir)}


def cell_inputs(recipe, protocol: str) -> list[tuple[str, str]]:
    """``[(recipe key, path)]`` of what a cell reads and is not on disk: the backbone checkpoint, the data root, and
    (when the root is there) the files the dataset's layout needs (for VTAB-1k both stages' list files)."""
    from dataclasses import replace

    from vptool.data import check_layout

    out = []
    if recipe.backbone.checkpoint and not Path(recipe.backbone.checkpoint).exists():
        out.append(("backbone.checkpoint", str(recipe.backbone.checkpoint)))
    if recipe.prompt.init == "file" and recipe.prompt.init_file and not Path(recipe.prompt.init_file).exists():
        out.append(("prompt.init_file", str(recipe.prompt.init_file)))
    d = recipe.data
    if d.dataset == "digits" or not d.root:
        return out
    if not Path(d.root).exists():
        return [*out, ("data.root", str(d.root))]
    if d.dataset == "vtab-1k":
        from vptool.data.vtab import split_files

        files = dict.fromkeys(p for s in ("tune", "final") for p in split_files(replace(d, vtab_split=s)))
        return [*out, *(("data.root", str(p)) for p in files if not p.is_file())]
    try:
        check_layout(d)
    except UserError as exc:
        out.append(("data.root", str(exc).splitlines()[0]))
    return out

