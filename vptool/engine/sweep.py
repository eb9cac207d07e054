"""``vptool sweep``: a grid search over recipe keys, one ``vptool train`` subprocess per grid point, coordinated
through an Optuna study so that any number of workers (the same command started several times, on one machine or
on several sharing a database) run the grid together.

Protocol (VPT, Jia et al. ECCV 2022, §4.1): the learning rate and the weight decay are chosen by a grid search on
the *validation* split (the official ``tune_fgvc.py``); test accuracy is reported for the selected point only,
never used to select it. The objective is therefore each trial's ``val_acc`` (the best validation accuracy of the
run, ``summary.json``), and the best trial is the one with the highest ``val_acc`` (ties: the lowest grid index).

Layout: the sweep directory is ``<output.dir>/<output.name>-sweep/`` (the recipe's, after ``--set``); grid point
``i`` trains in ``<SWEEP_DIR>/<TRIAL>/`` (``000-lr0.5-weight_decay0``: ``vptool.engine.sweep_grid``), each trial's
full stderr is appended to ``<SWEEP_DIR>/logs/<TRIAL>.log``, and the default study is a SQLite file
``<SWEEP_DIR>/study.db``.

The parts:

- ``sweep_grid``: the grid, its validation against the recipe schema, and the point table;
- ``sweep_procs``: the ``vptool train`` children, ``PR_SET_PDEATHSIG``, and SIGINT/SIGTERM;
- ``sweep_study``: the Optuna storage and study, and the rules that hand each grid point out exactly once;
- ``sweep_trial``: one trial (train, resume or read a grid point's run directory);
- ``sweep_report``: ``sweep.csv``, ``sweep.json`` and ``sweep.png``, and the command's result;
- this module: ``plan_sweep`` (every input checked before anything is written) and ``Sweep.run``.

Once every grid point has a result (COMPLETE or FAIL), a rerun starts nothing and only reports. Exit status: 0 when
every grid point has a result and at least one completed, 1 when every trial failed; ``--json`` counts the FAIL
trials either way.

Reports (``<SWEEP_DIR>/sweep.csv``, ``sweep.json``, ``sweep.png``) are rewritten atomically after every trial and at
the end.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import sys
import warnings
from pathlib import Path

from vptool.engine.sweep_grid import RESERVED_KEYS, SWEEP_SUFFIX, Grid, GridPoint, check_grid_values, parse_grid
from vptool.engine.sweep_procs import HOST_ID, POLL_SECONDS, SweepStopped, TrialFailed, TrialKilled, TrialProcesses
from vptool.engine.sweep_report import CSV_COLUMNS, best_row, format_table, json_result, sweep_figure, write_reports
from vptool.engine.sweep_study import GRACE_PERIOD, HEARTBEAT_INTERVAL, STUDY_ATTR, SweepStudy, require_optuna
from vptool.engine.sweep_trial import MAX_KILLED, TrialRunner
from vptool.errors import RunError, UserError
from vptool.paths import Read, recipe_reads, refuse_inputs
from vptool.recipe import load_recipe

__all__ = ["CSV_COLUMNS", "GRACE_PERIOD", "HEARTBEAT_INTERVAL", "HOST_ID", "MAX_KILLED", "POLL_SECONDS",
           "RESERVED_KEYS", "STUDY_ATTR", "SWEEP_SUFFIX", "Grid", "Sweep", "SweepStopped", "TrialFailed", "best_row",
           "check_grid_values", "format_table", "json_result", "parse_grid", "parse_trial_command", "plan_sweep",
           "require_optuna", "sweep_figure"]


# --------------------------------------------------------------------------------------------------- the sweep
class Sweep:
    """One worker of a sweep: validated inputs (nothing written yet); ``run()`` joins the study and trains.

    Build it with ``plan_sweep``.
    """

    def __init__(self, recipe_path: Path, grid: Grid, sets: list[str], sweep_dir: Path, storage_url: str,
                 shown_url: str, study_name: str, trial_command: list[str], sqlite: bool):
        self.recipe_path, self.grid, self.sets = recipe_path, grid, list(sets)
        self.sweep_dir, self.storage_url, self.shown_url = sweep_dir, storage_url, shown_url
        self.study_name, self.trial_command, self.sqlite = study_name, trial_command, sqlite
        self.logs = sweep_dir / "logs"
        self.outputs = {"csv": str(sweep_dir / "sweep.csv"), "json": str(sweep_dir / "sweep.json"),
                        "png": str(sweep_dir / "sweep.png")}
        self.say = _say_stderr
        self.heartbeat_interval, self.grace_period, self.poll = HEARTBEAT_INTERVAL, GRACE_PERIOD, POLL_SECONDS
        self.procs = TrialProcesses(self.poll, f"study {study_name}, {sweep_dir}")
        self.store: SweepStudy | None = None
        #: False: ``run`` returns once no grid point is left for this worker (others train the rest) instead of
        #: waiting for them (``vptool table`` moves on to its next cell); ``plot``: whether the reports include
        #: ``sweep.png``
        self.wait, self.plot = True, True

    @property
    def trained(self) -> int:
        """The ``vptool train`` processes this worker started."""
        return self.procs.started

    def run(self, say=None) -> dict:
        """Join the study (creating it), train grid points until every one has a result (with ``wait`` False: until
        none is left for this worker), write the reports.

        Args:
            say: ``f(line)`` for progress lines (default: stderr).

        Returns:
            The report (``report()``).

        Raises:
            UserError: the storage cannot be opened, or the study holds a sweep over another grid or other
                ``--set`` items (suggests ``--study NEW``).
            SweepStopped: SIGINT/SIGTERM (exit 130/143); the running trial was checkpointed and is enqueued again.
            RunError: no grid point completed (every trial failed); not raised with ``wait`` False (``vptool table``
                reads the counts itself).
        """
        optuna = require_optuna()
        if say is not None:
            self.say = say
        self.procs.poll = self.poll
        old_verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            with warnings.catch_warnings(), self.procs.signals():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna(\.|$)")
                warnings.filterwarnings("ignore", message=r".*(failed_trial_callback|RetryFailedTrialCallback)")
                report = self._join_and_train(optuna)
        finally:
            optuna.logging.set_verbosity(old_verbosity)
            if self.store is not None:
                self.store.close()
        if self.wait and report["counts"]["COMPLETE"] == 0 and report["counts"]["FAIL"] == len(self.grid):
            first = next(r for r in report["rows"] if r["state"] == "FAIL")
            raise RunError(f"every trial failed (first: {first['trial']}: {first['error']}); see "
                           f"{self.logs}/ (reports: {self.outputs['csv']})")
        return report

    def _join_and_train(self, optuna) -> dict:
        """Open the study, train until every grid point has a result, and write the reports (also when stopped)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.store = SweepStudy(self.grid, self.storage_url, self.shown_url, self.study_name, self.sweep_dir,
                                self.sqlite, self.say, self.heartbeat_interval, self.grace_period)
        self.store.open(optuna, {"grid": self.grid.to_attr(), "sets": self.sets,
                                 "recipe": str(self.recipe_path.resolve())})
        done = sum(p.final for p in self.store.points(self.store.trials()))
        shape = " x ".join(str(len(v)) for v in self.grid.values)
        self.say(f"sweep: {len(self.grid)} grid points ({shape}), {done} with a result; {self.sweep_dir}; "
                 f"study {self.study_name} at {self.shown_url}")
        try:
            self._loop(optuna)
        except BaseException:
            with contextlib.suppress(Exception):
                self.report(plot=self.plot)
            raise
        return self.report(plot=self.plot)

    def _loop(self, optuna) -> None:
        store = self.store
        runner = TrialRunner(self.recipe_path, self.grid, self.sets, self.sweep_dir, self.trial_command, store,
                             self.procs, self.say)
        said_waiting = False
        while True:
            self.procs.check_stop()
            trials = store.trials()
            if store.reap(trials):
                trials = store.trials()
            points = store.points(trials)
            if all(p.final for p in points):
                return
            if not any(p.available for p in points):
                if not self.wait:
                    return
                if not said_waiting:
                    self._say_waiting(points)
                    said_waiting = True
                self.procs.sleep()
                store.fail_stale(optuna)
                continue
            said_waiting = False
            store.requeue(points)
            trained = self.trained
            try:
                store.study.optimize(runner.objective, catch=(TrialFailed, TrialKilled), callbacks=[self._after_trial])
            except optuna.exceptions.UpdateFinishedTrialError:
                # another worker failed our trial as stale (e.g. this machine was suspended): the run directory
                # holds the truth, and the point's next trial reads it
                self.say("sweep: this worker's trial was failed by another worker (no heartbeat); going on")
            if self.trained == trained:
                self.procs.sleep()  # nothing trained: don't spin

    def _say_waiting(self, points: list[GridPoint]) -> None:
        busy = [self.grid.name(p.index) for p in points if not p.final]
        self.say(f"sweep: waiting for {len(busy)} grid point(s) other workers are training: "
                 f"{', '.join(busy[:4])}{' ...' if len(busy) > 4 else ''}")

    def _after_trial(self, study, frozen) -> None:
        with contextlib.suppress(Exception):  # a report that cannot be written now is written at the end
            self.report(plot=False)
        points = self.store.points(self.store.trials())
        progress = f"[{sum(p.final for p in points)}/{len(points)} done]"
        name = frozen.user_attrs.get("trial") or f"optuna trial {frozen.number}"
        attrs = frozen.user_attrs
        if frozen.state.name == "COMPLETE":
            s = attrs.get("summary") or {}
            test, secs = s.get("test_top1"), s.get("seconds")
            self.say(f"{name}: val {frozen.value:.2f}%  test top-1 "
                     + (f"{test:.2f}%" if isinstance(test, (int, float)) else "n/a")
                     + (f"  ({secs:.1f} s)" if isinstance(secs, (int, float)) else "")
                     + ("  (read from its finished run directory)" if attrs.get("reused") else "") + f"  {progress}")
        elif frozen.state.name == "FAIL" and "error" in attrs:
            self.say(f"{name}: FAIL: {attrs['error']}  {progress}")
        elif frozen.state.name == "PRUNED":
            self.say(f"{name}: skipped, {attrs.get('skipped', 'a duplicate')}  {progress}")
        if self.procs.stop is not None or not any(p.available for p in points):
            study.stop()

    def report(self, plot: bool = True) -> dict:
        """Write ``sweep.csv``, ``sweep.json`` (and with ``plot`` ``sweep.png``) from the study's current state.

        Returns:
            ``{"study", "storage", "sweep_dir", "recipe", "sets", "grid", "grid_points", "counts", "best", "rows",
            "outputs", "selection"}``; ``rows`` has one row per grid point (cross-product order) with ``trial``,
            ``overrides``, ``params``, ``state`` (COMPLETE / FAIL / RUNNING / PENDING), ``val_acc``, ``test_top1``,
            ``test_top5``, ``best_epoch``, ``seconds``, ``error``, ``run_dir``; ``best`` is the COMPLETE row with the
            highest ``val_acc`` (ties: the lowest grid index), or None.
        """
        about = {"study": self.study_name, "storage": self.shown_url, "sweep_dir": str(self.sweep_dir),
                 "recipe": str(self.recipe_path), "sets": self.sets}
        points = self.store.points(self.store.trials())
        return write_reports(self.grid, self.sweep_dir, points, about, self.outputs, plot)


# --------------------------------------------------------------------------------------------------- inputs
def parse_trial_command(text: str | None) -> list[str]:
    """The command a trial runs ``train ...`` with.

    Args:
        text: ``--trial-command``, split like a shell would (``"torchrun --nproc_per_node 4 -m vptool"``, so a
            trial can itself be a multi-process run); None: ``[sys.executable, "-m", "vptool"]``.

    Returns:
        The argv prefix.

    Raises:
        UserError: unbalanced quotes, an empty command, or a program not found on PATH.
    """
    if text is None:
        return [sys.executable, "-m", "vptool"]
    try:
        argv = shlex.split(text)
    except ValueError as exc:
        raise UserError(f"--trial-command: {exc} in {text[:80]!r}; e.g. --trial-command \"torchrun "
                        "--nproc_per_node 4 -m vptool\"") from None
    if not argv:
        raise UserError("--trial-command: empty; e.g. --trial-command \"torchrun --nproc_per_node 4 -m vptool\"")
    if shutil.which(argv[0]) is None:
        raise UserError(f"--trial-command: {argv[0]!r} not found (not on PATH, or not executable); give the "
                        "program's path")
    return argv


def _refuse_inputs(recipe_path: str | Path, recipe, sweep_dir: Path) -> None:
    """The sweep directory (and every trial run in it) may not be, contain or lie inside the recipe or what it
    reads.

    Raises:
        UserError: one line naming both paths (``paths.refuse_inputs``).
    """
    refuse_inputs("output.dir/output.name", sweep_dir, [Read("recipe", recipe_path), *recipe_reads(recipe)])


def _refuse_storage(grid: Grid, sweep_dir: Path, storage) -> None:
    """A ``--storage`` SQLite file (``storage``: the parsed URL) may not be one of the sweep's outputs: its reports,
    ``logs/``, its lock or a trial's run.

    Raises:
        UserError: one line naming both paths (``paths.refuse_inputs``).
    """
    database = storage.database if storage.get_backend_name() == "sqlite" else None
    if database and database != ":memory:":
        outputs = [sweep_dir / n for n in ("sweep.csv", "sweep.json", "sweep.png", "logs", ".sweep.lock")]
        outputs += [sweep_dir / grid.name(i) for i in range(len(grid))]
        refuse_inputs("output.dir/output.name", outputs, [Read("storage file (--storage)", database)])


def _say_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _check_sweep_dir(sweep_dir: Path) -> None:
    """The sweep directory's nearest existing ancestor is a folder, and the directory itself is not a file.

    Raises:
        UserError: one line naming the file and the fix.
    """
    probe = sweep_dir
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"output.dir: {probe} is a file, not a folder; set output.dir to a folder")
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UserError(f"{sweep_dir}: is a file; the sweep writes a folder there (move it, or --set output.name=NEW)")


def _storage_url(storage: str | None, sweep_dir: Path):
    """(the study's URL: ``--storage`` or ``sqlite:///<SWEEP_DIR>/study.db``, its parsed SQLAlchemy form).

    Raises:
        UserError: a malformed ``--storage`` URL.
    """
    from sqlalchemy.engine import make_url  # installed with optuna (the optional ``sweep`` extra)

    url = storage if storage is not None else f"sqlite:///{sweep_dir.resolve() / 'study.db'}"
    try:
        return url, make_url(url)
    except Exception as exc:
        raise UserError(f"--storage: {url[:120]!r} is not a database URL ({str(exc)[:80]}); e.g. "
                        "sqlite:///sweep.db or postgresql://user@host/db") from None


# --------------------------------------------------------------------------------------------------- entry
def plan_sweep(recipe_path: str | Path, grid_items: list[str], sets: list[str] | None = None,
               storage: str | None = None, study: str | None = None, trial_command: str | None = None) -> Sweep:
    """Check every input of a sweep and return the worker, without writing anything.

    The sweep is VPT's hyper-parameter protocol (§4.1; the official ``tune_fgvc.py``): a grid over e.g. the
    learning rate and the weight decay, each point trained on the training split and scored on the validation
    split; the best point is chosen by validation accuracy and its test accuracy is reported.

    Args:
        recipe_path: the YAML recipe every trial trains.
        grid_items: ``--grid KEY=V1,V2,...`` items (see ``parse_grid``).
        sets: ``--set KEY=V`` items applied to every trial before the grid values.
        storage: a SQLAlchemy URL shared by the workers (default: ``sqlite:///<SWEEP_DIR>/study.db``).
        study: the Optuna study name (default: the recipe's ``output.name``).
        trial_command: what runs ``train ...`` (default ``python -m vptool``; e.g. ``torchrun --nproc_per_node 4
            -m vptool``).

    Returns:
        The ``Sweep``; ``run()`` starts it.

    Raises:
        UserError: a bad ``--grid`` (see ``parse_grid``), optuna not installed, a bad recipe or ``--set``, a bad
            ``--trial-command``, a malformed ``--storage`` URL or an empty ``--study`` (one line each); a sweep
            directory or trial run that is, contains or lies inside an input, or a ``--storage`` file that is one of
            the sweep's outputs (``paths.refuse_inputs``).
        RecipeError: grid values the recipe schema refuses, every one at once (``check_grid_values``).
    """
    grid = parse_grid(list(grid_items))
    require_optuna()
    command = parse_trial_command(trial_command)
    sets = list(sets or [])
    recipe = load_recipe(recipe_path, sets)
    check_grid_values(recipe_path, grid, sets)
    sweep_dir = Path(recipe.output.dir) / f"{recipe.output.name}{SWEEP_SUFFIX}"
    _refuse_inputs(recipe_path, recipe, sweep_dir)
    _check_sweep_dir(sweep_dir)
    url, parsed = _storage_url(storage, sweep_dir)
    shown = parsed.render_as_string(hide_password=True)
    if storage is not None:
        _refuse_storage(grid, sweep_dir, parsed)
    name = study if study is not None else recipe.output.name
    if not name or not name.strip():
        raise UserError("--study: empty; give a name, e.g. --study lr-wd")
    grid_keys = set(grid.keys)
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in grid_keys:
            _say_stderr(f"warning: --set {item[:80]} is overridden by --grid {key} in every trial")
    return Sweep(Path(recipe_path), grid, sets, sweep_dir, url, shown, name, command,
                 sqlite=parsed.get_backend_name() == "sqlite")
