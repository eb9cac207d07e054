"""VPT's FGVC benchmark layout (``fgvc-json``): CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars.

Layout (``data.root`` = one task's folder)::

    train.json  val.json  test.json     each {"<image path>": <class id>, ...}
    <image_dir>/<image path>            image_dir = data.image_dir, default per task (catalog.FGVC_TASKS):
                                        cub, nabirds "images"; dogs "Images"; flowers, cars the root itself

Splits: the three JSON files as given (VPT's own train/val split of each official train set). Samples keep the
JSON order. Labels: the class ids of ``train.json``, sorted as integers, mapped to 0..K-1 (the VPT code's
contiguous mapping); class names are the original ids as strings. A val/test class id that ``train.json`` lacks
is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

from vptool.data.catalog import FGVC_TASKS
from vptool.data.files import FileListDataset, require, require_images, require_root
from vptool.errors import UserError

SPLITS = ("train", "val", "test")


def image_dir(data) -> str:
    """The folder (relative to ``data.root``) the JSON paths are relative to: ``data.image_dir`` or the task's."""
    if data.image_dir is not None:
        return data.image_dir
    return FGVC_TASKS[data.task][0]


def layout(data) -> str:
    folder = image_dir(data)
    where = f"<root>/{folder}/" if folder else "<root>/ itself"
    return (f"fgvc-json (task {data.task}) expects <root>/{{train.json,val.json,test.json}} mapping image path -> "
            f"class id, the paths relative to {where} (set data.image_dir to change it)")


def check_layout(data) -> Path:
    """Check that the three JSON files and the image folder exist (nothing is parsed).

    Returns:
        ``data.root`` as a Path.

    Raises:
        UserError: the root, a JSON file or the image folder is missing; names it and the expected layout.
    """
    root = require_root(data.root, layout(data))
    for split in SPLITS:
        require(root / f"{split}.json", layout(data))
    require(root / image_dir(data), layout(data), folder=True)
    return root


def _class_id(value, path: Path, image: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UserError(f"data.root: {path}: image {image!r} has class id {value!r}; class ids must be integers")
    try:
        return int(value)
    except ValueError:
        raise UserError(f"data.root: {path}: image {image!r} has class id {value!r}; class ids must be "
                        "integers") from None


def read_json(path: Path) -> list[tuple[str, int]]:
    """``[(image path, class id)]`` of one split file, in file order.

    Raises:
        UserError: not valid JSON, not an object, a class id that is not an integer (names the file).
    """
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        msg = " ".join(str(exc).split())
        raise UserError(f"data.root: {path}: not valid JSON ({msg}); expected {{\"<image path>\": <class id>}}") \
            from None
    if not isinstance(obj, dict):
        raise UserError(f"data.root: {path}: holds a JSON {type(obj).__name__}; expected an object "
                        "{\"<image path>\": <class id>}")
    return [(str(k), _class_id(v, path, k)) for k, v in obj.items()]


def build(data, train_tf, eval_tf) -> tuple[FileListDataset, FileListDataset, FileListDataset, list[str]]:
    """``(train, val, test, classes)`` of one fgvc-json task (see the module docstring).

    Raises:
        UserError: missing files or images, malformed JSON, a val/test class id not in ``train.json``.
    """
    root = check_layout(data)
    images = root / image_dir(data)
    rows = {split: read_json(root / f"{split}.json") for split in SPLITS}
    for split in SPLITS:
        if not rows[split]:
            raise UserError(f"data.root: {root / (split + '.json')} lists no images; {layout(data)}")
    ids = sorted({c for _, c in rows["train"]})
    cont = {c: i for i, c in enumerate(ids)}
    classes = [str(c) for c in ids]
    out = []
    for split, tf in zip(SPLITS, (train_tf, eval_tf, eval_tf)):
        path = root / f"{split}.json"
        samples = []
        for image, c in rows[split]:
            if c not in cont:
                raise UserError(f"data.root: {path}: class id {c} (image {image!r}) does not occur in "
                                f"{root / 'train.json'}; every val/test class needs training images")
            samples.append((images / image, cont[c]))
        require_images([p for p, _ in samples], str(path), layout(data))
        out.append(FileListDataset(samples, classes, tf))
    return out[0], out[1], out[2], classes
