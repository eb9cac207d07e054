"""``torchvision:<Name>``: the torchvision dataset classes of VPTM's benchmark list, read with ``download=False``.

``data.root`` is the folder torchvision's class is given as ``root``; ``LAYOUTS`` lists what each class reads
under it. vptool never downloads: fetch the release files yourself (or once with torchvision's own
``download=True``) and point ``data.root`` at their parent folder.

Splits (train / val / test):

==============  ===================================================================
CIFAR10/100     train minus a held-out val / held-out val / test
Flowers102      train / val / test (official)
Food101         train minus a held-out val / held-out val / test
EuroSAT         no official split: see below
SVHN            train minus a held-out val / held-out val / test (``extra`` unused)
OxfordIIITPet   trainval minus a held-out val / held-out val / test
DTD             train1 / val1 / test1 (partition 1)
PCAM            train / val / test (official; needs ``h5py``)
==============  ===================================================================

A held-out val is a seeded stratified ``data.val_fraction`` of the official training split (seed
``data.split_seed``) and uses the eval transform. EuroSAT ships one folder of 27,000 images; the VPTM paper
does not say how it split them, so vptool holds out a seeded stratified 20 % as test, then ``data.val_fraction``
of the rest as val, both with ``data.split_seed`` (so test membership changes with the seed, as for digits).

Class names come from the torchvision dataset's ``classes`` where it has them (SVHN and PCAM have none:
``"0".."K-1"``). Labels are torchvision's (SVHN's digit 0 is label 0).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from vptool.data.catalog import TORCHVISION_SETS
from vptool.data.files import checked_loader, require, require_images, require_root, stratified_holdout
from vptool.errors import UserError


@dataclass(frozen=True)
class TVSet:
    """What one torchvision dataset class reads and which splits vptool takes from it.

    Attributes:
        required: paths under ``data.root`` torchvision reads; a trailing ``/`` marks a folder.
        layout: the same, written compactly for error messages (``<root>`` is replaced by ``data.root``).
        splits: torchvision's split names for (train, val, test); val None = held out of train.
        loader: the class takes a ``loader`` argument (then vptool passes its checked PIL loader).
    """

    required: tuple[str, ...]
    layout: str
    splits: tuple[str | None, str | None, str | None]
    loader: bool = True


_PCAM = "camelyonpatch_level_2_split_{}_{}.h5"
SETS: dict[str, TVSet] = {
    "CIFAR10": TVSet(tuple(f"cifar-10-batches-py/{f}" for f in
                           [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
                     "<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}",
                     ("train", None, "test"), loader=False),
    "CIFAR100": TVSet(("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
                      "<root>/cifar-100-python/{train,test,meta}", ("train", None, "test"), loader=False),
    "Flowers102": TVSet(("flowers-102/jpg/", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
                        "<root>/flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}",
                        ("train", "val", "test")),
    "Food101": TVSet(("food-101/images/", "food-101/meta/train.json", "food-101/meta/test.json"),
                     "<root>/food-101/{images/<class>/<id>.jpg,meta/train.json,meta/test.json}",
                     ("train", None, "test")),
    "EuroSAT": TVSet(("eurosat/2750/",), "<root>/eurosat/2750/<class>/*.jpg", (None, None, None)),
    "SVHN": TVSet(("train_32x32.mat", "test_32x32.mat"), "<root>/{train_32x32.mat,test_32x32.mat}",
                  ("train", None, "test"), loader=False),
    "OxfordIIITPet": TVSet(("oxford-iiit-pet/images/", "oxford-iiit-pet/annotations/trainval.txt",
                            "oxford-iiit-pet/annotations/test.txt"),
                           "<root>/oxford-iiit-pet/{images/*.jpg,annotations/trainval.txt,annotations/test.txt}",
                           ("trainval", None, "test"), loader=False),
    "DTD": TVSet(("dtd/dtd/images/", "dtd/dtd/labels/train1.txt", "dtd/dtd/labels/val1.txt",
                  "dtd/dtd/labels/test1.txt"),
                 "<root>/dtd/dtd/{images/<class>/*.jpg,labels/train1.txt,labels/val1.txt,labels/test1.txt}",
                 ("train", "val", "test")),
    "PCAM": TVSet(tuple("pcam/" + _PCAM.format(s, xy) for s in ("train", "valid", "test") for xy in ("x", "y")),
                  "<root>/pcam/" + _PCAM.format("{train,valid,test}", "{x,y}"), ("train", "val", "test"),
                  loader=False),
}
assert set(SETS) == set(TORCHVISION_SETS)

EUROSAT_TEST_FRACTION = 0.2


def layout(name: str, root: str | Path | None) -> str:
    """One line: what ``torchvision:<name>`` expects under ``root``, and that vptool never downloads."""
    where = SETS[name].layout.replace("<root>", str(root) if root else "<root>")
    return (f"torchvision:{name} expects {where} (vptool never downloads: fetch the dataset and point data.root "
            "at the folder that holds it)")


def check_layout(name: str, root: str | Path | None) -> Path:
    """Check that the files and folders torchvision's reader needs exist (no dataset is constructed).

    Returns:
        ``data.root`` as a Path.

    Raises:
        UserError: the root or a required file/folder is missing; names it and the expected layout.
    """
    path = require_root(root, layout(name, root))
    for rel in SETS[name].required:
        require(path / rel.rstrip("/"), layout(name, root), folder=rel.endswith("/"))
    return path


class TorchvisionSplit(Dataset):
    """A split (or a subset of one) of a torchvision dataset, with vptool's transform and int labels.

    The torchvision dataset is built once without a transform; ``transform`` is applied to the PIL image it
    returns, so a held-out val can share the training split's dataset object with a different transform.

    Args:
        dataset: the torchvision dataset (transform None).
        indices: the items of ``dataset`` in this split (None: all).
        transform: callable on a PIL RGB image.
        targets: every label of ``dataset``.
        classes: the K class names.

    Attributes:
        dataset, indices, transform, classes; targets: the labels of this split's items, ``list[int]``.
    """

    def __init__(self, dataset, indices: list[int] | None, transform, targets: list[int], classes: list[str]):
        self.dataset = dataset
        self.indices = list(range(len(targets))) if indices is None else list(indices)
        self.transform = transform
        self.targets = [int(targets[i]) for i in self.indices]
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        try:
            img, _ = self.dataset[j]
        except UserError:
            raise
        except OSError as exc:
            msg = " ".join(str(exc).split())
            raise UserError(f"{type(self.dataset).__name__} item {j}: cannot read image ({type(exc).__name__}: "
                            f"{msg}); remove or replace the file") from None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[i]


def _construct(name: str, root: Path, split: str | None):
    """torchvision's dataset object for one official split (``download=False``, no transform)."""
    import torchvision.datasets as tvd

    spec = SETS[name]
    cls = getattr(tvd, name)
    kw: dict = {"download": False}
    if spec.loader:
        kw["loader"] = checked_loader
    if name in ("CIFAR10", "CIFAR100"):
        kw["train"] = split == "train"
    elif name == "DTD":
        kw.update(split=split, partition=1)
    elif split is not None:
        kw["split"] = split
    try:
        return cls(str(root), **kw)
    except UserError:
        raise
    except Exception as exc:  # torchvision: RuntimeError "Dataset not found or corrupted"; unreadable files
        msg = " ".join(str(exc).split())
        raise UserError(f"data.root: {root}: torchvision:{name} cannot read its {split or 'image'} files "
                        f"({type(exc).__name__}: {msg}); {layout(name, root)}") from None


def _targets(name: str, root: Path, split: str | None, ds) -> list[int]:
    """Every label of one torchvision split, without decoding images."""
    if name == "PCAM":  # labels live in their own h5 file, (N, 1, 1, 1)
        import h5py

        part = {"train": "train", "val": "valid", "test": "test"}[split]
        with h5py.File(root / "pcam" / _PCAM.format(part, "y"), "r") as fh:
            return [int(t) for t in fh["y"][:, 0, 0, 0]]
    for attr in ("targets", "_labels", "labels"):
        values = getattr(ds, attr, None)
        if values is not None:
            return [int(t) for t in values]
    raise AssertionError(f"torchvision:{name}: no label list found on {type(ds).__name__}")


def _check_images(name: str, root: Path, split: str, ds) -> None:
    """Every image file the split lists exists (file-based sets; CIFAR/SVHN/PCAM hold arrays)."""
    files = getattr(ds, "_image_files", None) or getattr(ds, "_images", None)
    if files:
        require_images(files, f"torchvision:{name}'s {split} split", layout(name, root))


def _classes(name: str, ds) -> list[str]:
    names = getattr(ds, "classes", None)
    return list(names) if names else [str(i) for i in range(TORCHVISION_SETS[name])]


def build(name: str, data, train_tf, eval_tf) -> tuple[TorchvisionSplit, TorchvisionSplit, TorchvisionSplit,
                                                      list[str]]:
    """``(train, val, test, classes)`` of ``torchvision:<name>`` (see the module docstring).

    Raises:
        UserError: a missing file (checked before torchvision runs), files torchvision cannot read or that fail
            its md5 check, missing ``h5py`` for PCAM, an impossible hold-out.
    """
    if name == "PCAM" and importlib.util.find_spec("h5py") is None:
        raise UserError("data.dataset: torchvision:PCAM needs the h5py package, which vptool does not install; "
                        "pip install h5py")
    root = check_layout(name, data.root)
    spec = SETS[name]
    if name == "EuroSAT":
        base = _construct(name, root, None)
        targets = _targets(name, root, None, base)
        rest, test = stratified_holdout(targets, EUROSAT_TEST_FRACTION, data.split_seed,
                                        what=f"torchvision:EuroSAT's {len(targets)} images as test")
        keep, held = stratified_holdout([targets[i] for i in rest], data.val_fraction, data.split_seed,
                                        what=f"torchvision:EuroSAT's {len(rest)} non-test images")
        classes = _classes(name, base)
        return (TorchvisionSplit(base, [rest[i] for i in keep], train_tf, targets, classes),
                TorchvisionSplit(base, [rest[i] for i in held], eval_tf, targets, classes),
                TorchvisionSplit(base, test, eval_tf, targets, classes), classes)

    train_split, val_split, test_split = spec.splits
    built = {}
    for split in (train_split, val_split, test_split):
        if split is not None:
            ds = _construct(name, root, split)
            _check_images(name, root, split, ds)
            built[split] = (ds, _targets(name, root, split, ds))
    base, targets = built[train_split]
    classes = _classes(name, base)
    for split in (val_split, test_split):
        other = getattr(built[split][0], "classes", None) if split is not None else None
        if other is not None and list(other) != classes:
            raise UserError(f"data.root: {root}: torchvision:{name}'s {split} split has classes {list(other)[:5]}..., "
                            f"its {train_split} split {classes[:5]}...; every split needs the same classes")
    test_ds, test_targets = built[test_split]
    test = TorchvisionSplit(test_ds, None, eval_tf, test_targets, classes)
    if val_split is not None:
        train = TorchvisionSplit(base, None, train_tf, targets, classes)
        val = TorchvisionSplit(built[val_split][0], None, eval_tf, built[val_split][1], classes)
    else:
        keep, held = stratified_holdout(targets, data.val_fraction, data.split_seed,
                                        what=f"torchvision:{name}'s {len(targets)} {train_split} images")
        train = TorchvisionSplit(base, keep, train_tf, targets, classes)
        val = TorchvisionSplit(base, held, eval_tf, targets, classes)
    return train, val, test, classes
