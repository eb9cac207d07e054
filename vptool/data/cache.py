"""The decoded-image cache of file datasets (``data.cache: auto``): each image decoded once, kept as uint8.

A file dataset (``imagefolder``, ``cub200``, ``fgvc-json``, ``vtab-1k``) otherwise decodes every JPEG again in
every epoch. ``vptool.data.build_transforms`` builds every file transform as uint8 geometry first, then
``ToDtype(float32, scale)`` and ``Normalize``, and describes how it splits around a cache (``CacheForm``):

- ``pre``: the deterministic uint8 ops done once, when the image is cached (``vtab``: ``Resize`` to (H, W);
  ``fgvc`` evaluation: ``Resize`` of the shorter side to floor(size * 256 / 224), ``CenterCrop`` (H, W));
- ``post``: what runs on the cached uint8 tensor at every item (the random crop and flip, the float conversion,
  the normalisation).

Deterministic transforms (``vtab``, every evaluation transform) cache the (3, H, W) result of ``pre``; the items
are then **bitwise** those of the uncached pipeline (the same ops on the same uint8 tensors, in the same order).

The ``fgvc`` training transform (``RandomResizedCrop`` (H, W) of the whole image, then a flip) has no
deterministic step, so its images are cached shrunk: the shorter side to ``shrink`` (the evaluation resize),
aspect ratio kept, never enlarged. The crop box is drawn by the transform's own ``RandomResizedCrop.make_params``
on the image's original size, so the random draws (box and flip) are exactly the uncached pipeline's with the
same RNG state; the box is then scaled to the cached image and cropped there. Images no larger than ``shrink``
give bitwise the uncached batches; larger ones the same regions, resampled from the shrunk image.

Storage (``ImageStore``): one flat uint8 buffer of every image's (3, h_i, w_i) bytes plus an index (offsets,
cached and original sizes), in memory (a torch tensor, shared with fork-started DataLoader workers) or a
memory-mapped ``images.npy`` in a folder with ``index.npy`` and ``key.json``. The key (``cache_key``) hashes the
transform's description, the shrink size, every (path, label) and every file's size and mtime: a folder whose key
differs is never read (``open_store`` returns None).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from vptool.data.files import checked_loader
from vptool.errors import UserError
from vptool.paths import write_text_atomically

#: bump when the stored layout or the meaning of the key changes: older folders are then never read
CACHE_FORMAT = 1
KEY_FILE, INDEX_FILE, IMAGES_FILE = "key.json", "index.npy", "images.npy"


@dataclass
class CacheForm:
    """How a file transform splits around the cache (set by ``build_transforms`` as ``transform.vptool_cache``).

    Attributes:
        pre: deterministic uint8 ops done once when an image is cached (after ``ToImage``).
        post: the ops run on the cached uint8 (3, h, w) tensor at every item, in order.
        size: (H, W) of every cached image when ``pre`` fixes it, else None.
        shrink: cached images have their shorter side shrunk to this many pixels (never enlarged); None keeps
            ``pre``'s output.
        crop: ``post``'s first op when it is a ``RandomResizedCrop`` drawn on the original image size.
    """

    pre: list
    post: list
    size: tuple[int, int] | None = None
    shrink: int | None = None
    crop: object | None = None

    def apply(self, x: torch.Tensor, orig: tuple[int, int]) -> torch.Tensor:
        """``post`` on a cached uint8 (3, h, w) image whose file was ``orig`` = (H0, W0): float32 (3, H, W)."""
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        x = tv_tensors.Image(x)
        ops = self.post
        if self.crop is not None:
            crop = self.crop
            H0, W0 = orig
            p = crop.make_params([tv_tensors.Image(torch.empty(1, 1, 1, dtype=torch.uint8).expand(1, H0, W0))])
            top, left, h, w = p["top"], p["left"], p["height"], p["width"]
            hc, wc = x.shape[-2:]
            if (hc, wc) != (H0, W0):  # the same box, scaled to the shrunk image
                top, left = min(hc - 1, round(top * hc / H0)), min(wc - 1, round(left * wc / W0))
                h, w = max(1, min(hc - top, round(h * hc / H0))), max(1, min(wc - left, round(w * wc / W0)))
            x = F.resized_crop(x, top, left, h, w, size=crop.size, interpolation=crop.interpolation,
                               antialias=crop.antialias)
            ops = ops[1:]
        for op in ops:
            x = op(x)
        return x


def cache_form(transform) -> CacheForm | None:
    """The ``CacheForm`` of a transform ``build_transforms`` built for PIL inputs, else None."""
    return getattr(transform, "vptool_cache", None)


def file_items(dataset) -> tuple[list[str], list[int], object] | None:
    """``(paths, labels, transform)`` of a file dataset whose transform has a ``CacheForm``: a
    ``FileListDataset``, torchvision ``ImageFolder`` or a ``Subset`` of one; None for anything else (digits,
    torchvision's in-memory sets)."""
    indices = None
    if isinstance(dataset, Subset):
        indices, dataset = list(dataset.indices), dataset.dataset
    samples, transform = getattr(dataset, "samples", None), getattr(dataset, "transform", None)
    if samples is None or cache_form(transform) is None:
        return None
    if indices is not None:
        samples = [samples[i] for i in indices]
    return [str(p) for p, _ in samples], [int(y) for _, y in samples], transform


def shrunk_size(H: int, W: int, short: int | None) -> tuple[int, int]:
    """(h, w) of an H x W image with its shorter side shrunk to ``short`` (torchvision ``Resize(short)``'s
    rounding; aspect ratio kept; an image already that small, or ``short`` None, keeps its size)."""
    if short is None or min(H, W) <= short:
        return H, W
    if H <= W:
        return short, int(short * W / H)
    return int(short * H / W), short


def cache_key(paths: list[str], labels: list[int], transform, form: CacheForm) -> str:
    """sha256 of what the cached bytes depend on: the format, the transform's description (its ops and their
    parameters), the shrink size, and every (path, label, file size, mtime) in order.

    Raises:
        UserError: an image file is gone.
    """
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "transform": repr(transform), "size": form.size,
                                   "shrink": form.shrink}, sort_keys=True).encode())
    for p, y in zip(paths, labels):
        try:
            st = os.stat(p)
        except OSError as exc:
            raise UserError(f"data.root: image {p}: {exc.strerror}") from None
        h.update(f"{p}\0{y}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def planned_sizes(paths: list[str], form: CacheForm) -> np.ndarray:
    """(N, 4) int64: each image's cached (h, w) and original (H0, W0), from the form's fixed size or the files'
    headers (no decoding); the original size is 0 where ``pre`` fixes the size (nothing needs it).

    Raises:
        UserError: a file PIL cannot open.
    """
    out = np.zeros((len(paths), 4), dtype=np.int64)
    if form.size is not None:
        out[:, :2] = form.size
        return out
    from PIL import Image

    for i, p in enumerate(paths):
        try:
            with Image.open(p) as im:
                W0, H0 = im.size
        except Exception as exc:
            raise UserError(f"{p}: cannot read image ({type(exc).__name__}: {exc}); remove or replace the file") \
                from None
        out[i] = (*shrunk_size(H0, W0, form.shrink), H0, W0)
    return out


class ImageStore:
    """N uint8 images (3, h_i, w_i) in one flat buffer, in memory or in a memory-mapped file.

    Args:
        sizes: (N, 4) int64, each image's cached (h, w) and original (H0, W0) (``planned_sizes``).
        folder: None keeps the bytes in memory; else ``folder/images.npy`` (created, or opened read-only with
            ``existing``).
        existing: open a complete folder ``save_index`` finished instead of creating one.
    """

    def __init__(self, sizes: np.ndarray, folder: Path | None = None, existing: bool = False):
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes[:, 0] * self.sizes[:, 1])]).astype(np.int64)
        self.nbytes = int(self.offsets[-1])
        self.folder = folder
        self._flat = None
        if folder is None:
            self._flat = torch.empty(self.nbytes, dtype=torch.uint8)
        elif not existing:
            np.lib.format.open_memmap(folder / IMAGES_FILE, mode="w+", dtype=np.uint8, shape=(self.nbytes,))
            self._open("r+")

    def _open(self, mode: str = "r"):
        self._flat = np.load(self.folder / IMAGES_FILE, mmap_mode=mode)
        return self._flat

    def __getstate__(self):  # a file-backed store travels to spawned workers as its path, reopened there
        state = dict(self.__dict__)
        if self.folder is not None:
            state["_flat"] = None
        return state

    def __len__(self) -> int:
        return len(self.sizes)

    def put(self, i: int, x: torch.Tensor) -> None:
        """Store image ``i``, a uint8 (3, h_i, w_i) tensor of its planned size."""
        a, b = self.offsets[i], self.offsets[i + 1]
        flat = self._flat if self._flat is not None else self._open("r+")
        flat[a:b] = x.reshape(-1) if isinstance(flat, torch.Tensor) else x.reshape(-1).numpy()

    def get(self, i: int) -> torch.Tensor:
        """Image ``i`` as a uint8 (3, h_i, w_i) tensor (a copy)."""
        a, b = self.offsets[i], self.offsets[i + 1]
        h, w = (int(v) for v in self.sizes[i, :2])
        flat = self._flat if self._flat is not None else self._open()
        if isinstance(flat, torch.Tensor):
            return flat[a:b].view(3, h, w).clone()
        return torch.from_numpy(np.array(flat[a:b])).view(3, h, w)

    def orig(self, i: int) -> tuple[int, int]:
        return int(self.sizes[i, 2]), int(self.sizes[i, 3])

    def save_index(self, key: str) -> None:
        """Finish a file-backed store: flush, write ``index.npy``, then ``key.json`` (atomically, last: a folder
        without it is incomplete)."""
        if self.folder is None:
            return
        if isinstance(self._flat, np.memmap):
            self._flat.flush()
        np.save(self.folder / INDEX_FILE, self.sizes)
        write_text_atomically(self.folder / KEY_FILE, json.dumps({"format": CACHE_FORMAT, "key": key}) + "\n")

    def close(self) -> None:
        """Drop the bytes (the folder itself is the caller's to remove)."""
        self._flat = None


def open_store(folder: Path, key: str) -> ImageStore | None:
    """The complete store in ``folder`` when its ``key.json`` holds ``key``; None when it is missing, incomplete or
    was built for other images or another transform."""
    try:
        saved = json.loads((folder / KEY_FILE).read_text())
        if saved != {"format": CACHE_FORMAT, "key": key}:
            return None
        store = ImageStore(np.load(folder / INDEX_FILE), folder, existing=True)
        if store._open().shape != (store.nbytes,):
            return None
        return store
    except (OSError, ValueError):
        return None


class _Decode(Dataset):
    """Item i: image i decoded, ``pre`` applied, shrunk: (uint8 (3, h, w) tensor, i)."""

    def __init__(self, paths: list[str], form: CacheForm):
        self.paths, self.form = paths, form

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from torchvision.transforms import v2
        from torchvision.transforms.v2 import functional as F

        img = checked_loader(self.paths[i])
        x = v2.ToImage()(img)
        for op in self.form.pre:
            x = op(x)
        H0, W0 = x.shape[-2:]
        h, w = shrunk_size(H0, W0, self.form.shrink)
        if (h, w) != (H0, W0):
            x = F.resize(x, [h, w], antialias=True)
        return x.as_subclass(torch.Tensor).contiguous(), i


class CachedImages(Dataset):
    """A file dataset served from an ``ImageStore``: ``(float32 (3, H, W) image, int label)``.

    Until ``fill`` (or ``attach``) gives it a store, items come from the wrapped dataset (decoded as usual).

    Args:
        dataset: a dataset ``file_items`` accepts.

    Attributes:
        targets: the labels, ``list[int]``; classes: the class names.
        key: ``cache_key`` of the images and transform.
    """

    def __init__(self, dataset):
        items = file_items(dataset)
        assert items is not None, "CachedImages needs a file dataset with a cacheable transform"
        self.dataset = dataset
        self.paths, self.targets, self.transform = items
        self.form = cache_form(self.transform)
        self.classes = list(getattr(dataset, "classes", []))
        self.store: ImageStore | None = None
        self._key: str | None = None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = cache_key(self.paths, self.targets, self.transform, self.form)
        return self._key

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        if self.store is None:
            return self.dataset[i]
        return self.form.apply(self.store.get(i), self.store.orig(i)), self.targets[i]

    def planned_sizes(self) -> np.ndarray:
        """``planned_sizes`` of this dataset's images."""
        return planned_sizes(self.paths, self.form)

    def fill(self, sizes: np.ndarray, folder: Path | None = None, num_workers: int = 0, on_image=None) -> ImageStore:
        """Decode every image once into a new store (``folder`` None: in memory) and serve items from it.

        Args:
            sizes: ``planned_sizes()``.
            num_workers: DataLoader processes that decode.
            on_image: called after each image (progress, stop checks).

        Raises:
            UserError: an unreadable image, or one whose decoded size differs from its header's.
        """
        store = ImageStore(sizes, folder)
        loader = DataLoader(_Decode(self.paths, self.form), batch_size=None, shuffle=False, num_workers=num_workers,
                            generator=torch.Generator())  # its own seed: the run's RNG stream is left as it was
        try:
            for x, i in loader:
                if tuple(x.shape) != (3, *(int(v) for v in sizes[i, :2])):
                    raise UserError(f"{self.paths[i]}: decodes to {tuple(x.shape[-2:])}, its header says "
                                    f"{tuple(int(v) for v in sizes[i, 2:])}; re-save the file or set data.cache: off")
                store.put(i, x)
                if on_image is not None:
                    on_image()
            store.save_index(self.key)
        except BaseException:
            store.close()
            raise
        self.store = store
        return store

    def attach(self, store: ImageStore) -> None:
        """Serve items from ``store`` (an ``open_store`` result for this dataset's key)."""
        self.store = store

    def close(self) -> None:
        """Go back to decoding (the stored bytes are dropped)."""
        if self.store is not None:
            self.store.close()
            self.store = None
