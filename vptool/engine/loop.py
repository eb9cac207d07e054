"""The training loop: epochs of optimizer steps, validation, the best adapter, checkpoints and the test evaluation.

``fit`` runs it for ``vptool.engine.train.train`` (which decides where, ``vptool.engine.runplan``), on a ``Fit``:
the model, data, optimizer and schedule (``vptool.engine.schedule``), the feature cache of a head-only run
(``vptool.engine.features``), and what the loop carries from step to step. It writes ``metrics.jsonl``,
``adapter.safetensors``, ``checkpoints/last.pt``, ``prompt_history/``, ``adapter_config.json`` and
``summary.json`` (the run directory contract: ``vptool.engine.train``), and with the recipe's ``log`` section the
same numbers to TensorBoard / MLflow (``vptool.engine.loggers``); under torchrun only rank 0 writes.

A stop signal (``runstate.StopSignals``) ends the current step, or abandons an evaluation, then the loop writes
``last.pt`` and raises ``runstate.Interrupted``; a non-finite loss, gradient, update or parameter raises
``RunError`` naming the epoch, step and lr.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import vptool
from vptool.adapter import CONFIG_NAME, write_config
from vptool.data import make_loader
from vptool.data.loading import num_workers
from vptool.engine import dist, features, images, runstate
from vptool.engine.evaluate import eval_loader, method_report, predict, topk_accuracy
from vptool.engine.probe import save_snapshot
from vptool.engine.runstate import (
    CHECKPOINT,
    CHECKPOINT_FORMAT,
    Interrupted,
    dumps_strict,
    fault,
    reset_faults,
    rng_state,
    set_rng_state,
)
from vptool.engine.runtime import compile_wanted, seed_everything
from vptool.engine.schedule import TrainSampler, WeightedSplit, lr_factor, make_optimizer
from vptool.engine.setup import Setup, autocast
from vptool.errors import RunError, UserError
from vptool.paths import write_text_atomically
from vptool.progress import Progress
from vptool.prompting.model import format_parameter_summary
from vptool.recipe import Recipe

log = logging.getLogger(__name__)


def _finite_flag(tensors, device: torch.device | None = None) -> torch.Tensor:
    """A 0-d float tensor (on ``device``), 1.0 when every tensor (None skipped) is finite, else 0.0; no host
    sync."""
    ts = [t for t in tensors if t is not None]
    if not ts:
        return torch.tensor(1.0, device=device)
    return torch.stack([torch.isfinite(t).all() for t in ts]).all().float().to(device)


def _all_finite(tensors) -> bool:
    return bool(_finite_flag(tensors))


def _nonfinite(what: str, value, epoch: int, step: int, steps: int, lr: float, best: dict, recipe: Recipe,
               work: Path) -> RunError:
    kept = (f"the best adapter so far (epoch {best['epoch']}, val {best['val_acc']:.2f}%) is kept in "
            f"{work / 'adapter.safetensors'}" if best["epoch"] else "no model was saved")
    exc = RunError(f"non-finite {what} ({value}) at epoch {epoch}, step {step}/{steps}, lr {lr:.3g}: training "
                   f"stopped; likely cause: train.lr {recipe.train.lr:g} is too high (try 10x lower) or the data "
                   f"holds NaN/inf; {kept}; start again with --overwrite")
    exc.collective = True  # every rank sees the same all-reduced values and stops at the same step
    return exc


class _NoLoggers:
    """``engine.loggers.RunLoggers``' face when nothing is logged (no ``log`` section, or a rank other than 0)."""

    def log_epoch(self, record: dict, model=None) -> None: ...

    def log_summary(self, summary: dict, step: int) -> None: ...

    def close(self, status: str = "FINISHED") -> None: ...


class _Stop(Exception):
    """Raised inside an evaluation loop when a stop signal arrived."""


def fit(recipe: Recipe, setup: Setup, run: Path, final: Path, obs: Progress, t_start: float,
        ckpt: dict | None, stop, resume_command: str, job, cleanup=None) -> dict:
    """The epochs, the best-validation adapter, the test evaluation and the run files (written into ``run``;
    ``final`` is the name they will have; only rank 0 writes).

    Each optimizer step t uses the images at permutation positions tB .. tB + B - 1 (``TrainSampler``), n_t of
    them real. Rank r's loss is sum_i w_i CE_i * W / n_t over its share (w_i = 0 for padding), so DDP's mean of
    the W gradients is the gradient of the global batch's mean cross-entropy: with W processes the run follows
    the one-process run up to float rounding. The step's loss sum, correct count, image count and stop flag are
    all-reduced together, so every rank sees the same metrics, NaN and signal and stops at the same step.
    """
    reset_faults()
    loop = Fit(recipe, setup, run, final, obs, stop, resume_command, job)
    loop.restore(ckpt)
    loop.write_metrics()  # a fresh run starts empty; a resumed one drops lines a killed attempt wrote past last.pt
    if loop.main and (recipe.log.tensorboard or recipe.log.mlflow is not None):
        from vptool.engine.loggers import RunLoggers  # tensorboard / mlflow are imported only when asked for

        loop.loggers = RunLoggers(recipe, run, final, loop.records if ckpt else [], obs.note)
    try:
        loop.build_cache(cleanup)
        loop.train_epochs()
        summary = loop.finish(t_start)
    except BaseException as exc:
        loop.loggers.close("KILLED" if isinstance(exc, Interrupted) else "FAILED")
        raise
    loop.loggers.close()
    return summary


class Fit:
    """The state of one ``fit``: model, data, optimizer and schedule, the feature cache, and what the loop
    carries from step to step (``records``, ``best``, ``best_state``, ``running``, ``lr``), in the order ``fit``
    calls them: ``restore``, ``build_cache``, ``train_epochs`` (``epoch`` for each epoch), ``finish``."""

    def __init__(self, recipe: Recipe, setup: Setup, run: Path, final: Path, obs: Progress, stop,
                 resume_command: str, job):
        self.recipe, self.setup, self.run, self.final, self.obs = recipe, setup, run, final, obs
        self.stop, self.resume_command, self.job = stop, resume_command, job
        self.main, self.W = job.main, job.world
        model, splits, device, amp = setup.model, setup.splits, setup.device, setup.amp_dtype
        self.model, self.splits, self.device, self.amp = model, splits, device, amp
        if device.type == "cpu":  # bitwise repeatable on CPU; on CUDA, speed wins (cuBLAS/SDPA kernels may vary)
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.trainable, self.total = model.parameter_summary()
        self.backbone_params = sum(p.numel() for p in model.backbone.parameters())
        obs.run_start({"run_dir": str(final), "device": str(device), "amp": str(amp) if amp else "fp32",
                       "params": format_parameter_summary(self.trainable, self.total),
                       "train_images": len(splits.train), "val_images": len(splits.val),
                       "test_images": len(splits.test), "classes": len(splits.classes)})
        log.info(format_parameter_summary(self.trainable, self.total))
        d, t = recipe.data, recipe.train
        self.N, self.B = len(splits.train), d.batch_size
        W = self.W
        self.sampler = TrainSampler(self.N, recipe.seed, W, job.rank)
        self.cached, why_not = features.decide(recipe, model)  # nothing before the head trains: features once
        self.image_sets: dict = {}  # file datasets whose images are decoded once (``build_cache``)
        if not self.cached:
            splits, self.image_sets = images.wrap(recipe, splits)
            self.splits = setup.splits = splits
        self.train_loader = make_loader(WeightedSplit(splits.train), self.B // W, shuffle=False,
                                        num_workers=num_workers(d, self.N), seed=recipe.seed + job.rank,
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
        if why_not:
            obs.note(why_not)
        self.head = features.FeatureHead(model) if self.cached else None
        self._forwards(compile_wanted(t.compile, self.device))
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
        self.images = None
        self.loggers = _NoLoggers()  # ``fit`` opens the recipe's ``log`` section on rank 0

    def _forwards(self, compile_: bool) -> None:
        """``trained`` (what each step runs: the head on cached features, or the whole model), ``evaluator``
        and ``fwd`` (``trained`` behind DDP and/or ``torch.compile``)."""
        model, head, W, job = self.model, self.head, self.W, self.job
        self.trained = head if self.cached else model
        self.evaluator = torch.compile(model) if compile_ else model
        if W > 1:  # gradients of the trainable tensors only: the frozen backbone is neither synced nor broadcast
            frozen = [n for n, p in self.trained.named_parameters() if not p.requires_grad]
            frozen += [n for n, _ in self.trained.named_buffers()]
            DDP._set_params_and_buffers_to_ignore_for_model(self.trained, frozen)
            ddp = DDP(self.trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.fwd = torch.compile(ddp) if compile_ else ddp
            if job.rank:  # augmentation and prompt dropout: an independent stream per rank
                seed_everything(self.recipe.seed + job.rank)
        else:
            self.fwd = (torch.compile(head) if compile_ else head) if self.cached else self.evaluator

    def restore(self, ckpt: dict | None) -> None:
        """Continue from ``checkpoints/last.pt`` (adapter, optimizer, scheduler, records, best, RNG), or write
        the epoch-0 prompt snapshot of a fresh run."""
        model, run, W, job = self.model, self.run, self.W, self.job
        if ckpt is None:
            if self.history and self.main:
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
            set_rng_state(ranks[job.rank])
        else:
            if W > 1 or ranks:
                self.obs.note(f"the checkpoint's RNG states are for {len(ranks) if ranks else 1} process(es), this "
                              f"job has {W}: the data order is exact, augmentation and dropout draws are not")
            if not job.rank:
                set_rng_state(ckpt["rng"])

    # ------------------------------------------------------------------------------------------- run files
    def checkpoint(self, epoch_done: int, step: int) -> None:
        """Write ``checkpoints/last.pt``; every rank calls it at the same step (a collective)."""
        rng = dist.gather_objects(rng_state(), "gathering RNG states") if self.W > 1 else None
        if not self.main:
            return
        best = self.best
        current_is_best = best["epoch"] == epoch_done and step == 0 and best["epoch"] > 0
        state = {"format": CHECKPOINT_FORMAT, "epoch": epoch_done, "step": step, "epochs": self.epochs,
                 "steps_per_epoch": self.steps, "adapter": self.model.adapter_state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rng_state(), "running": dict(self.running), "records": [dict(r) for r in self.records],
                 "best": dict(best), "best_adapter": None if current_is_best else self.best_state}
        if rng is not None:
            state["rng_ranks"] = rng
        runstate.save_checkpoint(self.run / CHECKPOINT, state)  # through the module: tests spy on it

    def write_metrics(self) -> None:
        if self.main:
            write_text_atomically(self.metrics_path, "".join(dumps_strict(r) + "\n" for r in self.records))

    # ------------------------------------------------------------------------------------------- stopping
    def stop_agreed(self) -> int:
        """The signal number when any rank was signalled (all ranks agree), else 0."""
        if self.W == 1:
            return self.stop.signum
        got = dist.all_reduce(torch.tensor([float(self.stop.signum or 0)]), "agreeing on a stop", op="max")
        return int(got.item())

    def stopped(self, where: str, signum: int | None = None):
        signum = self.stop.signum or signum or signal.SIGTERM
        name = signal.Signals(signum).name
        exc = Interrupted(f"stopped by {name} {where}; checkpoint written to {self.run / CHECKPOINT}; continue "
                          f"with: {self.resume_command}", signum)
        exc.collective = True
        return exc

    # ------------------------------------------------------------------------------------------- data
    def build_cache(self, cleanup) -> None:
        """The decoded images of train and val, once (``images.build``), for a file dataset; or the frozen
        features of train and val, once (``features.build``), when the feature cache is on."""
        if self.image_sets and self.start_epoch <= self.epochs:
            self.images = images.build(self.recipe, self.image_sets, self.run, self.job.rank, self.obs)
            self._keep_cache(self.images, cleanup, "the images")
        if not (self.cached and self.start_epoch <= self.epochs):
            return
        setup, recipe = self.setup, self.recipe
        self.cache = features.build(self.model, setup, recipe, self.run, self.job.rank, self.obs,
                                    lambda s: eval_loader(setup, recipe, s))
        self._keep_cache(self.cache, cleanup, "the features")

    def _keep_cache(self, cache, cleanup, what: str) -> None:
        """A cache just built: removed (if file-backed) when the run fails or stops; a stop signal agreed while it
        was built checkpoints the run and stops it."""
        if cleanup is not None:
            cleanup.callback(cache.close)
        signum = self.stop_agreed()
        if signum:
            cache.close()
            self.checkpoint(self.start_epoch - 1, self.start_step)
            raise self.stopped(f"while caching {what}", signum)

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
            save_snapshot(self.model, self.run, epoch)
        signum = self.stop_agreed()
        self.checkpoint(epoch, 0)
        self.loggers.log_epoch(record, self.model)  # after last.pt holds the record: a resume never logs it twice
        self.obs.epoch_end(record)
        if signum:
            raise self.stopped(f"after epoch {epoch}", signum)

    def finish(self, t_start: float) -> dict:
        """Test evaluation of the best adapter, ``adapter_config.json`` and ``summary.json``; the summary."""
        model, setup, recipe, best = self.model, self.setup, self.recipe, self.best
        if self.cache is not None:
            self.cache.close()
        if self.images is not None:  # the test split is read once, uncached
            self.images.close()
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
            "trainable_params": self.trainable, "total_params": self.total, "backbone_params": self.backbone_params,
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
            self.loggers.log_summary(summary, len(self.records))
        self.obs.run_end(summary)
        return summary
