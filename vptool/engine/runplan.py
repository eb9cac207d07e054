"""Where a train call writes, decided from what is on disk before anything is written.

``run_path`` names the run directory (``<output.dir>/<output.name>``); ``check_run_inputs`` refuses one that is,
contains or lies inside what the run reads; ``plan_run`` (called under the run's lock, ``runstate.RunLock``)
decides whether the run starts, replaces a finished run (``--overwrite``) or continues one (``--resume``), and
refuses what would lose or mix runs; ``recipe_changes`` lists what a resumed recipe changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from vptool.engine.runstate import RunState, failed_start, inspect_run, load_checkpoint, overwrite_dir, read_json
from vptool.errors import UserError
from vptool.paths import Read, recipe_reads, refuse_inputs
from vptool.recipe import Recipe, flat_keys, read_yaml, resolve_saved


def run_path(recipe: Recipe) -> Path:
    """``<output.dir>/<output.name>``.

    Raises:
        UserError: ``output.dir`` (or a folder above it) is a file.
    """
    parent = Path(recipe.output.dir)
    probe = parent
    while True:
        if probe.exists():
            if not probe.is_dir():
                key = "output.dir" if probe == parent else f"output.dir ({probe})"
                raise UserError(f"{key}: {probe} is a file, not a folder; set output.dir to a folder")
            break
        if probe.parent == probe:
            break
        probe = probe.parent
    return parent / recipe.output.name


def check_run_inputs(final: Path, recipe: Recipe, recipe_file: str | Path | None = None, resume: bool = False) -> None:
    """Refuse a run directory ``final`` that is, contains or lies inside what the run reads: the recipe file (except
    a resumed run's own ``recipe.yaml``), ``backbone.checkpoint``, ``prompt.init_file``, ``data.root``.

    Raises:
        UserError: one line naming ``output.dir/output.name``, the run directory and the input.
    """
    reads = recipe_reads(recipe)
    if recipe_file is not None:
        own = Path(final) / "recipe.yaml"
        if not (resume and Path(recipe_file).resolve() == own.resolve()):
            reads.append(Read("recipe", recipe_file))
    refuse_inputs("output.dir/output.name", final, reads)


_RESUME_FREE = {"train.epochs", "train.feature_cache", "data.num_workers", "output.save_every_steps", "output.dir",
                "output.name", "log.tensorboard", "log.mlflow", "log.mlflow_experiment",
                "train.compile", "train.activation_checkpointing"}  # how it runs, not what it computes


#: keys whose ``auto`` is resolved into recipe.yaml when the run starts (``setup.resolve_auto``)
_RESOLVED_AUTO = {"readout.pool", "readout.norm", "prompt.init_transform"}


def recipe_changes(saved: Recipe, new: Recipe) -> list[tuple[str, object, object]]:
    """``[(key, saved value, new value)]`` for the keys that differ, except those a resume may change
    (``train.epochs``, ``output.save_every_steps``, and ``output.dir``/``output.name``, which locate the run).
    ``auto`` in the new recipe matches the value it was resolved to in the saved one (the original YAML recipe
    resumes its own run)."""
    a, b = flat_keys(saved.to_dict()), flat_keys(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in _RESUME_FREE and a.get(k) != b.get(k) and not (k in _RESOLVED_AUTO and b.get(k) == "auto")]


class Plan:
    """Where a train call writes (``work``), whether it resumes (``checkpoint``), and what it says first."""

    def __init__(self, work: Path, final: Path, resume: bool = False, checkpoint: dict | None = None,
                 done: dict | None = None, extend_from: int | None = None):
        self.work, self.final, self.resume, self.checkpoint = work, final, resume, checkpoint
        self.done, self.extend_from = done, extend_from


def plan_run(final: Path, recipe: Recipe, overwrite: bool, resume: bool) -> Plan:
    """Decide, from what is on disk, where this train writes; refuse what would lose or mix runs.

    - no run: train into it (``--resume``: refused, nothing to resume);
    - a finished run: refused; ``--overwrite`` trains into ``.<name>.overwrite`` and swaps it in at the end;
      ``--resume`` with a larger ``train.epochs`` extends it, with the same returns its summary;
    - an unfinished run (killed, failed, stopped): refused naming ``--resume`` and ``--overwrite``, unless it
      stopped before anything finished (``runstate.failed_start``: a bad image, a full disk): then it starts over;
    - ``--overwrite --resume``: continues an interrupted replacement in ``.<name>.overwrite``.
    Call it under the run's lock (it removes a stale ``.<name>.overwrite``).

    Raises:
        UserError: one line naming the run and the ways out.
    """
    st = inspect_run(final)
    if st.status == "absent":
        if resume:
            raise UserError(f"--resume: {final} does not exist; drop --resume to start the run")
        return Plan(final, final)
    if not resume:
        return _start_plan(final, st, overwrite)
    return _resume_plan(_resume_dir(final, st, overwrite), final, recipe)


def _refuse_foreign(final: Path, st: RunState) -> None:
    if st.status == "foreign":
        raise UserError(f"{final} already exists and is not a vptool run directory (no recipe.yaml); delete it, "
                        "choose another name with --set output.name=NEW, or pass --overwrite")


def _start_plan(final: Path, st: RunState, overwrite: bool) -> Plan:
    """A run that starts from scratch where ``final`` exists: its replacement (``overwrite``), or ``final``
    itself when it stopped before anything finished; else the UserError that names the ways out."""
    if overwrite:
        tmp = overwrite_dir(final)
        if tmp.exists():
            shutil.rmtree(tmp)  # a replacement that never finished; the lock says nobody is using it
        return Plan(tmp, final)
    _refuse_foreign(final, st)
    if st.status == "unfinished" and failed_start(final):
        shutil.rmtree(final)  # it stopped before its first finished epoch: nothing to keep, start it over
        return Plan(final, final)
    if st.status == "finished":
        raise UserError(f"{final} already exists (a finished run); choose another name with --set "
                        "output.name=NEW, or replace it with --overwrite (the old run stays until the new "
                        "one finishes)")
    raise UserError(f"{final} exists and has not finished ({st.describe()}); continue it with --resume, "
                    "replace it with --overwrite, or choose another name with --set output.name=NEW")


def _resume_dir(final: Path, st: RunState, overwrite: bool) -> Path:
    """The folder ``--resume`` continues: ``final``, or with ``overwrite`` its interrupted replacement."""
    if not overwrite:
        _refuse_foreign(final, st)
        return final
    tmp = overwrite_dir(final)
    if inspect_run(tmp).status != "unfinished":
        raise UserError(f"--resume --overwrite: no interrupted replacement of {final} to continue ({tmp}); drop "
                        "--resume to start the replacement over")
    return tmp


def _check_saved_recipe(work: Path, recipe: Recipe) -> None:
    """Refuse a resume whose recipe differs from ``work/recipe.yaml`` in more than the keys a resume may change."""
    saved_path = work / "recipe.yaml"
    saved = resolve_saved(read_yaml(saved_path), source=str(saved_path))
    changes = recipe_changes(saved, recipe)
    if changes:
        key, old, new = changes[0]
        more = f" (and {len(changes) - 1} more key(s))" if len(changes) > 1 else ""
        raise UserError(f"--resume: the recipe differs from {saved_path} in {key} ({old!r} -> {new!r}){more}; only "
                        "train.epochs may change on resume: drop the change, or start a new run with --set "
                        "output.name=NEW")


def _resume_plan(work: Path, final: Path, recipe: Recipe) -> Plan:
    """Continue the run in ``work`` from its ``checkpoints/last.pt``, extend a finished one to more epochs, or
    return a finished one's summary (``train.epochs`` unchanged)."""
    _check_saved_recipe(work, recipe)
    ckpt_path = work / "checkpoints" / "last.pt"
    ckpt = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    done_epochs = ckpt["epoch"] if ckpt else 0
    if recipe.train.epochs < done_epochs:
        raise UserError(f"train.epochs: {recipe.train.epochs} but {work} has trained {done_epochs} epochs; "
                        f"--resume needs train.epochs >= {done_epochs}")
    if recipe.train.epochs <= recipe.train.warmup_epochs:
        raise UserError(f"train.epochs: {recipe.train.epochs} must be above train.warmup_epochs")
    if (work / "summary.json").is_file():
        if ckpt is None:
            raise UserError(f"--resume: {work} finished but has no checkpoints/last.pt to extend")
        if recipe.train.epochs == done_epochs:
            return Plan(work, final, resume=True, done=read_json(work / "summary.json"))
        return Plan(work, final, resume=True, checkpoint=ckpt, extend_from=done_epochs)
    return Plan(work, final, resume=True, checkpoint=ckpt)
