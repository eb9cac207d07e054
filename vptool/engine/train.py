"""The training loop and the run directory.

Run directory contract (stable; other tools read it):

- ``recipe.yaml``: the fully resolved recipe (every default filled in).
- ``metrics.jsonl``: one JSON object per epoch: ``epoch`` (1-based), ``lr`` (at the epoch's last step),
  ``train_loss`` (mean cross-entropy over the epoch's images), ``train_acc``, ``val_acc`` (percent), ``seconds``.
- ``summary.json``: ``best_epoch``, ``val_acc``, ``test_top1``, ``test_top5`` (percent, best-validation adapter),
  ``trainable_params``, ``total_params``, ``seconds``, ``vptool_version``, ``backbone`` (name, checkpoint, sha256);
  for gated prompts ``gates`` and ``selection_ratio`` (GateVPT eq. 10-11), with a learnable temperature
  ``temperature`` (L values), with a [MASK] token ``mask_token``: ``pretrained`` or ``learned``; under torchrun
  ``world_size`` (the processes; ``vptool.engine.dist``: only rank 0 writes any of these files).
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
- ``.feature_cache/`` only while a head-only run trains on cached features too big for memory
  (``vptool.engine.features``): removed when training ends, and by the next attempt after a kill.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vptool
from vptool.adapter import CONFIG_NAME, write_config
from vptool.data import make_loader
from vptool.engine.evaluate import eval_loader, method_report, predict, topk_accuracy
from vptool.engine.setup import Setup, autocast, prepare
from vptool.errors import RunError, UserError
from vptool.paths import write_text_atomically
from vptool.progress import Progress
from vptool.prompting.model import format_parameter_summary
from vptool.recipe import Recipe, dump_recipe, flat_keys

log = logging.getLogger(__name__)


#: the progress hooks train reports to (``vptool.progress.Progress``; the former name, kept: tests subclass it)
Observer = Progress


def effective_lr(recipe: Recipe) -> float:
    """Peak learning rate: base lr, times batch_size / 256 with ``lr_scaling: linear`` (VPT §4, Goyal et al.)."""
    lr = recipe.train.lr
    if recipe.train.lr_scaling == "linear":
        lr = lr * recipe.data.batch_size / 256
    return lr


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup: (step + 1) / warmup_steps. Cosine: 0.5 (1 + cos(pi t / T)) with t = step - warmup_steps and
    T = total_steps - warmup_steps. No step trains at lr 0: warmup starts at 1/warmup_steps and the cosine's
    last step has t = T - 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t, T = step - warmup_steps, max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t / T))


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, at the peak lr."""
    t = recipe.train
    lr = effective_lr(recipe)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)


class TrainSampler(torch.utils.data.DistributedSampler):
    """The training order: torch's ``DistributedSampler(shuffle=True, seed=seed)``, a permutation of the N images
    seeded by ``seed + epoch`` of which rank r takes positions r, r + W, r + 2W, ...; it pads the permutation
    with its first images so every rank gets ceil(N / W). Two additions:

    - padding is marked: a padded position yields ``index + N`` (``WeightedSplit`` gives it weight 0), so the
      images of global step t are exactly those one process sees (permutation positions tB .. tB + B - 1);
    - ``set_epoch(epoch, start)`` skips this rank's first ``start`` positions, when a run resumes mid-epoch.

    The order depends only on (seed, epoch), never on how many epochs ran before in this process, so a resumed
    epoch sees exactly the batches the uninterrupted run saw. With one process it is a plain seeded shuffle.
    """

    def __init__(self, n: int, seed: int, world: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n, self.start = n, 0
        self.epoch = 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        W, r, n = self.num_replicas, self.rank, self.n
        out = [idx if r + i * W < n else idx + n for i, idx in enumerate(super().__iter__())]
        return iter(out[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class WeightedSplit(torch.utils.data.Dataset):
    """``(image, label, weight)``: index i < N is image i with weight 1, index N + i is image i as
    ``TrainSampler``'s padding, weight 0 (it contributes nothing to the loss, the gradient or the metrics)."""

    def __init__(self, dataset):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int):
        x, y = self.dataset[i % self.n]
        return x, y, torch.tensor(1.0 if i < self.n else 0.0)


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
    from vptool.paths import Read, recipe_reads, refuse_inputs

    reads = recipe_reads(recipe)
    if recipe_file is not None:
        own = Path(final) / "recipe.yaml"
        if not (resume and Path(recipe_file).resolve() == own.resolve()):
            reads.append(Read("recipe", recipe_file))
    refuse_inputs("output.dir/output.name", final, reads)


_RESUME_FREE = {"train.epochs", "train.feature_cache", "output.save_every_steps", "output.dir", "output.name"}


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
    from vptool.engine.runstate import failed_start, inspect_run, load_checkpoint, overwrite_dir

    st = inspect_run(final)
    if overwrite:
        if st.status == "absent":
            if resume:
                raise UserError(f"--resume: {final} does not exist; drop --resume to start the run")
            return Plan(final, final)
        tmp = overwrite_dir(final)
        if not resume:
            if tmp.exists():
                shutil.rmtree(tmp)  # a replacement that never finished; the lock says nobody is using it
            return Plan(tmp, final)
        if inspect_run(tmp).status != "unfinished":
            raise UserError(f"--resume --overwrite: no interrupted replacement of {final} to continue ({tmp}); drop "
                            "--resume to start the replacement over")
        work = tmp
    else:
        if st.status == "absent":
            if resume:
                raise UserError(f"--resume: {final} does not exist; drop --resume to start the run")
            return Plan(final, final)
        if st.status == "foreign":
            raise UserError(f"{final} already exists and is not a vptool run directory (no recipe.yaml); delete it, "
                            "choose another name with --set output.name=NEW, or pass --overwrite")
        if not resume and st.status == "unfinished" and failed_start(final):
            shutil.rmtree(final)  # it stopped before its first finished epoch: nothing to keep, start it over
            return Plan(final, final)
        if not resume:
            if st.status == "finished":
                raise UserError(f"{final} already exists (a finished run); choose another name with --set "
                                "output.name=NEW, or replace it with --overwrite (the old run stays until the new "
                                "one finishes)")
            raise UserError(f"{final} exists and has not finished ({st.describe()}); continue it with --resume, "
                            "replace it with --overwrite, or choose another name with --set output.name=NEW")
        work = final
    from vptool.recipe import read_yaml, resolve_saved

    saved_path = work / "recipe.yaml"
    saved = resolve_saved(read_yaml(saved_path), source=str(saved_path))
    changes = recipe_changes(saved, recipe)
    if changes:
        key, old, new = changes[0]
        more = f" (and {len(changes) - 1} more key(s))" if len(changes) > 1 else ""
        raise UserError(f"--resume: the recipe differs from {saved_path} in {key} ({old!r} -> {new!r}){more}; only "
                        "train.epochs may change on resume: drop the change, or start a new run with --set "
                        "output.name=NEW")
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
            from vptool.engine.runstate import read_json

            return Plan(work, final, resume=True, done=read_json(work / "summary.json"))
        return Plan(work, final, resume=True, checkpoint=ckpt, extend_from=done_epochs)
    return Plan(work, final, resume=True, checkpoint=ckpt)


def _rng_state() -> dict:
    import random

    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _finite_flag(tensors, device: torch.device | None = None) -> torch.Tensor:
    """A 0-d float tensor (on ``device``), 1.0 when every tensor (None skipped) is finite, else 0.0; no host
    sync."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.tensor(1.0, device=device)
    return torch.stack([torch.isfinite(t).all() for t in ts]).all().float().to(device)


def _all_finite(tensors) -> bool:
    return bool(_finite_flag(tensors))


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
    import contextlib

    from vptool.engine import dist
    from vptool.engine.runstate import RunLock, StopSignals, recover_swap, swap_in
    from vptool.engine.runtime import resolve_device

    t_start = time.time()
    final = run_path(recipe)
    check_run_inputs(final, recipe, recipe_file, resume)
    device = setup.device if setup is not None else dist.device_for(resolve_device(recipe.train.device))
    B, W = recipe.data.batch_size, dist.from_env().world
    if B % W:  # refused by every rank alike, before the rendezvous
        raise UserError(f"data.batch_size: {B} (the global batch) does not divide by the {W} processes of this "
                        f"torchrun job; use a multiple of {W}, e.g. {max(W, B - B % W)}")
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
        resuming = plan.checkpoint is not None
        # every input error surfaces here, before anything is written; a resume skips the SPT prompt build
        setup = setup or prepare(recipe, device=device, observer=obs, for_adapter=resuming)
        if resuming:  # the prompts come from last.pt; record the recipe's init
            setup.model.config = setup.model.config.replace(prompt_init=recipe.prompt.init)
        work = plan.work
        if plan.extend_from is not None:
            obs.note(f"extending {final} from {plan.extend_from} to {recipe.train.epochs} epochs; the cosine "
                     f"schedule is recomputed over {recipe.train.epochs} epochs")
            if job.main:
                os.replace(work / "summary.json", work / "checkpoints" / "previous_summary.json")
        elif resuming:
            obs.note(f"resuming {final} after epoch {plan.checkpoint['epoch']}"
                     + (f" + {plan.checkpoint['step']} steps" if plan.checkpoint["step"] else ""))
        if job.main:  # only rank 0 writes the run directory
            (work / "checkpoints").mkdir(parents=True, exist_ok=True)
            write_text_atomically(work / "recipe.yaml", dump_recipe(recipe))
            if setup.prompt_init is not None:  # the SPT prompts this run started from, for provenance and reuse
                from vptool.engine.init_prompts import write_prompt_file

                write_prompt_file(work / "prompt_init.safetensors", *setup.prompt_init, overwrite=True)
        command = resume_command or f"vptool train {final} --resume"
        with StopSignals() as stop:
            summary = _fit(recipe, setup, work, final, obs, t_start, plan.checkpoint, stop, command, job, held)
        if work != final and job.main:
            swap_in(work, final)
        return summary


def _nonfinite(what: str, value, epoch: int, step: int, steps: int, lr: float, best: dict, recipe: Recipe,
               work: Path) -> RunError:
    kept = (f"the best adapter so far (epoch {best['epoch']}, val {best['val_acc']:.2f}%) is kept in "
            f"{work / 'adapter.safetensors'}" if best["epoch"] else "no model was saved")
    exc = RunError(f"non-finite {what} ({value}) at epoch {epoch}, step {step}/{steps}, lr {lr:.3g}: training "
                   f"stopped; likely cause: train.lr {recipe.train.lr:g} is too high (try 10x lower) or the data "
                   f"holds NaN/inf; {kept}; start again with --overwrite")
    exc.collective = True  # every rank sees the same all-reduced values and stops at the same step
    return exc


class _Stop(Exception):
    """Raised inside an evaluation loop when a stop signal arrived."""


def _fit(recipe: Recipe, setup: Setup, run: Path, final: Path, obs: Observer, t_start: float,
         ckpt: dict | None, stop, resume_command: str, job, cleanup=None) -> dict:
    """The epochs, the best-validation adapter, the test evaluation and the run files (written into ``run``;
    ``final`` is the name they will have; only rank 0 writes).

    Each optimizer step t uses the images at permutation positions tB .. tB + B - 1 (``TrainSampler``), n_t of
    them real. Rank r's loss is sum_i w_i CE_i * W / n_t over its share (w_i = 0 for padding), so DDP's mean of
    the W gradients is the gradient of the global batch's mean cross-entropy: with W processes the run follows
    the one-process run up to float rounding. The step's loss sum, correct count, image count and stop flag are
    all-reduced together, so every rank sees the same metrics, NaN and signal and stops at the same step.
    """
    from vptool.engine import runstate

    runstate.reset_faults()
    fit = _Fit(recipe, setup, run, final, obs, stop, resume_command, job)
    fit.restore(ckpt)
    fit.write_metrics()  # a fresh run starts empty; a resumed one drops lines a killed attempt wrote past last.pt
    fit.build_cache(cleanup)
    fit.train_epochs()
    return fit.finish(t_start)


class _Fit:
    """The state of one ``_fit``: model, data, optimizer and schedule, the feature cache, and what the loop
    carries from step to step (``records``, ``best``, ``best_state``, ``running``, ``lr``), in the order ``_fit``
    calls them: ``restore``, ``build_cache``, ``train_epochs`` (``epoch`` for each epoch), ``finish``."""

    def __init__(self, recipe: Recipe, setup: Setup, run: Path, final: Path, obs: Observer, stop,
                 resume_command: str, job):
        from vptool.engine import features

        self.recipe, self.setup, self.run, self.final, self.obs = recipe, setup, run, final, obs
        self.stop, self.resume_command, self.job = stop, resume_command, job
        self.main, self.W = job.main, job.world
        model, splits, device, amp = setup.model, setup.splits, setup.device, setup.amp_dtype
        self.model, self.splits, self.device, self.amp = model, splits, device, amp
        if device.type == "cpu":  # bitwise repeatable on CPU; on CUDA, speed wins (cuBLAS/SDPA kernels may vary)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.trainable, self.total = model.parameter_summary()
        obs.run_start({"run_dir": str(final), "device": str(device), "amp": str(amp) if amp else "fp32",
                       "params": format_parameter_summary(self.trainable, self.total),
                       "train_images": len(splits.train), "val_images": len(splits.val),
                       "test_images": len(splits.test), "classes": len(splits.classes)})
        log.info(format_parameter_summary(self.trainable, self.total))
        d, t = recipe.data, recipe.train
        self.N, self.B = len(splits.train), d.batch_size
        W = self.W
        self.sampler = TrainSampler(self.N, recipe.seed, W, job.rank)
        self.train_loader = make_loader(WeightedSplit(splits.train), self.B // W, shuffle=False,
                                        num_workers=d.num_workers, seed=recipe.seed + job.rank,
                                        pin_memory=device.type == "cuda", sampler=self.sampler)
        self.val_loader = eval_loader(setup, recipe, "val")
        self.params = model.trainable_parameters()
        self.optimizer = make_optimizer(recipe, self.params)
        self.steps = math.ceil(self.N / self.B)
        self.epochs = t.epochs
        total_steps, warmup_steps = self.epochs * self.steps, t.warmup_epochs * self.steps

        def factor(s: int) -> float:  # a plain function: LambdaLR.state_dict() saves a callable object's __dict__
            return lr_factor(s, total_steps, warmup_steps)

        self.factor = factor
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor)
        self.cached, why_not = features.decide(recipe, model)  # nothing before the head trains: features once
        if why_not:
            obs.note(why_not)
        self.head = features.FeatureHead(model) if self.cached else None
        self._forwards(t.compile)
        self.adapter_meta = {"vptool_version": vptool.__version__, "method": recipe.method,
                             "backbone": setup.backbone.name}
        self.adapter_path, self.metrics_path = run / "adapter.safetensors", run / "metrics.jsonl"
        self.history = recipe.output.save_prompt_history and model.prompts is not None
        self.records: list[dict] = []
        self.best: dict = {"epoch": 0, "val_acc": -1.0}
        self.best_state = None
        self.running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "lr": None}
        self.start_epoch, self.start_step = 1, 0
        self.lr: float | None = None  # the last step's lr, carried from epoch to epoch (train_epochs)
        self.cache = None

    def _forwards(self, compile_: bool) -> None:
        """``trained`` (what each step runs: the head on cached features, or the whole model), ``evaluator``
        and ``fwd`` (``trained`` behind DDP and/or ``torch.compile``)."""
        model, head, W, job = self.model, self.head, self.W, self.job
        self.trained = head if self.cached else model
        self.evaluator = torch.compile(model) if compile_ else model
        if W > 1:  # gradients of the trainable tensors only: the frozen backbone is neither synced nor broadcast
            from torch.nn.parallel import DistributedDataParallel as DDP

            frozen = [n for n, p in self.trained.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.trained.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.trained, frozen)
            ddp = DDP(self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.fwd = torch.compile(ddp) if compile_ else ddp
            if job.rank:  # augmentation and prompt dropout: an independent stream per rank
                from vptool.engine.runtime import seed_everything

                seed_everything(self.recipe.seed + job.rank)
        else:
            self.fwd = (torch.compile(head) if compile_ else head) if self.cached else self.evaluator

    def restore(self, ckpt: dict | None) -> None:
        """Continue from ``checkpoints/last.pt`` (adapter, optimizer, scheduler, records, best, RNG), or write
        the epoch-0 prompt snapshot of a fresh run."""
        from vptool.engine.runstate import CHECKPOINT

        model, run, W, job = self.model, self.run, self.W, self.job
        if ckpt is None:
            if self.history and self.main:
                from vptool.engine.probe import save_snapshot

                save_snapshot(model, run, 0)
            return
        if ckpt["steps_per_epoch"] != self.steps:
            raise UserError(f"{run / CHECKPOINT}: the training split has changed since the checkpoint "
                            f"({ckpt['steps_per_epoch']} steps per epoch then, {self.steps} now); restore the data "
                            "or start over with --overwrite")
        model.load_adapter_state_dict(ckpt["adapter"], source=str(run / CHECKPOINT))
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["epochs"] != self.epochs:  # extended: the next step's lr comes from the new schedule
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * self.factor(self.scheduler.last_epoch)
        self.records = [dict(r) for r in ckpt["records"]]
        self.best = dict(ckpt["best"])
        if ckpt["best_adapter"] is not None:
            self.best_state = ckpt["best_adapter"]
        elif self.best["epoch"]:
            self.best_state = model.adapter_state_dict()
        self.start_epoch, self.start_step = ckpt["epoch"] + 1, ckpt["step"]
        if self.start_step:
            self.running = dict(ckpt["running"])
        if self.best_state is not None and self.main:  # a killed attempt may have written a later adapter
            model_state = model.adapter_state_dict()
            model.load_adapter_state_dict(self.best_state)
            model.save_adapter(str(self.adapter_path), {**self.adapter_meta, "epoch": str(self.best["epoch"])})
            model.load_adapter_state_dict(model_state)
        ranks = ckpt.get("rng_ranks")
        if ranks and len(ranks) == W:
            _set_rng_state(ranks[job.rank])
        else:
            if W > 1 or ranks:
                self.obs.note(f"the checkpoint's RNG states are for {len(ranks) if ranks else 1} process(es), this "
                              f"job has {W}: the data order is exact, augmentation and dropout draws are not")
            if not job.rank:
                _set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------------------------- run files
    def checkpoint(self, epoch_done: int, step: int) -> None:
        """Write ``checkpoints/last.pt``; every rank calls it at the same step (a collective)."""
        from vptool.engine import dist, runstate
        from vptool.engine.runstate import CHECKPOINT, CHECKPOINT_FORMAT

        rng = dist.gather_objects(_rng_state(), "gathering RNG states") if self.W > 1 else None
        if not self.main:
            return
        best = self.best
        current_is_best = best["epoch"] == epoch_done and step == 0 and best["epoch"] > 0
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch_done, "step": step, "epochs": self.epochs,
                 "steps_per_epoch": self.steps, "adapter": self.model.adapter_state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": _rng_state(), "running": dict(self.running), "records": [dict(r) for r in self.records],
                 "best": dict(best), "best_adapter": None if current_is_best else self.best_state}
        if rng is not None:
            state["rng_ranks"] = rng
        runstate.save_checkpoint(self.run / CHECKPOINT, state)

    def write_metrics(self) -> None:
        from vptool.engine.runstate import dumps_strict

        if self.main:
            write_text_atomically(self.metrics_path, "".join(dumps_strict(r) + "\n" for r in self.records))

    # ------------------------------------------------------------------------------------------- stopping
    def stop_agreed(self) -> int:
        """The signal number when any rank was signalled (all ranks agree), else 0."""
        from vptool.engine import dist

        if self.W == 1:
            return self.stop.signum
        got = dist.all_reduce(torch.tensor([float(self.stop.signum or 0)]), "agreeing on a stop", op="max")
        return int(got.item())

    def stopped(self, where: str, signum: int | None = None):
        import signal

        from vptool.engine.runstate import CHECKPOINT, Interrupted

        signum = self.stop.signum or signum or signal.SIGTERM
        name = signal.Signals(signum).name
        exc = Interrupted(f"stopped by {name} {where}; checkpoint written to {self.run / CHECKPOINT}; continue "
                          f"with: {self.resume_command}", signum)
        exc.collective = True
        return exc

    # ------------------------------------------------------------------------------------------- data
    def build_cache(self, cleanup) -> None:
        """The frozen features of train and val, once (``features.build``), when the feature cache is on."""
        from vptool.engine import features

        if not (self.cached and self.start_epoch <= self.epochs):
            return
        setup, recipe = self.setup, self.recipe
        self.cache = features.build(self.model, setup, recipe, self.run, self.job.rank, self.obs,
                                    lambda s: eval_loader(setup, recipe, s))
        if cleanup is not None:
            cleanup.callback(self.cache.close)  # a failed or stopped run removes a file-backed cache too
        signum = self.stop_agreed()
        if signum:
            self.cache.close()
            self.checkpoint(self.start_epoch - 1, self.start_step)
            raise self.stopped("while caching the features", signum)

    def batches(self):
        """This epoch's (x, y, w) batches: images from the loader, or rows of the feature cache in the same order
        (``TrainSampler``: index N + i is image i as padding, weight 0)."""
        cache, N, b = self.cache, self.N, self.B // self.W
        if cache is None:
            yield from self.train_loader
            return
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        for s in range(0, len(order), b):
            j = order[s:s + b]
            yield cache.rows("train", j % N, self.device), cache.labels["train"][j % N], (j < N).float()

    def evaluate(self, loader, point: str, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``predict`` over ``loader`` (the validation split from the feature cache when there is one); a stop
        signal abandons it (raises ``_Stop``) at the next batch."""
        from vptool.engine import features
        from vptool.engine.runstate import fault

        def batch() -> None:
            if on_batch is not None:
                on_batch()
            fault(point)
            if self.stop.signum and self.W == 1:  # with several ranks the stop is agreed on after the pass
                raise _Stop

        if self.cache is not None and point == "val":
            return features.predict_cached(self.head, self.cache, "val", self.recipe.data.eval_batch_size,
                                           self.device, self.amp, on_batch=batch)
        return predict(self.evaluator, loader, self.device, self.amp, on_batch=batch)

    # ------------------------------------------------------------------------------------------- training
    def _step(self, x, y, w, epoch: int, step: int) -> tuple[float, float, float, float, float]:
        """One optimizer step on a (x, y, w) batch; returns the all-reduced (loss sum, correct, images, stop
        signal, lr). Raises RunError (collective) on a non-finite loss, gradient, update or parameter."""
        from vptool.engine import dist

        device, W, B, N = self.device, self.W, self.B, self.N
        optimizer, recipe, run, steps, best = self.optimizer, self.recipe, self.run, self.steps, self.best
        x = x.to(device, non_blocking=True)
        y = torch.as_tensor(y).to(device, non_blocking=True)
        w = w.to(device, non_blocking=True)
        n_real = min(B, N - step * B)  # real images in this global batch (the last one may be short)
        with autocast(device, self.amp):
            logits = self.fwd(x)
        ce = F.cross_entropy(logits.float(), y, reduction="none") * w
        loss = ce.sum() * (W / n_real)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad(set_to_none=True)
        if W > 1:  # DDP all-reduces the trainable gradients here
            dist.collective("the gradient all-reduce", loss.backward)
        else:
            loss.backward()
        # the step's numbers in one tensor and one host sync: loss sum, correct, images, stop flag, finite grads
        local = torch.stack([ce.sum().detach(), ((logits.argmax(dim=1) == y).float() * w).sum(), w.sum(),
                             torch.tensor(float(self.stop.signum or 0), device=device),
                             _finite_flag((p.grad for p in self.params), device)])
        if W > 1:  # every rank gets the same numbers (a summed finite flag of W: every rank's gradients)
            local = dist.all_reduce(local, "the training step")
        loss_sum, correct, seen, signum, grads_ok = local.tolist()
        if not math.isfinite(loss_sum):
            raise _nonfinite("loss", loss_sum / max(seen, 1), epoch, step + 1, steps, lr, best, recipe, run)
        if grads_ok < W:
            raise _nonfinite("gradient", "nan/inf", epoch, step + 1, steps, lr, best, recipe, run)
        try:
            optimizer.step()
        except RuntimeError as exc:  # e.g. AdamW's step size lr / (1 - beta^t) past the float range
            if "overflow" not in str(exc):
                raise
            raise _nonfinite("update (the step size overflows)", "inf", epoch, step + 1, steps, lr, best,
                             recipe, run) from None
        self.model.constrain_()  # keep the learnable temperature in range (GateVPT official clamp)
        self.scheduler.step()
        if not _all_finite(self.params):
            raise _nonfinite("parameters after the optimizer step", "nan/inf", epoch, step + 1, steps, lr, best,
                             recipe, run)
        return loss_sum, correct, seen, signum, lr

    def train_epochs(self) -> None:
        """Epochs ``start_epoch`` .. ``epochs``; ``lr`` starts as the checkpoint's last lr or the optimizer's."""
        running = self.running
        self.lr = running["lr"] if running["lr"] is not None else self.optimizer.param_groups[0]["lr"]
        for epoch in range(self.start_epoch, self.epochs + 1):
            self.epoch(epoch)

    def epoch(self, epoch: int) -> None:
        """One epoch (from the checkpoint's step when resuming mid-epoch), its validation, metrics, best adapter
        and checkpoint."""
        from vptool.engine.runstate import fault

        B, W, steps, main = self.B, self.W, self.steps, self.main
        t0 = time.time()
        skip = self.start_step if epoch == self.start_epoch else 0
        if not skip:
            self.running = {"loss_sum": 0.0, "correct": 0, "seen": 0, "lr": None}
        running = self.running
        self.sampler.set_epoch(epoch, skip * (B // W))
        self.trained.train()
        self.obs.epoch_start(epoch, self.epochs, steps)
        every = self.recipe.output.save_every_steps
        step = skip
        for x, y, w in self.batches():
            loss_sum, correct, seen, signum, lr = self._step(x, y, w, epoch, step)
            self.lr = lr
            step += 1
            running["loss_sum"] += loss_sum
            running["correct"] += int(round(correct))
            running["seen"] += int(round(seen))
            running["lr"] = lr
            self.obs.step(loss_sum / max(seen, 1), 100.0 * running["correct"] / running["seen"], lr)
            fault("step")
            if self.stop.signum if W == 1 else signum:  # several ranks: the flag all-reduced with the metrics
                self.checkpoint(epoch - 1, step)
                raise self.stopped(f"at epoch {epoch}, step {step}/{steps}")
            # the scheduler's last_epoch counts the optimizer steps of the whole run (restored on resume)
            if every and self.scheduler.last_epoch % every == 0 and step < steps:
                self.checkpoint(epoch - 1, step)

        try:
            val_logits, val_labels = self.evaluate(self.val_loader, "val")
        except _Stop:
            self.checkpoint(epoch - 1, steps)
            raise self.stopped(f"during validation of epoch {epoch}") from None
        val_acc = topk_accuracy(val_logits, val_labels, 1)
        lr = self.lr = running["lr"] if running["lr"] is not None else self.lr
        seen = max(running["seen"], 1)
        record = {"epoch": epoch, "lr": lr, "train_loss": running["loss_sum"] / seen,
                  "train_acc": 100.0 * running["correct"] / seen, "val_acc": val_acc,
                  "seconds": round(time.time() - t0, 3)}
        self.records.append(record)
        self.write_metrics()
        if val_acc > self.best["val_acc"]:
            self.best = {"epoch": epoch, "val_acc": val_acc}
            self.best_state = self.model.adapter_state_dict()
            if main:
                self.model.save_adapter(str(self.adapter_path), {**self.adapter_meta, "epoch": str(epoch)})
        if self.history and main:
            from vptool.engine.probe import save_snapshot

            save_snapshot(self.model, self.run, epoch)
        signum = self.stop_agreed()
        self.checkpoint(epoch, 0)
        self.obs.epoch_end(record)
        if signum:
            raise self.stopped(f"after epoch {epoch}", signum)

    def finish(self, t_start: float) -> dict:
        """Test evaluation of the best adapter, ``adapter_config.json`` and ``summary.json``; the summary."""
        from vptool.engine.runstate import dumps_strict

        model, setup, recipe, best = self.model, self.setup, self.recipe, self.best
        if self.cache is not None:
            self.cache.close()
        model.load_adapter_state_dict(self.best_state)
        test_loader = eval_loader(setup, recipe, "test")
        self.obs.eval_start("test", len(test_loader))
        try:
            logits, labels = self.evaluate(test_loader, "test", self.obs.eval_step)
        except _Stop:
            raise self.stopped("during the test evaluation") from None
        summary = {
            "best_epoch": best["epoch"], "val_acc": best["val_acc"],
            "test_top1": topk_accuracy(logits, labels, 1), "test_top5": topk_accuracy(logits, labels, 5),
            "trainable_params": self.trainable, "total_params": self.total,
            "seconds": round(time.time() - t_start, 3), "vptool_version": vptool.__version__,
            "method": recipe.method, "device": str(self.device),
            "backbone": {"name": setup.backbone.name, "checkpoint": setup.backbone.checkpoint,
                         "checkpoint_sha256": setup.backbone.checkpoint_sha256, "format": setup.backbone.format,
                         "mean": setup.backbone.data_config.get("mean"), "std": setup.backbone.data_config.get("std")},
            "run_dir": str(self.final),
            **method_report(model),
        }
        if self.W > 1:
            summary["world_size"] = self.W
        model.adapter_info["metrics"] = {k: summary[k] for k in ("best_epoch", "val_acc", "test_top1", "test_top5")}
        if self.main:
            write_config(model, self.run / CONFIG_NAME)
            write_text_atomically(self.run / "summary.json", dumps_strict(summary, indent=2) + "\n")
        self.obs.run_end(summary)
        return summary
