"""Three stand-in tasks made from scikit-learn's bundled handwritten digits, written in the VTAB-1k file layout
(``vptool.data.vtab``), so that ``vptool table`` runs its whole VTAB-1k protocol (tune on train800/val200, retrain on
train800val200, test) on real images on any machine: ``recipes/tables/digits_vtab.yaml``.

The tasks (the table puts the first and the last in its Natural group, the second in Specialized):

- ``digits`` (K = 10): the digits as they are;
- ``digits_rot90`` (K = 10): every image rotated by 90 degrees (counter-clockwise), a change of input statistics;
- ``digits_5to9`` (K = 5): only the digits 5..9, labelled 0..4, a class subset.

Each task takes a stratified, seeded sample of the 1,797 images (``TRAIN`` + ``VAL`` + ``TEST``; smaller than
VTAB-1k's 800/200 so that the table runs in CI in minutes): the list files keep VTAB-1k's names (``train800.txt``
holds ``TRAIN`` images, ``val200.txt`` ``VAL``, ``train800val200.txt`` both, ``test.txt`` the rest of the sample).
Images are 8x8 grayscale PNGs, pixel = round(value / 16 * 255), named by their index in ``load_digits()``.

Usage: ``python -m vptool.data.digits_vtab DEST`` writes ``DEST/<task>/...`` (refuses a DEST that holds files
already); every file is written to a temporary folder first and moved into place.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

#: task -> K
TASKS = {"digits": 10, "digits_rot90": 10, "digits_5to9": 5}
TRAIN, VAL, TEST = 200, 100, 300
SEED = 0


def _task_arrays(images: np.ndarray, labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, each one's index in scikit-learn's digits) of one task."""
    index = np.arange(len(labels))
    if task == "digits_rot90":
        return np.rot90(images, k=1, axes=(1, 2)), labels, index
    if task == "digits_5to9":
        keep = labels >= 5
        return images[keep], labels[keep] - 5, index[keep]
    return images, labels, index


def _split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (train, val, test) indices of sizes TRAIN, VAL, TEST (smaller when the task has fewer images)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    n = min(len(labels), TRAIN + VAL + TEST)
    sample, _ = (idx, None) if n == len(idx) else train_test_split(idx, train_size=n, stratify=labels,
                                                                    random_state=seed)
    test_n = n - TRAIN - VAL
    trainval, test = train_test_split(sample, test_size=test_n, stratify=labels[sample], random_state=seed)
    train, val = train_test_split(trainval, test_size=VAL, stratify=labels[trainval], random_state=seed)
    return np.sort(train), np.sort(val), np.sort(test)


def write_digits_vtab(dest: str | Path, seed: int = SEED) -> Path:
    """Write the three stand-in tasks into ``dest`` in the VTAB-1k layout.

    Args:
        dest: the folder to create (``data.root`` of the table's columns); it may exist but must be empty.
        seed: the sampling seed (the same seed writes the same files).

    Returns:
        ``dest`` as a Path.

    Raises:
        FileExistsError: ``dest`` exists and is not an empty folder (nothing is written).
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest}: exists and is not an empty folder; give a new folder")
    d = load_digits()
    pixels = np.rint(d.images / 16.0 * 255.0).astype(np.uint8)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        for task in TASKS:
            images, labels, index = _task_arrays(pixels, d.target.astype(np.int64), task)
            folder = tmp / task / "images"
            folder.mkdir(parents=True)
            train, val, test = _split(labels, seed)
            lists = {}
            for name, idx in (("train800", train), ("val200", val), ("test", test)):
                lines = []
                for i in idx:
                    rel = f"images/{index[i]:04d}.png"  # named by its index in load_digits()
                    Image.fromarray(np.ascontiguousarray(images[i]), mode="L").save(tmp / task / rel)
                    lines.append(f"{rel} {int(labels[i])}")
                lists[name] = lines
            lists["train800val200"] = lists["train800"] + lists["val200"]
            for name, lines in lists.items():
                (tmp / task / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m vptool.data.digits_vtab DEST``: exit 0, or 2 with one line when DEST is taken."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m vptool.data.digits_vtab DEST  (writes DEST/{" + ",".join(TASKS) + "}/ in the "
              "vtab-1k layout)", file=sys.stderr)
        return 2
    try:
        out = write_digits_vtab(args[0])
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
