"""The training loop and the run directory.

Run directory contract (stable; other tools read it):

- ``recipe.yaml``: the fully resolved recipe (every default filled in).
- ``metrics.jsonl``: one JSON object per epoch: ``epoch`` (1-based), ``lr`` (at the epoch's last step),
  ``train_loss`` (mean cross-entropy over the epoch's images), ``train_acc``, ``val_acc`` (percent), ``seconds``.
- ``summary.json``: ``best_epoch``, ``val_acc``, ``test_top1``, ``test_top5`` (percent, best-validation adapter),
  ``trainable_params``, ``total_params``, ``seconds``, ``vptool_version``, ``backbone`` (name, checkpoint, sha256);
  for gated prompts ``gates`` and ``selection_ratio`` (GateVPT eq. 10-11), with a learnable temperature
  ``temperature`` (L values), with a [MASK] token ``mask_token``: ``pretrained`` or ``learned``.
- ``adapter.safetensors`` + ``adapter_config.json``: the best-validation trainable tensors (never the frozen
  backbone) and the config that rebuilds the model without the dataset (``vptool.adapter``; ``vptool.load``).
- ``prompt_init.safetensors``: with an SPT strategy as ``prompt.init``, the prompts the run started from
  (init-prompts format, reusable with ``prompt.init: file``).
- ``checkpoints/last.pt``: model adapter, optimizer, scheduler, epoch and RNG states after the last epoch.
- ``prompt_history/epoch_EEEE.safetensors`` with ``output.save_prompt_history: true``: the tensors that shape the
  prompt representations (``prompts.*``, ``gates.logit``, ``temperature``, a learned ``mask_token``) before
  training (epoch 0) and after each epoch, read by ``vptool probe-nmi --history``.
"""

from __future__ import annotations

import json
import logging
import math
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
from vptool.errors import UserError
from vptool.prompting.model import format_parameter_summary
from vptool.recipe import Recipe, dump_recipe

log = logging.getLogger(__name__)


class Observer:
    """Hooks the CLI uses to show progress; the library itself only logs."""

    def run_start(self, info: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, acc: float, lr: float) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    def eval_start(self, split: str, steps: int) -> None: ...
    def eval_step(self) -> None: ...
    def run_end(self, summary: dict) -> None: ...
    # building SPT prompts before training (``prompt.init`` names a strategy); see engine.init_prompts
    def extract_start(self, batches: int) -> None: ...
    def extract_step(self) -> None: ...
    def kmeans_start(self, steps: int) -> None: ...
    def kmeans_step(self) -> None: ...


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


def prepare_run_dir(recipe: Recipe, overwrite: bool) -> Path:
    """The run directory path; refuses an existing one unless ``overwrite`` (nothing is written here).

    Raises:
        UserError: the directory exists and ``overwrite`` is False.
    """
    run = Path(recipe.output.dir) / recipe.output.name
    if run.exists() and not overwrite:
        raise UserError(f"{run} already exists; delete it, choose another name with --set output.name=NEW, "
                        "or pass --overwrite")
    return run


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def train(recipe: Recipe, overwrite: bool = False, observer: Observer | None = None,
          setup: Setup | None = None) -> dict:
    """Train a recipe and write its run directory; returns the summary.

    Raises:
        UserError: bad input found while building (nothing is written, an existing run is kept).
    """
    obs = observer or Observer()
    t_start = time.time()
    run = prepare_run_dir(recipe, overwrite)
    setup = setup or prepare(recipe, observer=obs)  # every input error surfaces here, before anything is written
    if run.exists():  # --overwrite: the old run goes only now that the new one is known to build
        shutil.rmtree(run)
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    if setup.prompt_init is not None:  # the SPT prompts this run started from, for provenance and reuse
        from vptool.engine.init_prompts import write_prompt_file

        write_prompt_file(run / "prompt_init.safetensors", *setup.prompt_init)
    try:
        return _fit(recipe, setup, run, obs, t_start)
    except UserError:  # bad input found mid-run (e.g. a corrupt image): leave no half-written run behind
        shutil.rmtree(run, ignore_errors=True)
        raise


def _fit(recipe: Recipe, setup: Setup, run: Path, obs: Observer, t_start: float) -> dict:
    """The epochs, the best-validation adapter, the test evaluation and the run files."""
    model, splits, device, amp = setup.model, setup.splits, setup.device, setup.amp_dtype
    if device.type == "cpu":  # bitwise repeatable on CPU; on CUDA, speed wins (cuBLAS/SDPA kernels may vary)
        torch.use_deterministic_algorithms(True, warn_only=True)
    trainable, total = model.parameter_summary()
    obs.run_start({"run_dir": str(run), "device": str(device), "amp": str(amp) if amp else "fp32",
                   "params": format_parameter_summary(trainable, total), "train_images": len(splits.train),
                   "val_images": len(splits.val), "test_images": len(splits.test), "classes": len(splits.classes)})
    log.info(format_parameter_summary(trainable, total))

    d = recipe.data
    train_loader = make_loader(splits.train, d.batch_size, shuffle=True, num_workers=d.num_workers,
                               seed=recipe.seed, pin_memory=device.type == "cuda")
    val_loader = eval_loader(setup, recipe, "val")
    optimizer = make_optimizer(recipe, model.trainable_parameters())
    steps_per_epoch = len(train_loader)
    total_steps = recipe.train.epochs * steps_per_epoch
    warmup_steps = recipe.train.warmup_epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup_steps))
    fwd = torch.compile(model) if recipe.train.compile else model
    adapter_meta = {"vptool_version": vptool.__version__, "method": recipe.method, "backbone": setup.backbone.name}
    metrics_path = run / "metrics.jsonl"
    metrics_path.write_text("")
    best_acc, best_epoch, best_state = -1.0, 0, None
    history = recipe.output.save_prompt_history and model.prompts is not None
    if history:
        from vptool.engine.probe import save_snapshot

        save_snapshot(model, run, 0)
    for epoch in range(1, recipe.train.epochs + 1):
        t0 = time.time()
        model.train()
        obs.epoch_start(epoch, recipe.train.epochs, steps_per_epoch)
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train_loader:
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            with autocast(device, amp):
                logits = fwd(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            model.constrain_()  # keep the learnable temperature in range (GateVPT official clamp)
            scheduler.step()
            n = y.shape[0]
            loss_sum += loss.item() * n
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += n
            obs.step(loss.item(), 100.0 * correct / seen, lr)
        val_logits, val_labels = predict(fwd, val_loader, device, amp)
        val_acc = topk_accuracy(val_logits, val_labels, 1)
        record = {"epoch": epoch, "lr": lr, "train_loss": loss_sum / seen, "train_acc": 100.0 * correct / seen,
                  "val_acc": val_acc, "seconds": round(time.time() - t0, 3)}
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if val_acc > best_acc:
            best_acc, best_epoch = val_acc, epoch
            best_state = model.adapter_state_dict()
            model.save_adapter(str(run / "adapter.safetensors"), {**adapter_meta, "epoch": str(epoch)})
        torch.save({"epoch": epoch, "adapter": model.adapter_state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    "loader_generator": train_loader.generator.get_state(),
                    "best": {"epoch": best_epoch, "val_acc": best_acc}},
                   run / "checkpoints" / "last.pt")
        if history:
            save_snapshot(model, run, epoch)
        obs.epoch_end(record)

    model.load_adapter_state_dict(best_state)
    test_loader = eval_loader(setup, recipe, "test")
    obs.eval_start("test", len(test_loader))
    logits, labels = predict(fwd, test_loader, device, amp, on_batch=obs.eval_step)
    summary = {
        "best_epoch": best_epoch, "val_acc": best_acc,
        "test_top1": topk_accuracy(logits, labels, 1), "test_top5": topk_accuracy(logits, labels, 5),
        "trainable_params": trainable, "total_params": total, "seconds": round(time.time() - t_start, 3),
        "vptool_version": vptool.__version__, "method": recipe.method, "device": str(device),
        "backbone": {"name": setup.backbone.name, "checkpoint": setup.backbone.checkpoint,
                     "checkpoint_sha256": setup.backbone.checkpoint_sha256, "format": setup.backbone.format,
                     "mean": setup.backbone.data_config.get("mean"), "std": setup.backbone.data_config.get("std")},
        "run_dir": str(run),
        **method_report(model),
    }
    model.adapter_info["metrics"] = {k: summary[k] for k in ("best_epoch", "val_acc", "test_top1", "test_top5")}
    write_config(model, run / CONFIG_NAME)
    (run / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    obs.run_end(summary)
    return summary
