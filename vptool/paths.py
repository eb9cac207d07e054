"""Checks on the files a command is about to write, made before any slow work so bad input costs nothing."""

from __future__ import annotations

from pathlib import Path

from vptool.errors import UserError


def check_new_file(path: str | Path, option: str, suffix: str | None, overwrite: bool = False,
                   folder: bool = False) -> Path:
    """``path`` as a Path, refused (nothing written) when it does not end in ``suffix`` (None: any), exists
    without ``overwrite``, is a folder (a file, with ``folder``: the command writes a folder there), or its
    parent folder does not exist.

    Raises:
        UserError: one line naming ``option`` (e.g. ``-o``, ``--save-logits``) and the path.
    """
    p = Path(path)
    if suffix is not None and p.suffix != suffix:
        raise UserError(f"{option}: {p} must end in {suffix}")
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{option}: {p} is a file; this writes a folder, pass a folder path")
    if not folder and p.is_dir():
        raise UserError(f"{option}: {p} is a folder; pass a file path")
    if p.exists() and not overwrite:
        raise UserError(f"{option}: {p} already exists; choose another path or pass --overwrite")
    if not p.parent.is_dir():
        raise UserError(f"{option}: folder {p.parent} does not exist")
    return p


def write_atomically(path: str | Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it into place: a reader never sees a
    half-written file, and a failed write leaves the old file (if any) untouched.

    Args:
        path: the final file.
        write: ``f(tmp: Path)`` that writes the whole file to ``tmp``.
    """
    import os

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return p


def write_text_atomically(path: str | Path, text: str) -> Path:
    """``write_atomically`` for text (UTF-8)."""
    return write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_csv_atomically(path: str | Path, header: list[str], rows) -> Path:
    """``write_atomically`` for a CSV file: ``header`` then ``rows`` (iterables of cells)."""
    import csv
    import io

    buf = io.StringIO(newline="")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return write_text_atomically(path, buf.getvalue())
