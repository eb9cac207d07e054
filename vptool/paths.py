"""Checks on the files a command is about to write, made before any slow work so bad input costs nothing."""

from __future__ import annotations

from pathlib import Path

from vptool.errors import UserError


def check_new_file(path: str | Path, option: str, suffix: str, overwrite: bool = False) -> Path:
    """``path`` as a Path, refused (nothing written) when it does not end in ``suffix``, exists without
    ``overwrite``, or its folder does not exist.

    Raises:
        UserError: one line naming ``option`` (e.g. ``-o``, ``--save-logits``) and the path.
    """
    p = Path(path)
    if p.suffix != suffix:
        raise UserError(f"{option}: {p} must end in {suffix}")
    if p.exists() and not overwrite:
        raise UserError(f"{option}: {p} already exists; choose another path or pass --overwrite")
    if not p.parent.is_dir():
        raise UserError(f"{option}: folder {p.parent} does not exist")
    return p
