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
    """Call ``write(tmp)`` on a temporary path beside ``path``, fsync it, then rename it into place (and fsync the
    folder): a reader never sees a half-written file, and a failed write or a kill leaves the old file (if any)
    untouched.

    Args:
        path: the final file.
        write: ``f(tmp: Path)`` that writes the whole file to ``tmp``.
    """
    import os

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # the permissions a plain open() would give (some writers use 0600)
        fd = os.open(str(tmp), os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them the file
        finally:
            os.close(fd)
        os.replace(tmp, p)
    except OSError as exc:  # name the file the user asked for (a failed write() names none, or the temporary)
        raise OSError(exc.errno, exc.strerror or f"write failed ({exc}: disk full or file size limit?)",
                      str(p)) from None
    finally:
        tmp.unlink(missing_ok=True)
    try:
        dfd = os.open(str(p.parent), os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # not every filesystem syncs a folder
        pass
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


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """``safetensors.torch.save`` with a canonical header: keys sorted, so the same tensors and metadata give the
    same bytes in every process (the library's header order varies per process with its hash map seed). The
    header stays valid safetensors: the same JSON, reordered, padded with spaces to its original length."""
    import json

    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8:8 + n]), separators=(",", ":"), sort_keys=True).encode()
    if len(header) > n:  # cannot happen (same characters); keep the library's bytes if it ever does
        return data
    return data[:8] + header + b" " * (n - len(header)) + data[8 + n:]


def write_safetensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` (+ ``metadata``) to ``path`` atomically with a canonical header (``safetensors_bytes``)."""
    data = safetensors_bytes(tensors, metadata)
    return write_atomically(path, lambda tmp: Path(tmp).write_bytes(data))
