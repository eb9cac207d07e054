"""Pieces shared by the file-based readers: a (path, label) list dataset, layout checks, a seeded hold-out.

Every reader checks its layout before it lists anything (``require_root``, ``require``) and checks that every
listed image exists before it returns a split (``require_images``), so a run with missing files stops with a
one-line ``UserError`` before training instead of failing mid-epoch. Images are decoded only when an item is
indexed (``checked_loader``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset, Subset

from vptool.errors import UserError


def is_deterministic(transform) -> bool:
    """True for a transform ``vptool.data.build_transforms`` built without randomness (``vtab`` training, every
    evaluation transform): the same input always gives the same tensor, so it may be applied once and kept."""
    return bool(getattr(transform, "vptool_deterministic", False))


def to_rgb(img):
    """A PIL image of any mode as 8-bit RGB.

    Grayscale, palette, RGBA (alpha dropped, as torchvision's loader does) and CMYK go through PIL's own
    ``convert("RGB")``. 16-bit grayscale (``I;16*``, and ``I`` read as 16-bit) is scaled by 255 / 65535 first:
    PIL's own conversion would clip every value above 255 to white. Float images (``F``) are taken as [0, 1].
    """
    import numpy as np
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64) * 255.0
        img = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))  # 2-D uint8 -> mode L
    return img if img.mode == "RGB" else img.convert("RGB")


def checked_loader(path: str | Path):
    """PIL loader (RGB, see ``to_rgb``) that names the file when an image is corrupt or unreadable.

    Raises:
        UserError: the file cannot be opened or decoded as an image.
    """
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            img = Image.open(fh)
            img.load()
            return to_rgb(img)
    except Exception as exc:
        from PIL import UnidentifiedImageError

        why = "not an image format PIL can decode" if isinstance(exc, UnidentifiedImageError) else \
            f"{type(exc).__name__}: {exc}"
        raise UserError(f"{path}: cannot read image ({why}); remove or replace the file") from None


class FileListDataset(Dataset):
    """Images listed as ``(path, label)`` pairs, decoded with PIL when an item is indexed.

    Args:
        samples: ``(path, label)`` pairs in dataset order; labels in 0..K-1.
        classes: the K class names (index = label).
        transform: callable on a PIL RGB image (a torchvision v2 pipeline).

    Attributes:
        samples: ``[(path as str, label)]``.
        targets: the labels, ``list[int]``.
        classes: the K class names.
    """

    def __init__(self, samples: Sequence[tuple[str | Path, int]], classes: Sequence[str], transform=None):
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, y = self.samples[i]
        x = checked_loader(path)
        if self.transform is not None:
            x = self.transform(x)
        return x, y


class TargetSubset(Subset):
    """``torch.utils.data.Subset`` that also exposes ``targets`` (and ``classes``) of the selected items."""

    @property
    def targets(self) -> list[int]:
        base = self.dataset.targets
        return [int(base[i]) for i in self.indices]

    @property
    def classes(self) -> list[str]:
        return list(self.dataset.classes)


def stratified_holdout(targets: Sequence[int], fraction: float, seed: int, what: str = "train",
                       fix: str = "change data.val_fraction") -> tuple[list[int], list[int]]:
    """Seeded stratified split of ``range(len(targets))`` into (kept, held out), each sorted.

    ``fraction`` of the items is held out, class proportions kept (scikit-learn's ``train_test_split`` with
    ``stratify``); the same ``seed`` gives the same split on every machine.

    Args:
        targets: label of each item.
        fraction: share held out, in (0, 1).
        seed: ``random_state`` of the split.
        what: names the item list in the error message.
        fix: how to fix an impossible split, for the error message.

    Raises:
        UserError: the split is impossible (a class with one item, fewer held-out items than classes, ...).
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(targets))
    try:
        keep, held = train_test_split(idx, test_size=fraction, stratify=list(targets), random_state=seed)
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        raise UserError(f"data.val_fraction: cannot hold out a stratified {fraction} of {what} ({msg}); {fix}") \
            from None
    return sorted(keep.tolist()), sorted(held.tolist())


def require_root(root: str | Path | None, layout: str) -> Path:
    """``data.root`` as a Path, checked to be a folder.

    Raises:
        UserError: unset or not a folder; the message ends with ``layout`` (what the reader expects).
    """
    if not root:
        raise UserError(f"data.root: missing; {layout} (set data.root)")
    path = Path(root)
    if not path.is_dir():
        raise UserError(f"data.root: {path} not found; {layout}")
    return path


def require(path: Path, layout: str, folder: bool = False) -> Path:
    """Check that a file (``folder`` False) or folder the reader needs exists.

    Raises:
        UserError: it does not; names the path and the expected ``layout``.
    """
    ok = path.is_dir() if folder else path.is_file()
    if not ok:
        raise UserError(f"data.root: {path}{'/' if folder else ''} not found; {layout}")
    return path


def require_images(paths: Sequence[str | Path], source: str, layout: str) -> None:
    """Check that every listed image file exists (no decoding).

    Args:
        paths: the image files of one split.
        source: where they are listed (a split file), for the message.
        layout: what the reader expects, for the message.

    Raises:
        UserError: names the first missing file and how many of the listed ones are missing.
    """
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"data.root: image {missing[0]} not found ({len(missing)} of {len(paths)} images listed in "
                        f"{source} are missing); {layout}")


def read_fields(path: Path, n: int, expect: str, from_right: bool = False) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a text file, each split into ``n`` whitespace-separated fields.

    Split from the left (``<id> <rest>``: the last field keeps inner spaces) or, with ``from_right``, from the
    right (``<path> <label>``: the first field keeps inner spaces).

    Returns:
        ``[(line number, fields)]``.

    Raises:
        UserError: a line without ``n`` fields; names ``file:line`` and the ``expect``-ed form.
    """
    out = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"data.root: {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); expected lines "
                        f"'{expect}'") from None
    for lineno, line in enumerate(lines, 1):
        text = line.strip()
        if not text:
            continue
        fields = text.rsplit(maxsplit=n - 1) if from_right else text.split(maxsplit=n - 1)
        if len(fields) != n:
            raise UserError(f"data.root: {path}:{lineno}: malformed line {text[:80]!r}; expected '{expect}'")
        out.append((lineno, [f.strip() for f in fields]))
    return out


def parse_int(value: str, path: Path, lineno: int, what: str) -> int:
    """``int(value)`` or a UserError naming ``file:line`` and the bad value."""
    try:
        return int(value)
    except ValueError:
        raise UserError(f"data.root: {path}:{lineno}: {what} {value!r} is not an integer") from None
