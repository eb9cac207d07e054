"""Names of the datasets vptool reads, the tasks inside them and their class counts (no I/O here).

``data.dataset`` in a recipe is one of ``DATASETS`` or ``torchvision:<Name>`` with ``<Name>`` in
``TORCHVISION_SETS``. The recipe validator uses these tables to reject an unknown name with a suggestion before
anything is read from disk.
"""

from __future__ import annotations

#: dataset readers with their own on-disk layout (``torchvision:<Name>`` is the other form).
DATASETS = ("digits", "imagefolder", "cub200", "fgvc-json", "vtab-1k")

#: fgvc-json tasks (VPT's FGVC benchmark): task -> (image folder relative to data.root that the JSON paths are
#: relative to, as in the VPT code's ``get_imagedir``; number of classes K).
FGVC_TASKS: dict[str, tuple[str, int]] = {
    "cub": ("images", 200),
    "nabirds": ("images", 555),
    "flowers": ("", 102),
    "dogs": ("Images", 120),
    "cars": ("", 196),
}

#: VTAB-1k task folders of the widely shared ``vtab-1k/<task>/`` layout -> number of classes K.
VTAB_TASKS: dict[str, int] = {
    "caltech101": 102, "cifar": 100, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37, "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2, "eurosat": 10, "resisc45": 45, "diabetic_retinopathy": 5,
    "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4, "dsprites_loc": 16, "dsprites_ori": 16,
    "smallnorb_azi": 18, "smallnorb_ele": 9,
}

#: VTAB-1k split files per protocol: (train, val, test).
VTAB_SPLITS = {"final": ("train800val200", "val200", "test"), "tune": ("train800", "val200", "test")}

#: ``torchvision:<Name>`` datasets (VPTM's list) -> number of classes K. Read with ``download=False``.
TORCHVISION_SETS: dict[str, int] = {
    "CIFAR10": 10, "CIFAR100": 100, "Flowers102": 102, "Food101": 101, "EuroSAT": 10, "SVHN": 10,
    "OxfordIIITPet": 37, "DTD": 47, "PCAM": 2,
}


def dataset_problem(dataset: str, task: str | None, num_classes: int | None = None) -> str | None:
    """One line naming what is wrong with ``data.dataset`` / ``data.task``, or None when they are valid.

    A ``vtab-1k`` task folder that is not one of the 19 (``VTAB_TASKS``) is a task of your own in the same layout
    (e.g. the digits stand-in tasks of ``vptool.data.digits_vtab``): valid when ``num_classes`` (``data.num_classes``,
    its K) is given.
    """
    import difflib

    if dataset.startswith("torchvision:"):
        name = dataset.split(":", 1)[1]
        if name not in TORCHVISION_SETS:
            by_lower = {n.lower(): n for n in TORCHVISION_SETS}
            close = [by_lower[c] for c in difflib.get_close_matches(name.lower(), list(by_lower), n=1)]
            hint = f"did you mean torchvision:{close[0]}?" if close else f"choose one of {', '.join(TORCHVISION_SETS)}"
            return f"data.dataset: torchvision dataset {name!r} is not supported; {hint}"
        return None
    if dataset not in DATASETS:
        close = difflib.get_close_matches(dataset, list(DATASETS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "choose one of " + ", ".join(DATASETS) + \
            " or torchvision:<Name>"
        return f"data.dataset: unknown dataset {dataset!r}; {hint}"
    tasks = {"fgvc-json": FGVC_TASKS, "vtab-1k": VTAB_TASKS}.get(dataset)
    if tasks is None:
        return None
    if task is None:
        return f"data.task: missing; {dataset} needs one of {', '.join(tasks)}"
    if task not in tasks:
        if dataset == "vtab-1k" and num_classes is not None:
            return None  # a task of one's own in the vtab-1k layout; K given
        close = difflib.get_close_matches(task, list(tasks), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(tasks)}"
        if dataset == "vtab-1k":
            hint += " (or set data.num_classes for a task folder of your own in the vtab-1k layout)"
        return f"data.task: {task!r} is not a {dataset} task; {hint}"
    return None


def expected_classes(dataset: str, task: str | None) -> int | None:
    """K of a known benchmark dataset/task (None for digits, imagefolder, cub200 reads classes.txt: 200)."""
    if dataset == "cub200":
        return 200
    if dataset == "fgvc-json" and task in FGVC_TASKS:
        return FGVC_TASKS[task][1]
    if dataset == "vtab-1k" and task in VTAB_TASKS:
        return VTAB_TASKS[task]
    if dataset.startswith("torchvision:"):
        return TORCHVISION_SETS.get(dataset.split(":", 1)[1])
    return None
