"""``train``: a recipe in, a run directory out (the entry point of ``vptool train``).

``train`` decides where the run writes (``vptool.engine.runplan``, under the run's lock), prepares the model and
data (``vptool.engine.setup``), writes the start of the run directory and hands over to the training loop
(``vptool.engine.loop``, with the schedule and data order of ``vptool.engine.schedule``); an ``--overwrite`` run
is swapped in when it has finished (``vptool.engine.runstate``). Its former helpers stay importable from here.

Run directory contract (stable; other tools read it):

- ``recipe.yaml``: the fully resolved recipe (every default filled in).
- ``metrics.jsonl``: one JSON object per epoch: ``epoch`` (1-based), ``lr`` (at the epoch's last step),
  ``train_loss`` (mean cross-entropy over the epoch's images), ``train_acc``, ``val_acc`` (percent), ``seconds``.
- ``summary.json``: ``best_epoch``, ``val_acc``, ``test_top1``, ``test_top5`` (percent, best-validation adapter),
  ``trainable_params``, ``total_params``, ``backbone_params`` (the pretrained backbone's own tensors, trained or
  not: the unit of ``vptool table``'s "Total params"), ``seconds``, ``vptool_version``, ``backbone`` (name,
  checkpoint, sha256); for gated prompts ``gates`` and ``selection_ratio`` (GateVPT eq. 10-11), with a learnable
  temperature ``temperature`` (L values), with a [MASK] token ``mask_token``: ``pretrained`` or ``learned``; under
  torchrun ``world_size`` (the processes; ``vptool.engine.dist``: only rank 0 writes any of these files).
- ``adapter.safetensors`` + ``adapter_config.json``: the best-validation trainable tensors (never the frozen
  backbone) and the config that rebuilds the model without the dataset (``vptool.adapter``; ``vptool.load``).
- ``prompt_init.safetensors``: with an SPT strategy as ``prompt.init``, the prompts the run started from
  (init-prompts format, reusable with ``prompt.init: file``).
- ``checkpoints/last.pt``: what ``--resume`` continues from (``torch.load(weights_only=True)``): ``epoch``
  (completed), ``step`` (optimizer steps into the next epoch), the adapter, optimizer, scheduler, every RNG state
  (torch, CUDA, Python, NumPy; under torchrun also ``rng_ranks``, every rank's), the epoch's running
  loss/accuracy, the metrics records, and the best-so-far (epoch, val_acc, and its adapter unless it is the
  current one). Written atomically at each epoch's end, every
  ``output.save_every_steps`` steps, and when SIGINT/SIGTERM stops the run.
- ``prompt_history/epoch_EEEE.safetensors`` with ``output.save_prompt_history: true``: the tensors that shape the
  prompt representations (``prompts.*``, ``gates.logit``, ``temperature``, a learned ``mask_token``) before
  training (epoch 0) and after each epoch, read by ``vptool probe-nmi --history``.
- ``tensorboard/`` (``log.tensorboard: true``): TensorBoard event files, one scalar per ``metrics.jsonl`` number per
  epoch (step = epoch; a resumed run writes a new file from epoch 1: readers keep the last value per step);
  ``mlflow_run_id`` (``log.mlflow``): the MLflow run a resumed run continues (``vptool.engine.loggers``).
- ``.feature_cache/`` only while a head-only run trains on cached features too big for memory
  (``vptool.engine.features``): removed when training ends, and by the next attempt after a kill.
- ``.image_cache/`` only while a file dataset's decoded train and val images (``data.cache: auto``) are too big
  for memory (``vptool.engine.images``): removed when training ends; the next attempt after a kill reuses a
  split's folder whose key (images, their sizes and mtimes, the transform) matches and removes the rest.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import torch.nn.functional as F  # noqa: F401  (tests patch train.F.cross_entropy; the loss is in engine.loop)

from vptool.engine import dist
from vptool.engine.init_prompts import write_prompt_file
from vptool.engine.loop import fit
from vptool.engine.runplan import (  # noqa: F401  (re-exported: train was their home)
    Plan,
    check_run_inputs,
    plan_run,
    recipe_changes,
    run_path,
)
from vptool.engine.runstate import RunLock, StopSignals, recover_swap, swap_in
from vptool.engine.runtime import resolve_device
from vptool.engine.schedule import (  # noqa: F401  (re-exported: train was their home)
    TrainSampler,
    WeightedSplit,
    effective_lr,
    lr_factor,
    make_optimizer,
)
from vptool.engine.setup import Setup, prepare
from vptool.errors import UserError
from vptool.paths import write_text_atomically
from vptool.progress import Progress
from vptool.recipe import Recipe, dump_recipe

#: the progress hooks train reports to (``vptool.progress.Progress``; the former name, kept: tests subclass it)
Observer = Progress


def train(recipe: Recipe, overwrite: bool = False, observer: Observer | None = None,
          setup: Setup | None = None, resume: bool = False, resume_command: str | None = None,
          recipe_file: str | Path | None = None) -> dict:
    """Train a recipe and write its run directory; returns the summary.

    Run-directory safety (``vptool.engine.runstate``): an exclusive lock for the run, atomic files, ``--overwrite``
    into a sibling folder swapped in only when the new run finished, ``resume`` from ``checkpoints/last.pt``
    (adapter, optimizer, scheduler, epoch and step, best-so-far, every RNG state: on CPU a resumed run's files
    are bitwise those of an uninterrupted one), SIGINT/SIGTERM stop after the current step with a checkpoint.

    Args:
        resume: continue the run's checkpoint (see ``plan_run`` for what may differ from its recipe).
        resume_command: the command the stop message tells the user to run (default ``vptool train RUN --resume``).
        recipe_file: the YAML file the recipe was read from: the run directory may not be, contain or lie inside
            it (nor the recipe's backbone checkpoint, prompt file or dataset folder; ``paths.refuse_inputs``).

    Raises:
        UserError: bad input (exit 2), found before anything is written when it is in the recipe or on disk; a run
            directory that is, contains or lies inside one of the run's inputs.
        RunError: the run failed (exit 1): a non-finite loss, gradient or parameter, with the epoch, step and lr.
        Interrupted: SIGINT/SIGTERM (exit 130/143), after writing ``checkpoints/last.pt``.
    """
    t_start = time.time()
    final = run_path(recipe)
    check_run_inputs(final, recipe, recipe_file, resume)
    device = setup.device if setup is not None else dist.device_for(resolve_device(recipe.train.device))
    _check_batch_divides(recipe.data.batch_size, dist.from_env().world)
    job = dist.init(device)
    obs = (observer or Observer()) if job.main else Observer.silent()
    with contextlib.ExitStack() as held:

        def decide() -> Plan:  # rank 0 alone holds the lock and reads the disk; every rank gets its plan
            held.enter_context(RunLock(final))
            recover_swap(final)
            return plan_run(final, recipe, overwrite, resume)

        plan = dist.shared_decision(decide, "planning the run")
        if plan.done is not None:
            obs.note(f"{final} finished already ({recipe.train.epochs} epochs); nothing to resume (extend it with "
                     "--set train.epochs=N)")
            return plan.done
        setup = _setup_for(plan, recipe, setup, device, obs)
        _start_run_dir(plan, recipe, setup, job.main, obs)
        command = resume_command or f"vptool train {final} --resume"
        with StopSignals() as stop:
            summary = fit(recipe, setup, plan.work, final, obs, t_start, plan.checkpoint, stop, command, job, held)
        if plan.work != final and job.main:
            swap_in(plan.work, final)
        return summary


def _check_batch_divides(B: int, W: int) -> None:
    """Refuse a global batch of ``B`` images that ``W`` processes cannot share evenly (every rank alike, before
    the rendezvous)."""
    if B % W:
        raise UserError(f"data.batch_size: {B} (the global batch) does not divide by the {W} processes of this "
                        f"torchrun job; use a multiple of {W}, e.g. {max(W, B - B % W)}")


def _setup_for(plan: Plan, recipe: Recipe, setup: Setup | None, device, obs: Progress) -> Setup:
    """The model and data (``setup.prepare`` unless given): every input error surfaces here, before anything is
    written; a resume skips the SPT prompt build."""
    resuming = plan.checkpoint is not None
    setup = setup or prepare(recipe, device=device, observer=obs, for_adapter=resuming)
    if resuming:  # the prompts come from last.pt; record the recipe's init
        setup.model.config = setup.model.config.replace(prompt_init=recipe.prompt.init)
    return setup


def _start_run_dir(plan: Plan, recipe: Recipe, setup: Setup, main: bool, obs: Progress) -> None:
    """Say how the run starts (extended, resumed) and, on rank 0 only, write ``recipe.yaml`` and the SPT prompts
    it started from into ``plan.work``; an extended run's ``summary.json`` becomes
    ``checkpoints/previous_summary.json``."""
    work, final = plan.work, plan.final
    if plan.extend_from is not None:
        obs.note(f"extending {final} from {plan.extend_from} to {recipe.train.epochs} epochs; the cosine "
                 f"schedule is recomputed over {recipe.train.epochs} epochs")
        if main:
            os.replace(work / "summary.json", work / "checkpoints" / "previous_summary.json")
    elif plan.checkpoint is not None:
        obs.note(f"resuming {final} after epoch {plan.checkpoint['epoch']}"
                 + (f" + {plan.checkpoint['step']} steps" if plan.checkpoint["step"] else ""))
    if main:  # only rank 0 writes the run directory
        (work / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_text_atomically(work / "recipe.yaml", dump_recipe(recipe))
        if setup.prompt_init is not None:  # the SPT prompts this run started from, for provenance and reuse
            write_prompt_file(work / "prompt_init.safetensors", *setup.prompt_init, overwrite=True)
