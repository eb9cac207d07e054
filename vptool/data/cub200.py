"""CUB-200-2011 (Caltech-UCSD Birds, 200 classes) read from its official release folder ``CUB_200_2011/``.

Layout (``data.root`` is the ``CUB_200_2011`` folder)::

    images.txt               <image id> <path relative to images/>
    image_class_labels.txt   <image id> <class id 1..200>
    train_test_split.txt     <image id> <1 = train | 0 = test>
    classes.txt              <class id> <class name>
    images/<class folder>/<file>.jpg

Splits: test = the official test images (5,794); train/val = a seeded stratified hold-out of
``data.val_fraction`` (default 0.1, so 90/10) of the official train images (5,994), seed ``data.split_seed``.
Label = class id - 1; class names from ``classes.txt``. Samples keep ``images.txt`` order.
"""

from __future__ import annotations

from pathlib import Path

from vptool.data.files import (
    FileListDataset,
    parse_int,
    read_fields,
    require,
    require_images,
    require_root,
    stratified_holdout,
)
from vptool.errors import UserError

FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
LAYOUT = "cub200 expects CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,images/}"


def check_layout(root: str | Path | None) -> Path:
    """Check that the four text files and ``images/`` exist under ``root`` (nothing is parsed).

    Returns:
        ``root`` as a Path.

    Raises:
        UserError: ``root`` or one of the files is missing; names it and the expected layout.
    """
    root = require_root(root, LAYOUT)
    for name in FILES:
        require(root / name, LAYOUT)
    require(root / "images", LAYOUT, folder=True)
    return root


def _id_table(path: Path, expect: str, what: str) -> dict[int, tuple[int, str]]:
    """``{id: (line number, value)}`` of an ``<id> <value>`` file; duplicate ids are errors."""
    out: dict[int, tuple[int, str]] = {}
    for lineno, (key, value) in read_fields(path, 2, expect):
        i = parse_int(key, path, lineno, what)
        if i in out:
            raise UserError(f"data.root: {path}:{lineno}: {what} {i} is listed twice (first on line {out[i][0]})")
        out[i] = (lineno, value)
    return out


def read_official(root: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], list[str]]:
    """The official train and test lists and the class names.

    Returns:
        ``(train, test, classes)``: ``[(image path, label 0..K-1)]`` in ``images.txt`` order, K class names.

    Raises:
        UserError: a malformed line, an unknown or duplicate id, a class id that is not in ``classes.txt``,
            class ids that are not 1..K, a split flag other than 0/1 (each names ``file:line`` or the id).
    """
    classes_txt, images_txt, labels_txt, split_txt = (root / "classes.txt", root / "images.txt",
                                                      root / "image_class_labels.txt", root / "train_test_split.txt")
    class_rows = _id_table(classes_txt, "<class id> <class name>", "class id")
    for k, (i, (lineno, _)) in enumerate(sorted(class_rows.items()), 1):
        if i != k:
            raise UserError(f"data.root: {classes_txt}:{lineno}: class id {i} breaks the numbering; class ids "
                            f"must be 1..K without gaps (label = class id - 1)")
    classes = [name for _, (_, name) in sorted(class_rows.items())]
    images = _id_table(images_txt, "<image id> <path relative to images/>", "image id")
    labels = _id_table(labels_txt, "<image id> <class id>", "image id")
    flags = _id_table(split_txt, "<image id> <1 train | 0 test>", "image id")
    for path, table in ((labels_txt, labels), (split_txt, flags)):
        extra = sorted(set(table) - set(images))
        if extra:
            raise UserError(f"data.root: {path}:{table[extra[0]][0]}: image id {extra[0]} is not in {images_txt}")
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for image_id, (_, rel) in images.items():
        for path, table in ((labels_txt, labels), (split_txt, flags)):
            if image_id not in table:
                raise UserError(f"data.root: {path} has no line for image id {image_id} (listed in {images_txt})")
        lineno, value = labels[image_id]
        cls = parse_int(value, labels_txt, lineno, "class id")
        if cls not in class_rows:
            raise UserError(f"data.root: {labels_txt}:{lineno}: class id {cls} is not in {classes_txt} "
                            f"(1..{len(classes)})")
        lineno, value = flags[image_id]
        if value not in ("0", "1"):
            raise UserError(f"data.root: {split_txt}:{lineno}: split flag {value!r} is not 1 (train) or 0 (test)")
        (train if value == "1" else test).append((root / "images" / rel, cls - 1))
    for name, rows in (("train (1)", train), ("test (0)", test)):
        if not rows:
            raise UserError(f"data.root: {split_txt} marks no image as {name}; {LAYOUT}")
    return train, test, classes


def build(data, train_tf, eval_tf) -> tuple[FileListDataset, FileListDataset, FileListDataset, list[str]]:
    """``(train, val, test, classes)`` of CUB-200-2011 (see the module docstring); val uses ``eval_tf``.

    Raises:
        UserError: missing files or images, malformed lists (``read_official``), an impossible hold-out.
    """
    root = check_layout(data.root)
    train, test, classes = read_official(root)
    require_images([p for p, _ in train + test], f"{root / 'images.txt'}", LAYOUT)
    keep, held = stratified_holdout([y for _, y in train], data.val_fraction, data.split_seed,
                                    what=f"the {len(train)} official cub200 train images")
    return (FileListDataset([train[i] for i in keep], classes, train_tf),
            FileListDataset([train[i] for i in held], classes, eval_tf),
            FileListDataset(test, classes, eval_tf), classes)
