"""``vptool sweep``: a grid search over recipe keys, one ``vptool train`` subprocess per grid point, coordinated
through an Optuna study so that any number of workers (the same command started several times, on one machine or
on several sharing a database) run the grid together.

Protocol (VPT, Jia et al. ECCV 2022, §4.1): the learning rate and the weight decay are chosen by a grid search on
the *validation* split (the official ``tune_fgvc.py``); test accuracy is reported for the selected point only,
never used to select it. The objective is therefore each trial's ``val_acc`` (the best validation accuracy of the
run, ``summary.json``), and the best trial is the one with the highest ``val_acc`` (ties: the lowest grid index).

Layout: the sweep directory is ``<output.dir>/<output.name>-sweep/`` (the recipe's, after ``--set``); grid point
``i`` trains in ``<SWEEP_DIR>/<TRIAL>/`` where ``TRIAL`` is ``i`` (zero-padded, in cross-product order) followed by
``-<last key segment><value>`` for each key (``000-lr0.5-weight_decay0``), so every worker agrees on it. Each
trial's full stderr is appended to ``<SWEEP_DIR>/logs/<TRIAL>.log`` (one ``=== attempt`` header per train
process started), and its ``recipe.yaml`` records its overrides (``vptool train`` writes the resolved recipe). The
default study is a SQLite file ``<SWEEP_DIR>/study.db``.

Exactly once. Grid points are handed out by ``optuna.samplers.GridSampler`` over an ``RDBStorage`` with a heartbeat
(a trial whose worker stopped beating is failed and re-enqueued by ``RetryHeartbeatStaleTrialCallback``), and
three more rules make every point train exactly once whatever the timing:

- a grid point belongs to the lowest-numbered trial with its parameters that is RUNNING or finished: a
  higher-numbered duplicate never trains; it waits while the owner runs (checking for stale trials) and marks
  itself PRUNED once the point has a result, or takes over when the owner is failed as stale;
- a RUNNING trial whose worker ran on this machine and has exited (its pid is gone) is failed at once instead of
  after the heartbeat's grace period, and a grid point with no result and nobody on it is enqueued again;
- the trial's run directory is the truth on a shared filesystem: a finished one (``summary.json``) is never
  retrained (its summary is read, after checking its recipe is this trial's), an unfinished one (killed) is
  continued with ``vptool train --resume``, and ``vptool train``'s exclusive lock on the run means two processes
  never train it at once (a trial that finds it locked waits for the holder).

A worker killed (even by SIGKILL) leaves its trial RUNNING; its ``vptool train`` child gets SIGTERM (Linux
``PR_SET_PDEATHSIG``), writes ``checkpoints/last.pt`` and exits; the next worker to look fails the trial and resumes
the run. SIGINT/SIGTERM to the sweep are forwarded to the running child, which checkpoints; the trial is enqueued
again and the sweep exits 130/143: rerunning the same command resumes it.

Every grid value, and every grid point, is validated against the recipe schema before anything is written
(``check_grid_values``: ``train.lr=abc`` or ``-1`` is refused with exit 2, every problem listed at once). A trial
whose ``vptool train`` still fails (exit 1: the run failed, e.g. a non-finite loss; exit 2: an input found bad only
when the trial starts) is recorded as FAIL with its error line, and the sweep goes on. Failed trials are final: a
rerun does not retry them (start a new study with ``--study NEW`` to try again). Once every grid point has a result
(COMPLETE or FAIL), a rerun starts nothing and only reports. Exit status: 0 when every grid point has a result and
at least one completed, 1 when every trial failed; ``--json`` counts the FAIL trials either way.

Reports (``<SWEEP_DIR>/sweep.csv``, ``sweep.json``, ``sweep.png``) are rewritten atomically after every trial and at
the end.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from vptool.errors import RunError, UserError

SWEEP_SUFFIX = "-sweep"
#: keys the sweep sets itself for every trial
RESERVED_KEYS = ("output.dir", "output.name")
#: Optuna heartbeat: a RUNNING trial whose worker has not beaten for GRACE_PERIOD seconds is failed and re-enqueued
HEARTBEAT_INTERVAL = 5
GRACE_PERIOD = 20
#: seconds between looks at the study while waiting for another worker's trial (or a run directory's lock)
POLL_SECONDS = 1.0
#: a grid point whose ``vptool train`` is killed by a signal the sweep did not send this many times fails for good
MAX_KILLED = 3
#: the study's user attribute holding the sweep's definition (grid, recipe, --set items)
STUDY_ATTR = "vptool_sweep"
CSV_COLUMNS = ["trial", "overrides", "val_acc", "test_top1", "test_top5", "best_epoch", "seconds", "state", "error",
               "run_dir"]
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]")


# --------------------------------------------------------------------------------------------------- the grid
class Grid:
    """The grid: recipe keys in the order given, each with its values as typed (strings, passed verbatim to
    ``--set``). Points are numbered in cross-product order (the last key varies fastest)."""

    def __init__(self, keys: list[str], values: list[list[str]]):
        self.keys = tuple(keys)
        self.values = tuple(tuple(v) for v in values)
        self.points = list(itertools.product(*self.values))
        self._index = {p: i for i, p in enumerate(self.points)}
        self._width = max(3, len(str(len(self.points) - 1)))

    def __len__(self) -> int:
        return len(self.points)

    def params(self, i: int) -> dict[str, str]:
        """Point ``i`` as ``{key: value string}``."""
        return dict(zip(self.keys, self.points[i]))

    def overrides(self, i: int) -> list[str]:
        """Point ``i`` as ``--set`` items, ``["train.lr=0.5", ...]``."""
        return [f"{k}={v}" for k, v in zip(self.keys, self.points[i])]

    def name(self, i: int) -> str:
        """The trial (run directory) name of point ``i``, e.g. ``000-lr0.5-weight_decay0``."""
        parts = [f"{i:0{self._width}d}"]
        for k, v in zip(self.keys, self.points[i]):
            parts.append(_NAME_CHARS.sub("_", f"{k.rsplit('.', 1)[-1]}{v}")[:48])
        return "-".join(parts)[:200]

    def index(self, params: dict) -> int | None:
        """The index of the point with these parameter values (None: not a point of this grid)."""
        try:
            return self._index.get(tuple(params[k] for k in self.keys))
        except KeyError:
            return None

    def search_space(self) -> dict[str, list[str]]:
        """The ``GridSampler`` search space (categorical string choices)."""
        return {k: list(v) for k, v in zip(self.keys, self.values)}

    def to_attr(self) -> list:
        """The JSON form stored in the study (order matters: it fixes the trial names)."""
        return [[k, list(v)] for k, v in zip(self.keys, self.values)]


def _recipe_keys() -> tuple[list[str], set[str]]:
    """(every leaf key of the recipe schema, the section names)."""
    from vptool.recipe import Recipe, key_paths

    paths = key_paths(Recipe)
    sections = {p.rsplit(".", 1)[0] for p in paths if "." in p}
    return [p for p in paths if p not in sections], sections


def _check_grid_key(key: str) -> None:
    import difflib

    leaves, sections = _recipe_keys()
    if key in RESERVED_KEYS:
        raise UserError(f"--grid {key}: the sweep sets output.dir and output.name itself (each trial trains in "
                        f"<output.dir>/<output.name>{SWEEP_SUFFIX}/<TRIAL>); to move the sweep use --set {key}=...")
    if key in leaves or (key.startswith("backbone.kwargs.") and len(key) > len("backbone.kwargs.")):
        return
    if key in sections or key == "":
        example = next((p for p in leaves if p.startswith(key + ".")), "train.lr")
        raise UserError(f"--grid {key}: is a section of the recipe, not a key; name a key in it, e.g. {example}")
    close = difflib.get_close_matches(key, leaves, n=1, cutoff=0.6)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [p for p in leaves if p.rsplit(".", 1)[-1] == last]
    hint = f"; did you mean {close[0]}?" if close else "; see the keys with vptool train RECIPE --dry-run"
    raise UserError(f"--grid {key}: unknown recipe key{hint}")


def parse_grid(items: list[str]) -> Grid:
    """Parse ``--grid KEY=V1,V2,...`` items into a ``Grid`` (the cross product of their values).

    Values are kept as the strings typed (split on commas, stripped) and later passed verbatim to ``--set``;
    ``check_grid_values`` validates them against the recipe schema.

    Args:
        items: the ``--grid`` options, e.g. ``["train.lr=0.5,0.25", "train.weight_decay=0,0.001"]``.

    Returns:
        The grid, keys in the order given.

    Raises:
        UserError: no item, an item without ``=``, an empty value list or an empty value, a value given twice,
            the same key twice, an unknown key (with a did-you-mean), or ``output.dir``/``output.name`` (one line
            naming the key and the fix).
    """
    if not items:
        raise UserError("--grid: missing; give at least one, e.g. --grid train.lr=0.5,0.25 (repeat --grid for a "
                        "cross product)")
    keys: list[str] = []
    values: list[list[str]] = []
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid {item[:80]!r}: expected KEY=V1,V2,..., e.g. --grid train.lr=0.5,0.25")
        vals = [v.strip() for v in text.split(",")]
        if not any(vals):
            raise UserError(f"--grid {key}: no values; give them comma-separated, e.g. --grid {key}=V1,V2")
        if not all(vals):
            raise UserError(f"--grid {key}: an empty value in {text[:80]!r}; give the values comma-separated, "
                            f"without an empty one, e.g. --grid {key}=V1,V2")
        dup = next((v for i, v in enumerate(vals) if v in vals[:i]), None)
        if dup is not None:
            raise UserError(f"--grid {key}: value {dup[:80]!r} is given twice; list each value once")
        if key in keys:
            raise UserError(f"--grid {key}: given twice; put all its values in one --grid {key}=V1,V2,...")
        _check_grid_key(key)
        keys.append(key)
        values.append(vals)
    return Grid(keys, values)


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


def require_optuna():
    """Import optuna (an optional dependency: the ``sweep`` extra).

    Returns:
        The ``optuna`` module.

    Raises:
        UserError: optuna is not installed (names the extra to install).
    """
    try:
        import optuna
    except ImportError:
        raise UserError('vptool sweep needs optuna, which is not installed: pip install -e ".[sweep]" (or pip '
                        "install optuna)") from None
    return optuna


def _yaml_str(text: str) -> str:
    """``text`` as a ``--set`` value that reads back exactly ``text``: as is when YAML reads it as that string,
    else single-quoted."""
    from vptool.recipe import load_yaml_text

    try:
        if load_yaml_text(text) == text:
            return text
    except Exception:
        pass
    return "'" + text.replace("'", "''") + "'"


def _display_value(text: str):
    """A grid value parsed as recipe YAML (safe), for display and plots only."""
    from vptool.recipe import load_yaml_text

    try:
        value = load_yaml_text(text)
    except Exception:
        return text
    return value if isinstance(value, (int, float, str, bool)) or value is None else text


# --------------------------------------------------------------------------------------------------- processes
def _host_id() -> str | None:
    """This machine (and pid namespace), so a worker can tell that a trial's worker ran here; None if unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{ns}"


HOST_ID = _host_id()


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def _child_preexec():
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux ``PR_SET_PDEATHSIG``),
    so a killed worker's ``vptool train`` writes its checkpoint and exits instead of training on unattended; None
    where that is not available."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:  # runs in the child between fork and exec: keep it to two system calls
        prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before the call: nobody would signal us
            os._exit(143)

    return preexec


def _last_error_line(text: str) -> str | None:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return lines[-1][len("error:"):].strip()[:300] if lines else None


def _only_empty_dirs(path: Path) -> bool:
    return path.is_dir() and all(p.is_dir() for p in path.rglob("*"))


def _clear_empty_run(run: Path) -> None:
    """Remove a trial's folder that holds only empty folders (a train killed right after creating it).

    Raises:
        TrialFailed: the folder holds something else (not a vptool run directory).
    """
    if not _only_empty_dirs(run):
        raise TrialFailed(f"{run} exists and is not a vptool run directory (no recipe.yaml); delete it, or "
                          "sweep under another name with --set output.name=NEW")
    for d in sorted(run.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [run]:
        with contextlib.suppress(OSError):
            d.rmdir()  # a train killed right after creating the folder: nothing in it


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class TrialFailed(Exception):
    """The trial's ``vptool train`` failed (exit 1 or 2): recorded as FAIL with its error line; final."""


class _TrialKilled(Exception):
    """The trial's ``vptool train`` was killed by a signal the sweep did not send: FAIL, not final (retried)."""


class SweepStopped(RunError):
    """The sweep was stopped by SIGINT (exit 130) or SIGTERM (exit 143); rerunning it resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------------------------------- points
@dataclass
class _Point:
    """What the study says about one grid point."""

    index: int
    trials: list = field(default_factory=list)

    def _of(self, *states):
        return [t for t in self.trials if t.state.name in states]

    @property
    def complete(self):
        done = self._of("COMPLETE")
        return min(done, key=lambda t: t.number) if done else None

    @property
    def failed(self):
        bad = [t for t in self._of("FAIL") if "error" in t.user_attrs]
        return min(bad, key=lambda t: t.number) if bad else None

    @property
    def final(self) -> bool:
        return self.complete is not None or self.failed is not None

    @property
    def running(self) -> list:
        return self._of("RUNNING")

    @property
    def waiting(self) -> list:
        return self._of("WAITING")

    @property
    def killed(self) -> int:
        return sum(1 for t in self.trials if "killed" in t.user_attrs)

    @property
    def state(self) -> str:
        if self.complete is not None:
            return "COMPLETE"
        if self.failed is not None:
            return "FAIL"
        return "RUNNING" if self.running else "PENDING"


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
        self.trained = 0  # train processes this worker started
        self._stop: int | None = None
        self._child: subprocess.Popen | None = None
        self._forwarded = 0
        self.study = self.storage = None
        self.study_id: int | None = None

    # ------------------------------------------------------------------ public
    def run(self, say=None) -> dict:
        """Join the study (creating it), train grid points until every one has a result, write the reports.

        Args:
            say: ``f(line)`` for progress lines (default: stderr).

        Returns:
            The report (``report()``).

        Raises:
            UserError: the storage cannot be opened, or the study holds a sweep over another grid or other
                ``--set`` items (suggests ``--study NEW``).
            SweepStopped: SIGINT/SIGTERM (exit 130/143); the running trial was checkpointed and is enqueued again.
            RunError: no grid point completed (every trial failed).
        """
        optuna = require_optuna()
        if say is not None:
            self.say = say
        old_verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            with warnings.catch_warnings(), self._signals():
                warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"optuna(\.|$)")
                warnings.filterwarnings("ignore", message=r".*(failed_trial_callback|RetryFailedTrialCallback)")
                self._open(optuna)
                done = sum(p.final for p in self._points(self._trials()))
                shape = " x ".join(str(len(v)) for v in self.grid.values)
                self.say(f"sweep: {len(self.grid)} grid points ({shape}), {done} with a result; {self.sweep_dir}; "
                         f"study {self.study_name} at {self.shown_url}")
                try:
                    self._loop(optuna)
                except BaseException:
                    with contextlib.suppress(Exception):
                        self.report(plot=True)
                    raise
                report = self.report(plot=True)
        finally:
            optuna.logging.set_verbosity(old_verbosity)
            self._close()
        if report["counts"]["COMPLETE"] == 0 and report["counts"]["FAIL"] == len(self.grid):
            first = next(r for r in report["rows"] if r["state"] == "FAIL")
            raise RunError(f"every trial failed (first: {first['trial']}: {first['error']}); see "
                           f"{self.logs}/ (reports: {self.outputs['csv']})")
        return report

    # ------------------------------------------------------------------ storage
    def _open(self, optuna) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if self.sqlite else {}
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
        import inspect

        params = inspect.signature(optuna.storages.RDBStorage).parameters
        cb_key = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else \
            "failed_trial_callback"
        kwargs[cb_key] = retry_cls(max_retry=None)  # the sweep re-enqueues lost points itself too
        with self._setup_lock():
            try:
                self.storage = optuna.storages.RDBStorage(self.storage_url, heartbeat_interval=self.heartbeat_interval,
                                                          grace_period=self.grace_period, **kwargs)
                sampler = optuna.samplers.GridSampler(self.grid.search_space(), seed=0)
                self.study = optuna.create_study(storage=self.storage, study_name=self.study_name, sampler=sampler,
                                                 direction="maximize", load_if_exists=True)
                self.study_id = self.storage.get_study_id_from_name(self.study_name)
            except Exception as exc:
                line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
                raise UserError(f"--storage {self.shown_url}: cannot open the study ({type(exc).__name__}: {line}); "
                                "check the URL, its database driver and that the server is reachable") from None
            self._check_definition()

    def _check_definition(self) -> None:
        mine = {"grid": self.grid.to_attr(), "sets": self.sets, "recipe": str(self.recipe_path.resolve())}
        saved = self.study.user_attrs.get(STUDY_ATTR)
        if saved is None:
            self.study.set_user_attr(STUDY_ATTR, mine)
            return
        if saved.get("grid") != mine["grid"]:
            old = " ".join(f"--grid {k}={','.join(v)}" for k, v in saved.get("grid") or [])
            raise UserError(f"--study {self.study_name}: {self.shown_url} holds a sweep over another grid ({old}); "
                            "rerun with that grid, or start a new sweep with --study NEW")
        if list(saved.get("sets") or []) != mine["sets"]:
            old = " ".join(f"--set {s}" for s in saved.get("sets") or []) or "no --set"
            raise UserError(f"--study {self.study_name}: {self.shown_url} holds a sweep with other --set items "
                            f"({old}); rerun with them, or start a new sweep under another name with "
                            "--set output.name=NEW")
        if saved.get("recipe") != mine["recipe"]:
            self.say(f"note: study {self.study_name} was created for recipe {saved.get('recipe')}; this worker "
                     f"runs {mine['recipe']}")

    @contextlib.contextmanager
    def _setup_lock(self):
        """Serialise creating the storage and the study among workers on this machine (SQLite schema creation is
        not safe to race)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        fd = os.open(str(self.sweep_dir / ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _close(self) -> None:
        if self.storage is not None:
            with contextlib.suppress(Exception):
                self.storage.remove_session()
            with contextlib.suppress(Exception):
                self.storage.engine.dispose()

    def _trial_id(self, number: int) -> int:
        """The storage's id of the study's trial ``number`` (Optuna's public storage API)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def _trials(self) -> list:
        return self.study.get_trials(deepcopy=False)

    def _points(self, trials: list) -> list[_Point]:
        points = [_Point(i) for i in range(len(self.grid))]
        for t in trials:
            i = self.grid.index(t.params)
            if i is not None:
                points[i].trials.append(t)
        return points

    # ------------------------------------------------------------------ signals
    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        if self._stop is None:
            self._stop = signum
            os.write(2, f"sweep: {_signame(signum)}: stopping; the running trial writes its checkpoint (rerun the "
                        "same command to continue)\n".encode())
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        """Pass the signal to the running trial command (it runs in its own session, so a terminal's Ctrl-C
        reaches it only this way, once; torchrun passes it on to its workers)."""
        child = self._child
        if child is not None and child.poll() is None:
            self._forwarded += 1
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    def _check_stop(self) -> None:
        if self._stop is not None:
            raise SweepStopped(f"sweep stopped by {_signame(self._stop)}; rerun the same command to continue it "
                               f"(study {self.study_name}, {self.sweep_dir})", self._stop)

    def _sleep(self, seconds: float | None = None) -> None:
        end = time.monotonic() + (self.poll if seconds is None else seconds)
        while True:
            self._check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    # ------------------------------------------------------------------ the loop
    def _loop(self, optuna) -> None:
        said_waiting = False
        while True:
            self._check_stop()
            trials = self._trials()
            if self._reap(trials):
                trials = self._trials()
            points = self._points(trials)
            if all(p.final for p in points):
                return
            if not any(self._available(p) for p in points):
                if not said_waiting:
                    busy = [self.grid.name(p.index) for p in points if not p.final]
                    self.say(f"sweep: waiting for {len(busy)} grid point(s) other workers are training: "
                             f"{', '.join(busy[:4])}{' ...' if len(busy) > 4 else ''}")
                    said_waiting = True
                self._sleep()
                optuna.storages.fail_stale_trials(self.study)
                continue
            said_waiting = False
            self._requeue(optuna, points)
            trained = self.trained
            try:
                self.study.optimize(self._objective, catch=(TrialFailed, _TrialKilled),
                                    callbacks=[self._after_trial])
            except optuna.exceptions.UpdateFinishedTrialError:
                # another worker failed our trial as stale (e.g. this machine was suspended): the run directory
                # holds the truth, and the point's next trial reads it
                self.say("sweep: this worker's trial was failed by another worker (no heartbeat); going on")
            if self.trained == trained:
                self._sleep()  # nothing trained: don't spin

    def _available(self, p: _Point) -> bool:
        """Whether a trial could do something for this point now (no result, and nobody running it)."""
        return not p.final and (bool(p.waiting) or not p.running)

    def _reap(self, trials: list, exclude: int | None = None) -> bool:
        """Fail RUNNING trials whose worker is known to be gone: it ran on this machine and its pid has exited,
        or it never recorded a worker long after it started. Returns whether any was failed."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now = datetime.datetime.now()
        reaped = False
        for t in trials:
            if t.state != TrialState.RUNNING or t.number == exclude:
                continue
            w = t.user_attrs.get("worker")
            if isinstance(w, dict):
                pid = w.get("pid")
                if HOST_ID is None or w.get("host") != HOST_ID or not isinstance(pid, int):
                    continue
                if pid != os.getpid() and _pid_alive(pid):
                    continue
                reason = f"its worker (pid {pid}) on this machine has exited"
            else:
                started = t.datetime_start
                if started is None or (now - started).total_seconds() < max(60, 3 * self.grace_period):
                    continue
                reason = "its worker never started it"
            try:
                trial_id = self._trial_id(t.number)
                self.storage.set_trial_user_attr(trial_id, "lost", reason)
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:
                continue
            reaped = True
            name = t.user_attrs.get("trial") or f"trial {t.number}"
            self.say(f"sweep: {name}: optuna trial {t.number} failed: {reason}; the grid point will be resumed")
        return reaped

    def _requeue(self, optuna, points: list[_Point]) -> None:
        """Enqueue again every grid point that was started but has no result, nobody running it and nothing
        waiting (a trial stopped by a signal, or failed as stale)."""
        from optuna.distributions import CategoricalDistribution
        from optuna.trial import TrialState, create_trial

        lost_ids = table = None
        for p in points:
            if p.final or p.running or p.waiting:
                continue
            src = max((t for t in p.trials if "grid_id" in t.system_attrs and "search_space" in t.system_attrs),
                      key=lambda t: t.number, default=None)
            if src is not None:
                params, dists = dict(src.params), dict(src.distributions)
                system = {"grid_id": src.system_attrs["grid_id"], "search_space": src.system_attrs["search_space"],
                          "vptool_requeued_from": src.number}
            else:
                # never started with its parameters: GridSampler hands it out, unless a trial that died before
                # taking its parameters used up its grid id (GridSampler then counts it as visited)
                if lost_ids is None:
                    lost_ids = {t.system_attrs.get("grid_id") for t in self._trials()
                                if t.state.is_finished() and self.grid.index(t.params) is None}
                    table = self._grid_table()
                gid = self._grid_id(p.index, table)
                if gid is None or gid not in lost_ids:
                    continue
                params = self.grid.params(p.index)
                dists = {k: CategoricalDistribution(list(v)) for k, v in zip(self.grid.keys, self.grid.values)}
                system = {"grid_id": gid, "search_space": self.grid.search_space()}
            self.study.add_trial(create_trial(state=TrialState.WAITING, params=params, distributions=dists,
                                              system_attrs=system))

    def _grid_id(self, i: int, table: list[tuple] | None) -> int | None:
        """GridSampler's id of grid point ``i``, or None if this optuna version orders its grid otherwise.

        GridSampler (``seed=0``, as the sweep builds it) numbers the cross product of the values, keys sorted by
        name, in the order a ``numpy.random.RandomState(0)`` shuffle leaves it. The table is rebuilt here from the
        public search space, and trusted only if it agrees with every trial that recorded both its grid id and its
        parameters (``FrozenTrial.system_attrs``, public): ``table`` is ``_grid_table()``.
        """
        if table is None:
            return None
        target = tuple(self.grid.params(i)[n] for n in sorted(self.grid.keys))
        return next((gid for gid, g in enumerate(table) if g == target), None)

    def _grid_table(self) -> list[tuple] | None:
        """GridSampler's grid list (``_grid_id``), or None when a trial contradicts it."""
        import numpy as np

        names = sorted(self.grid.keys)
        space = self.grid.search_space()
        table = list(itertools.product(*(space[n] for n in names)))
        np.random.RandomState(0).shuffle(table)
        for t in self._trials():
            gid = t.system_attrs.get("grid_id")
            if isinstance(gid, int) and all(n in t.params for n in names) and \
                    (not 0 <= gid < len(table) or table[gid] != tuple(t.params[n] for n in names)):
                return None
        return table

    def _after_trial(self, study, frozen) -> None:
        with contextlib.suppress(Exception):  # a report that cannot be written now is written at the end
            self.report(plot=False)
        points = self._points(self._trials())
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
        if self._stop is not None or not any(self._available(p) for p in points):
            study.stop()

    # ------------------------------------------------------------------ one trial
    def _tag(self, i: int) -> str:
        return self.grid.name(i)

    def _objective(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        trial.set_user_attr("worker", {"host": HOST_ID, "pid": os.getpid()})
        # the parameters first (a trial stopped before it has them would hide its grid point from the sweep)
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in zip(self.grid.keys, self.grid.values)}
        i = self.grid.index(params)
        name = self.grid.name(i)
        trial.set_user_attr("trial", name)
        my_gid = self.storage.get_trial(self._trial_id(trial.number)).system_attrs.get("grid_id")
        said: set[str] = set()
        retries = 0
        while True:
            self._check_stop()
            trials = self._trials()
            if self._reap(trials, exclude=trial.number):
                trials = self._trials()
            same = [t for t in trials if t.number != trial.number and self._same_point(t, params, my_gid)]
            done = _Point(i, same)
            result = done.complete or done.failed
            if result is not None:
                trial.set_user_attr("skipped", f"grid point has a result already (optuna trial {result.number})")
                raise optuna.TrialPruned(f"{name}: done by optuna trial {result.number}")
            owner = min((t for t in same if t.state == TrialState.RUNNING and t.number < trial.number),
                        key=lambda t: t.number, default=None)
            if owner is not None:
                if "owner" not in said:
                    self.say(f"{self._tag(i)}: optuna trial {owner.number} is training it; waiting")
                    said.add("owner")
                self._sleep()
                optuna.storages.fail_stale_trials(self.study)
                continue
            try:
                outcome, payload = self._train_point(trial, i, name, _Point(i, same))
            except TrialFailed as exc:
                trial.set_user_attr("error", str(exc))
                trial.set_user_attr("log", str(self.logs / f"{name}.log"))
                raise
            if outcome == "done":
                return payload
            if outcome == "locked":
                if "locked" not in said:
                    self.say(f"{self._tag(i)}: its run directory is locked by another vptool train; waiting")
                    said.add("locked")
                self._sleep()
                continue
            retries += 1  # "retry": the run directory changed under us (another process finished or started it)
            if retries > 3:
                trial.set_user_attr("error", str(payload))
                trial.set_user_attr("log", str(self.logs / f"{name}.log"))
                raise TrialFailed(payload)

    def _same_point(self, t, params: dict, my_gid) -> bool:
        if all(k in t.params for k in self.grid.keys):
            return all(t.params[k] == params[k] for k in self.grid.keys)
        # a trial just created, its parameters not set yet: the grid id the sampler gave it tells
        return my_gid is not None and t.state.name == "RUNNING" and t.system_attrs.get("grid_id") == my_gid

    def _trial_sets(self, i: int, name: str) -> list[str]:
        return [*self.sets, *self.grid.overrides(i), f"output.dir={_yaml_str(str(self.sweep_dir))}",
                f"output.name={_yaml_str(name)}"]

    def _train_point(self, trial, i: int, name: str, point: _Point) -> tuple[str, object]:
        """Train (or read, or resume) grid point ``i`` in its run directory.

        Returns ``("done", val_acc)``, ``("locked", line)`` (another process holds the run's lock) or
        ``("retry", line)`` (the directory changed between the look and the train).

        Raises:
            TrialFailed: the train failed (its error line), or the directory holds something else.
            _TrialKilled: the train process was killed by a signal the sweep did not send.
            SweepStopped: the sweep was stopped by a signal (the trial is enqueued again).
        """
        from vptool.engine.runstate import inspect_run

        run = self.sweep_dir / name
        status = inspect_run(run).status
        if status == "finished":
            summary = self._finished_summary(run, i, name)
            self.say(f"{self._tag(i)}: finished already; reading {run / 'summary.json'}")
            return "done", self._record(trial, i, summary, reused=True)
        if status == "foreign":
            _clear_empty_run(run)
        resume = status == "unfinished"
        argv = self._train_argv(i, name, resume)
        what = "resuming" if resume else "training"
        self.say(f"{self._tag(i)}: {what} ({' '.join(self.grid.overrides(i))}; optuna trial {trial.number}, "
                 f"worker pid {os.getpid()})")
        rc, out, err_line, log = self._spawn(argv, name, trial.number)
        if rc == 0:  # (also when a stop signal came too late to stop it: its result counts)
            summary = self._parse_summary(out, run)
            if summary is None:
                raise TrialFailed(f"vptool train exited 0 but {run / 'summary.json'} is missing or unreadable; see "
                                  f"{log}")
            return "done", self._record(trial, i, summary, reused=False)
        if self._stop is not None:
            self._requeue_stopped(trial, name)
            raise SweepStopped(f"sweep stopped by {_signame(self._stop)}: {name} stopped after writing its "
                               f"checkpoint ({run}); rerun the same command to continue the sweep", self._stop)
        if rc == 2 and err_line and "locked by another vptool train" in err_line:
            return "locked", err_line
        if rc == 2 and inspect_run(run).status != status:
            return "retry", err_line or f"vptool train exited 2; see {log}"
        if rc < 0 or rc in (130, 143):
            sig = _signame(-rc if rc < 0 else rc - 128)
            trial.set_user_attr("killed", sig)
            if point.killed + 1 >= MAX_KILLED:
                raise TrialFailed(f"vptool train was killed by {sig} {point.killed + 1} times (out of memory?); "
                                  f"see {log}")
            self.say(f"{self._tag(i)}: vptool train was killed by {sig}; the grid point will be resumed")
            raise _TrialKilled(sig)
        raise TrialFailed(err_line or f"vptool train exited {rc} without an error line; see {log}")

    def _train_argv(self, i: int, name: str, resume: bool) -> list[str]:
        """The ``vptool train`` command line of grid point ``i`` (``--json``; ``--resume`` to continue its run)."""
        argv = [*self.trial_command, "train", str(self.recipe_path)]
        for item in self._trial_sets(i, name):
            argv += ["--set", item]
        argv.append("--json")
        if resume:
            argv.append("--resume")
        return argv

    def _spawn(self, argv: list[str], name: str, number: int) -> tuple[int, str, str | None, Path]:
        """Run one train process: stderr appended to ``logs/<TRIAL>.log``, stdout captured. Returns (exit code,
        stdout, the last ``error:`` line of this attempt, the log path)."""
        self._check_stop()
        log = self.logs / f"{name}.log"
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(log, "ab") as fh:
            fh.write(f"=== attempt {stamp} optuna trial {number}, worker pid {os.getpid()}: {shlex.join(argv)}\n"
                     .encode())
            fh.flush()
            start = os.fstat(fh.fileno()).st_size
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fh, env=env,
                                    preexec_fn=_child_preexec(), start_new_session=True)
            before = self._forwarded
            self._child = proc
            try:
                if self._stop is not None and self._forwarded == before:
                    self._forward(self._stop)  # the signal came while Popen ran: the handler had no child to tell
                out, _ = proc.communicate()
            finally:
                self._child = None
            self.trained += 1
            rc = proc.returncode
            fh.write(f"=== exit {rc}\n".encode())
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
        return rc, out.decode(errors="replace"), _last_error_line(text), log

    def _requeue_stopped(self, trial, name: str) -> None:
        """The sweep was stopped while this trial trained: mark it, and enqueue its point again so that the next
        worker (or a rerun) resumes it."""
        from optuna.trial import TrialState, create_trial

        with contextlib.suppress(Exception):
            trial.set_user_attr("stopped", _signame(self._stop))
            ft = self.storage.get_trial(self._trial_id(trial.number))
            system = ({k: ft.system_attrs[k] for k in ("grid_id", "search_space")}
                      if "grid_id" in ft.system_attrs and "search_space" in ft.system_attrs else {})
            system["vptool_requeued_from"] = trial.number
            self.study.add_trial(create_trial(state=TrialState.WAITING, params=dict(ft.params),
                                              distributions=dict(ft.distributions), system_attrs=system))

    @staticmethod
    def _parse_summary(out: str, run: Path) -> dict | None:
        for line in reversed(out.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(data, dict) and "val_acc" in data:
                    return data
        try:
            return json.loads((run / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None

    def _finished_summary(self, run: Path, i: int, name: str) -> dict:
        """The summary of a finished run directory, after checking it was trained with this trial's recipe."""
        from vptool.engine.runstate import read_json
        from vptool.recipe import flat_keys, load_recipe, read_yaml, resolve_saved

        try:
            summary = read_json(run / "summary.json")
            saved = resolve_saved(read_yaml(run / "recipe.yaml"), source=str(run / "recipe.yaml"))
            expected = load_recipe(self.recipe_path, self._trial_sets(i, name))
        except UserError as exc:
            raise TrialFailed(str(exc).splitlines()[0]) from None
        a, b = flat_keys(saved.to_dict()), flat_keys(expected.to_dict())
        diff = [k for k in sorted(set(a) | set(b)) if k not in RESERVED_KEYS and a.get(k) != b.get(k)]
        if diff:
            k = diff[0]
            raise TrialFailed(f"{run} holds a finished run of another recipe ({k}: {a.get(k)!r} there, "
                              f"{b.get(k)!r} here); delete it, or sweep under another name with --set output.name=NEW")
        return summary

    def _record(self, trial, i: int, summary: dict, reused: bool) -> float:
        val = summary.get("val_acc")
        if not isinstance(val, (int, float)) or not math.isfinite(val):
            raise TrialFailed(f"the run's summary has no finite val_acc ({val!r}); see {self.logs}/"
                              f"{self.grid.name(i)}.log")
        keep = {k: summary.get(k) for k in ("val_acc", "test_top1", "test_top5", "best_epoch", "seconds", "run_dir")}
        trial.set_user_attr("summary", keep)
        trial.set_user_attr("reused", reused)
        return float(val)

    # ------------------------------------------------------------------ reports
    def _row(self, p: _Point) -> dict:
        i = p.index
        row = {"index": i, "trial": self.grid.name(i), "overrides": self.grid.overrides(i),
               "params": {k: _display_value(v) for k, v in self.grid.params(i).items()}, "state": p.state,
               "val_acc": None, "test_top1": None, "test_top5": None, "best_epoch": None, "seconds": None,
               "error": None, "run_dir": str(self.sweep_dir / self.grid.name(i)), "optuna_trial": None}
        t = p.complete or p.failed
        if p.complete is not None:
            s = t.user_attrs.get("summary") or {}
            row.update({k: s.get(k) for k in ("test_top1", "test_top5", "best_epoch", "seconds")})
            row["val_acc"] = t.value if t.value is not None else s.get("val_acc")
            row["run_dir"] = s.get("run_dir") or row["run_dir"]
        elif t is not None:
            row["error"] = t.user_attrs.get("error")
        if t is not None:
            row["optuna_trial"] = t.number
        return row

    def report(self, plot: bool = True) -> dict:
        """Write ``sweep.csv``, ``sweep.json`` (and with ``plot`` ``sweep.png``) from the study's current state.

        Returns:
            ``{"study", "storage", "sweep_dir", "recipe", "sets", "grid", "grid_points", "counts", "best", "rows",
            "outputs", "selection"}``; ``rows`` has one row per grid point (cross-product order) with ``trial``,
            ``overrides``, ``params``, ``state`` (COMPLETE / FAIL / RUNNING / PENDING), ``val_acc``, ``test_top1``,
            ``test_top5``, ``best_epoch``, ``seconds``, ``error``, ``run_dir``; ``best`` is the COMPLETE row with the
            highest ``val_acc`` (ties: the lowest grid index), or None.
        """
        from vptool.engine.runstate import dumps_strict
        from vptool.paths import write_csv_atomically, write_text_atomically

        rows = [self._row(p) for p in self._points(self._trials())]
        best = best_row(rows)
        counts = {s: sum(1 for r in rows if r["state"] == s) for s in ("COMPLETE", "FAIL", "RUNNING", "PENDING")}
        data = {"study": self.study_name, "storage": self.shown_url, "sweep_dir": str(self.sweep_dir),
                "recipe": str(self.recipe_path), "sets": self.sets, "grid": self.grid.search_space(),
                "grid_points": len(self.grid), "counts": counts, "best": best, "rows": rows,
                "outputs": dict(self.outputs),
                "selection": "highest val_acc on the validation split (VPT §4.1); test accuracy is only reported"}

        def cell(v):
            if v is None:
                return ""
            if isinstance(v, float):
                return f"{v:.4f}"
            return v

        write_csv_atomically(self.outputs["csv"], CSV_COLUMNS,
                             [[cell(" ".join(r["overrides"]) if c == "overrides" else r[c]) for c in CSV_COLUMNS]
                              for r in rows])
        write_text_atomically(self.outputs["json"], dumps_strict(data, indent=2) + "\n")
        if plot:
            from vptool.analysis.plots import save

            save(sweep_figure(self.grid, rows, best), self.outputs["png"])
        return data


def best_row(rows: list[dict]) -> dict | None:
    """The selected grid point: selection is on the validation split only (VPT §4.1, as the official
    ``tune_fgvc.py`` picks lr and weight decay); ``test_top1`` is never looked at.

    Args:
        rows: report rows (``index``, ``state``, ``val_acc``, ...).

    Returns:
        The COMPLETE row with the highest ``val_acc`` (ties: the lowest grid index), or None if none completed.
    """
    done = [r for r in rows if r["state"] == "COMPLETE" and isinstance(r["val_acc"], (int, float))]
    return max(done, key=lambda r: (r["val_acc"], -r["index"])) if done else None


def sweep_figure(grid: Grid, rows: list[dict], best: dict | None):
    """val_acc per grid point: a heatmap for a two-key grid (first key down, second across), else bars; the best
    point is outlined (heatmap) or red (bars), points without a result are labelled with their state.

    Args:
        grid: the sweep's grid.
        rows: one report row per grid point, in grid order.
        best: the selected row (``best_row``) or None.

    Returns:
        A matplotlib Figure on the Agg canvas (``vptool.analysis.plots.save`` writes it).
    """
    if len(grid.keys) == 2:
        return _heatmap_figure(grid, rows, best)
    return _bar_figure(grid, rows, best)


_FIGURE_TITLE = "val_acc (%) per grid point; best selected on val (VPT §4.1)"


def _heatmap_figure(grid: Grid, rows: list[dict], best: dict | None):
    """``sweep_figure`` for a two-key grid: val_acc as a heatmap, the best point outlined in red."""
    import numpy as np

    from vptool.analysis.plots import figure

    title = _FIGURE_TITLE
    n0, n1 = len(grid.values[0]), len(grid.values[1])
    acc = np.full((n0, n1), np.nan)
    for r in rows:
        a, b = divmod(r["index"], n1)
        if r["val_acc"] is not None:
            acc[a, b] = r["val_acc"]
    fig, ax = figure(max(6.0, 1.2 * n1 + 2.4), max(3.8, 0.8 * n0 + 1.8))
    im = ax.imshow(np.ma.masked_invalid(acc), cmap="viridis", aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="val_acc (%)")
    ax.set_xticks(range(n1), [str(_display_value(v)) for v in grid.values[1]])
    ax.set_yticks(range(n0), [str(_display_value(v)) for v in grid.values[0]])
    ax.set(xlabel=grid.keys[1], ylabel=grid.keys[0])
    ax.set_title(title, fontsize="medium")
    finite = acc[np.isfinite(acc)]
    mid = float(finite.mean()) if finite.size else 0.0
    for r in rows:
        a, b = divmod(r["index"], n1)
        text = f"{r['val_acc']:.1f}" if r["val_acc"] is not None else r["state"]
        ax.text(b, a, text, ha="center", va="center", fontsize="small",
                color="white" if r["val_acc"] is not None and r["val_acc"] < mid else "black")
    if best is not None:
        a, b = divmod(best["index"], n1)
        from matplotlib.patches import Rectangle

        ax.add_patch(Rectangle((b - 0.5, a - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    return fig


def _bar_figure(grid: Grid, rows: list[dict], best: dict | None):
    """``sweep_figure`` for one key (or more than two): val_acc as bars, the best one red."""
    from vptool.analysis.plots import figure

    title = _FIGURE_TITLE
    labels = ([str(_display_value(v)) for v in grid.values[0]] if len(grid.keys) == 1
              else [r["trial"] for r in rows])
    fig, ax = figure(max(6.4, 0.5 * len(rows) + 2), 4.4)
    heights = [r["val_acc"] if r["val_acc"] is not None else 0.0 for r in rows]
    colors = ["tab:red" if best is not None and r["index"] == best["index"] else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), heights, color=colors)
    upright = len(grid.keys) == 1 and len(rows) <= 8
    top = max(heights) * 1.08 if max(heights) > 0 else 100.0
    ax.set_ylim(0, top)
    for x, r in enumerate(rows):
        if r["val_acc"] is None:
            ax.text(x, 0.02 * top, r["state"], ha="center", va="bottom", fontsize="x-small",
                    rotation=0 if upright else 90, clip_on=True)
    ax.set_xticks(range(len(rows)), labels, rotation=0 if upright else 90, fontsize="small")
    ax.set(ylabel="val_acc (%)", xlabel=grid.keys[0] if len(grid.keys) == 1 else "trial")
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, axis="y")
    return fig


def check_grid_values(recipe_path: str | Path, grid: Grid, sets: list[str]) -> None:
    """Validate every grid value, and every grid point, against the recipe schema before any trial starts.

    Each value is checked with the recipe and ``sets`` alone (``--grid train.lr=abc: ...``), then each point whose
    values all passed is checked whole, for the rules that join keys (``--grid point 001-lr0.5-warmup_epochs9:
    ...``).

    Raises:
        RecipeError: one line per problem (each distinct problem once), naming the key and the value.
    """
    import copy

    from vptool.errors import RecipeError
    from vptool.recipe import parse_overrides, read_yaml, resolve

    raw = read_yaml(recipe_path)  # read once; each check resolves a copy

    def problems(overrides: list[str]) -> list[str]:
        try:
            resolve(copy.deepcopy(raw), parse_overrides([*sets, *overrides]), source=str(recipe_path))
        except RecipeError as exc:
            return list(exc.problems)
        except UserError as exc:
            return [str(exc).splitlines()[0] if str(exc) else type(exc).__name__]
        return []

    found: list[str] = []
    for key, values in zip(grid.keys, grid.values):
        for v in values:
            found += [f"--grid {key}={v}: {line}" for line in problems([f"{key}={v}"])]
    if not found:
        for i in range(len(grid)):
            for line in problems(grid.overrides(i)):
                found.append(f"--grid point {grid.name(i)}: {line}")
    unique = list(dict.fromkeys(found))
    if unique:
        raise RecipeError(unique[:20] + ([f"... and {len(unique) - 20} more"] if len(unique) > 20 else []))


def _refuse_inputs(recipe_path: str | Path, recipe, sweep_dir: Path) -> None:
    """The sweep directory (and every trial run in it) may not be, contain or lie inside the recipe or what it
    reads.

    Raises:
        UserError: one line naming both paths (``paths.refuse_inputs``).
    """
    from vptool.paths import Read, recipe_reads, refuse_inputs

    refuse_inputs("output.dir/output.name", sweep_dir, [Read("recipe", recipe_path), *recipe_reads(recipe)])


def _refuse_storage(grid: Grid, sweep_dir: Path, storage) -> None:
    """A ``--storage`` SQLite file (``storage``: the parsed URL) may not be one of the sweep's outputs: its reports,
    ``logs/``, its lock or a trial's run.

    Raises:
        UserError: one line naming both paths (``paths.refuse_inputs``).
    """
    from vptool.paths import Read, refuse_inputs

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
    from sqlalchemy.engine import make_url

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
    from vptool.recipe import load_recipe

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


def json_result(report: dict) -> dict:
    """The ``--json`` object of ``vptool sweep``.

    Args:
        report: ``Sweep.report()``'s result.

    Returns:
        The best row (its fields None when no trial completed) plus ``sweep_dir``, ``csv``, ``json``, ``png``,
        ``study``, ``storage``, ``grid_points`` and ``counts`` (grid points per state).
    """
    best = report["best"] or {k: None for k in ("index", "trial", "overrides", "params", "state", "val_acc",
                                                 "test_top1", "test_top5", "best_epoch", "seconds", "error",
                                                 "run_dir", "optuna_trial")}
    return {**best, "sweep_dir": report["sweep_dir"], **report["outputs"], "study": report["study"],
            "storage": report["storage"], "grid_points": report["grid_points"], "counts": report["counts"]}


def format_table(report: dict) -> str:
    """The plain-text result of ``vptool sweep``.

    Args:
        report: ``Sweep.report()``'s result.

    Returns:
        A table (one line per grid point: val_acc, test_top1, seconds, state, error), the best line and the
        report files.
    """
    rows = report["rows"]
    w = max([len("trial")] + [len(r["trial"]) for r in rows])

    def num(v, spec=".2f"):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    lines = [f"{'trial':<{w}}  {'val_acc':>8}  {'test_top1':>9}  {'seconds':>8}  state     error"]
    for r in rows:
        lines.append(f"{r['trial']:<{w}}  {num(r['val_acc']):>8}  {num(r['test_top1']):>9}  "
                     f"{num(r['seconds'], '.1f'):>8}  {r['state']:<8}  {(r['error'] or '')[:100]}")
    b = report["best"]
    if b is None:
        lines.append("best: none (no trial completed)")
    else:
        lines.append(f"best (highest val_acc, VPT §4.1): {b['trial']} ({' '.join(b['overrides'])}): val "
                     f"{b['val_acc']:.2f}%, test top-1 {num(b['test_top1'])}%  -> {b['run_dir']}")
    lines.append("-> " + ", ".join(report["outputs"].values()))
    return "\n".join(lines)
