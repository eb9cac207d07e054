"""Datasets and transforms.

Readers (``data.dataset``): ``digits`` (bundled), ``imagefolder`` (your own images), ``cub200``
(CUB_200_2011 release), ``fgvc-json`` (VPT's FGVC JSON splits), ``vtab-1k`` (VTAB-1k split lists) and
``torchvision:<Name>`` (torchvision's classes, never downloading). Each returns train/val/test datasets of
``(image tensor, int label)`` with a ``targets`` list, and the class names.

Input size, mean and std always come from the backbone's data config (timm ``resolve_model_data_config``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vptool.errors import UserError
from vptool.options import TrainTransform, choices

#: ``data.train_transform`` values (see ``build_transforms``).
TRAIN_TRANSFORMS = choices(TrainTransform)

#: the FGVC evaluation resize: shorter side to size * 256 / 224 before the centre crop (VPT's FGVC setting).
FGVC_RESIZE_RATIO = (256, 224)

__all__ = ["Splits", "build_transforms", "build_splits", "check_layout", "make_loader", "FileListDataset",
           "TargetSubset", "TRAIN_TRANSFORMS"]

if TYPE_CHECKING:
    from torch.utils.data import DataLoader, Dataset


def __getattr__(name: str):
    """``FileListDataset`` and ``TargetSubset`` on first use: importing this package (the recipe checks do, and
    so does the CLI's start) must not import torch."""
    if name in ("FileListDataset", "TargetSubset"):
        from vptool.data import files

        return getattr(files, name)
    raise AttributeError(f"module 'vptool.data' has no attribute {name!r}")


@dataclass
class Splits:
    """The three splits and the class names (index = label)."""

    train: Dataset
    val: Dataset
    test: Dataset
    classes: list[str]

    def __getitem__(self, split: str) -> Dataset:
        if split not in ("train", "val", "test"):
            raise UserError(f"--split: {split!r} is not train, val or test")
        return getattr(self, split)


def build_transforms(data_config: dict, train_transform: str, from_pil: bool):
    """(train, eval) torchvision v2 transforms for a backbone's data config.

    ``vtab`` (VPT's VTAB setting): resize to the input size (H, W), no augmentation, for training and
    evaluation alike. ``fgvc`` (VPT's FGVC setting): training takes a random resized crop of the input size and
    a random horizontal flip; evaluation resizes the shorter side to floor(size * 256 / 224) (aspect ratio kept)
    and centre crops the input size. For a non-square input size (H, W) the evaluation resize is to
    (floor(H * 256 / 224), floor(W * 256 / 224)). Both end with normalisation by the config's mean and std.

    For PIL inputs the geometry runs on the uint8 image (``ToImage``, resize / crop / flip), then
    ``ToDtype(float32, scale=True)`` and the normalisation; each transform carries a ``vptool.data.cache.CacheForm``
    (``vptool_cache``) saying which ops the decoded-image cache may do once (``data.cache``).

    Args:
        data_config: timm data config (``input_size`` (3, H, W), ``mean``, ``std``).
        train_transform: ``vtab`` or ``fgvc``.
        from_pil: inputs are PIL images (file-based readers) rather than float tensors in [0, 1] (digits).

    Raises:
        UserError: an unknown ``train_transform``.
    """
    import torch
    from torchvision.transforms import v2

    if train_transform not in TRAIN_TRANSFORMS:
        raise UserError(f"data.train_transform: {train_transform!r} is not one of {', '.join(TRAIN_TRANSFORMS)} "
                        "(vtab: resize; fgvc: random resized crop + flip)")
    size = tuple(int(s) for s in data_config["input_size"][1:])
    norm = v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))
    num, den = FGVC_RESIZE_RATIO
    pre = size[0] * num // den if size[0] == size[1] else tuple(s * num // den for s in size)
    if not from_pil:  # digits: float tensors in [0, 1] already
        if train_transform == "fgvc":
            train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), norm])
            evaluate = v2.Compose([v2.Resize(pre, antialias=True), v2.CenterCrop(size), norm])
        else:
            train = evaluate = v2.Compose([v2.Resize(size, antialias=True), norm])
    else:  # PIL: the geometry on uint8 (as PIL-based pipelines do), then to float and normalised
        from vptool.data.cache import CacheForm

        tail = [v2.ToDtype(torch.float32, scale=True), norm]
        if train_transform == "fgvc":
            crop = v2.RandomResizedCrop(size, antialias=True)
            geometry = [v2.Resize(pre, antialias=True), v2.CenterCrop(size)]
            train = v2.Compose([v2.ToImage(), crop, v2.RandomHorizontalFlip(), *tail])
            train.vptool_cache = CacheForm(pre=[], post=train.transforms[1:], shrink=max(_as_pair(pre)), crop=crop)
            evaluate = v2.Compose([v2.ToImage(), *geometry, *tail])
            evaluate.vptool_cache = CacheForm(pre=geometry, post=tail, size=size)
        else:
            geometry = [v2.Resize(size, antialias=True)]
            train = evaluate = v2.Compose([v2.ToImage(), *geometry, *tail])
            train.vptool_cache = CacheForm(pre=geometry, post=tail, size=size)
    train.vptool_deterministic = train_transform != "fgvc"  # vptool.data.files.is_deterministic
    evaluate.vptool_deterministic = True
    return train, evaluate


def _as_pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    from vptool.data.files import checked_loader

    try:
        return ImageFolder(str(root), transform=transform, loader=checked_loader)
    except FileNotFoundError as exc:
        raise UserError(f"data.root: {root}: {exc}") from None


def _stratified_holdout(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """imagefolder's seeded stratified hold-out (``files.stratified_holdout`` with its fix hint)."""
    from vptool.data.files import stratified_holdout

    return stratified_holdout(targets, fraction, seed, what="train", fix="add a val/ folder or change "
                              "data.val_fraction")


IMAGEFOLDER_LAYOUT = "imagefolder expects <root>/train/<class>/* and <root>/test/<class>/* (val/ optional)"


def _imagefolder_layout(data) -> Path:
    if not data.root:
        raise UserError(f"data.root: missing; {IMAGEFOLDER_LAYOUT} (set data.root)")
    root = Path(data.root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} not found; {IMAGEFOLDER_LAYOUT}")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"data.root: {root / split} not found; {IMAGEFOLDER_LAYOUT}")
    return root


def _imagefolder(data, train_tf, eval_tf) -> Splits:
    from vptool.data.files import TargetSubset

    root = _imagefolder_layout(data)
    train = _image_folder(root / "train", train_tf)
    test = _image_folder(root / "test", eval_tf)
    if (root / "val").is_dir():
        val = _image_folder(root / "val", eval_tf)
    else:
        keep, held = _stratified_holdout(train.targets, data.val_fraction, data.split_seed)
        val_base = _image_folder(root / "train", eval_tf)
        train, val = TargetSubset(train, keep), TargetSubset(val_base, held)
    base_train = train.dataset if isinstance(train, TargetSubset) else train
    for name, ds in (("val", val.dataset if isinstance(val, TargetSubset) else val), ("test", test)):
        if ds.classes != base_train.classes:
            raise UserError(f"data.root: {root / name} has classes {ds.classes[:5]}..., train has "
                            f"{base_train.classes[:5]}...; every split needs the same <class> folders")
    return Splits(train, val, test, list(base_train.classes))


def _dataset_problem(data) -> None:
    from vptool.data.catalog import dataset_problem

    problem = dataset_problem(data.dataset, data.task, data.num_classes)
    if problem:
        raise UserError(problem)


def check_layout(data) -> None:
    """Check that the files and folders ``data.dataset``'s reader needs exist, without reading any image.

    Nothing is parsed or decoded and no torchvision dataset is constructed: ``vptool train --dry-run`` calls
    this to report a dataset that is not on disk yet. The errors are the ones ``build_splits`` raises for the
    same problem. ``digits`` needs nothing; ``imagefolder`` needs ``root/train`` and ``root/test``; ``cub200``,
    ``fgvc-json`` and ``vtab-1k`` their list files and image folder; ``torchvision:<Name>`` the files torchvision's
    reader requires (``tvsets.SETS``).

    Args:
        data: a recipe's ``data`` section (``DataConfig``).

    Raises:
        UserError: an unknown dataset or task, a missing root, list file or folder (one line naming it and the
            expected layout).
    """
    if data.dataset == "digits":
        return
    _dataset_problem(data)
    if data.dataset == "imagefolder":
        _imagefolder_layout(data)
    elif data.dataset == "cub200":
        from vptool.data import cub200

        cub200.check_layout(data.root)
    elif data.dataset == "fgvc-json":
        from vptool.data import fgvc

        fgvc.check_layout(data)
    elif data.dataset == "vtab-1k":
        from vptool.data import vtab

        vtab.check_layout(data)
    else:
        from vptool.data import tvsets

        tvsets.check_layout(data.dataset.split(":", 1)[1], data.root)


def build_splits(data, data_config: dict, train_eval_transform: bool = False) -> Splits:
    """Build train/val/test datasets from a recipe's ``data`` section.

    Every split yields ``(image tensor (3, H, W) after its transform, int label)`` and has ``targets``
    (``list[int]``). Train gets the training transform (``data.train_transform``), val and test the eval
    transform; ``train_eval_transform`` gives train the eval transform too (feature extraction, ``init-prompts``).

    - ``digits``: stratified seeded 70/10/20 split of scikit-learn's digits.
    - ``imagefolder``: ``root/{train,val,test}/<class>/*``; without ``val/``, a seeded stratified
      ``val_fraction`` of train.
    - ``cub200``: official test; a seeded stratified ``val_fraction`` of the official train as val
      (``vptool.data.cub200``).
    - ``fgvc-json``: VPT's ``{train,val,test}.json`` (``vptool.data.fgvc``).
    - ``vtab-1k``: ``<task>/{train800,val200,train800val200,test}.txt`` by ``data.vtab_split``
      (``vptool.data.vtab``).
    - ``torchvision:<Name>``: the official splits, a held-out val where there is none (``vptool.data.tvsets``).

    Every listed image file is checked to exist here; images are decoded when an item is indexed.

    Raises:
        UserError: unknown dataset or task, missing root / list files / images, malformed lists, labels out of
            range, class lists that differ between splits, an impossible hold-out, unreadable torchvision files.
    """
    if data.dataset == "digits":
        from vptool.data.digits import CLASSES, DigitsDataset

        train_tf, eval_tf = build_transforms(data_config, data.train_transform, from_pil=False)
        train_tf = eval_tf if train_eval_transform else train_tf
        return Splits(DigitsDataset("train", train_tf, data.split_seed), DigitsDataset("val", eval_tf, data.split_seed),
                      DigitsDataset("test", eval_tf, data.split_seed), list(CLASSES))

    _dataset_problem(data)
    train_tf, eval_tf = build_transforms(data_config, data.train_transform, from_pil=True)
    train_tf = eval_tf if train_eval_transform else train_tf
    if data.dataset == "imagefolder":
        return _imagefolder(data, train_tf, eval_tf)
    if data.dataset == "cub200":
        from vptool.data import cub200 as reader

        return Splits(*reader.build(data, train_tf, eval_tf))
    if data.dataset == "fgvc-json":
        from vptool.data import fgvc as reader

        return Splits(*reader.build(data, train_tf, eval_tf))
    if data.dataset == "vtab-1k":
        from vptool.data import vtab as reader

        return Splits(*reader.build(data, train_tf, eval_tf))
    from vptool.data import tvsets

    return Splits(*tvsets.build(data.dataset.split(":", 1)[1], data, train_tf, eval_tf))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                pin_memory: bool, sampler=None) -> DataLoader:
    """A DataLoader with a seeded shuffle order (``torch.Generator``, which also seeds the workers' RNGs) and
    pinned memory on CUDA (the loops copy batches to the device with ``non_blocking=True``); ``sampler`` (e.g. the
    training loop's resumable ``TrainSampler``) replaces the shuffle. Workers (``num_workers`` > 0: a count
    ``vptool.data.loading.num_workers`` resolved) persist from one pass over the loader to the next."""
    import torch
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else None,
                      sampler=sampler, num_workers=num_workers,
                      generator=g, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=num_workers > 0)
