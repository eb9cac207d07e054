"""The decoded-image cache of a training run (``data.cache: auto``; the cache itself: ``vptool.data.cache``).

``wrap`` puts the train and val splits of a file dataset behind ``CachedImages`` (the test split is read once, so
it is not cached), and ``build`` decodes each of their images once, before the first epoch, with
``data.num_workers`` processes. A head-only run on cached features (``vptool.engine.features``) reads every image
once anyway, so it gets no image cache.

Storage: in host memory when the cached bytes fit half of the available memory (shared by the node's local
ranks), else ``RUN/.image_cache/<split>/`` (rank 0; other ranks a folder of their own in the system temporary
directory), memory-mapped. The folder is removed when training ends; the next attempt after a kill reuses a
split's folder only when its key (images, file sizes and mtimes, transform) matches, and removes it otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from vptool.data import Splits
from vptool.data.cache import CachedImages, file_items, open_store
from vptool.data.loading import local_world_size, num_workers
from vptool.recipe import Recipe

#: the cache folder inside a run directory (removed when training ends)
CACHE_DIR = ".image_cache"
#: the cached splits
SPLITS = ("train", "val")


def cache_root(run: Path, rank: int) -> Path:
    """``RUN/.image_cache`` for rank 0; other ranks (maybe on another node) a folder in the temporary directory."""
    if rank == 0:
        return Path(run) / CACHE_DIR
    return Path(tempfile.gettempdir()) / f"vptool-image-cache-{os.getpid()}"


def wrap(recipe: Recipe, splits: Splits) -> tuple[Splits, dict[str, CachedImages]]:
    """``splits`` with train and val behind ``CachedImages`` (still decoding until ``build``), and those two;
    ``splits`` itself and no split when ``data.cache`` is off or the dataset is not file-based."""
    if recipe.data.cache == "off":
        return splits, {}
    cached = {s: CachedImages(splits[s]) for s in SPLITS if file_items(splits[s]) is not None}
    if not cached:
        return splits, {}
    return Splits(**{s: cached.get(s, splits[s]) for s in ("train", "val", "test")}, classes=splits.classes), cached


def memory_budget() -> int:
    """Bytes the image cache may keep in host memory: half of the available memory over the node's local ranks."""
    from vptool.engine.setup import available_memory

    return available_memory(torch.device("cpu")) // 2 // local_world_size()


@dataclass
class ImageCaches:
    """The filled caches of one run; ``close`` drops them and removes their folder (idempotent)."""

    datasets: dict[str, CachedImages]
    root: Path | None = None

    def close(self) -> None:
        for ds in self.datasets.values():
            ds.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


def build(recipe: Recipe, datasets: dict[str, CachedImages], run: Path, rank: int, observer,
          budget: int | None = None) -> ImageCaches:
    """Fill ``datasets`` (``wrap``'s), each image decoded once, and note the size and where it is kept.

    Args:
        budget: host bytes the caches may take in memory (default ``memory_budget()``; tests pass 0 to force
            the memory-mapped files).

    Raises:
        UserError: an unreadable image.
    """
    root = cache_root(run, rank)
    sizes = {s: ds.planned_sizes() for s, ds in datasets.items()}
    nbytes = sum(int((3 * z[:, 0] * z[:, 1]).sum()) for z in sizes.values())
    in_memory = nbytes <= (memory_budget() if budget is None else budget)
    keep = set()
    if not in_memory:  # a killed attempt's folder for the same images and transform is complete: reuse it
        for s, ds in datasets.items():
            store = open_store(root / s, ds.key)
            if store is not None:
                ds.attach(store)
                keep.add(s)
    _clear(root, keep)
    caches = ImageCaches(dict(datasets), None if in_memory else root)
    where = "in host memory" if in_memory else f"in {root} (memory-mapped, deleted when training ends)"
    counts = " + ".join(f"{s} {len(ds):,d}" for s, ds in datasets.items())
    reused = f"; reused {', '.join(sorted(keep))} from the last attempt" if keep else ""
    observer.note(f"image cache: {counts} images decoded once, {nbytes / 2**20:,.1f} MiB of uint8 {where}{reused} "
                  "(data.cache: off decodes every epoch)")
    try:
        for s, ds in datasets.items():
            if s in keep:
                continue
            folder = None
            if not in_memory:
                folder = root / s
                folder.mkdir(parents=True)
            observer.eval_start(f"images {s}", len(ds))
            ds.fill(sizes[s], folder, num_workers(recipe.data, len(ds)), on_image=observer.eval_step)
    except BaseException:
        caches.close()
        raise
    return caches


def _clear(root: Path, keep: set[str]) -> None:
    """Remove everything in ``root`` but the reused split folders (a killed attempt's leftovers, a cache built for
    other images or another transform)."""
    if not root.is_dir():
        return
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
        return
    for child in root.iterdir():
        if child.name not in keep:
            shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)


def training_loader(recipe: Recipe, data_config: dict, work: Path, observer=None, epoch: int = 1):
    """The training loader a run of ``recipe`` iterates, without a model (for ``bench/``): the train split with
    the image cache when ``data.cache`` takes it (built now, under ``work``), ``TrainSampler``'s order for
    ``epoch``, ``data.batch_size`` images per batch, ``data.num_workers`` resolved as training does, memory
    pinned when CUDA is available.

    Args:
        data_config: ``input_size`` (3, H, W), ``mean``, ``std`` (a backbone's timm data config).
        work: the folder a memory-mapped cache goes to (``work/.image_cache``).
        observer: a ``vptool.progress.Progress`` for the cache's note and progress (default: none).

    Returns:
        ``(loader, caches)``: batches ``(x (B, 3, H, W) float32, y (B,), w (B,))``; ``caches`` (None when
        uncached) must be closed by the caller (it removes ``work/.image_cache``).

    Raises:
        UserError: what ``build_splits`` raises for the data section.
    """
    from vptool.data import build_splits, make_loader
    from vptool.engine.schedule import TrainSampler, WeightedSplit
    from vptool.progress import Progress

    splits, sets = wrap(recipe, build_splits(recipe.data, data_config))
    sets = {s: ds for s, ds in sets.items() if s == "train"}
    caches = build(recipe, sets, Path(work), 0, observer or Progress()) if sets else None
    n = len(splits.train)
    sampler = TrainSampler(n, recipe.seed)
    sampler.set_epoch(epoch)
    loader = make_loader(WeightedSplit(splits.train), recipe.data.batch_size, shuffle=False,
                         num_workers=num_workers(recipe.data, n), seed=recipe.seed,
                         pin_memory=torch.cuda.is_available(), sampler=sampler)
    return loader, caches
