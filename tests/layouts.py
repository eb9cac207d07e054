"""Tiny on-disk stand-ins of the dataset layouts vptool reads, drawn from scikit-learn's digits.

Each ``make_*`` writes one layout under ``root`` and returns the folder to set as ``data.root``.
``written(that folder)`` then gives what was written (a ``StandIn``): per split, in the order the layout lists
them, each image (its file, or for array-based sets its HWC uint8 array) with the label a correct reader must
return, and the class names where the layout fixes them. Tests compute their expectations from that, never from
the reader.

Images are distinct digits (8x8, values 0..16) scaled up to 16x16 (32x32 for the CIFAR/SVHN arrays) RGB with a
per-channel tint, saved as PNG. Where torchvision insists on a ``.jpg`` name the file is still PNG data (PIL
detects the format from the bytes), so pixel values stay exact.

``link=True`` (and ``make_full``) writes one PNG and hard-links every other image to it: stand-ins with a
benchmark's full class count (200 CUB classes, 555 NABirds, 397 sun397, ...) in well under a second, for tests
that only need the layout and the class count.

torchvision md5-checks the CIFAR pickles, the Flowers102 ``.mat`` files and the SVHN ``.mat`` files against the
real releases; a stand-in cannot pass that. Tests that construct those sets replace the check in-process with a
file-exists check (``patch_torchvision_md5``); vptool itself never does. PCAM needs ``h5py`` (not a vptool
dependency): without it the PCAM stand-in is layout-only (empty files with the right names).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from vptool.data.catalog import FGVC_TASKS, TORCHVISION_SETS, VTAB_TASKS

Item = tuple  # (Path | np.ndarray, label)


@dataclass
class StandIn:
    """What a ``make_*`` call wrote.

    Attributes:
        root: the folder to set as ``data.root``.
        splits: split name (the layout's own: ``train``/``test`` for cub200, ``train800``/``val200``/... for
            vtab-1k, torchvision's split names) -> ``[(image file or HWC uint8 array, label)]`` in listed order.
        classes: class names (index = label) where the layout defines them, else None.
        extra: layout-specific facts (fgvc-json: the original class ids).
    """

    root: Path
    splits: dict[str, list[Item]]
    classes: list[str] | None = None
    extra: dict = field(default_factory=dict)


WRITTEN: dict[Path, StandIn] = {}


def written(root) -> StandIn:
    """The record of the stand-in whose ``data.root`` is ``root``."""
    return WRITTEN[Path(root)]


def _record(s: StandIn) -> Path:
    WRITTEN[Path(s.root)] = s
    return Path(s.root)


# ---------------------------------------------------------------------------------------------------- images
@lru_cache(maxsize=1)
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().images  # (1797, 8, 8), values 0..16, no two alike


def digit_rgb(i: int, scale: int = 2) -> np.ndarray:
    """The i-th scikit-learn digit as an (8*scale, 8*scale, 3) uint8 RGB array (tinted per channel)."""
    g = np.round(_digits()[i % len(_digits())] * 255 / 16).astype(np.uint8)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1)
    return rgb.repeat(scale, 0).repeat(scale, 1)


class _Images:
    """Writes image files: distinct digits in order, or (``link``) one PNG hard-linked everywhere."""

    def __init__(self, link: bool = False, start: int = 0):
        self.link = link
        self.next = start
        self.first: Path | None = None

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.link and self.first is not None:
            os.link(self.first, path)
            return path
        Image.fromarray(digit_rgb(self.next), "RGB").save(path, format="PNG")
        self.next += 1
        self.first = self.first or path
        return path


def load_rgb01(path: Path):
    """An image file as a float (3, H, W) torch tensor in [0, 1], read with PIL."""
    import torch

    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).float()


# ---------------------------------------------------------------------------------------------------- cub200
def make_cub200(root: Path, n_classes: int = 3, per_class_train: int = 10, per_class_test: int = 4,
                link: bool = False, seed: int = 0) -> Path:
    """``root/CUB_200_2011/`` with images.txt, image_class_labels.txt, train_test_split.txt, classes.txt and
    images/<NNN.Class_k>/<Class_k>_<j>.png; train and test images of a class interleaved (seeded).

    Returns:
        the ``CUB_200_2011`` folder; ``written()`` gives splits ``train``/``test`` (images.txt order) and classes.
    """
    base = Path(root) / "CUB_200_2011"
    rng = np.random.default_rng(seed)
    imgs = _Images(link)
    classes = [f"{k + 1:03d}.Class_{k}" for k in range(n_classes)]
    images, labels, flags = [], [], []
    splits: dict[str, list[Item]] = {"train": [], "test": []}
    image_id = 0
    for k, folder in enumerate(classes):
        order = rng.permutation([1] * per_class_train + [0] * per_class_test)
        for j, is_train in enumerate(order):
            image_id += 1
            rel = f"{folder}/{folder[4:]}_{j:04d}.png"
            path = imgs.write(base / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {k + 1}")
            flags.append(f"{image_id} {int(is_train)}")
            splits["train" if is_train else "test"].append((path, k))
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(flags) + "\n")
    (base / "classes.txt").write_text("".join(f"{k + 1} {c}\n" for k, c in enumerate(classes)))
    return _record(StandIn(base, splits, classes))


# ------------------------------------------------------------------------------------------------- fgvc-json
def fgvc_class_ids(n_classes: int) -> list[int]:
    """Increasing, non-contiguous class ids whose string order differs from their integer order (2, 11, ...)."""
    return [2 + 9 * k + (k * k) % 5 for k in range(n_classes)]


def make_fgvc_json(root: Path, task: str, n_classes: int = 3, per_class: int | dict = 2, link: bool = False,
                   image_dir: str | None = None, seed: int = 0) -> Path:
    """``root/<task>/{train,val,test}.json`` + images under the task's image folder (catalog.FGVC_TASKS, or
    ``image_dir``). Class ids are ``fgvc_class_ids`` (non-contiguous); each JSON lists its images shuffled.

    Args:
        per_class: images per class, one int for every split or ``{"train": n, "val": n, "test": n}``.

    Returns:
        the task folder; ``written()`` gives splits ``train``/``val``/``test`` in JSON order with contiguous
        labels (rank of the id), classes = the ids as strings, extra ``ids``.
    """
    base = Path(root) / task
    folder = FGVC_TASKS[task][0] if image_dir is None else image_dir
    counts = per_class if isinstance(per_class, dict) else {s: per_class for s in ("train", "val", "test")}
    ids = fgvc_class_ids(n_classes)
    rng = np.random.default_rng(seed)
    imgs = _Images(link)
    splits: dict[str, list[Item]] = {}
    base.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        rows = []
        for k, cid in enumerate(ids):
            for j in range(counts[split]):
                rel = f"{cid:04d}.bird_{cid}/{split}_{j:03d}.png"
                rows.append((rel, cid, k, imgs.write(base / folder / rel)))
        rows = [rows[i] for i in rng.permutation(len(rows))]
        (base / f"{split}.json").write_text(json.dumps({rel: cid for rel, cid, _, _ in rows}))
        splits[split] = [(path, k) for _, _, k, path in rows]
    return _record(StandIn(base, splits, [str(c) for c in ids], {"ids": ids, "image_dir": folder}))


# --------------------------------------------------------------------------------------------------- vtab-1k
def make_vtab(root: Path, task: str, n_classes: int = 3, per_split: dict | None = None, link: bool = False) -> Path:
    """``root/vtab-1k/<task>/{train800,val200,train800val200,test}.txt`` + ``images/<split>/<n>.png``.

    Args:
        per_split: images per class per list, e.g. ``{"train800": 3, "val200": 1, "test": 2}``;
            train800val200 is written as train800's lines followed by val200's (the same files) unless given.

    Returns:
        the ``vtab-1k`` folder; ``written()`` gives one split per list file, classes ``"0".."K-1"`` (K of the task).
    """
    per_split = dict(per_split or {"train800": 3, "val200": 1, "test": 2})
    base = Path(root) / "vtab-1k"
    task_dir = base / task
    imgs = _Images(link)
    splits: dict[str, list[Item]] = {}
    for split, n in per_split.items():
        # class-interleaved order: (image 0 of every class), (image 1 of every class), ...
        splits[split] = [(imgs.write(task_dir / "images" / split / f"{j:03d}_{k:03d}.png"), k)
                         for j in range(n) for k in range(n_classes)]
    if "train800val200" not in splits:
        splits["train800val200"] = splits.get("train800", []) + splits.get("val200", [])
    for split, items in splits.items():
        (task_dir / f"{split}.txt").write_text("".join(f"{p.relative_to(task_dir).as_posix()} {y}\n"
                                                       for p, y in items))
    return _record(StandIn(base, splits, [str(i) for i in range(VTAB_TASKS[task])]))


# ----------------------------------------------------------------------------------------------- torchvision
EUROSAT_CLASSES = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]
DTD_CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy", "chequered", "cobwebbed", "cracked"]
FOOD_CLASSES = ["apple_pie", "baby_back_ribs", "baklava", "beef_carpaccio", "beef_tartare", "beet_salad"]
PET_BREEDS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier", "Bengal", "basset_hound", "Birman"]


def _cifar_batch(arrays: list[np.ndarray], labels: list[int], key: str) -> dict:
    data = np.stack([a.transpose(2, 0, 1).reshape(-1) for a in arrays]) if arrays else np.zeros((0, 3072), np.uint8)
    return {"data": data, key: list(labels)}


def make_torchvision_layout(root: Path, name: str, n_classes: int | None = None, n_per_class: int = 2,
                            layout_only: bool = False, link: bool = False) -> Path:
    """The files torchvision's ``name`` reader opens under ``root`` (``download=False``), with tiny data.

    ``n_per_class`` images per class in each official split torchvision reads (train/test; Flowers102 and DTD
    also val; EuroSAT: ``n_per_class`` in its single folder). ``n_classes`` defaults to min(K, 4). Classes whose
    names torchvision derives from the data use real names (EuroSAT, DTD, Food101, OxfordIIITPet breeds).
    ``layout_only`` (PCAM without ``h5py`` too) writes empty files with the right names: enough for
    ``check_layout``.

    Returns:
        ``root``; ``written()`` gives splits under torchvision's split names (EuroSAT: ``all``) and, where the
        stand-in fixes them, the class names torchvision will report.
    """
    root = Path(root)
    k_full = TORCHVISION_SETS[name]
    n = min(k_full, 4) if n_classes is None else n_classes
    imgs = _Images(link)
    splits: dict[str, list[Item]] = {}
    classes = None
    if name == "PCAM" and not layout_only and importlib.util.find_spec("h5py") is not None:
        import h5py

        base = root / "pcam"
        base.mkdir(parents=True, exist_ok=True)
        counter = 0
        for split, part in (("train", "train"), ("val", "valid"), ("test", "test")):
            items = [(digit_rgb(counter + j * n + k, scale=12), k) for j in range(n_per_class) for k in range(n)]
            counter += len(items)
            with h5py.File(base / f"camelyonpatch_level_2_split_{part}_x.h5", "w") as fh:
                fh["x"] = np.stack([a for a, _ in items])  # (N, 96, 96, 3)
            with h5py.File(base / f"camelyonpatch_level_2_split_{part}_y.h5", "w") as fh:
                fh["y"] = np.array([lab for _, lab in items], dtype=np.uint8).reshape(-1, 1, 1, 1)
            splits[split] = items
        return _record(StandIn(root, splits, None))
    if name == "PCAM" or layout_only:
        from vptool.data.tvsets import SETS

        for rel in SETS[name].required:
            p = root / rel
            if rel.endswith("/"):
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(b"")
        return _record(StandIn(root, {}, None, {"layout_only": True}))

    if name in ("CIFAR10", "CIFAR100"):
        folder, key, meta_key = (("cifar-10-batches-py", "labels", "label_names") if name == "CIFAR10"
                                 else ("cifar-100-python", "fine_labels", "fine_label_names"))
        base = root / folder
        base.mkdir(parents=True, exist_ok=True)
        classes = [f"class_{k}" for k in range(k_full)]
        counter = 0
        for split in ("train", "test"):
            items = []
            for _j in range(n_per_class):
                for k in range(n):
                    items.append((digit_rgb(counter, scale=4), k))
                    counter += 1
            splits[split] = items
        if name == "CIFAR10":
            chunks = np.array_split(np.arange(len(splits["train"])), 5)
            for b, idx in enumerate(chunks, 1):
                batch = _cifar_batch([splits["train"][i][0] for i in idx], [splits["train"][i][1] for i in idx], key)
                (base / f"data_batch_{b}").write_bytes(pickle.dumps(batch))
            (base / "test_batch").write_bytes(pickle.dumps(_cifar_batch(*zip(*splits["test"]), key)))
            (base / "batches.meta").write_bytes(pickle.dumps({meta_key: classes}))
        else:
            for split in ("train", "test"):
                (base / split).write_bytes(pickle.dumps(_cifar_batch(*zip(*splits[split]), key)))
            (base / "meta").write_bytes(pickle.dumps({meta_key: classes, "coarse_label_names": ["c"]}))
        return _record(StandIn(root, splits, classes))

    if name == "SVHN":
        from scipy.io import savemat

        counter = 0
        for split in ("train", "test"):
            items = [(digit_rgb(counter + j * n + k, scale=4), k) for j in range(n_per_class) for k in range(n)]
            counter += len(items)
            x = np.stack([a for a, _ in items], axis=-1)  # (32, 32, 3, N)
            y = np.array([[10 if lab == 0 else lab] for _, lab in items], dtype=np.uint8)  # SVHN stores 0 as 10
            root.mkdir(parents=True, exist_ok=True)
            savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
            splits[split] = items
        return _record(StandIn(root, splits, None))

    if name == "Flowers102":
        from scipy.io import savemat

        base = root / "flowers-102"
        labels, sets = [], {}
        image_id = 0
        for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
            ids, items = [], []
            for _j in range(n_per_class):
                for k in range(n):
                    image_id += 1
                    labels.append(k + 1)
                    ids.append(image_id)
                    items.append((imgs.write(base / "jpg" / f"image_{image_id:05d}.jpg"), k))
            sets[key] = np.array(ids, dtype=np.uint16)
            splits[split] = items
        savemat(base / "imagelabels.mat", {"labels": np.array(labels, dtype=np.uint8)[None]})
        savemat(base / "setid.mat", {k: v[None] for k, v in sets.items()})
        return _record(StandIn(root, splits, None))

    if name == "Food101":
        base = root / "food-101"
        names = FOOD_CLASSES[:n] if n <= len(FOOD_CLASSES) else [f"food_{k:03d}" for k in range(n)]
        (base / "meta").mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            meta = {c: [f"{c}/{split}{j}" for j in range(n_per_class)] for c in names}
            (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
            # torchvision lists classes in the JSON's key order, labels by sorted name
            splits[split] = [(imgs.write(base / "images" / f"{rel}.jpg"), sorted(names).index(c))
                             for c, rels in meta.items() for rel in rels]
        (base / "meta" / "classes.txt").write_text("".join(c + "\n" for c in names))
        return _record(StandIn(root, splits, sorted(names)))

    if name == "EuroSAT":
        base = root / "eurosat" / "2750"
        names = EUROSAT_CLASSES[:n] if n <= len(EUROSAT_CLASSES) else [f"Class{k:02d}" for k in range(n)]
        splits["all"] = [(imgs.write(base / c / f"{c}_{j + 1}.jpg"), k)
                         for k, c in enumerate(sorted(names)) for j in range(n_per_class)]
        return _record(StandIn(root, splits, sorted(names)))

    if name == "OxfordIIITPet":
        base = root / "oxford-iiit-pet"
        breeds = PET_BREEDS[:n] if n <= len(PET_BREEDS) else [f"breed{k:02d}" for k in range(n)]
        (base / "annotations").mkdir(parents=True, exist_ok=True)
        for split in ("trainval", "test"):
            lines, items = [], []
            for j in range(n_per_class):
                for k, breed in enumerate(breeds):
                    image_id = f"{breed}_{split}{j}"
                    species = 1 if breed[0].isupper() else 2
                    lines.append(f"{image_id} {k + 1} {species} {k + 1}\n")
                    items.append((imgs.write(base / "images" / f"{image_id}.jpg"), k))
            (base / "annotations" / f"{split}.txt").write_text("".join(lines))
            splits[split] = items
        classes = [" ".join(part.title() for part in b.split("_")) for b in breeds]
        return _record(StandIn(root, splits, classes))

    if name == "DTD":
        data_dir = root / "dtd" / "dtd"
        names = DTD_CLASSES[:n] if n <= len(DTD_CLASSES) else [f"texture{k:02d}" for k in range(n)]
        (data_dir / "labels").mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            rels = [(f"{c}/{c}_{split}_{j:04d}.jpg", k) for j in range(n_per_class) for k, c in enumerate(names)]
            (data_dir / "labels" / f"{split}1.txt").write_text("".join(r + "\n" for r, _ in rels))
            splits[split] = [(imgs.write(data_dir / "images" / r), sorted(names).index(names[k])) for r, k in rels]
        return _record(StandIn(root, splits, sorted(names)))

    raise ValueError(f"no stand-in for torchvision:{name}")


def patch_torchvision_md5(monkeypatch) -> None:
    """Replace torchvision's md5 check with a file-exists check, in this process only.

    The CIFAR pickles, Flowers102 ``.mat`` files and SVHN ``.mat`` files of a stand-in cannot match the real
    releases' md5 sums, so without this torchvision refuses them as "not found or corrupted".
    """
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.flowers102 as flowers102
    import torchvision.datasets.svhn as svhn

    def exists(fpath, md5=None):
        return os.path.isfile(fpath)

    for mod in (cifar, flowers102, svhn):
        monkeypatch.setattr(mod, "check_integrity", exists)


# ----------------------------------------------------------------------------------------------------- full
def make_full(root: Path, dataset: str, task: str | None = None) -> Path:
    """A stand-in with a benchmark's full class count K and hard-linked images, for dry-run style tests.

    ``cub200``: 200 classes, 10 train + 1 test image each (so the default 10 % stratified hold-out has one val
    image per class). ``fgvc-json`` (``task``): K of catalog.FGVC_TASKS, 1 image per class per split.
    ``vtab-1k`` (``task``): K of catalog.VTAB_TASKS, 1 image per class in train800, val200 and test.
    ``torchvision:<Name>``: K classes; 20 images per class in each official split where vptool holds out val
    (so the default hold-out works), else 1; PCAM layout-only.

    Returns:
        the folder to set as ``data.root``.
    """
    root = Path(root)
    if dataset == "cub200":
        return make_cub200(root, n_classes=200, per_class_train=10, per_class_test=1, link=True)
    if dataset == "fgvc-json":
        return make_fgvc_json(root, task, n_classes=FGVC_TASKS[task][1], per_class=1, link=True)
    if dataset == "vtab-1k":
        return make_vtab(root, task, VTAB_TASKS[task], {"train800": 1, "val200": 1, "test": 1}, link=True)
    if dataset.startswith("torchvision:"):
        from vptool.data.tvsets import SETS

        name = dataset.split(":", 1)[1]
        per = 20 if SETS[name].splits[1] is None else 1
        return make_torchvision_layout(root, name, n_classes=TORCHVISION_SETS[name], n_per_class=per, link=True)
    raise ValueError(f"no full stand-in for {dataset}")
