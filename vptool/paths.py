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


# --------------------------------------------------------------------------------------------------- inputs
#: the folders of a run directory that hold reports no command reads back (``eval``, ``probe-nmi``): an output
#: may go there
REPORT_FOLDERS = ("eval", "analysis")


class Read:
    """A path a command reads (its input): ``what`` names it in messages (``run directory``, ``recipe``, ...).

    ``reports`` are sub-folders (relative to ``path``) an output may lie in (a run directory's ``eval/``).
    """

    __slots__ = ("what", "path", "reports")

    def __init__(self, what: str, path: str | Path, reports: tuple[str, ...] = ()):
        self.what, self.path, self.reports = what, Path(path), tuple(reports)

    def __repr__(self) -> str:
        return f"Read({self.what!r}, {str(self.path)!r})"


def _resolved(path: Path) -> Path:
    """``path`` with symlinks and ``..`` resolved (as far as it exists; the rest kept as written)."""
    import os

    try:
        return Path(os.path.realpath(os.path.abspath(path)))
    except (OSError, ValueError):
        return Path(os.path.abspath(path))


def _inside(child: Path, parent: Path) -> bool:
    return child != parent and parent in child.parents


def _files(path: Path):
    """``(file, stat)`` for ``path`` (a file) or for every file under it (a folder); unreadable entries skipped."""
    import os

    try:
        if path.is_file():
            yield path, path.stat()
            return
        if not path.is_dir():
            return
    except OSError:
        return
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            p = Path(dirpath) / name
            try:
                yield p, p.stat()
            except OSError:
                continue


def _file_ids(path: Path, limit: int = 200_000) -> set[tuple[int, int]]:
    """``(st_dev, st_ino)`` of ``path`` (a file) or of every file under it (a folder; at most ``limit`` files)."""
    ids: set[tuple[int, int]] = set()
    for _, st in _files(path):
        ids.add((st.st_dev, st.st_ino))
        if len(ids) >= limit:
            break
    return ids


def _linked_files(path: Path) -> list[tuple[Path, tuple[int, int]]]:
    """The files at or under ``path`` that have another name (``st_nlink > 1``: a hard link may be an input)."""
    return [(p, (st.st_dev, st.st_ino)) for p, st in _files(path) if st.st_nlink > 1]


def refuse_inputs(option: str, outputs, reads) -> None:
    """Refuse, before anything is written, an output that is, contains or lies inside one of the command's inputs.

    ``--overwrite`` replaces a command's previous output, never what the command reads: this check holds with or
    without it. Paths are compared after resolving symlinks and ``..``; a file that is a hard link to an input file
    (or to a file inside an input folder) counts as that input. An output inside one of an input's ``reports``
    folders (a run directory's ``eval/``, ``analysis/``) is allowed.

    Args:
        option: how the output was named (``-o``, ``--save-logits``, ``output.dir/output.name``).
        outputs: the paths the command creates or replaces (a path, or an iterable of paths).
        reads: ``Read`` items (None entries, or entries whose path is None, are skipped).

    Raises:
        UserError: one line naming ``option``, the output and the input, and how to fix it.
    """
    if isinstance(outputs, (str, Path)):
        outputs = [outputs]
    reads = [r for r in reads if r is not None and r.path is not None and str(r.path) != ""]
    fix = "write to another path (--overwrite never replaces what a command reads)"
    resolved = [(r, _resolved(r.path)) for r in reads]
    for out in outputs:
        out = Path(out)
        o = _resolved(out)
        found = []  # (rank, relation, read): the input the output is, else the innermost it lies in, else the first
        for n, (r, i) in enumerate(resolved):
            if any(o == i / sub or _inside(o, i / sub) for sub in r.reports):
                continue
            if o == i:
                found.append(((0, n), "is", r))
            elif _inside(o, i):
                found.append(((1, -len(i.parts), n), "lies inside", r))
            elif _inside(i, o):
                found.append(((2, n), "contains", r))
        if found:
            _, relation, r = min(found, key=lambda f: f[0])
            raise UserError(f"{option}: {out} {relation} the {r.what} {r.path} this command reads; {fix}")
        linked = _linked_files(o)
        if not linked:
            continue
        for r, i in resolved:
            ids = _file_ids(i)
            for p, fid in linked:
                if fid in ids:
                    what = "is" if p == o else f"holds {p}, which is"
                    raise UserError(f"{option}: {out} {what} a hard link to the {r.what} {r.path} (or a file in "
                                    f"it) this command reads; {fix}")


def recipe_reads(recipe) -> list[Read]:
    """The files and folders a recipe points a command at: ``backbone.checkpoint``, ``prompt.init_file`` and
    ``data.root`` (those set)."""
    out = []
    if getattr(recipe.backbone, "checkpoint", None):
        out.append(Read("backbone checkpoint (backbone.checkpoint)", recipe.backbone.checkpoint))
    if getattr(recipe.prompt, "init_file", None):
        out.append(Read("prompt file (prompt.init_file)", recipe.prompt.init_file))
    if getattr(recipe.data, "root", None):
        out.append(Read("dataset folder (data.root)", recipe.data.root))
    return out


def source_reads(source: str | Path, what: str | None = None,
                 backbone_checkpoint: str | Path | None = None) -> list[Read]:
    """What a command that opens a run directory, adapter folder or ``.onnx`` file reads: the source itself (a
    run directory's report folders excepted), the backbone checkpoint (``backbone_checkpoint``, else the one its
    ``adapter_config.json`` or ``recipe.yaml`` records) and the dataset folder its recipe names.

    A path that is not a vptool source (missing, a folder without ``adapter_config.json`` or ``recipe.yaml``)
    gives only ``backbone_checkpoint``: the command refuses that source itself, before it writes anything.
    """
    import json

    src = Path(source)
    extra = [Read("backbone checkpoint (--backbone-checkpoint)", backbone_checkpoint)] if backbone_checkpoint else []
    if src.is_file():
        return [Read(what or "model file", src), *extra]
    is_run = (src / "recipe.yaml").is_file()
    if not is_run and not (src / "adapter_config.json").is_file():
        return extra
    out = [Read(what or ("run directory" if is_run else "adapter folder"), src, REPORT_FOLDERS), *extra]
    cfg: dict = {}
    try:
        cfg = json.loads((src / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    cfg = cfg if isinstance(cfg, dict) else {}
    rec = cfg.get("backbone") if isinstance(cfg.get("backbone"), dict) else {}
    recipe = cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else {}
    if not recipe and is_run:
        from vptool.yamlio import read_yaml

        try:
            recipe = read_yaml(src / "recipe.yaml")
        except UserError:
            recipe = {}
    saved_backbone = recipe.get("backbone") if isinstance(recipe.get("backbone"), dict) else {}
    ckpt = rec.get("checkpoint") or saved_backbone.get("checkpoint")
    if not backbone_checkpoint and isinstance(ckpt, str) and ckpt:
        out.append(Read("backbone checkpoint", ckpt))
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    if isinstance(data.get("root"), str) and data["root"]:
        out.append(Read("dataset folder (data.root)", data["root"]))
    return out
