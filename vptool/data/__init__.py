"""Datasets and transforms: ``digits`` (bundled) and ``imagefolder`` (your own images).

Input size, mean and std always come from the backbone's data config (timm ``resolve_model_data_config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vptool.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


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

    ``resize`` (VPT's VTAB setting): resize to the input size, both for training and evaluation.
    ``crop_flip`` (VPT's FGVC setting): random resized crop + horizontal flip for training; for evaluation,
    resize the shorter side to size / crop_pct (aspect ratio kept) and center crop.

    Args:
        data_config: timm data config (``input_size`` (3, H, W), ``mean``, ``std``, ``crop_pct``).
        train_transform: ``resize`` or ``crop_flip``.
        from_pil: inputs are PIL images (imagefolder) rather than float tensors in [0, 1] (digits).
    """
    from torchvision.transforms import v2

    size = tuple(data_config["input_size"][1:])
    head = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)] if from_pil else []
    norm = v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"]))
    if train_transform == "crop_flip":
        crop_pct = float(data_config.get("crop_pct") or 0.875)
        train = v2.Compose(head + [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), norm])
        if size[0] == size[1]:  # shorter side to size / crop_pct, aspect kept (timm's eval transform)
            pre = int(math.floor(size[0] / crop_pct))
        else:
            pre = tuple(int(math.floor(s / crop_pct)) for s in size)
        evaluate = v2.Compose(head + [v2.Resize(pre, antialias=True), v2.CenterCrop(size), norm])
    else:
        train = v2.Compose(head + [v2.Resize(size, antialias=True), norm])
        evaluate = train
    return train, evaluate


def _checked_loader(path: str):
    """PIL loader that names the file when an image is corrupt or unreadable."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            return img.convert("RGB")
    except Exception as exc:
        raise UserError(f"{path}: cannot read image ({type(exc).__name__}: {exc}); remove or replace the file") \
            from None


def _image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform, loader=_checked_loader)
    except FileNotFoundError as exc:
        raise UserError(f"data.root: {root}: {exc}") from None


def _stratified_holdout(targets: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=targets, random_state=seed)
    except ValueError as exc:
        raise UserError(f"data.val_fraction: cannot hold out a stratified {fraction} of train ({exc}); "
                        "add a val/ folder or change data.val_fraction") from None
    return sorted(keep.tolist()), sorted(held.tolist())


def build_splits(data, data_config: dict, train_eval_transform: bool = False) -> Splits:
    """Build train/val/test datasets from a recipe's ``data`` section.

    ``train_eval_transform`` gives the training split the deterministic eval transform (feature extraction,
    ``init-prompts``).

    ``digits``: stratified seeded 70/10/20 split of scikit-learn's digits. ``imagefolder``:
    ``root/{train,val,test}/<class>/*``; without ``val/``, a seeded stratified ``val_fraction`` of train.

    Raises:
        UserError: missing root or split folders, class lists that differ between splits.
    """
    if data.dataset == "digits":
        from vptool.data.digits import CLASSES, DigitsDataset

        train_tf, eval_tf = build_transforms(data_config, data.train_transform, from_pil=False)
        train_tf = eval_tf if train_eval_transform else train_tf
        return Splits(DigitsDataset("train", train_tf, data.split_seed), DigitsDataset("val", eval_tf, data.split_seed),
                      DigitsDataset("test", eval_tf, data.split_seed), list(CLASSES))

    root = Path(data.root)
    if not root.is_dir():
        raise UserError(f"data.root: {root} not found; point it at a folder with train/ and test/ "
                        "subfolders of <class>/ image folders")
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"data.root: {root / split} not found; imagefolder needs {root}/train/<class>/* "
                            f"and {root}/test/<class>/* (val/ optional)")
    train_tf, eval_tf = build_transforms(data_config, data.train_transform, from_pil=True)
    train_tf = eval_tf if train_eval_transform else train_tf
    train = _image_folder(root / "train", train_tf)
    test = _image_folder(root / "test", eval_tf)
    if (root / "val").is_dir():
        val = _image_folder(root / "val", eval_tf)
    else:
        keep, held = _stratified_holdout(train.targets, data.val_fraction, data.split_seed)
        val_base = _image_folder(root / "train", eval_tf)
        train, val = Subset(train, keep), Subset(val_base, held)
    classes = val.dataset.classes if isinstance(val, Subset) else val.classes
    base_train = train.dataset if isinstance(train, Subset) else train
    for name, ds in (("val", val if not isinstance(val, Subset) else val.dataset), ("test", test)):
        if ds.classes != base_train.classes:
            raise UserError(f"data.root: {root / name} has classes {ds.classes[:5]}..., train has "
                            f"{base_train.classes[:5]}...; every split needs the same <class> folders")
    return Splits(train, val, test, list(classes))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int, seed: int,
                pin_memory: bool) -> DataLoader:
    """A DataLoader with a seeded shuffle order (``torch.Generator``) and pinned memory on CUDA."""
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      generator=g, pin_memory=pin_memory, drop_last=False,
                      persistent_workers=num_workers > 0)
