"""VTAB-1k in the widely shared ``vtab-1k/<task>/`` layout of split lists (19 tasks, 1,000 training images each).

Layout (``data.root`` = the ``vtab-1k`` folder)::

    <task>/train800.txt  <task>/val200.txt  <task>/train800val200.txt  <task>/test.txt
        each line: <image path relative to <task>/> <label 0..K-1>

Splits (``data.vtab_split``, catalog.VTAB_SPLITS): ``final`` trains on train800val200 and tests on test
(val200, a subset of the training images, is still reported as val); ``tune`` trains on train800 and selects
on val200. K comes from catalog.VTAB_TASKS (the task's full class count, even if a split lacks a class);
class names are ``"0".."K-1"``. A task folder of one's own in this layout (not one of the 19) takes K from
``data.num_classes``. Samples keep file order.
"""

from __future__ import annotations

from pathlib import Path

from vptool.data.catalog import VTAB_SPLITS, VTAB_TASKS
from vptool.data.files import FileListDataset, parse_int, read_fields, require, require_images, require_root
from vptool.errors import UserError

LAYOUT = ("vtab-1k expects <root>/<task>/{train800,val200,train800val200,test}.txt with lines "
          "'<image path relative to <root>/<task>> <label>'")


def split_files(data) -> list[Path]:
    """The (train, val, test) list files ``data.vtab_split`` reads, in that order (not checked)."""
    task_dir = Path(data.root) / data.task
    return [task_dir / f"{name}.txt" for name in VTAB_SPLITS[data.vtab_split]]


def check_layout(data) -> Path:
    """Check that the task folder and the three list files of ``data.vtab_split`` exist (nothing is parsed).

    Returns:
        ``data.root`` as a Path.

    Raises:
        UserError: the root, the task folder or a list file is missing; names it and the expected layout.
    """
    root = require_root(data.root, LAYOUT)
    require(root / data.task, LAYOUT, folder=True)
    for path in split_files(data):
        require(path, LAYOUT)
    return root


def read_list(path: Path, num_classes: int) -> list[tuple[Path, int]]:
    """``[(image path, label)]`` of one list file; paths resolved against the file's folder.

    Raises:
        UserError: a malformed line, a label that is not an integer in [0, K), an empty file (names file:line).
    """
    out = []
    for lineno, (rel, value) in read_fields(path, 2, "<image path> <label>", from_right=True):
        y = parse_int(value, path, lineno, "label")
        if not 0 <= y < num_classes:
            raise UserError(f"data.root: {path}:{lineno}: label {y} is outside 0..{num_classes - 1} (the task has "
                            f"K = {num_classes} classes); fix the line or data.task")
        out.append((path.parent / rel, y))
    if not out:
        raise UserError(f"data.root: {path} lists no images; {LAYOUT}")
    return out


def build(data, train_tf, eval_tf) -> tuple[FileListDataset, FileListDataset, FileListDataset, list[str]]:
    """``(train, val, test, classes)`` of one VTAB-1k task for ``data.vtab_split`` (see the module docstring).

    Raises:
        UserError: missing files or images, malformed lines, labels outside [0, K).
    """
    check_layout(data)
    k = VTAB_TASKS.get(data.task) or data.num_classes  # a task of one's own: its data.num_classes
    classes = [str(i) for i in range(k)]
    out = []
    for path, tf in zip(split_files(data), (train_tf, eval_tf, eval_tf)):
        samples = read_list(path, k)
        require_images([p for p, _ in samples], str(path), LAYOUT)
        out.append(FileListDataset(samples, classes, tf))
    return out[0], out[1], out[2], classes
