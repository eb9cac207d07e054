"""One trial of a ``vptool sweep``: the Optuna objective that claims a grid point and trains, resumes or reads it,
one ``vptool train`` subprocess in the point's run directory.

Grid point ``i`` trains in ``<SWEEP_DIR>/<TRIAL>/`` (``Grid.name``); its ``recipe.yaml`` records its overrides
(``vptool train`` writes the resolved recipe). The objective is the trial's ``val_acc`` (the best validation accuracy
of the run, ``summary.json``).

A grid point belongs to the lowest-numbered trial with its parameters that is RUNNING or finished: a higher-numbered
duplicate never trains; it waits while the owner runs (checking for stale trials) and marks itself PRUNED once the
point has a result, or takes over when the owner is failed as stale.

The trial's run directory is the truth on a shared filesystem: a finished one (``summary.json``) is never retrained
(its summary is read, after checking its recipe is this trial's), an unfinished one (killed) is continued with
``vptool train --resume``, and ``vptool train``'s exclusive lock on the run means two processes never train it at
once (a trial that finds it locked waits for the holder).

A trial whose ``vptool train`` still fails (exit 1: the run failed, e.g. a non-finite loss; exit 2: an input found
bad only when the trial starts) is recorded as FAIL with its error line, and the sweep goes on. Failed trials are
final: a rerun does not retry them (start a new study with ``--study NEW`` to try again). A train killed by a signal
the sweep did not send is retried, up to ``MAX_KILLED`` times.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from vptool.engine.sweep_grid import RESERVED_KEYS, Grid, GridPoint, yaml_str
from vptool.engine.sweep_procs import (
    HOST_ID,
    SweepStopped,
    TrialFailed,
    TrialKilled,
    TrialProcesses,
    clear_empty_run,
    signame,
)
from vptool.engine.sweep_study import SweepStudy
from vptool.errors import UserError
from vptool.recipe import flat_keys, load_recipe, read_yaml, resolve_saved

#: a grid point whose ``vptool train`` is killed by a signal the sweep did not send this many times fails for good
MAX_KILLED = 3


class TrialRunner:
    """Runs the sweep's Optuna trials: ``objective`` is what ``study.optimize`` calls.

    Args:
        recipe_path: the recipe every trial trains.
        grid: the sweep's grid.
        sets: ``--set`` items applied to every trial before the grid values.
        sweep_dir: the sweep directory (a run directory per grid point, ``logs/``).
        trial_command: the argv prefix that runs ``train ...``.
        store: the opened study.
        procs: the worker's stop signals and train child.
        say: ``f(line)`` for progress lines.
    """

    def __init__(self, recipe_path: Path, grid: Grid, sets: list[str], sweep_dir: Path, trial_command: list[str],
                 store: SweepStudy, procs: TrialProcesses, say):
        self.recipe_path, self.grid, self.sets, self.sweep_dir = recipe_path, grid, sets, sweep_dir
        self.trial_command, self.store, self.procs, self.say = trial_command, store, procs, say
        self.logs = sweep_dir / "logs"

    def objective(self, trial) -> float:
        """Claim the trial's grid point and train it (or wait for its owner); returns its ``val_acc``.

        Raises:
            optuna.TrialPruned: the grid point has a result already (the trial is a duplicate).
            TrialFailed: the train failed (its error line, recorded in the trial's ``error``).
            TrialKilled: the train was killed by a signal the sweep did not send.
            SweepStopped: the sweep was stopped by a signal.
        """
        import optuna

        trial.set_user_attr("worker", {"host": HOST_ID, "pid": os.getpid()})
        # the parameters first (a trial stopped before it has them would hide its grid point from the sweep)
        params = {k: trial.suggest_categorical(k, list(v)) for k, v in zip(self.grid.keys, self.grid.values)}
        i = self.grid.index(params)
        name = self.grid.name(i)
        trial.set_user_attr("trial", name)
        my_gid = self.store.storage.get_trial(self.store.trial_id(trial.number)).system_attrs.get("grid_id")
        said: set[str] = set()
        retries = 0
        while True:
            self.procs.check_stop()
            point = self._point(trial, i, params, my_gid)
            result = point.complete or point.failed
            if result is not None:
                trial.set_user_attr("skipped", f"grid point has a result already (optuna trial {result.number})")
                raise optuna.TrialPruned(f"{name}: done by optuna trial {result.number}")
            owner = min((t for t in point.running if t.number < trial.number), key=lambda t: t.number, default=None)
            if owner is not None:
                self._say_once(said, "owner", f"{name}: optuna trial {owner.number} is training it; waiting")
                self.procs.sleep()
                self.store.fail_stale(optuna)
                continue
            try:
                outcome, payload = self._train_point(trial, i, name, point)
            except TrialFailed as exc:
                self._record_failure(trial, name, str(exc))
                raise
            if outcome == "done":
                return payload
            if outcome == "locked":
                self._say_once(said, "locked", f"{name}: its run directory is locked by another vptool train; waiting")
                self.procs.sleep()
                continue
            retries += 1  # "retry": the run directory changed under us (another process finished or started it)
            if retries > 3:
                self._record_failure(trial, name, str(payload))
                raise TrialFailed(payload)

    def _point(self, trial, i: int, params: dict, my_gid) -> GridPoint:
        """Grid point ``i`` as the study has it now, without ``trial`` (after failing trials whose worker is gone)."""
        trials = self.store.trials()
        if self.store.reap(trials, exclude=trial.number):
            trials = self.store.trials()
        return GridPoint(i, [t for t in trials if t.number != trial.number and self._same_point(t, params, my_gid)])

    def _say_once(self, said: set[str], key: str, line: str) -> None:
        if key not in said:
            self.say(line)
            said.add(key)

    def _record_failure(self, trial, name: str, error: str) -> None:
        trial.set_user_attr("error", error)
        trial.set_user_attr("log", str(self.logs / f"{name}.log"))

    def _same_point(self, t, params: dict, my_gid) -> bool:
        if all(k in t.params for k in self.grid.keys):
            return all(t.params[k] == params[k] for k in self.grid.keys)
        # a trial just created, its parameters not set yet: the grid id the sampler gave it tells
        return my_gid is not None and t.state.name == "RUNNING" and t.system_attrs.get("grid_id") == my_gid

    def trial_sets(self, i: int, name: str) -> list[str]:
        """The ``--set`` items of grid point ``i``: the sweep's, the point's, and its run directory."""
        return [*self.sets, *self.grid.overrides(i), f"output.dir={yaml_str(str(self.sweep_dir))}",
                f"output.name={yaml_str(name)}"]

    def _train_point(self, trial, i: int, name: str, point: GridPoint) -> tuple[str, object]:
        """Train (or read, or resume) grid point ``i`` in its run directory.

        Returns ``("done", val_acc)``, ``("locked", line)`` (another process holds the run's lock) or
        ``("retry", line)`` (the directory changed between the look and the train).

        Raises:
            TrialFailed: the train failed (its error line), or the directory holds something else.
            TrialKilled: the train process was killed by a signal the sweep did not send.
            SweepStopped: the sweep was stopped by a signal (the trial is enqueued again).
        """
        from vptool.engine.runstate import inspect_run  # imports torch: only once a trial runs

        run = self.sweep_dir / name
        status = inspect_run(run).status
        if status == "finished":
            summary = self._finished_summary(run, i, name)
            self.say(f"{name}: finished already; reading {run / 'summary.json'}")
            return "done", self._record(trial, i, summary, reused=True)
        if status == "foreign":
            clear_empty_run(run)
        resume = status == "unfinished"
        self.say(f"{name}: {'resuming' if resume else 'training'} ({' '.join(self.grid.overrides(i))}; optuna trial "
                 f"{trial.number}, worker pid {os.getpid()})")
        log = self.logs / f"{name}.log"
        rc, out, err_line = self.procs.spawn(self._train_argv(i, name, resume), log, f"optuna trial {trial.number}")
        if rc == 0:  # (also when a stop signal came too late to stop it: its result counts)
            summary = parse_summary(out, run)
            if summary is None:
                raise TrialFailed(f"vptool train exited 0 but {run / 'summary.json'} is missing or unreadable; see "
                                  f"{log}")
            return "done", self._record(trial, i, summary, reused=False)
        if self.procs.stop is not None:
            self.store.requeue_stopped(trial, signame(self.procs.stop))
            raise SweepStopped(f"sweep stopped by {signame(self.procs.stop)}: {name} stopped after writing its "
                               f"checkpoint ({run}); rerun the same command to continue the sweep", self.procs.stop)
        if rc == 2 and err_line and "locked by another vptool train" in err_line:
            return "locked", err_line
        if rc == 2 and inspect_run(run).status != status:
            return "retry", err_line or f"vptool train exited 2; see {log}"
        if rc < 0 or rc in (130, 143):
            self._killed(trial, name, point, signame(-rc if rc < 0 else rc - 128), log)
        raise TrialFailed(err_line or f"vptool train exited {rc} without an error line; see {log}")

    def _killed(self, trial, name: str, point: GridPoint, sig: str, log: Path) -> None:
        """The train was killed by signal ``sig`` that the sweep did not send: raise ``TrialKilled`` (retried), or
        ``TrialFailed`` after ``MAX_KILLED`` kills."""
        trial.set_user_attr("killed", sig)
        if point.killed + 1 >= MAX_KILLED:
            raise TrialFailed(f"vptool train was killed by {sig} {point.killed + 1} times (out of memory?); "
                              f"see {log}")
        self.say(f"{name}: vptool train was killed by {sig}; the grid point will be resumed")
        raise TrialKilled(sig)

    def _train_argv(self, i: int, name: str, resume: bool) -> list[str]:
        """The ``vptool train`` command line of grid point ``i`` (``--json``; ``--resume`` to continue its run)."""
        argv = [*self.trial_command, "train", str(self.recipe_path)]
        for item in self.trial_sets(i, name):
            argv += ["--set", item]
        argv.append("--json")
        if resume:
            argv.append("--resume")
        return argv

    def _finished_summary(self, run: Path, i: int, name: str) -> dict:
        """The summary of a finished run directory, after checking it was trained with this trial's recipe."""
        from vptool.engine.runstate import read_json  # imports torch: only once a trial runs

        try:
            summary = read_json(run / "summary.json")
            saved = resolve_saved(read_yaml(run / "recipe.yaml"), source=str(run / "recipe.yaml"))
            expected = load_recipe(self.recipe_path, self.trial_sets(i, name))
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


def parse_summary(out: str, run: Path) -> dict | None:
    """A train's summary: the last JSON line of its stdout (``--json``) holding ``val_acc``, else the run's
    ``summary.json``; None when neither reads."""
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
