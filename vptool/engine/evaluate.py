"""Evaluation: logits over a split, top-k accuracy, and rebuilding a trained model from its run directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vptool.data import make_loader
from vptool.data.loading import num_workers
from vptool.engine.runtime import autocast, autocast_dtype, resolve_device
from vptool.engine.setup import Setup
from vptool.errors import UserError
from vptool.recipe import Recipe, read_yaml, resolve_saved

log = logging.getLogger(__name__)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device,
            amp_dtype: torch.dtype | None = None, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits over a loader in dataset order.

    Under torchrun, a loader from ``eval_loader`` holds this rank's shard (``DistributedSampler``, padded to equal
    shards); the shards are gathered and the padding dropped, so every rank returns all N rows in dataset order
    and the metrics count each image exactly once.

    Returns:
        ``(logits, labels)``: float32 (N, K) on CPU and int64 (N,).
    """
    was_training = model.training
    model.eval()
    outs, labels = [], []
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(x)
        outs.append(logits.float().cpu())
        labels.append(torch.as_tensor(y))
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    logits, labels = torch.cat(outs), torch.cat(labels)
    from torch.utils.data import DistributedSampler

    if isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas > 1:
        from vptool.engine import dist

        n = len(loader.dataset)
        logits = dist.gather_rows(logits.to(device), n, "gathering the evaluation logits").cpu()
        labels = dist.gather_rows(labels.to(device), n, "gathering the evaluation labels").cpu()
    return logits, labels


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of rows whose label is among the ``k`` largest logits (k capped at K)."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels.unsqueeze(1)).any(dim=1)
    return 100.0 * int(hit.sum()) / int(labels.shape[0])


def method_report(model: torch.nn.Module) -> dict:
    """What a trained adapter says about its method: GateVPT gates and selection ratio (eq. 10-11), the
    learned temperatures (eq. 9), and where the [MASK] token came from (``pretrained`` or ``learned``)."""
    from vptool.analysis.gates import gate_report

    out: dict = {}
    gates = gate_report(model)
    if gates is not None:
        out.update(gates)
    taus = model.temperatures() if hasattr(model, "temperatures") else None
    if taus is not None:
        out["temperature"] = [round(float(t), 6) for t in taus.detach().cpu()]
    if getattr(model, "mask_source", None) is not None:
        out["mask_token"] = model.mask_source
    return out


def eval_loader(setup: Setup, recipe: Recipe, split: str) -> DataLoader:
    """The deterministic evaluation loader of ``split`` (no shuffle, ``data.eval_batch_size`` per process); under
    torchrun this rank's shard (``DistributedSampler(shuffle=False)``; ``predict`` gathers the shards)."""
    from torch.utils.data import DistributedSampler

    from vptool.engine import dist

    ds = setup.splits[split]
    job = dist.context()
    sampler = DistributedSampler(ds, num_replicas=job.world, rank=job.rank, shuffle=False) if job.active else None
    return make_loader(ds, recipe.data.eval_batch_size, shuffle=False, num_workers=num_workers(recipe.data, len(ds)),
                       seed=recipe.seed, pin_memory=setup.device.type == "cuda", sampler=sampler)


def load_run(run_dir: str | Path, device: str | None = None, train_eval_transform: bool = False,
             last: bool = False) -> tuple[Recipe, Setup]:
    """Rebuild a trained model from a run directory (``vptool.adapter.load``: ``adapter_config.json`` +
    ``adapter.safetensors`` + the backbone, sha256-checked) and its data splits (``recipe.yaml``'s ``data``).

    ``train_eval_transform``: the training split uses the deterministic eval transform (analysis of train).
    ``last``: the adapter of ``checkpoints/last.pt`` (the latest epoch, not the best one), rebuilt from
    ``recipe.yaml``; the only way to evaluate a run that has not finished (no ``summary.json``).

    Raises:
        UserError: not a run directory, its files do not match each other, a backbone checkpoint that is
            missing or has another sha256, or data that is not on disk.
    """
    from vptool.adapter import load_with_info
    from vptool.data import build_splits
    from vptool.prompting.model import PromptedViT

    run = Path(run_dir)
    if run.is_file() and run.suffix in (".yaml", ".yml"):
        raise UserError(f"{run}: is a recipe; eval takes the run directory `vptool train {run}` writes "
                        "(e.g. runs/quickstart)")
    if not run.is_dir():
        raise UserError(f"{run}: run directory not found; pass the folder `vptool train` wrote (e.g. runs/quickstart)")
    if not (run / "recipe.yaml").is_file():
        raise UserError(f"{run}: no recipe.yaml; is this a finished vptool run directory?")
    from vptool.engine.runstate import CHECKPOINT, load_checkpoint, read_json

    recipe = resolve_saved(read_yaml(run / "recipe.yaml"), source=str(run / "recipe.yaml"))
    from vptool.engine import dist

    dev = dist.device_for(resolve_device(device or recipe.train.device, key="--device" if device else "train.device"))
    dist.init(dev)
    if last:
        ckpt_path = run / CHECKPOINT
        if not ckpt_path.is_file():
            raise UserError(f"{ckpt_path}: not found; the run stopped before its first checkpoint: continue it with "
                            f"vptool train {run} --resume")
        from vptool.engine.setup import prepare

        ckpt = load_checkpoint(ckpt_path)
        setup = prepare(recipe, dev, for_adapter=True, train_eval_transform=train_eval_transform, check_mem=False)
        setup.model.load_adapter_state_dict(ckpt["adapter"], source=str(ckpt_path))
        setup.model.eval()
        setup.checkpoint = {"epoch": int(ckpt["epoch"]), "step": int(ckpt["step"])}
        return recipe, setup
    if not (run / "summary.json").is_file():
        raise UserError(f"{run}: the run has not finished (no summary.json); finish it with vptool train {run} "
                        "--resume (vptool eval --last evaluates its last checkpoint)")
    read_json(run / "summary.json")  # a truncated summary is named, not ignored
    model, info, _ = load_with_info(run, dev, model_cls=PromptedViT)
    splits = build_splits(recipe.data, info.data_config, train_eval_transform=train_eval_transform)
    _warn_precision(recipe, dev)
    return recipe, Setup(model, splits, info, dev, autocast_dtype(recipe.train.precision, dev))


def _warn_precision(recipe: Recipe, device: torch.device) -> None:
    from vptool.engine.runtime import precision_warning

    slow = precision_warning(recipe.train.precision, device)
    if slow:
        log.warning(slow)


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    """Per-class accuracy and the confusion matrix (scikit-learn) of top-1 predictions.

    Args:
        logits: (N, K); labels: (N,) in 0..K-1; classes: the K class names (index = label).

    Returns:
        ``confusion_matrix`` (K, K) counts, row = true class, column = predicted (``sklearn.metrics``);
        ``per_class_accuracy`` {class: percent, or None for a class absent from the split}; ``support``
        {class: images}; ``mean_per_class_accuracy`` (percent, over present classes).
    """
    from sklearn.metrics import confusion_matrix

    K = len(classes)
    cm = confusion_matrix(labels.numpy(), logits.argmax(dim=1).numpy(), labels=list(range(K)))
    support = cm.sum(axis=1)
    per_class = {c: (100.0 * float(cm[k, k]) / float(support[k]) if support[k] else None)
                 for k, c in enumerate(classes)}
    present = [v for v in per_class.values() if v is not None]
    return {"classes": list(classes), "per_class_accuracy": per_class,
            "support": {c: int(support[k]) for k, c in enumerate(classes)},
            "mean_per_class_accuracy": float(sum(present) / len(present)) if present else None,
            "confusion_matrix": cm.tolist()}


def write_eval_report(run_dir: Path, split: str, result: dict, report: dict, plots: bool) -> dict[str, str]:
    """Write ``RUN_DIR/eval/<split>.json`` (accuracy, per-class accuracy, confusion matrix, method report) and,
    for gated prompts, ``eval/gates.csv`` + ``eval/gates.json`` (GateVPT eq. 10-11); with ``plots`` also
    ``eval/<split>_confusion.png`` and ``eval/gates.png``. These are eval's own files: a later eval of the same
    split replaces them. Returns {what: path}.
    """
    from vptool.analysis import plots as figs
    from vptool.analysis.gates import write_gate_files
    from vptool.paths import write_text_atomically

    out = Path(run_dir) / "eval"
    out.mkdir(exist_ok=True)
    written = {}
    path = write_text_atomically(out / f"{split}.json", json.dumps({**result, **report}, indent=2) + "\n")
    written["report"] = str(path)
    name = Path(run_dir).name
    if plots:
        fig = figs.confusion_figure(report["confusion_matrix"], report["classes"],
                                    f"{name}: confusion matrix, {split} split (top-1 {result['top1']:.2f}%)")
        written["confusion_png"] = str(figs.save(fig, out / f"{split}_confusion.png"))
    if "gates" in result:
        written.update(write_gate_files(result, out, plots, f"{name}: GateVPT selection ratio per block"))
    return written
