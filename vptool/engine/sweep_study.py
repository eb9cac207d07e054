"""The Optuna study of a ``vptool sweep``: the storage every worker shares, the study over the grid, and the
rules that hand each grid point out exactly once. Only Optuna's public API is used (``storage.get_trial_id_from_
study_id_trial_number``, ``FrozenTrial.system_attrs``, ``create_trial``), never a trial's private attributes.

The default study is a SQLite file ``<SWEEP_DIR>/study.db``. Exactly once: grid points are handed out by
``optuna.samplers.GridSampler`` over an ``RDBStorage`` with a heartbeat (a trial whose worker stopped beating is
failed and re-enqueued by ``RetryHeartbeatStaleTrialCallback``), and three more rules make every point train exactly
once whatever the timing:

- a grid point belongs to the lowest-numbered trial with its parameters that is RUNNING or finished: a
  higher-numbered duplicate never trains; it waits while the owner runs (checking for stale trials) and marks
  itself PRUNED once the point has a result, or takes over when the owner is failed as stale
  (``vptool.engine.sweep_trial``);
- a RUNNING trial whose worker ran on this machine and has exited (its pid is gone) is failed at once instead of
  after the heartbeat's grace period, and a grid point with no result and nobody on it is enqueued again
  (``SweepStudy.reap`` and ``SweepStudy.requeue``);
- the trial's run directory is the truth on a shared filesystem (``vptool.engine.sweep_trial``).

Optuna is an optional dependency (the ``sweep`` extra): it is imported only once ``require_optuna`` has said it is
there, never at the top of a module.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import itertools
import os
from pathlib import Path

from vptool.engine.sweep_grid import Grid, GridPoint, grid_points
from vptool.engine.sweep_procs import HOST_ID, pid_alive
from vptool.errors import UserError

try:
    import fcntl
except ImportError:  # not POSIX: no lock between the workers of one machine
    fcntl = None

#: Optuna heartbeat: a RUNNING trial whose worker has not beaten for GRACE_PERIOD seconds is failed and re-enqueued
HEARTBEAT_INTERVAL = 5
GRACE_PERIOD = 20
#: the study's user attribute holding the sweep's definition (grid, recipe, --set items)
STUDY_ATTR = "vptool_sweep"


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


class SweepStudy:
    """One worker's handle on the sweep's Optuna study: ``open()`` joins it (creating it), then it lists the trials
    per grid point, fails trials whose worker is gone and enqueues lost grid points again.

    Args:
        grid: the sweep's grid (the sampler's search space).
        storage_url: the SQLAlchemy URL; ``shown_url`` is it without a password, for messages.
        study_name: the study's name.
        sweep_dir: the sweep directory (holds the lock that serialises opening among this machine's workers).
        sqlite: whether the storage is SQLite (a longer busy timeout).
        say: ``f(line)`` for progress lines.
        heartbeat_interval, grace_period: the storage's heartbeat (seconds).
    """

    def __init__(self, grid: Grid, storage_url: str, shown_url: str, study_name: str, sweep_dir: Path,
                 sqlite: bool, say, heartbeat_interval: float = HEARTBEAT_INTERVAL,
                 grace_period: float = GRACE_PERIOD):
        self.grid, self.storage_url, self.shown_url, self.study_name = grid, storage_url, shown_url, study_name
        self.sweep_dir, self.sqlite, self.say = sweep_dir, sqlite, say
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.study = self.storage = None
        self.study_id: int | None = None

    # ------------------------------------------------------------------ storage
    def open(self, optuna, definition: dict) -> None:
        """Open the storage and the study (creating them), and check the study is this sweep's.

        Args:
            optuna: the ``optuna`` module (``require_optuna``).
            definition: ``{"grid": Grid.to_attr(), "sets": [...], "recipe": absolute path}``, stored in the study.

        Raises:
            UserError: the storage cannot be opened, or the study holds a sweep over another grid or other ``--set``
                items.
        """
        kwargs = {"engine_kwargs": {"connect_args": {"timeout": 60}}} if self.sqlite else {}
        retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or \
            optuna.storages.RetryFailedTrialCallback
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
            self._check_definition(definition)

    def _check_definition(self, mine: dict) -> None:
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
        if fcntl is None:
            yield
            return
        fd = os.open(str(self.sweep_dir / ".sweep.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def close(self) -> None:
        """Release the storage's database connections (nothing to do if it was never opened)."""
        if self.storage is not None:
            with contextlib.suppress(Exception):
                self.storage.remove_session()
            with contextlib.suppress(Exception):
                self.storage.engine.dispose()

    # ------------------------------------------------------------------ trials
    def trial_id(self, number: int) -> int:
        """The storage's id of the study's trial ``number`` (Optuna's public storage API)."""
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    def trials(self) -> list:
        """The study's trials (``FrozenTrial``, not copied: read only)."""
        return self.study.get_trials(deepcopy=False)

    def points(self, trials: list) -> list[GridPoint]:
        """The point table of ``trials`` (``grid_points``)."""
        return grid_points(self.grid, trials)

    def fail_stale(self, optuna) -> None:
        """Fail the study's RUNNING trials whose worker stopped beating (Optuna's heartbeat)."""
        optuna.storages.fail_stale_trials(self.study)

    def reap(self, trials: list, exclude: int | None = None) -> bool:
        """Fail RUNNING trials whose worker is known to be gone: it ran on this machine and its pid has exited,
        or it never recorded a worker long after it started. Returns whether any was failed."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        now = datetime.datetime.now()
        reaped = False
        for t in trials:
            if t.state != TrialState.RUNNING or t.number == exclude:
                continue
            reason = self._gone(t, now)
            if reason is None:
                continue
            try:
                trial_id = self.trial_id(t.number)
                self.storage.set_trial_user_attr(trial_id, "lost", reason)
                if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                    continue
            except UpdateFinishedTrialError:
                continue
            reaped = True
            name = t.user_attrs.get("trial") or f"trial {t.number}"
            self.say(f"sweep: {name}: optuna trial {t.number} failed: {reason}; the grid point will be resumed")
        return reaped

    def _gone(self, t, now: datetime.datetime) -> str | None:
        """Why RUNNING trial ``t``'s worker is known to be gone, or None when it may still be alive."""
        w = t.user_attrs.get("worker")
        if isinstance(w, dict):
            pid = w.get("pid")
            if HOST_ID is None or w.get("host") != HOST_ID or not isinstance(pid, int):
                return None
            if pid != os.getpid() and pid_alive(pid):
                return None
            return f"its worker (pid {pid}) on this machine has exited"
        started = t.datetime_start
        if started is None or (now - started).total_seconds() < max(60, 3 * self.grace_period):
            return None
        return "its worker never started it"

    def requeue(self, points: list[GridPoint]) -> None:
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
                    lost_ids = {t.system_attrs.get("grid_id") for t in self.trials()
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

    def requeue_stopped(self, trial, stopped_by: str) -> None:
        """The sweep was stopped (by signal ``stopped_by``) while ``trial`` trained: mark it, and enqueue its point
        again so that the next worker (or a rerun) resumes it."""
        from optuna.trial import TrialState, create_trial

        with contextlib.suppress(Exception):
            trial.set_user_attr("stopped", stopped_by)
            ft = self.storage.get_trial(self.trial_id(trial.number))
            system = ({k: ft.system_attrs[k] for k in ("grid_id", "search_space")}
                      if "grid_id" in ft.system_attrs and "search_space" in ft.system_attrs else {})
            system["vptool_requeued_from"] = trial.number
            self.study.add_trial(create_trial(state=TrialState.WAITING, params=dict(ft.params),
                                              distributions=dict(ft.distributions), system_attrs=system))

    # ------------------------------------------------------------------ GridSampler's numbering
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
        import numpy as np  # only on this rare path (a lost grid id): not on every worker's start

        names = sorted(self.grid.keys)
        space = self.grid.search_space()
        table = list(itertools.product(*(space[n] for n in names)))
        np.random.RandomState(0).shuffle(table)
        for t in self.trials():
            gid = t.system_attrs.get("grid_id")
            if isinstance(gid, int) and all(n in t.params for n in names) and \
                    (not 0 <= gid < len(table) or table[gid] != tuple(t.params[n] for n in names)):
                return None
        return table
