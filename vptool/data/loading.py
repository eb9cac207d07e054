"""How many DataLoader worker processes a loader gets (``data.num_workers``), without importing torch.

``auto`` (per process; under torchrun per local rank):

- 0 for ``digits`` (in memory, 8x8 images: a worker's start-up, ~1-2 s with torch imported, costs more than the
  whole epoch) and for a split under ``AUTO_MIN_IMAGES`` images;
- else ``min(AUTO_MAX_WORKERS, CPUs // local ranks - 1)``, at least 0: the CPUs this process may run on
  (``os.sched_getaffinity``, else ``os.cpu_count``), shared by torchrun's ``LOCAL_WORLD_SIZE`` ranks on this node,
  one CPU left to the training process itself.

With workers, the training transform's random draws (``data.train_transform: fgvc``) come from per-worker streams
seeded from the run's seed: a rerun with the same worker count repeats them, another count draws others, and a
resumed run repeats the data order but not those draws. The ``vtab`` transform draws nothing, so every worker
count gives the same batches.
"""

from __future__ import annotations

import os

#: ``auto`` gives no workers to a split with fewer images than this
AUTO_MIN_IMAGES = 512
#: ``auto`` gives at most this many workers per process
AUTO_MAX_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def local_world_size() -> int:
    """Processes of this job on this node: torchrun's ``LOCAL_WORLD_SIZE``, 1 outside torchrun."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def resolve_num_workers(setting: int | str, n_images: int, dataset: str, cpus: int | None = None,
                        local_world: int | None = None) -> int:
    """The worker count of one loader.

    Args:
        setting: ``data.num_workers``: a count >= 0 (returned as is) or ``auto``.
        n_images: images in the loader's split.
        dataset: ``data.dataset`` (``digits`` gets 0 under ``auto``).
        cpus: CPUs of this process (default ``usable_cpus()``).
        local_world: processes on this node (default ``local_world_size()``).

    Returns:
        Worker processes, >= 0.
    """
    if setting != "auto":
        return int(setting)
    if dataset == "digits" or n_images < AUTO_MIN_IMAGES:
        return 0
    cpus = usable_cpus() if cpus is None else cpus
    local_world = local_world_size() if local_world is None else local_world
    return max(0, min(AUTO_MAX_WORKERS, cpus // max(1, local_world) - 1))


def num_workers(data, n_images: int) -> int:
    """``resolve_num_workers`` for a recipe's ``data`` section and a split of ``n_images`` images."""
    return resolve_num_workers(data.num_workers, n_images, data.dataset)
