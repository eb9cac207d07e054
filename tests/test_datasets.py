"""Benchmark dataset readers (``cub200``, ``fgvc-json``, ``vtab-1k``, ``torchvision:<Name>``) and ``check_layout``.

Every layout is a tiny stand-in written by ``layouts.py`` from scikit-learn digits; expectations come from what
the stand-in wrote (``layouts.written``) and from the image files read with PIL and plain torch ops.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_naming
from layouts import (
    load_rgb01,
    make_cub200,
    make_fgvc_json,
    make_full,
    make_torchvision_layout,
    make_vtab,
    patch_torchvision_md5,
    written,
)

from vptool.data import build_splits, check_layout
from vptool.data.catalog import FGVC_TASKS, TORCHVISION_SETS, VTAB_TASKS
from vptool.errors import UserError
from vptool.recipe import DataConfig

MEAN, STD = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
SIZE = 12


def data_config(h: int = SIZE) -> dict:
    return dict(input_size=[3, h, h], mean=list(MEAN), std=list(STD), crop_pct=0.9, interpolation="bilinear")


#: one 8-bit level in normalised units: images are resized on uint8 (torch's fixed-point kernel), so items are the
#: exact resize rounded to 8 bits, give or take one level where the exact value sits near a half
LEVEL = 1.0 / 255 / min(STD) + 1e-6


def _levels(x01: torch.Tensor) -> torch.Tensor:
    return torch.round(x01.double() * 255).clamp(0, 255).float() / 255


def _norm(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _rgb01(src) -> torch.Tensor:
    """An image file or an HWC uint8 array as a float (3, H, W) tensor in [0, 1]."""
    if isinstance(src, np.ndarray):
        return torch.from_numpy(src.astype(np.float64) / 255.0).permute(2, 0, 1).float()
    return load_rgb01(src)


def vtab_eval(src, size: int = SIZE) -> torch.Tensor:
    """Reference vtab transform: bilinear antialiased resize to (size, size) (to 8-bit levels), then normalise."""
    x = F.interpolate(_rgb01(src)[None].double(), size=(size, size), mode="bilinear", antialias=True,
                      align_corners=False)
    return _norm(_levels(x[0]))


def fgvc_eval(src, size: int = SIZE) -> torch.Tensor:
    """Reference fgvc eval transform of a square image: resize to floor(size * 256 / 224), centre crop size."""
    pre = int(np.floor(size * 256 / 224))
    big = _levels(F.interpolate(_rgb01(src)[None].double(), size=(pre, pre), mode="bilinear", antialias=True,
                                align_corners=False)[0])
    off = int(round((pre - size) / 2.0))
    return _norm(big[:, off:off + size, off:off + size])


def paths(ds) -> list[tuple[Path, int]]:
    return [(Path(p), y) for p, y in ds.samples]


def check_items(ds, items, at=None, ref=vtab_eval):
    """Item i of ``ds`` is (ref(items[i] image), items[i] label) for the positions ``at`` (default: ends, middle)."""
    for i in at if at is not None else sorted({0, len(ds) // 2, len(ds) - 1}):
        x, y = ds[i]
        assert isinstance(y, int) and y == items[i][1]
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32
        torch.testing.assert_close(x, ref(items[i][0]), atol=LEVEL, rtol=0)


def identify(ds, items, ref=vtab_eval) -> list[int]:
    """For every item of ``ds``, the index in ``items`` of the written image its tensor equals (through the
    reference transform ``ref``); also checks the label."""
    ref = torch.stack([ref(src).flatten() for src, _ in items])
    out = []
    for i in range(len(ds)):
        x, y = ds[i]
        err = (ref - x.flatten()[None]).abs().amax(1)
        j = int(err.argmin())
        assert err[j] <= LEVEL, f"item {i} matches no written image (min err {err[j]})"
        assert y == items[j][1], f"item {i}: label {y}, written {items[j][1]}"
        out.append(j)
    return out


# ================================================ cub200 ========================================================


def cub(root, **kw) -> DataConfig:
    return DataConfig(dataset="cub200", root=str(root), **kw)


def test_cub200_official_test_and_stratified_holdout(tmp_path):
    root = make_cub200(tmp_path, n_classes=3, per_class_train=10, per_class_test=4)
    w = written(root)
    splits = build_splits(cub(root), data_config())
    assert splits.classes == w.classes == ["001.Class_0", "002.Class_1", "003.Class_2"]
    assert paths(splits.test) == w.splits["test"]  # official test, images.txt order
    train, val = paths(splits.train), paths(splits.val)
    assert len(val) == 3 and len(train) == 27  # 10 % of the 30 official train images
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(w.splits["train"])
    assert Counter(y for _, y in val) == {0: 1, 1: 1, 2: 1}
    for ds in (splits.train, splits.val, splits.test):
        assert ds.targets == [y for _, y in ds.samples]
    check_items(splits.test, w.splits["test"])
    check_items(splits.val, val)
    check_items(splits.train, train)  # vtab: the training transform is the eval resize


@pytest.mark.parametrize("fraction,per_class", [(0.1, 1), (0.2, 2), (0.5, 5)])
def test_cub200_holdout_is_seeded_and_stratified(tmp_path, fraction, per_class):
    root = make_cub200(tmp_path, n_classes=4, per_class_train=10, per_class_test=1)

    def val_paths(seed):
        s = build_splits(cub(root, split_seed=seed, val_fraction=fraction), data_config())
        assert Counter(y for _, y in paths(s.val)) == {k: per_class for k in range(4)}
        assert Counter(y for _, y in paths(s.train)) == {k: 10 - per_class for k in range(4)}
        return sorted(paths(s.val))

    a, b, c = val_paths(0), val_paths(0), val_paths(1)
    assert a == b
    assert a != c


def test_cub200_fgvc_transform(tmp_path):
    """fgvc: train items are random crops of the input size; val and test use resize 256/224 + centre crop."""
    root = make_cub200(tmp_path, n_classes=3, per_class_train=10, per_class_test=2)
    splits = build_splits(cub(root, train_transform="fgvc"), data_config())
    check_items(splits.val, paths(splits.val), ref=fgvc_eval)
    check_items(splits.test, written(root).splits["test"], ref=fgvc_eval)
    torch.manual_seed(0)
    x, _ = splits.train[0]
    assert x.shape == (3, SIZE, SIZE)
    # train_eval_transform: the training split gets the deterministic eval transform
    det = build_splits(cub(root, train_transform="fgvc"), data_config(), train_eval_transform=True)
    check_items(det.train, paths(det.train), ref=fgvc_eval)


@pytest.mark.parametrize("missing", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt",
                                     "images"])
def test_cub200_missing_file(tmp_path, missing):
    root = make_cub200(tmp_path, n_classes=2, per_class_train=10, per_class_test=1)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for call in (lambda: check_layout(cub(root)), lambda: build_splits(cub(root), data_config())):
        with pytest.raises(UserError) as exc:
            call()
        assert_one_line_naming(exc, "data.root", str(target), "CUB_200_2011/{images.txt,")


def test_cub200_missing_root(tmp_path):
    root = tmp_path / "nowhere" / "CUB_200_2011"
    with pytest.raises(UserError) as exc:
        build_splits(cub(root), data_config())
    assert_one_line_naming(exc, "data.root", str(root), "cub200 expects")


def test_cub200_missing_images_named_before_training(tmp_path):
    root = make_cub200(tmp_path, n_classes=2, per_class_train=10, per_class_test=2)
    w = written(root)
    first, later = w.splits["train"][0][0], w.splits["test"][-1][0]  # image ids 1-2 and 23-24
    for p in (first, later):
        p.unlink()
    check_layout(cub(root))  # the layout itself is complete: no per-image checks there
    with pytest.raises(UserError) as exc:
        build_splits(cub(root), data_config())
    msg = assert_one_line_naming(exc, "data.root", str(first), "2 of 24 images", str(root / "images.txt"))
    assert str(later) not in msg


@pytest.mark.parametrize("file,line,needle", [
    ("images.txt", "oops", "malformed line"),
    ("images.txt", "x 001.Class_0/extra.png", "'x' is not an integer"),
    ("image_class_labels.txt", "3 7", "class id 7 is not in"),
    ("image_class_labels.txt", "3 zero", "'zero' is not an integer"),
    ("train_test_split.txt", "3 2", "split flag '2'"),
    ("train_test_split.txt", "1 1", "image id 1 is listed twice"),
    ("classes.txt", "5 005.Class_4", "class id 5 breaks the numbering"),  # class ids 1, 2, 5: a gap
])
def test_cub200_bad_line_named_with_file_and_line(tmp_path, file, line, needle):
    root = make_cub200(tmp_path, n_classes=2, per_class_train=10, per_class_test=1)
    lines = (root / file).read_text().splitlines()
    if file == "classes.txt":
        lines.append(line)
    else:
        lines[2] = line
    (root / file).write_text("\n".join(lines) + "\n")
    check_layout(cub(root))  # nothing is parsed there
    with pytest.raises(UserError) as exc:
        build_splits(cub(root), data_config())
    assert_one_line_naming(exc, "data.root", f"{root / file}:3", needle)


def test_cub200_image_without_label_named(tmp_path):
    root = make_cub200(tmp_path, n_classes=2, per_class_train=10, per_class_test=1)
    lines = (root / "train_test_split.txt").read_text().splitlines()
    (root / "train_test_split.txt").write_text("\n".join(lines[:-1]) + "\n")  # image id 22 has no split flag
    with pytest.raises(UserError) as exc:
        build_splits(cub(root), data_config())
    assert_one_line_naming(exc, str(root / "train_test_split.txt"), "image id 22")


# ============================================== fgvc-json =======================================================


def fgvc(root, task, **kw) -> DataConfig:
    return DataConfig(dataset="fgvc-json", root=str(root), task=task, **kw)


@pytest.mark.parametrize("task", ["cub", "dogs", "flowers"])
def test_fgvc_json_splits_and_contiguous_labels(tmp_path, task):
    root = make_fgvc_json(tmp_path, task, n_classes=4, per_class={"train": 3, "val": 1, "test": 2})
    w = written(root)
    ids = w.extra["ids"]
    assert sorted(map(str, ids)) != [str(i) for i in ids]  # string order differs: the mapping must sort ints
    splits = build_splits(fgvc(root, task), data_config())
    assert splits.classes == [str(i) for i in sorted(ids)]
    image_root = root / FGVC_TASKS[task][0]
    for name in ("train", "val", "test"):
        got = paths(splits[name])
        assert got == w.splits[name]  # JSON order, label = rank of the id among train.json's ids
        listed = json.loads((root / f"{name}.json").read_text())
        assert [(image_root / k, sorted(ids).index(v)) for k, v in listed.items()] == got
        check_items(splits[name], w.splits[name])
    aug = build_splits(fgvc(root, task, train_transform="fgvc"), data_config())  # val and test: eval transform
    for name in ("val", "test"):
        check_items(aug[name], w.splits[name], ref=fgvc_eval)


def test_fgvc_json_image_dir_override(tmp_path):
    root = make_fgvc_json(tmp_path, "cars", n_classes=2, per_class=2, image_dir="car_ims")
    with pytest.raises(UserError) as exc:  # cars' default is the root itself: the JSON paths are not there
        build_splits(fgvc(root, "cars"), data_config())
    assert_one_line_naming(exc, "data.root", str(root / written(root).splits["train"][0][0].relative_to(
        root / "car_ims")), "4 of 4 images")
    splits = build_splits(fgvc(root, "cars", image_dir="car_ims"), data_config())
    assert paths(splits.test) == written(root).splits["test"]


@pytest.mark.parametrize("split", ["val", "test"])
def test_fgvc_json_unknown_class_id(tmp_path, split):
    root = make_fgvc_json(tmp_path, "cub", n_classes=3, per_class=2)
    listed = json.loads((root / f"{split}.json").read_text())
    key = next(iter(listed))
    listed[key] = 999
    (root / f"{split}.json").write_text(json.dumps(listed))
    with pytest.raises(UserError) as exc:
        build_splits(fgvc(root, "cub"), data_config())
    assert_one_line_naming(exc, "data.root", str(root / f"{split}.json"), "999", str(root / "train.json"))


@pytest.mark.parametrize("content,needle", [("{not json", "not valid JSON"), ('["a.png", 1]', "holds a JSON list"),
                                            ('{"a.png": "bird"}', "'bird'"), ('{"a.png": 1.5}', "1.5"),
                                            ("{}", "lists no images")])
def test_fgvc_json_bad_file(tmp_path, content, needle):
    root = make_fgvc_json(tmp_path, "cub", n_classes=2, per_class=2)
    (root / "train.json").write_text(content)
    with pytest.raises(UserError) as exc:
        build_splits(fgvc(root, "cub"), data_config())
    assert_one_line_naming(exc, "data.root", str(root / "train.json"), needle)


@pytest.mark.parametrize("missing", ["train.json", "val.json", "test.json", "images"])
def test_fgvc_json_missing_file(tmp_path, missing):
    root = make_fgvc_json(tmp_path, "nabirds", n_classes=2, per_class=1)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for call in (lambda: check_layout(fgvc(root, "nabirds")), lambda: build_splits(fgvc(root, "nabirds"),
                                                                                      data_config())):
        with pytest.raises(UserError) as exc:
            call()
        assert_one_line_naming(exc, "data.root", str(target), "{train.json,val.json,test.json}", "<root>/images/")


def test_fgvc_json_missing_image(tmp_path):
    root = make_fgvc_json(tmp_path, "dogs", n_classes=2, per_class=2)
    gone = written(root).splits["val"][2][0]
    gone.unlink()
    check_layout(fgvc(root, "dogs"))
    with pytest.raises(UserError) as exc:
        build_splits(fgvc(root, "dogs"), data_config())
    assert_one_line_naming(exc, "data.root", str(gone), "1 of 4 images", str(root / "val.json"))


# =============================================== vtab-1k ========================================================


def vtab(root, task, **kw) -> DataConfig:
    return DataConfig(dataset="vtab-1k", root=str(root), task=task, **kw)


@pytest.mark.parametrize("protocol,train_list", [("final", "train800val200"), ("tune", "train800")])
def test_vtab_final_and_tune_membership(tmp_path, protocol, train_list):
    root = make_vtab(tmp_path, "eurosat", n_classes=3, per_split={"train800": 3, "val200": 2, "test": 2})
    w = written(root)
    assert len(w.splits["train800val200"]) == 15
    splits = build_splits(vtab(root, "eurosat", vtab_split=protocol), data_config())
    assert splits.classes == [str(i) for i in range(VTAB_TASKS["eurosat"])]
    assert paths(splits.train) == w.splits[train_list]
    assert paths(splits.val) == w.splits["val200"]
    assert paths(splits.test) == w.splits["test"]
    assert splits.train.targets == [y for _, y in w.splits[train_list]]
    check_items(splits.train, w.splits[train_list])
    check_items(splits.test, w.splits["test"])
    aug = build_splits(vtab(root, "eurosat", vtab_split=protocol, train_transform="fgvc"), data_config())
    check_items(aug.val, w.splits["val200"], ref=fgvc_eval)
    check_items(aug.test, w.splits["test"], ref=fgvc_eval)


def test_vtab_tune_reads_no_train800val200(tmp_path):
    root = make_vtab(tmp_path, "dtd", n_classes=2, per_split={"train800": 2, "val200": 1, "test": 1})
    (root / "dtd" / "train800val200.txt").unlink()
    check_layout(vtab(root, "dtd", vtab_split="tune"))
    assert len(build_splits(vtab(root, "dtd", vtab_split="tune"), data_config()).train) == 4
    with pytest.raises(UserError) as exc:
        check_layout(vtab(root, "dtd", vtab_split="final"))
    assert_one_line_naming(exc, "data.root", str(root / "dtd" / "train800val200.txt"), "vtab-1k expects")


@pytest.mark.parametrize("line,needle", [
    ("images/x.png 10", "label 10 is outside 0..9"),    # eurosat: K = 10
    ("images/x.png -1", "label -1 is outside 0..9"),
    ("images/x.png", "malformed line"),
    ("images/x.png three", "'three' is not an integer"),
])
def test_vtab_bad_line_named_with_file_and_line(tmp_path, line, needle):
    root = make_vtab(tmp_path, "eurosat", n_classes=2, per_split={"train800": 2, "val200": 1, "test": 1})
    f = root / "eurosat" / "test.txt"
    lines = f.read_text().splitlines()
    f.write_text("\n".join(lines[:1] + [line] + lines[1:]) + "\n")
    with pytest.raises(UserError) as exc:
        build_splits(vtab(root, "eurosat"), data_config())
    assert_one_line_naming(exc, "data.root", f"{f}:2", needle)


def test_vtab_binary_list_file_named(tmp_path):
    root = make_vtab(tmp_path, "kitti", n_classes=2, per_split={"train800": 2, "val200": 1, "test": 1})
    f = root / "kitti" / "val200.txt"
    f.write_bytes(b"images/a.png 0\n\xff\xfe\x00 1\n")
    with pytest.raises(UserError) as exc:
        build_splits(vtab(root, "kitti"), data_config())
    assert_one_line_naming(exc, "data.root", str(f), "not UTF-8")


def test_vtab_missing_task_folder_and_image(tmp_path):
    root = make_vtab(tmp_path, "svhn", n_classes=2, per_split={"train800": 2, "val200": 1, "test": 1})
    with pytest.raises(UserError) as exc:
        check_layout(vtab(root, "cifar"))
    assert_one_line_naming(exc, "data.root", str(root / "cifar"))
    gone = written(root).splits["test"][1][0]
    gone.unlink()
    with pytest.raises(UserError) as exc:
        build_splits(vtab(root, "svhn"), data_config())
    assert_one_line_naming(exc, "data.root", str(gone), "1 of 2 images", str(root / "svhn" / "test.txt"))


def test_unknown_task_named(tmp_path):
    for data in (vtab(tmp_path, "cifar10"), fgvc(tmp_path, "birds")):
        with pytest.raises(UserError) as exc:
            build_splits(data, data_config())
        assert_one_line_naming(exc, "data.task", data.task)


# ============================================= torchvision ======================================================

HOLDOUT = ["CIFAR10", "CIFAR100", "Food101", "SVHN", "OxfordIIITPet"]  # official train (or trainval) + test
OFFICIAL_VAL = ["Flowers102", "DTD"]


def tv(root, name, **kw) -> DataConfig:
    return DataConfig(dataset=f"torchvision:{name}", root=str(root), **kw)


@pytest.mark.parametrize("name", HOLDOUT)
def test_torchvision_holdout_sets(tmp_path, monkeypatch, name):
    patch_torchvision_md5(monkeypatch)
    root = make_torchvision_layout(tmp_path, name, n_classes=4, n_per_class=5)
    w = written(root)
    train_name = "trainval" if name == "OxfordIIITPet" else "train"
    official = w.splits[train_name]
    splits = build_splits(tv(root, name, val_fraction=0.2), data_config())
    if w.classes is not None:
        assert splits.classes == w.classes
    else:
        assert splits.classes == [str(i) for i in range(TORCHVISION_SETS[name])]
    assert identify(splits.test, w.splits["test"]) == list(range(len(w.splits["test"])))  # official test, in order
    tr, va = identify(splits.train, official), identify(splits.val, official)
    assert len(va) == 4 and len(tr) == 16
    assert sorted(tr + va) == list(range(20))  # a partition of the official training split
    assert Counter(official[j][1] for j in va) == {k: 1 for k in range(4)}  # stratified
    assert splits.val.targets == [official[j][1] for j in va]
    seeds = [sorted(identify(build_splits(tv(root, name, val_fraction=0.2, split_seed=s), data_config()).val,
                             official)) for s in (0, 1)]
    assert seeds[0] == sorted(va) and seeds[1] != seeds[0]
    aug = build_splits(tv(root, name, val_fraction=0.2, train_transform="fgvc"), data_config())
    assert identify(aug.val, official, ref=fgvc_eval) == va  # held-out val: the eval transform


@pytest.mark.parametrize("name", OFFICIAL_VAL)
def test_torchvision_official_val_sets(tmp_path, monkeypatch, name):
    patch_torchvision_md5(monkeypatch)
    root = make_torchvision_layout(tmp_path, name, n_classes=3, n_per_class=2)
    w = written(root)
    splits = build_splits(tv(root, name), data_config())
    if w.classes is not None:
        assert splits.classes == w.classes
    else:
        from torchvision.datasets import Flowers102

        assert splits.classes == Flowers102.classes and len(splits.classes) == 102
    for split in ("train", "val", "test"):
        assert identify(splits[split], w.splits[split]) == list(range(6))
        assert splits[split].targets == [y for _, y in w.splits[split]]
    aug = build_splits(tv(root, name, train_transform="fgvc"), data_config())
    for split in ("val", "test"):
        assert identify(aug[split], w.splits[split], ref=fgvc_eval) == list(range(6))


def test_torchvision_eurosat_split(tmp_path):
    """EuroSAT has no official split: stratified seeded 20 % test, then val_fraction of the rest as val."""
    root = make_torchvision_layout(tmp_path, "EuroSAT", n_classes=4, n_per_class=10)
    w = written(root)
    everything = w.splits["all"]
    cfg = tv(root, "EuroSAT", val_fraction=0.25)
    splits = build_splits(cfg, data_config())
    assert splits.classes == w.classes == ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway"]
    got = {s: identify(splits[s], everything) for s in ("train", "val", "test")}
    assert [len(got[s]) for s in ("train", "val", "test")] == [24, 8, 8]
    assert sorted(got["train"] + got["val"] + got["test"]) == list(range(40))
    for s, n in (("train", 6), ("val", 2), ("test", 2)):
        assert Counter(everything[j][1] for j in got[s]) == {k: n for k in range(4)}
    again = build_splits(tv(root, "EuroSAT", val_fraction=0.25, train_transform="fgvc"), data_config())
    assert identify(again.test, everything, ref=fgvc_eval) == got["test"]
    assert identify(again.val, everything, ref=fgvc_eval) == got["val"]
    other = build_splits(tv(root, "EuroSAT", val_fraction=0.25, split_seed=3), data_config())
    assert sorted(identify(other.test, everything)) != sorted(got["test"])


def test_torchvision_md5_failure_is_one_line(tmp_path):
    """Without the test-only md5 patch torchvision rejects the stand-in; vptool names root, layout, no download."""
    root = make_torchvision_layout(tmp_path, "CIFAR10", n_classes=2, n_per_class=2)
    check_layout(tv(root, "CIFAR10"))  # every file is there
    with pytest.raises(UserError) as exc:
        build_splits(tv(root, "CIFAR10"), data_config())
    assert_one_line_naming(exc, "data.root", str(root), "torchvision:CIFAR10",
                           f"{root}/cifar-10-batches-py/{{data_batch_1..5,test_batch,batches.meta}}",
                           "never downloads", "corrupted")


EXPECTED_LAYOUT = {
    "CIFAR10": ("cifar-10-batches-py/data_batch_3", "/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}"),
    "CIFAR100": ("cifar-100-python/meta", "/cifar-100-python/{train,test,meta}"),
    "Flowers102": ("flowers-102/setid.mat", "/flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}"),
    "Food101": ("food-101/meta/test.json", "/food-101/{images/<class>/<id>.jpg,meta/train.json,meta/test.json}"),
    "EuroSAT": ("eurosat/2750", "/eurosat/2750/<class>/*.jpg"),
    "SVHN": ("test_32x32.mat", "/{train_32x32.mat,test_32x32.mat}"),
    "OxfordIIITPet": ("oxford-iiit-pet/annotations/trainval.txt",
                      "/oxford-iiit-pet/{images/*.jpg,annotations/trainval.txt,annotations/test.txt}"),
    "DTD": ("dtd/dtd/labels/val1.txt",
            "/dtd/dtd/{images/<class>/*.jpg,labels/train1.txt,labels/val1.txt,labels/test1.txt}"),
    "PCAM": ("pcam/camelyonpatch_level_2_split_valid_y.h5",
             "/pcam/camelyonpatch_level_2_split_{train,valid,test}_{x,y}.h5"),
}


@pytest.mark.parametrize("name", list(TORCHVISION_SETS))
def test_torchvision_check_layout(tmp_path, name):
    assert set(EXPECTED_LAYOUT) == set(TORCHVISION_SETS)
    rel, layout = EXPECTED_LAYOUT[name]
    root = make_torchvision_layout(tmp_path / "data", name, layout_only=True)
    assert check_layout(tv(root, name)) is None
    target = root / rel
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    for call in (lambda: check_layout(tv(root, name)), lambda: build_splits(tv(root, name), data_config())):
        with pytest.raises(UserError) as exc:
            call()
        if name == "PCAM" and importlib.util.find_spec("h5py") is None and "h5py" in str(exc.value):
            continue  # build_splits stops at the missing package first
        assert_one_line_naming(exc, "data.root", str(target), str(root) + layout, "never downloads")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError) as exc:
        check_layout(tv(empty, name))
    assert_one_line_naming(exc, "data.root", str(empty) + layout)


@pytest.mark.skipif(importlib.util.find_spec("h5py") is not None, reason="h5py is installed")
def test_torchvision_pcam_needs_h5py(tmp_path):
    root = make_torchvision_layout(tmp_path, "PCAM")
    check_layout(tv(root, "PCAM"))
    with pytest.raises(UserError) as exc:
        build_splits(tv(root, "PCAM"), data_config())
    assert_one_line_naming(exc, "torchvision:PCAM", "pip install h5py")


def test_torchvision_pcam_with_h5py(tmp_path):
    pytest.importorskip("h5py")
    root = make_torchvision_layout(tmp_path, "PCAM", n_classes=2, n_per_class=3)
    w = written(root)
    splits = build_splits(tv(root, "PCAM"), data_config())
    assert splits.classes == ["0", "1"]
    for split in ("train", "val", "test"):
        assert identify(splits[split], w.splits[split]) == list(range(6))
        assert splits[split].targets == [y for _, y in w.splits[split]]


def test_torchvision_missing_image_named(tmp_path):
    root = make_torchvision_layout(tmp_path, "Food101", n_classes=3, n_per_class=2)
    gone = written(root).splits["test"][4][0]
    gone.unlink()
    with pytest.raises(UserError) as exc:
        build_splits(tv(root, "Food101"), data_config())
    assert_one_line_naming(exc, "data.root", str(gone), "1 of 6 images", "test split")


# ============================================ check_layout =======================================================


def test_check_layout_complete_own_formats(tmp_path):
    cases = [
        cub(make_cub200(tmp_path / "a", n_classes=2, per_class_train=10, per_class_test=1)),
        fgvc(make_fgvc_json(tmp_path / "b", "flowers", n_classes=2, per_class=1), "flowers"),
        vtab(make_vtab(tmp_path / "c", "kitti", n_classes=2), "kitti"),
        DataConfig(dataset="digits"),
    ]
    for data in cases:
        assert check_layout(data) is None


def test_check_layout_reads_no_image(tmp_path):
    """check_layout decodes nothing: corrupt images pass it; build_splits lists them; indexing names the file."""
    root = make_vtab(tmp_path, "dmlab", n_classes=2, per_split={"train800": 2, "val200": 1, "test": 1})
    bad = written(root).splits["test"][0][0]
    bad.write_bytes(b"not an image")
    check_layout(vtab(root, "dmlab"))
    splits = build_splits(vtab(root, "dmlab"), data_config())
    with pytest.raises(UserError) as exc:
        splits.test[0]
    assert_one_line_naming(exc, str(bad))


@pytest.mark.parametrize("dataset", ["cub200", "fgvc-json", "vtab-1k", "imagefolder"])
def test_check_layout_missing_root(tmp_path, dataset):
    root = tmp_path / "absent"
    data = DataConfig(dataset=dataset, root=str(root), task={"fgvc-json": "cub", "vtab-1k": "cifar"}.get(dataset))
    with pytest.raises(UserError) as exc:
        check_layout(data)
    assert_one_line_naming(exc, "data.root", str(root))
    with pytest.raises(UserError) as exc:
        check_layout(DataConfig(dataset=dataset, root=None, task=data.task))
    assert_one_line_naming(exc, "data.root: missing")


# ====================================== full class-count stand-ins ==============================================


@pytest.mark.parametrize("dataset,task,k", [("cub200", None, 200), ("fgvc-json", "nabirds", 555),
                                            ("vtab-1k", "sun397", 397), ("fgvc-json", "dogs", 120)])
def test_full_standins_have_the_benchmark_class_count(tmp_path, dataset, task, k):
    root = make_full(tmp_path, dataset, task)
    data = DataConfig(dataset=dataset, root=str(root), task=task)
    check_layout(data)
    splits = build_splits(data, data_config())
    assert len(splits.classes) == k
    assert set(splits.train.targets) | set(splits.val.targets) == set(range(k))
    assert set(splits.test.targets) == set(range(k))


@pytest.mark.parametrize("name", list(TORCHVISION_SETS))
def test_full_torchvision_standins_pass_check_layout(tmp_path, name):
    check_layout(tv(make_full(tmp_path, f"torchvision:{name}"), name))
