"""Datasets and transforms (``vptool.data``): the bundled digits split and the ``imagefolder`` layout.

Expected values are computed here from scikit-learn's digits / the PNG files with PIL and plain torch ops.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_naming
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import Subset

from vptool.data import build_splits, build_transforms
from vptool.data.digits import digits_split
from vptool.errors import UserError
from vptool.recipe import DataConfig

MEAN, STD = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]


@pytest.fixture(scope="module")
def sk():
    d = load_digits()
    return d.images, d.target  # (1797, 8, 8) float64 with values 0..16, (1797,)


def data_config(h: int, w: int | None = None, crop_pct: float = 1.0) -> dict:
    return dict(input_size=[3, h, w or h], mean=list(MEAN), std=list(STD), crop_pct=crop_pct,
                interpolation="bilinear")


#: one 8-bit level in normalised units: file images are resized on uint8 (torch's fixed-point kernel), so they are
#: the exact resize rounded to 8 bits, give or take one level where the exact value sits near a half
LEVEL = 1.0 / 255 / min(STD) + 1e-6


def to_levels(x01: torch.Tensor) -> torch.Tensor:
    """A [0, 1] image rounded to 8-bit levels (what a uint8 resize keeps)."""
    return torch.round(x01.double() * 255).clamp(0, 255).float() / 255


def expected(img_chw01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reference: bilinear antialiased resize of a [0, 1] (C, H, W) image, then (x - mean) / std."""
    x = F.interpolate(img_chw01[None].double(), size=size, mode="bilinear", antialias=True,
                      align_corners=False)[0]
    m = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    s = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return ((x - m) / s).float()


def expected_file(img_chw01: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Reference for a file image: ``expected``'s resize rounded to 8-bit levels, then (x - mean) / std."""
    x = to_levels(F.interpolate(img_chw01[None].double(), size=size, mode="bilinear", antialias=True,
                                align_corners=False)[0]).double()
    m = torch.tensor(MEAN, dtype=torch.float64)[:, None, None]
    s = torch.tensor(STD, dtype=torch.float64)[:, None, None]
    return ((x - m) / s).float()


# ================================================ digits ========================================================


def _keys(images01: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return [(im.astype(np.float32).tobytes(), int(y)) for im, y in zip(images01, labels)]


def test_digits_split_partitions_sklearn_digits(sk):
    images, target = sk
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)  # no duplicates: bytes identify
    full = Counter(_keys((images / 16.0).astype(np.float32), target))
    split = digits_split(0)
    assert {k: len(v[1]) for k, v in split.items()} == {"train": 1257, "val": 180, "test": 360}
    seen: Counter = Counter()
    for name, (im, lab) in split.items():
        assert im.dtype == np.float32 and im.shape == (len(lab), 8, 8)
        keys = _keys(im, lab)
        assert len(set(keys)) == len(keys), f"{name} holds an image twice"
        seen.update(keys)
    # every split image is a sklearn image / 16 with its label, each of the 1797 used exactly once
    assert seen == full


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_digits_split_is_stratified(sk, seed):
    _, target = sk
    overall = np.bincount(target, minlength=10) / len(target)
    for name, (_, lab) in digits_split(seed).items():
        counts = np.bincount(lab, minlength=10)
        assert np.all(np.abs(counts - overall * len(lab)) <= 1.0), (name, counts, overall * len(lab))


def test_digits_split_is_seeded():
    a, b, c = digits_split(0), digits_split(0), digits_split(1)
    for name in ("train", "val", "test"):
        assert np.array_equal(a[name][0], b[name][0]) and np.array_equal(a[name][1], b[name][1])
    ka = {n: set(_keys(*a[n])) for n in a}
    kc = {n: set(_keys(*c[n])) for n in c}
    assert all(ka[n] != kc[n] for n in ("train", "val", "test"))


def _expected_all(images, size):
    """Every sklearn digit through the reference pipeline: (1797, 3 * H * W)."""
    x = torch.from_numpy(images / 16.0).float()[:, None].expand(-1, 3, -1, -1)
    x = F.interpolate(x.double(), size=size, mode="bilinear", antialias=True, align_corners=False)
    m = torch.tensor(MEAN, dtype=torch.float64)[None, :, None, None]
    s = torch.tensor(STD, dtype=torch.float64)[None, :, None, None]
    return ((x - m) / s).float().flatten(1)


def test_reference_resize_matches_torchvision_v2():
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    for size in [(16, 16), (24, 24), (12, 20), (6, 6)]:
        x = torch.rand(3, 8, 8, generator=g)
        ref = F.interpolate(x[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        torch.testing.assert_close(v2.Resize(size, antialias=True)(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h,w", [(24, 24), (16, 16), (12, 20)])
def test_digits_items_resized_normalised_from_config(sk, h, w):
    images, target = sk
    ref = _expected_all(images, (h, w))
    splits = build_splits(DataConfig(dataset="digits"), data_config(h, w))
    assert splits.classes == [str(i) for i in range(10)]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1257, 180, 360)
    for name in ("train", "val", "test"):
        ds = splits[name]
        for i in (0, 1, len(ds) // 2, len(ds) - 1):
            x, y = ds[i]
            assert x.shape == (3, h, w) and x.dtype == torch.float32
            err = (ref - x.flatten()[None]).abs().amax(1)
            j = int(err.argmin())
            assert err[j] < 1e-5, f"{name}[{i}] matches no digit through resize + normalise (min err {err[j]})"
            assert y == int(target[j])


@pytest.mark.parametrize("seed", [0, 5])
def test_digits_test_split_follows_split_seed(sk, seed):
    """All 360 test items are exactly digits_split(seed)'s test images, in the configured size."""
    images, target = sk
    ref = _expected_all(images, (8, 8))
    splits = build_splits(DataConfig(dataset="digits", split_seed=seed), data_config(8))
    items = [splits.test[i] for i in range(len(splits.test))]
    got = torch.stack([x.flatten() for x, _ in items])
    idx = torch.cdist(got.double(), ref.double()).argmin(1)
    assert torch.allclose(got, ref[idx], atol=1e-5)
    assert [y for _, y in items] == target[idx.numpy()].tolist()
    want = set(_keys(*digits_split(seed)["test"]))
    have = set(_keys((images[idx.numpy()] / 16.0).astype(np.float32), target[idx.numpy()]))
    assert want == have and len(set(idx.tolist())) == 360


# ============================================== imagefolder =====================================================

CLASSES = ["cat", "dog", "emu"]  # sorted; the digits 0, 1, 2 stand in for them


def _png(path: Path, digit_image: np.ndarray, scale: int = 2) -> None:
    """Save an 8x8 digit (values 0..16) as a (8*scale)^2 RGB PNG with a per-channel tint."""
    g = np.round(digit_image * 255 / 16).astype(np.uint8)
    rgb = np.stack([g, 255 - g, g // 2], axis=-1).repeat(scale, 0).repeat(scale, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def make_tree(root: Path, sk, counts: dict[str, int], classes=CLASSES) -> dict[str, list[Path]]:
    """root/<split>/<class>/NN.png from distinct digit images; returns the written paths per split."""
    images, target = sk
    pools = {c: iter(np.flatnonzero(target == k)) for k, c in enumerate(classes)}
    written: dict[str, list[Path]] = {}
    for split, n in counts.items():
        for c in classes:
            for i in range(n):
                p = root / split / c / f"{i:02d}.png"
                _png(p, images[next(pools[c])])
                written.setdefault(split, []).append(p)
    return written


def load_ref(path: Path) -> torch.Tensor:
    """A PNG as a float (3, H, W) tensor in [0, 1], read with PIL."""
    a = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1).float()


def sample_paths(ds) -> list[Path]:
    if isinstance(ds, Subset):
        return [Path(ds.dataset.samples[i][0]) for i in ds.indices]
    return [Path(p) for p, _ in ds.samples]


def imagefolder(root, **kw) -> DataConfig:
    return DataConfig(dataset="imagefolder", root=str(root), **kw)


def test_imagefolder_without_val_holds_out_stratified_fraction(tmp_path, sk):
    files = make_tree(tmp_path, sk, {"train": 10, "test": 4})
    splits = build_splits(imagefolder(tmp_path, val_fraction=0.3, split_seed=0), data_config(12))
    assert splits.classes == CLASSES
    train, val = sample_paths(splits.train), sample_paths(splits.val)
    assert len(val) == 9 and len(train) == 21
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(files["train"])
    assert sorted(sample_paths(splits.test)) == sorted(files["test"])
    # stratified: 30% of each class's 10 images
    assert Counter(p.parent.name for p in val) == {c: 3 for c in CLASSES}
    # items: label = index of the class folder, tensor = the PNG through resize + normalise (eval transform)
    for ds, paths in ((splits.val, val), (splits.train, train), (splits.test, sample_paths(splits.test))):
        for i in (0, len(paths) - 1):
            x, y = ds[i]
            assert y == CLASSES.index(paths[i].parent.name)
            torch.testing.assert_close(x, expected_file(load_ref(paths[i]), (12, 12)), atol=LEVEL, rtol=0)


def test_imagefolder_holdout_is_seeded(tmp_path, sk):
    make_tree(tmp_path, sk, {"train": 10, "test": 4})

    def val_paths(seed):
        return sorted(sample_paths(build_splits(imagefolder(tmp_path, val_fraction=0.3, split_seed=seed),
                                                data_config(12)).val))

    a, b, c = val_paths(0), val_paths(0), val_paths(1)
    assert a == b
    assert a != c


def test_imagefolder_with_val_folder_uses_it(tmp_path, sk):
    files = make_tree(tmp_path, sk, {"train": 10, "val": 2, "test": 4})
    splits = build_splits(imagefolder(tmp_path, val_fraction=0.3), data_config(12))
    assert sorted(sample_paths(splits.train)) == sorted(files["train"])  # nothing held out of train
    assert sorted(sample_paths(splits.val)) == sorted(files["val"])
    assert sorted(sample_paths(splits.test)) == sorted(files["test"])
    p = sample_paths(splits.val)[-1]
    x, y = splits.val[len(splits.val) - 1]
    assert y == CLASSES.index(p.parent.name)
    torch.testing.assert_close(x, expected_file(load_ref(p), (12, 12)), atol=LEVEL, rtol=0)


@pytest.mark.parametrize("split,other_classes", [
    ("test", ["cat", "dog"]),               # a class missing
    ("test", ["cat", "dog", "emu", "fox"]),  # an extra class
    ("test", ["cat", "dog", "eel"]),         # a renamed class
    ("val", ["cat", "dog"]),
    ("val", ["ant", "cat", "dog"]),
])
def test_imagefolder_class_lists_must_agree(tmp_path, sk, split, other_classes):
    make_tree(tmp_path, sk, {"train": 10, **({"test": 4} if split == "val" else {})})
    make_tree(tmp_path, sk, {split: 2}, classes=other_classes)
    with pytest.raises(UserError) as exc:
        build_splits(imagefolder(tmp_path), data_config(12))
    assert_one_line_naming(exc, "data.root", str(tmp_path / split))


def test_imagefolder_missing_root(tmp_path):
    root = tmp_path / "no" / "such" / "dataset"
    with pytest.raises(UserError) as exc:
        build_splits(imagefolder(root), data_config(12))
    assert_one_line_naming(exc, "data.root", str(root))


@pytest.mark.parametrize("missing", ["train", "test"])
def test_imagefolder_missing_split_folder(tmp_path, sk, missing):
    make_tree(tmp_path, sk, {s: 2 for s in ("train", "val", "test") if s != missing})
    with pytest.raises(UserError) as exc:
        build_splits(imagefolder(tmp_path), data_config(12))
    assert_one_line_naming(exc, "data.root", str(tmp_path / missing))


def _garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())


def _truncated_png(path: Path) -> None:
    _png(path, np.arange(64).reshape(8, 8) % 17, scale=8)
    path.write_bytes(path.read_bytes()[:120])


@pytest.mark.parametrize("make_bad", [_garbage, _truncated_png], ids=["random_bytes", "truncated_png"])
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_imagefolder_corrupt_image_named_when_loaded(tmp_path, sk, split, make_bad):
    make_tree(tmp_path, sk, {"train": 10, "val": 2, "test": 4})
    bad = tmp_path / split / "dog" / "zz_corrupt.png"
    make_bad(bad)
    splits = build_splits(imagefolder(tmp_path), data_config(12))  # listing the files reads none of them
    ds = splits[split]
    i = sample_paths(ds).index(bad)
    with pytest.raises(UserError) as exc:
        ds[i]
    assert_one_line_naming(exc, str(bad))
    x, _ = ds[i - 1]  # its neighbours still load
    assert x.shape == (3, 12, 12)


def test_imagefolder_corrupt_image_in_heldout_val(tmp_path, sk):
    make_tree(tmp_path, sk, {"train": 10, "test": 4})
    bad = tmp_path / "train" / "emu" / "zz_corrupt.png"
    _garbage(bad)
    splits = build_splits(imagefolder(tmp_path, val_fraction=0.3), data_config(12))
    for ds in (splits.train, splits.val):
        if bad in sample_paths(ds):
            with pytest.raises(UserError) as exc:
                ds[sample_paths(ds).index(bad)]
            assert_one_line_naming(exc, str(bad))
            break
    else:
        pytest.fail("the corrupt file is in neither train nor val")


# ============================================ vtab / fgvc ========================================================


def _ref_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A file image's resize: bilinear antialiased, rounded to 8-bit levels (the pipeline resizes uint8)."""
    return to_levels(F.interpolate(x[None].double(), size=size, mode="bilinear", antialias=True,
                                   align_corners=False)[0])


def _ref_norm(x: torch.Tensor) -> torch.Tensor:
    return (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]


def _random_image(height: int, width: int, seed: int = 1) -> tuple[Image.Image, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB"), torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


@pytest.mark.parametrize("h,w", [(16, 16), (12, 20)])
def test_vtab_transform_square_resize_no_augmentation(h, w):
    """vtab: the whole image resized to (H, W) (aspect not kept, nothing cropped), train = eval."""
    train_tf, eval_tf = build_transforms(data_config(h, w, crop_pct=0.875), "vtab", from_pil=True)
    img, x = _random_image(30, 45)
    want = _ref_norm(_ref_resize(x, (h, w)))
    torch.manual_seed(0)
    for tf in (train_tf, train_tf, eval_tf):
        torch.testing.assert_close(tf(img), want, atol=LEVEL, rtol=0)


@pytest.mark.parametrize("h,w,crop_pct", [(16, 16, 0.875), (16, 16, 0.5), (12, 20, 0.875), (32, 32, 1.0)])
def test_fgvc_transforms(h, w, crop_pct):
    """fgvc: train = random resized crop + flip; eval = resize to floor(size * 256 / 224) + centre crop, whatever
    the config's crop_pct."""
    cfg = data_config(h, w, crop_pct=crop_pct)
    train_tf, eval_tf = build_transforms(cfg, "fgvc", from_pil=True)
    rgb = (40, 128, 250)
    const = Image.new("RGB", (37, 29), rgb)
    value = (torch.tensor(rgb) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)

    torch.manual_seed(0)
    for _ in range(5):
        t = train_tf(const)
        assert t.shape == (3, h, w) and t.dtype == torch.float32
        torch.testing.assert_close(t, value[:, None, None].expand(3, h, w), atol=1e-5, rtol=0)
    e = eval_tf(const)
    assert e.shape == (3, h, w)
    torch.testing.assert_close(e, value[:, None, None].expand(3, h, w), atol=1e-5, rtol=0)

    # a non-square image (H 30 x W 45): the shorter side to floor(size * 256 / 224), aspect kept (the longer side
    # floored), then the centre (h, w) window; a non-square input size scales both sides by 256/224
    img, x = _random_image(30, 45)
    if h == w:
        ph = math.floor(h * 256 / 224)
        pw = int(ph * 45 / 30)
    else:
        ph, pw = math.floor(h * 256 / 224), math.floor(w * 256 / 224)
    big = _ref_resize(x, (ph, pw))
    top, left = int(round((ph - h) / 2.0)), int(round((pw - w) / 2.0))
    want = _ref_norm(big[:, top:top + h, left:left + w])
    torch.testing.assert_close(eval_tf(img), want, atol=LEVEL, rtol=0)


def test_fgvc_eval_size_224():
    """At ViT-B's 224 the eval resize is VPT's 256."""
    _, eval_tf = build_transforms(data_config(224, crop_pct=0.9), "fgvc", from_pil=True)
    resize = [t for t in eval_tf.transforms if type(t).__name__ == "Resize"]
    assert len(resize) == 1 and list(resize[0].size) == [256]


def test_fgvc_train_is_random_eval_is_not():
    train_tf, eval_tf = build_transforms(data_config(16, crop_pct=0.875), "fgvc", from_pil=True)
    arr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    torch.manual_seed(0)
    outs = [train_tf(img) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert torch.equal(eval_tf(img), eval_tf(img))


@pytest.mark.parametrize("name", ["crop_flip", "resize", "FGVC"])
def test_unknown_train_transform(name):
    with pytest.raises(UserError) as exc:
        build_transforms(data_config(16), name, from_pil=True)
    assert_one_line_naming(exc, "data.train_transform", repr(name), "vtab", "fgvc")


def test_fgvc_imagefolder_splits(tmp_path, sk):
    """fgvc: train items are random crops of the configured size; held-out val uses the eval transform."""
    make_tree(tmp_path, sk, {"train": 10, "test": 4})
    splits = build_splits(imagefolder(tmp_path, val_fraction=0.3, train_transform="fgvc"),
                          data_config(12, crop_pct=0.875))
    torch.manual_seed(0)
    x, _ = splits.train[0]
    assert x.shape == (3, 12, 12)
    p = sample_paths(splits.val)[0]
    v, _ = splits.val[0]
    pre = math.floor(12 * 256 / 224)  # 13
    big = _ref_resize(load_ref(p), (pre, pre))
    off = int(round((pre - 12) / 2.0))
    torch.testing.assert_close(v, _ref_norm(big[:, off:off + 12, off:off + 12]), atol=LEVEL, rtol=0)
    assert splits.val.targets == [CLASSES.index(q.parent.name) for q in sample_paths(splits.val)]
