"""``vptool predict``: classify image files with a run, an adapter folder or an exported ``.onnx`` graph.

Rows (one per image, in input order) are JSON lines ``{"path", "classes", "probs"}`` or CSV ``path, class_1,
prob_1, ..., class_k, prob_k, error``; an unreadable image under ``--skip-bad`` gets ``{"path", "error"}``.
Without ``--skip-bad`` every image is decoded once before the first row is written, so a bad file stops the
command (exit 2) before any output. With ``-o FILE`` the rows are written to a temporary file renamed into
place at the end: a failed run leaves no partial file and an existing one intact.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time
from pathlib import Path

import torch

from vptool.adapter import read_config
from vptool.errors import UserError
from vptool.inference import Preprocess, expand_inputs, open_source, read_image, top_k_rows
from vptool.paths import Read, check_new_file, refuse_inputs, source_reads, write_text_atomically
from vptool.progress import Progress


class _Rows:
    """Writes rows as JSON lines or CSV to a stream, flushing after each batch."""

    def __init__(self, stream, fmt: str, k: int):
        self.stream, self.fmt = stream, fmt
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")]
                              + ["error"])
            self.k = k

    def write(self, path: Path, row: dict | None, error: str | None = None) -> None:
        if self.fmt == "json":
            out = {"path": str(path), "error": error} if error else {"path": str(path), **row}
            self.stream.write(json.dumps(out) + "\n")
            return
        cells = [str(path)]
        if error:
            cells += [""] * (2 * self.k) + [error]
        else:
            for c, p in zip(row["classes"], row["probs"]):
                cells += [c, f"{p:.6f}"]
            cells += [""] * (2 * (self.k - len(row["classes"]))) + [""]
        self.csv.writerow(cells)

    def flush(self) -> None:
        self.stream.flush()


def _precheck(paths: list[Path], observer) -> None:
    """Decode every image once; the first that fails raises its one-line UserError."""
    observer.eval_start("check images", len(paths))
    for p in paths:
        read_image(p)
        observer.eval_step()


def run_predict(source: str | Path, inputs: list[str], top_k: int = 5, batch_size: int = 64, fmt: str = "json",
                output: str | Path | None = None, skip_bad: bool = False,
                backbone_checkpoint: str | Path | None = None, device: str | None = None, observer=None,
                stdin=None, stdout=None, overwrite: bool = False) -> dict:
    """Classify ``inputs`` (files, folders, ``-`` for paths on ``stdin``) with ``source``.

    Args:
        output: write the rows to this file (atomically, at the end) instead of ``stdout``; it may not exist
            unless ``overwrite``, and may never be, contain or lie inside an input (``paths.refuse_inputs``).

    Returns:
        ``{"images", "bad", "seconds", "output"}``.

    Raises:
        UserError: a missing input, an empty folder, an unreadable image (without ``skip_bad``), a source that
            is not a run directory, adapter folder or vptool ``.onnx`` file, a missing backbone checkpoint; an
            ``output`` that is an input or exists (without ``overwrite``).
    """
    obs = observer or Progress()
    t0 = time.time()
    paths = expand_inputs(inputs, stdin)
    src = Path(source)
    if output is not None:
        _check_output(output, src, inputs, paths, backbone_checkpoint, overwrite)
    _check_source(src)
    obs.start()
    try:
        if not skip_bad:
            _precheck(paths, obs)
        runner = open_source(src, device=device, backbone_checkpoint=backbone_checkpoint)
        prep = Preprocess(runner.data_config, runner.eval_transform)
        k = min(top_k, len(runner.classes))
        buf = io.StringIO() if output is not None else None
        rows = _Rows(buf if buf is not None else (stdout or sys.stdout), fmt, k)
        bad = _predict_rows(runner, prep, paths, rows, k, batch_size, skip_bad, obs)
    finally:
        obs.stop()
    if output is not None:
        write_text_atomically(output, buf.getvalue())
    return {"images": len(paths), "bad": bad, "seconds": round(time.time() - t0, 3),
            "output": str(output) if output is not None else None}


def _check_output(output: str | Path, src: Path, inputs: list[str], paths: list[Path],
                  backbone_checkpoint: str | Path | None, overwrite: bool) -> None:
    """Refuse an ``-o`` file that is, contains or lies inside what the command reads (the source, its backbone
    checkpoint, the images and their folders), or that exists (without ``overwrite``)."""
    given = [Path(x) for x in inputs if x != "-"]
    reads = source_reads(src, backbone_checkpoint=backbone_checkpoint)
    reads += [Read("image folder" if p.is_dir() else "image", p) for p in given]
    if "-" in inputs:  # the files named on stdin (those found in a folder lie inside it)
        reads += [Read("image", p) for p in paths]
    refuse_inputs("-o", output, reads)
    check_new_file(output, "-o", None, overwrite)


def _check_source(src: Path) -> None:
    """Name a wrong SOURCE before any image is decoded: an adapter folder or run directory whose config does not
    read, or a missing ``.onnx`` file."""
    if src.suffix != ".onnx":
        read_config(src)
    elif not src.is_file():
        raise UserError(f"{src}: not found; pass an .onnx file from vptool export, a run directory or an adapter "
                        "folder")


def _predict_rows(runner, prep: Preprocess, paths: list[Path], rows: _Rows, k: int, batch_size: int,
                  skip_bad: bool, obs) -> int:
    """Classify ``paths`` in batches of ``batch_size`` and write one row each, in order; returns how many images
    were unreadable (written as error rows under ``skip_bad``, else the first raises its UserError)."""
    bad = 0
    obs.eval_start("predict", len(paths))
    for s in range(0, len(paths), batch_size):
        chunk = paths[s:s + batch_size]
        tensors, errors = [], {}
        for i, p in enumerate(chunk):
            try:
                tensors.append(prep.from_pil(read_image(p)))
            except UserError as exc:
                if not skip_bad:
                    raise
                errors[i] = str(exc)
        results = iter(top_k_rows(runner(torch.stack(tensors)), runner.classes, k) if tensors else [])
        for i, p in enumerate(chunk):
            if i in errors:
                bad += 1
                rows.write(p, None, errors[i])
            else:
                rows.write(p, next(results))
            obs.eval_step()
        rows.flush()
    return bad
