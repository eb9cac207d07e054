"""The feature cache of head-only training (``train.feature_cache: auto``).

When nothing before the readout's input trains, every epoch would run the frozen backbone over the same images
and get the same features: a linear probe (``train.tune: head``) or frozen prompts (SPT Table 4a,
``prompt.trainable: false``) without gates, a learnable temperature or a learned [MASK] token. The training loop
then computes the features once per split (train and val) and trains the head on them. The results equal the
uncached run's (the same rows, batches, order and head; the features differ only by batch-size rounding, ~1e-7).

What is cached is exactly what the trainable part consumes (``FeatureHead``): the pooled, normalised (B, D)
features when the readout norm is frozen, or the pooled features before the norm when a ``fresh`` norm trains.

The conditions (``decide``):

- nothing trains but the head (and a fresh readout norm): ``train.tune: head``, or ``prompts`` whose only
  trainable tensors are the head's (``prompt.trainable: false``, no gates, fixed temperature, no learned [MASK]);
- the frozen part is deterministic in training: no prompt dropout, no hard (sampled) gates;
- the train transform is deterministic: ``data.train_transform: vtab``. With ``fgvc`` (random resized crop and
  flip) every epoch sees other pixels, so the cache is off, and a note says so.

Storage (``plan_storage``): in memory when the features fit a quarter of the CUDA device's free memory (on the
device) or half of the host's available memory, else in a file under the run directory (``.feature_cache/``),
memory-mapped and deleted when training ends. The size, 4·D·(N_train + N_val) bytes, is stated in a note.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from vptool.engine import dist
from vptool.engine.runtime import autocast
from vptool.recipe import Recipe

#: the cache folder inside a run directory (removed when training ends, and by the next run if one was killed)
CACHE_DIR = ".feature_cache"


def _trains(module: nn.Module | None) -> bool:
    return module is not None and any(p.requires_grad for p in module.parameters())


def decide(recipe: Recipe, model) -> tuple[bool, str | None]:
    """Whether to train on cached features, and the one-line note for a run that could but may not.

    Returns:
        ``(use, note)``: ``note`` is None unless the cache is off for a reason the recipe could change (an
        augmenting train transform, prompt dropout, hard gates) in a run whose head alone trains.
    """
    if recipe.train.feature_cache == "off" or recipe.train.tune == "all":
        return False, None
    head = {id(p) for p in model.get_classifier().parameters()}
    if model.fc_norm is not None:
        head |= {id(p) for p in model.fc_norm.parameters()}
    if any(p.requires_grad and id(p) not in head for p in model.parameters()):
        return False, None  # prompts, gates, temperature or a [MASK] token train: the features change each step
    why = None
    if model.prompts is not None and model.prompts.dropout.p > 0:
        why = (f"prompt.dropout {model.prompts.dropout.p:g} makes the frozen prompts random in training, so the "
               "backbone runs every epoch; prompt.dropout: 0 caches the features")
    elif model.gates is not None and model.gates.kind == "hard":
        why = "prompt.gate hard samples the gates in training, so the backbone runs every epoch"
    elif recipe.data.train_transform != "vtab":
        why = (f"data.train_transform {recipe.data.train_transform} augments every epoch (random resized crop + "
               "flip), so the backbone runs every epoch; data.train_transform: vtab caches the features")
    if why:
        return False, f"feature cache off: {why} (train.feature_cache: off silences this)"
    return True, None


class FeatureHead(nn.Module):
    """The trainable part on cached features: (B, D) features -> (B, K) logits.

    ``pre_norm``: the cached features are pooled but not normalised and the (trainable, ``fresh``) readout norm
    runs here; otherwise the head alone. The modules are the model's own, so training this trains the model.
    """

    def __init__(self, model):
        super().__init__()
        self.pre_norm = _trains(model.fc_norm)
        self.norm = model.fc_norm if self.pre_norm else None
        self.head = model.get_classifier()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(z) if self.norm is not None else z)


def feature_fn(model, pre_norm: bool):
    """(B, 3, H, W) images -> (B, D) what ``FeatureHead`` consumes (eval mode, no grad)."""
    if pre_norm:
        return lambda x: model.pool(model.forward_features(x))
    return lambda x: model.readout(model.forward_features(x))


def memory_budget(device: torch.device) -> int:
    """Bytes the cache may take in memory on ``device``: a quarter of a CUDA device's free memory, half of the
    host's available memory (``setup.available_memory``)."""
    from vptool.engine.setup import available_memory

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free) // 4
    return available_memory(torch.device("cpu")) // 2


def plan_storage(nbytes: int, device: torch.device) -> str:
    """``device`` (the features stay where training runs), ``cpu`` (a CUDA run whose features fit host memory
    only) or ``file`` (a memory-mapped file under the run directory)."""
    if nbytes <= memory_budget(device):
        return "device"
    if device.type == "cuda" and nbytes <= memory_budget(torch.device("cpu")):
        return "cpu"
    return "file"


@dataclass
class FeatureCache:
    """Per split: features (N, D) float32 and labels (N,) int64, in memory or memory-mapped from a file."""

    features: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    storage: str
    nbytes: int
    folder: Path | None = None
    _maps: list = field(default_factory=list)

    def rows(self, split: str, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Features of rows ``index`` (M,) of ``split`` as (M, D) float32 on ``device``."""
        f = self.features[split]
        return f[index.to(f.device)].to(device, non_blocking=True)

    def close(self) -> None:
        """Drop the features; remove the file-backed cache from disk (idempotent)."""
        self.features.clear()
        self._maps.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def cache_folder(run: Path, rank: int) -> Path:
    """Where a file-backed cache lives: ``RUN/.feature_cache`` for rank 0; other ranks (maybe on another node)
    use a folder of their own in the system temporary directory."""
    if rank == 0:
        return run / CACHE_DIR
    import os
    import tempfile

    return Path(tempfile.gettempdir()) / f"vptool-feature-cache-{os.getpid()}"


@torch.no_grad()
def build(model, setup, recipe: Recipe, run: Path, rank: int, observer, loader_for) -> FeatureCache:
    """Run the frozen part once over the train and val splits and keep what ``FeatureHead`` consumes.

    Args:
        loader_for: ``split -> DataLoader`` of the deterministic evaluation loader (``evaluate.eval_loader``;
            under torchrun this rank's shard: the shards are gathered batch by batch, so every rank holds all rows).

    Raises:
        RunError: a peer rank failed during a gather (``vptool.engine.dist``).
    """
    device, amp = setup.device, setup.amp_dtype
    pre_norm = _trains(model.fc_norm)
    fn = feature_fn(model, pre_norm)
    D = int(model.family.width(model.backbone))  # the pooled width (ViT: embed_dim)
    splits = {s: len(setup.splits[s]) for s in ("train", "val")}
    nbytes = 4 * D * sum(splits.values())
    storage = plan_storage(nbytes, device)
    folder = _clear_folders(run, rank, storage)
    what = "pooled features before the trainable readout norm" if pre_norm else "readout features"
    where = {"device": f"in {device.type} memory", "cpu": "in host memory",
             "file": f"in {folder} (memory-mapped, deleted when training ends)"}[storage]
    observer.note(f"feature cache: only the head trains, so the frozen backbone runs once per split: train "
                  f"{splits['train']:,d} + val {splits['val']:,d} images x {D} {what} = {nbytes / 2**20:,.1f} MiB "
                  f"{where}")
    cache = FeatureCache({}, {}, storage, nbytes, folder)
    was_training = model.training
    model.eval()
    try:
        for split, n in splits.items():
            store = _new_store(cache, split, n, D, device)
            labels = torch.empty(n, dtype=torch.int64)
            _fill(store, labels, fn, loader_for(split), device, amp, observer, f"features {split}")
            cache.features[split], cache.labels[split] = store, labels
    except BaseException:
        cache.close()
        raise
    finally:
        model.train(was_training)
    return cache


def _clear_folders(run: Path, rank: int, storage: str) -> Path | None:
    """Remove a killed attempt's cache (rank 0); for ``file`` storage, make this rank's empty cache folder and
    return it."""
    if rank == 0:
        shutil.rmtree(run / CACHE_DIR, ignore_errors=True)  # a killed attempt's leftovers
    if storage != "file":
        return None
    folder = cache_folder(run, rank)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def _new_store(cache: FeatureCache, split: str, n: int, D: int, device: torch.device) -> torch.Tensor:
    """An (n, D) float32 tensor for ``split``'s features where ``cache.storage`` says: a memory-mapped
    ``<folder>/<split>.npy`` (kept open by the cache), ``device`` or host memory."""
    if cache.storage == "file":
        mm = np.lib.format.open_memmap(cache.folder / f"{split}.npy", mode="w+", dtype=np.float32, shape=(n, D))
        cache._maps.append(mm)
        return torch.from_numpy(mm)
    return torch.empty(n, D, dtype=torch.float32, device=device if cache.storage == "device" else "cpu")


def _fill(store: torch.Tensor, labels: torch.Tensor, fn, loader, device: torch.device, amp, observer,
          what: str) -> None:
    """Write ``fn`` of every image of ``loader`` into ``store`` (n, D) and its label into ``labels`` (n,), in
    dataset order; under torchrun each batch's shards are gathered from every rank."""
    n = labels.shape[0]
    sampler = loader.sampler
    W = sampler.num_replicas if isinstance(sampler, DistributedSampler) else 1
    observer.eval_start(what, len(loader))
    pos = 0  # rows of this rank's shard done; with W ranks, shard row i is dataset position i * W + rank
    for x, y in loader:
        with autocast(device, amp):
            z = fn(x.to(device, non_blocking=True))
        z, y = z.float(), torch.as_tensor(y)
        b = z.shape[0]
        if W > 1:  # rows (pos + i) * W + r, i < b, r < W: dataset positions pos * W .. (pos + b) * W - 1
            z = dist.gather_rows(z, W * b, "gathering the cached features")
            y = dist.gather_rows(y.to(device), W * b, "gathering the cached labels").cpu()
        start = pos * W
        keep = max(0, min(z.shape[0], n - start))  # the sampler's padding comes last
        store[start:start + keep] = z[:keep].to(store.device)
        labels[start:start + keep] = y[:keep]
        pos += b
        observer.eval_step()


@torch.no_grad()
def predict_cached(head: nn.Module, cache: FeatureCache, split: str, batch_size: int, device: torch.device,
                   amp_dtype, on_batch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``evaluate.predict`` on cached features: ``(logits (N, K) float32 on CPU, labels (N,))``; every rank
    holds every row, so nothing is gathered."""
    was_training = head.training
    head.eval()
    n = cache.labels[split].shape[0]
    out = []
    for s in range(0, n, batch_size):
        z = cache.rows(split, torch.arange(s, min(n, s + batch_size)), device)
        with autocast(device, amp_dtype):
            out.append(head(z).float().cpu())
        if on_batch is not None:
            on_batch()
    head.train(was_training)
    return torch.cat(out), cache.labels[split].clone()
