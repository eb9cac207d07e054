"""The decoded-image cache of file datasets (``data.cache``, ``vptool.data.cache``, ``vptool.engine.images``) and
``data.num_workers: auto`` (``vptool.data.loading``).

The uncached pipeline is the reference: each check decodes the same files through the plain transform
(``FileListDataset``) and compares.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_recipe
from PIL import Image

from vptool.data import FileListDataset, build_transforms
from vptool.data.cache import CachedImages, cache_key, open_store
from vptool.data.loading import AUTO_MAX_WORKERS, AUTO_MIN_IMAGES, resolve_num_workers
from vptool.engine import images
from vptool.engine.train import Observer, train
from vptool.recipe import resolve

CONFIG = {"input_size": (3, 32, 32), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.3, 0.4)}
#: (width, height): larger and smaller than the 32 input and the fgvc resize (36), both orientations, odd sizes
SIZES = [(120, 90), (40, 30), (90, 120), (64, 64), (150, 45), (33, 47), (20, 20), (37, 36), (200, 150), (31, 70)]


def smooth_image(w: int, h: int, seed: int) -> np.ndarray:
    """(h, w, 3) uint8: smooth gradients plus a little noise (so a crop of the same region, resampled from a
    shrunk copy, stays close to the full-resolution crop)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = rng.uniform(0.5, 3.0, 3)
    chans = [np.sin(a * x + b * y), np.cos(c * x - a * y), np.sin(b * x * y + c)]
    img = (np.stack(chans, -1) * 0.5 + 0.5) * 230 + rng.uniform(0, 20, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def jpegs(tmp_path) -> list[tuple[Path, int]]:
    """20 JPEGs of mixed sizes and aspect ratios (some grayscale), as (path, label)."""
    out = []
    for i in range(20):
        w, h = SIZES[i % len(SIZES)]
        img = Image.fromarray(smooth_image(w, h, i))
        img = img.convert("L") if i % 7 == 3 else img
        path = tmp_path / "jpegs" / f"{i:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        img.save(path, quality=90)
        out.append((path, i % 3))
    return out


def both(samples, transform, folder: Path | None = None):
    """(uncached, cached) datasets of the same files and transform; the cached one filled (in ``folder``)."""
    plain = FileListDataset(samples, ["a", "b", "c"], transform)
    cached = CachedImages(FileListDataset(samples, ["a", "b", "c"], transform))
    if folder is not None:
        folder.mkdir(parents=True)
    cached.fill(cached.planned_sizes(), folder)
    return plain, cached


def items(ds, seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every item of ``ds`` in order from torch seed ``seed``; and the RNG state after them."""
    torch.manual_seed(seed)
    return [ds[i][0] for i in range(len(ds))], torch.get_rng_state()


@pytest.mark.parametrize("train_transform", ["vtab", "fgvc"])
@pytest.mark.parametrize("storage", ["memory", "file"])
def test_eval_transform_batches_are_bitwise_the_uncached_ones(jpegs, tmp_path, train_transform, storage):
    _, evaluate = build_transforms(CONFIG, train_transform, from_pil=True)
    plain, cached = both(jpegs, evaluate, tmp_path / "store" if storage == "file" else None)
    want, _ = items(plain, 0)
    got, _ = items(cached, 0)
    assert all(torch.equal(a, b) and a.dtype == b.dtype == torch.float32 for a, b in zip(want, got))
    assert cached.store.sizes[:, :2].tolist() == [[32, 32]] * len(jpegs)  # the centre crop (or resize) is cached


def test_vtab_train_batches_through_a_loader_are_bitwise_the_uncached_ones(jpegs):
    from vptool.data import make_loader

    train_tf, _ = build_transforms(CONFIG, "vtab", from_pil=True)
    plain, cached = both(jpegs, train_tf)
    for a, b in zip(make_loader(plain, 8, True, 0, 3, False), make_loader(cached, 8, True, 0, 3, False)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_fgvc_train_draws_the_same_crops_and_flips(jpegs):
    """The same RNG calls in the same order (the RNG state after every item is equal); bitwise the uncached
    items for images no larger than the cache's shrink size (36 px), and the same region, resampled from the
    shrunk image, for the larger ones."""
    train_tf, _ = build_transforms(CONFIG, "fgvc", from_pil=True)
    plain, cached = both(jpegs, train_tf)
    shrink = cached.form.shrink
    assert shrink == 36  # floor(32 * 256 / 224)
    for seed in range(5):
        want, state_want = items(plain, seed)
        got, state_got = items(cached, seed)
        assert torch.equal(state_want, state_got)
        for (path, _), a, b in zip(jpegs, want, got):
            w, h = Image.open(path).size
            if min(w, h) <= shrink:
                assert torch.equal(a, b), path
            else:  # the same box at lower resolution: close in value (normalised units; std ~0.2-0.4)
                assert (a - b).abs().mean() < 0.15, (path, (a - b).abs().mean())


def test_fgvc_train_crop_boxes_follow_random_resized_crop(jpegs, monkeypatch):
    """The boxes the cached pipeline draws, in original-image coordinates, are those of torchvision's
    ``RandomResizedCrop.get_params`` (the v1 reference) with the same seed."""
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.v2 import functional as F

    train_tf, _ = build_transforms(CONFIG, "fgvc", from_pil=True)
    _, cached = both(jpegs, train_tf)
    boxes = []
    real = F.resized_crop

    def spy(x, top, left, h, w, **k):
        boxes.append((top, left, h, w, tuple(x.shape[-2:])))
        return real(x, top, left, h, w, **k)

    monkeypatch.setattr(F, "resized_crop", spy)
    torch.manual_seed(7)
    for i in range(len(cached)):
        cached[i]
    torch.manual_seed(7)
    for (path, _), (top, left, h, w, (hc, wc)) in zip(jpegs, boxes):
        W0, H0 = Image.open(path).size
        i, j, bh, bw = RandomResizedCrop.get_params(torch.empty(1, H0, W0), [0.08, 1.0], [3 / 4, 4 / 3])
        torch.rand(1)  # the flip's draw
        sy, sx = hc / H0, wc / W0
        assert abs(top - i * sy) <= 1 and abs(left - j * sx) <= 1, path
        assert abs(h - bh * sy) <= 1 and abs(w - bw * sx) <= 1, path


def test_a_cache_for_another_transform_or_other_files_is_never_reused(jpegs, tmp_path):
    vtab, _ = build_transforms(CONFIG, "vtab", from_pil=True)
    _, fgvc_eval = build_transforms(CONFIG, "fgvc", from_pil=True)
    _, cached = both(jpegs, vtab, tmp_path / "store")
    key = cached.key
    assert open_store(tmp_path / "store", key) is not None
    other = CachedImages(FileListDataset(jpegs, ["a", "b", "c"], fgvc_eval))
    assert other.key != key and open_store(tmp_path / "store", other.key) is None
    bigger, _ = build_transforms({**CONFIG, "input_size": (3, 48, 48)}, "vtab", from_pil=True)
    assert cache_key([str(p) for p, _ in jpegs], [y for _, y in jpegs], bigger, bigger.vptool_cache) != key
    relabelled = [(p, (y + 1) % 3) for p, y in jpegs]
    assert CachedImages(FileListDataset(relabelled, ["a", "b", "c"], vtab)).key != key
    Image.fromarray(smooth_image(50, 40, 99)).save(jpegs[0][0])  # an image replaced in place: other size/mtime
    assert CachedImages(FileListDataset(jpegs, ["a", "b", "c"], vtab)).key != key
    (tmp_path / "store" / "key.json").unlink()  # a folder a kill left without its key is incomplete
    assert open_store(tmp_path / "store", key) is None


def test_num_workers_auto():
    big = AUTO_MIN_IMAGES
    assert resolve_num_workers(3, 10, "digits") == 3  # a count is kept
    assert resolve_num_workers("auto", 10_000, "digits", cpus=64, local_world=1) == 0
    assert resolve_num_workers("auto", big - 1, "imagefolder", cpus=64, local_world=1) == 0
    assert resolve_num_workers("auto", big, "imagefolder", cpus=64, local_world=1) == AUTO_MAX_WORKERS
    assert resolve_num_workers("auto", big, "imagefolder", cpus=16, local_world=4) == 3
    assert resolve_num_workers("auto", big, "imagefolder", cpus=1, local_world=1) == 0
    assert resolve_num_workers("auto", big, "imagefolder", cpus=8, local_world=8) == 0


def test_num_workers_auto_reads_the_cpus_and_torchrun(monkeypatch):
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert resolve_num_workers("auto", 5000, "cub200") == 5
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert resolve_num_workers("auto", 5000, "cub200") == AUTO_MAX_WORKERS


# ------------------------------------------------------------------------------------------------ training runs
PER_SPLIT = {"train": 120, "val": 40, "test": 60}


def digits_folder(root: Path) -> Path:
    """scikit-learn's digits as 8x8 grayscale PNGs in the imagefolder layout root/{train,val,test}/<class>/."""
    from vptool.data.digits import digits_split

    for split, (imgs, labels) in digits_split(0).items():
        for i in range(PER_SPLIT[split]):
            d = root / split / str(int(labels[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.rint(imgs[i] * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


class Notes(Observer):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


def run(tmp_path: Path, name: str, cache: str, **data) -> tuple[dict, list[dict], list[str]]:
    raw = tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "digits"), "batch_size": 32,
                                      "cache": cache, **data},
                      output={"dir": str(tmp_path / "runs"), "name": name})
    obs = Notes()
    summary = train(resolve(raw), observer=obs)
    lines = (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    metrics = [{k: v for k, v in json.loads(ln).items() if k != "seconds"} for ln in lines]
    return summary, metrics, obs.notes


@pytest.mark.parametrize("train_transform", ["vtab", pytest.param("fgvc", marks=pytest.mark.slow)])
def test_cached_run_equals_uncached_run_on_digits_as_an_image_folder(tmp_path, monkeypatch, train_transform):
    digits_folder(tmp_path / "digits")
    off, m_off, notes_off = run(tmp_path, "off", "off", train_transform=train_transform)
    seen = []
    real = images.build

    def build(*a, **k):
        caches = real(*a, **k)
        seen.append(sorted(p.name for p in caches.root.iterdir()))
        return caches

    monkeypatch.setattr(images, "memory_budget", lambda: 0)  # the memory-mapped files, then removed
    monkeypatch.setattr(images, "build", build)
    on, m_on, notes_on = run(tmp_path, "on", "auto", train_transform=train_transform)
    assert m_on == m_off and len(m_on) == 2
    assert (on["val_acc"], on["test_top1"], on["test_top5"]) == (off["val_acc"], off["test_top1"], off["test_top5"])
    assert seen == [["train", "val"]]
    assert not any("image cache" in n for n in notes_off)
    assert sum("image cache: train 120 + val 40 images decoded once" in n for n in notes_on) == 1
    assert not (tmp_path / "runs" / "on" / images.CACHE_DIR).exists()


def test_a_stale_cache_of_a_killed_run_is_cleared_and_a_matching_one_reused(tmp_path, monkeypatch):
    from vptool.data import Splits

    digits_folder(tmp_path / "digits")
    recipe = resolve(tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "digits")}))
    train_tf, eval_tf = build_transforms(CONFIG, "vtab", from_pil=True)
    from vptool.data import build_splits

    splits = build_splits(recipe.data, CONFIG)
    run_dir = tmp_path / "run"
    stale = run_dir / images.CACHE_DIR / "train"
    stale.mkdir(parents=True)
    (stale / "images.npy").write_bytes(b"half written")
    (run_dir / images.CACHE_DIR / "junk").write_text("x")
    wrapped, sets = images.wrap(recipe, splits)
    assert isinstance(wrapped, Splits) and sorted(sets) == ["train", "val"] and wrapped.test is splits.test
    first = images.build(recipe, sets, run_dir, 0, Notes(), budget=0)
    assert sorted(p.name for p in (run_dir / images.CACHE_DIR).iterdir()) == ["train", "val"]
    assert sorted(p.name for p in stale.iterdir()) == ["images.npy", "index.npy", "key.json"]
    want = [wrapped.train[i][0] for i in range(5)]
    # a kill leaves the folder; the next attempt (same images and transform) reuses it
    _, again = images.wrap(recipe, build_splits(recipe.data, CONFIG))
    notes = Notes()
    second = images.build(recipe, again, run_dir, 0, notes, budget=0)
    assert "reused train, val from the last attempt" in notes.notes[0]
    assert all(torch.equal(a, again["train"][i][0]) for i, a in enumerate(want))
    # another input size: the folders are cleared and rebuilt
    other = {**CONFIG, "input_size": (3, 24, 24)}
    _, third_sets = images.wrap(recipe, build_splits(recipe.data, other))
    notes = Notes()
    third = images.build(recipe, third_sets, run_dir, 0, notes, budget=0)
    assert "reused" not in notes.notes[0] and third_sets["train"][0][0].shape == (3, 24, 24)
    for caches in (first, second, third):
        caches.close()
    assert not (run_dir / images.CACHE_DIR).exists()


def test_cache_off_and_non_file_datasets_are_not_wrapped(tmp_path):
    from vptool.data import build_splits

    digits = resolve(tiny_recipe(tmp_path))
    splits = build_splits(digits.data, CONFIG)
    assert images.wrap(digits, splits) == (splits, {})
    digits_folder(tmp_path / "digits")
    off = resolve(tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "digits"),
                                              "cache": "off"}))
    splits = build_splits(off.data, CONFIG)
    assert images.wrap(off, splits) == (splits, {})


def test_training_loader_without_a_model(tmp_path):
    """``images.training_loader`` (what ``bench/`` measures): a run's training batches from a recipe alone."""
    digits_folder(tmp_path / "digits")
    recipe = resolve(tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "digits"),
                                                 "batch_size": 50, "train_transform": "fgvc"}))
    loader, caches = images.training_loader(recipe, CONFIG, tmp_path / "work")
    x, y, w = next(iter(loader))
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.float32 and y.shape == w.shape == (50,)
    assert caches is not None and caches.datasets["train"].store is not None and len(loader) == 3
    caches.close()
    off = resolve(tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(tmp_path / "digits"),
                                              "cache": "off"}))
    assert images.training_loader(off, CONFIG, tmp_path / "work")[1] is None
