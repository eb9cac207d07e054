"""``vptool export``: a trained adapter as a portable folder, or the whole prompted model as one graph.

Formats:

- ``adapter``: the folder ``save_pretrained`` writes (``adapter.safetensors``, ``adapter_config.json``,
  ``README.md`` model card); no backbone tensor.
- ``onnx``: the frozen backbone, prompts, extra tokens, readout and head as one ONNX graph (torch.onnx's
  dynamo exporter, onnxscript). Input ``pixel_values`` (B, 3, H, W) float32 normalised images with a dynamic
  batch, output ``logits`` (B, K). The metadata key ``vptool`` holds JSON with the class names, ``data_config``
  (input size, mean, std) and ``eval_transform``, so ``vptool predict MODEL.onnx`` needs no PyTorch model; the
  flat keys ``class_names``, ``input_size``, ``mean``, ``std`` repeat them for other tools.
- ``pt2``: a ``torch.export`` ``ExportedProgram`` (``torch.export.save``), dynamic batch.
- ``torchscript``: ``torch.jit.trace``, only where the pinned torch traces this model faithfully (TorchScript
  is deprecated in torch 2.x); otherwise a one-line refusal pointing to ``pt2`` / ``onnx``.

Every graph is checked before it is kept: it runs (onnxruntime for ``onnx``, the loaded program for ``pt2``
and ``torchscript``) on a batch of the run's own images (the test split through the eval transform, when the
dataset is on disk; else seeded random normalised inputs, which the report says) and on one image, and must
give max |logits - PyTorch logits| <= ``TOLERANCE`` with the same argmax. Otherwise the file is removed and
the export fails (``RunError``, exit 1). Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from vptool.errors import RunError, UserError

log = logging.getLogger(__name__)

FORMATS = ("adapter", "onnx", "pt2", "torchscript")
SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt"}
#: max |Δ logits| an exported graph may differ from the PyTorch model by (fp32).
TOLERANCE = 1e-4
CHECK_IMAGES = 8
#: the oldest ONNX opset torch's dynamo exporter writes (an older --opset would silently become this one).
MIN_OPSET = 18
EXTRA = 'pip install "vptool[export]"'


class VerifyError(Exception):
    """The exported graph does not reproduce the PyTorch logits (or cannot run)."""


def _first_line(exc: Exception) -> str:
    """``Type: first line`` of an exporter's error, without terminal colour codes."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_output(out: str | Path, fmt: str, overwrite: bool) -> Path:
    """The output path, refused before any work when it has the wrong suffix, exists without ``overwrite``, or
    its folder is missing.

    Raises:
        UserError: an unknown format, or one of the above (one line naming ``-o`` or ``--format``).
    """
    from vptool.paths import check_new_file

    if fmt not in FORMATS:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    folder = fmt == "adapter"
    return check_new_file(out, "-o", None if folder else SUFFIX[fmt], overwrite, folder=folder)


def require_extra(fmt: str) -> None:
    """Raises UserError naming ``pip install "vptool[export]"`` when ``fmt`` needs a package not installed."""
    if fmt != "onnx":
        return
    missing = []
    for name in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: {EXTRA}")


def check_images(model, cfg: dict, n: int = CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Up to ``n`` normalised images (N, 3, H, W) to verify an export on, and where they came from.

    The run's own test split (``recipe.data`` in the config, eval transform) when it can be read; else seeded
    standard-normal inputs of the model's input size.
    """
    from vptool.data import build_splits
    from vptool.recipe import resolve_saved

    if cfg.get("recipe"):
        try:
            recipe = resolve_saved(cfg["recipe"], "adapter_config.json")
            splits = build_splits(recipe.data, {**model.data_config})
            ds = splits.test
            k = min(n, len(ds))
            if k:
                return torch.stack([ds[i][0] for i in range(k)]), f"{k} images of the {recipe.data.dataset} test split"
        except Exception as exc:  # the data is not here (moved, another machine): fall back, and say so
            log.info("export check: dataset not readable (%s); using random inputs", exc)
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *model.data_config["input_size"], generator=g), \
        f"{n} random inputs (the run's dataset is not readable here)"


def compare(run, model, images: torch.Tensor) -> dict:
    """Run ``run`` (a batch function) and the PyTorch model on ``images`` and on its first image.

    Returns:
        ``{"max_abs_diff", "argmax_equal", "batch_sizes"}``.

    Raises:
        VerifyError: the graph fails to run, or differs by more than ``TOLERANCE`` / in its argmax.
    """
    worst, same, sizes = 0.0, True, []
    for x in (images, images[:1]):
        with torch.no_grad():
            want = model(x).float()
        try:
            with torch.no_grad():
                got = torch.as_tensor(run(x)).float()
        except Exception as exc:
            raise VerifyError(f"the exported graph fails on a batch of {x.shape[0]}: {_first_line(exc)}") from None
        if got.shape != want.shape:
            raise VerifyError(f"the exported graph gives logits of shape {tuple(got.shape)} for a batch of "
                              f"{x.shape[0]}, PyTorch {tuple(want.shape)}")
        worst = max(worst, float((got - want).abs().max()))
        same = same and bool(torch.equal(got.argmax(1), want.argmax(1)))
        sizes.append(int(x.shape[0]))
    if not worst <= TOLERANCE or not same:
        raise VerifyError(f"max |Δ logits| {worst:.3g} (tolerance {TOLERANCE:g}), argmax "
                          f"{'equal' if same else 'differs'}")
    return {"max_abs_diff": worst, "argmax_equal": same, "batch_sizes": sizes}


def onnx_metadata(model) -> dict[str, str]:
    """The ONNX metadata vptool writes (and ``vptool predict MODEL.onnx`` reads)."""
    import vptool

    dc = {k: list(model.data_config[k]) for k in ("input_size", "mean", "std")}
    b = model.backbone_config or {}
    info = {"vptool_version": vptool.__version__, "method": model.adapter_info.get("method"),
            "classes": list(model.class_names), "num_classes": model.num_classes, "data_config": dc,
            "eval_transform": model.eval_transform, "backbone": b.get("name"),
            "backbone_sha256": b.get("checkpoint_sha256"), "input": "pixel_values", "output": "logits"}
    return {"vptool": json.dumps(info), "class_names": json.dumps(list(model.class_names)),
            "input_size": json.dumps(dc["input_size"]), "mean": json.dumps(dc["mean"]), "std": json.dumps(dc["std"])}


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def _example(images: torch.Tensor) -> torch.Tensor:
    """A batch of at least 2 (a batch of 1 would be specialised to 1 by the exporters)."""
    return images if images.shape[0] >= 2 else images.repeat(2, 1, 1, 1)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress on stdout/stderr; keep it off the command's output (``--debug`` logs it)."""
    buf = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
    if buf.getvalue():
        log.debug("exporter output:\n%s", buf.getvalue())


def write_onnx(model, path: Path, images: torch.Tensor, opset: int | None) -> dict:
    """Export ``model`` to ``path`` (ONNX, dynamic batch, metadata), verified with onnxruntime."""
    import onnxruntime as ort

    x = _example(images)
    with _quiet():
        try:
            prog = torch.onnx.export(model, (x,), None, input_names=["pixel_values"], output_names=["logits"],
                                     dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, dynamo=True,
                                     opset_version=opset, external_data=False, verbose=False)
        except Exception as exc:
            raise VerifyError(f"torch.onnx.export failed: {_first_line(exc)}") from None
        for k, v in onnx_metadata(model).items():
            prog.model.metadata_props[k] = v
        prog.save(str(path), external_data=False)
    opset_used = next((v for k, v in prog.model.opset_imports.items() if k == ""), opset)
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        if opset is not None:
            raise UserError(f"--opset: onnxruntime {ort.__version__} cannot run the opset-{opset} graph "
                            f"({_first_line(exc)[:160]}); choose a lower --opset or leave it out") from None
        raise VerifyError(f"onnxruntime cannot load the exported graph: {_first_line(exc)}") from None
    report = compare(lambda t: session.run(None, {"pixel_values": t.numpy()})[0], model, images)
    return {**report, "opset": opset_used}


def write_pt2(model, path: Path, images: torch.Tensor) -> dict:
    """Export ``model`` to ``path`` (``torch.export.save``, dynamic batch), verified after loading it back."""
    with _quiet():
        try:
            ep = torch.export.export(model, (_example(images),), dynamic_shapes=({0: torch.export.Dim("batch")},))
        except Exception as exc:
            raise VerifyError(f"torch.export failed: {_first_line(exc)}") from None
        torch.export.save(ep, str(path))
        loaded = torch.export.load(str(path)).module()
    return compare(loaded, model, images)


def write_torchscript(model, path: Path, images: torch.Tensor) -> dict:
    """Trace ``model`` with TorchScript and save it, verified after loading it back.

    Raises:
        UserError: this torch cannot trace the model faithfully (one line pointing to pt2 / onnx).
    """
    why = None
    with _quiet():
        try:
            traced = torch.jit.trace(model, _example(images), check_trace=False)
            torch.jit.save(traced, str(path))
            loaded = torch.jit.load(str(path))
        except Exception as exc:
            why = _first_line(exc)
    if why is None:
        try:
            return compare(loaded, model, images)
        except VerifyError as exc:
            why = str(exc)
    path.unlink(missing_ok=True)
    raise UserError(f"--format torchscript: torch {torch.__version__} cannot trace this model faithfully ({why}); "
                    "TorchScript is deprecated: use --format pt2 (torch.export) or --format onnx")


def export(source: str | Path, fmt: str, out: str | Path, opset: int | None = None, overwrite: bool = False,
           backbone_checkpoint: str | Path | None = None) -> dict:
    """Export a run directory or adapter folder (see the module doc); returns a report.

    Args:
        source: ``runs/NAME`` or an adapter folder.
        fmt: ``adapter``, ``onnx``, ``pt2`` or ``torchscript``.
        out: the folder (``adapter``) or file (``.onnx``, ``.pt2``, ``.pt``) to write.
        opset: ONNX opset (default: the exporter's).
        overwrite: replace an existing ``out`` (only once the new one is verified).
        backbone_checkpoint: the backbone checkpoint when it has moved.

    Returns:
        ``{"source", "format", "output", "bytes", "classes", "input_size"}`` and, for graphs, ``check_images``,
        ``max_abs_diff``, ``argmax_equal``, ``batch_sizes`` (and ``opset`` for onnx).

    Raises:
        UserError: bad input (format, output path, source, checkpoint, missing extra, torchscript refusal); an
            ``out`` that is, contains or lies inside ``source``, its backbone checkpoint or its dataset folder
            (with or without ``overwrite``: ``paths.refuse_inputs``).
        RunError: the exported graph does not reproduce the model (the file is removed).
    """
    from vptool.adapter import load_with_info
    from vptool.prompting.model import PromptedViT

    out = _checked_request(source, fmt, out, opset, overwrite, backbone_checkpoint)
    model, _, cfg = load_with_info(source, device="cpu", backbone_checkpoint=backbone_checkpoint,
                                   model_cls=PromptedViT)
    model.float().eval()
    report = {"source": str(source), "format": fmt, "output": str(out), "classes": len(model.class_names),
              "input_size": list(model.data_config["input_size"])}
    if fmt == "adapter":
        return _export_adapter(model, out, report)
    return _export_graph(model, cfg, fmt, out, opset, report)


def _checked_request(source: str | Path, fmt: str, out: str | Path, opset: int | None, overwrite: bool,
                     backbone_checkpoint: str | Path | None) -> Path:
    """The output path, once the request is checked before any work: ``out`` clear of the inputs, its suffix and
    folder (``check_output``), the format's extra installed, and ``--opset`` only with onnx, in range.

    Raises:
        UserError: one line naming ``-o``, ``--format`` or ``--opset``.
    """
    from vptool.paths import refuse_inputs, source_reads

    if fmt in FORMATS:
        refuse_inputs("-o", out, source_reads(source, backbone_checkpoint=backbone_checkpoint))
    out = check_output(out, fmt, overwrite)
    require_extra(fmt)
    if opset is not None and fmt != "onnx":
        raise UserError(f"--opset: only with --format onnx (got --format {fmt})")
    if opset is not None:
        import onnx.defs

        newest = onnx.defs.onnx_opset_version()
        if not MIN_OPSET <= opset <= newest:
            raise UserError(f"--opset: {opset} is outside {MIN_OPSET}..{newest} (torch's ONNX exporter starts at "
                            f"{MIN_OPSET}; onnx {onnx.__version__} knows up to {newest})")
    return out


def _export_adapter(model, out: Path, report: dict) -> dict:
    """Write the adapter folder at ``out`` (a temporary folder swapped into place); ``report`` with its files."""
    from vptool.adapter import save_pretrained

    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_pretrained(model, tmp, name=out.name)
        _swap_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    report["files"] = sorted(f.name for f in out.iterdir())
    return report


def _export_graph(model, cfg: dict, fmt: str, out: Path, opset: int | None, report: dict) -> dict:
    """Write ``model`` as a verified ``fmt`` graph at ``out`` (a temporary file renamed into place); ``report``
    with the check's results.

    Raises:
        RunError: the graph does not reproduce the model (nothing is written).
    """
    # an inference graph: no tensor requires grad (with grad-requiring tensors torch.export records SDPA kernels
    # whose output strides the ONNX decomposition then mis-views, on BEiT with gates, say)
    model.requires_grad_(False)
    images, where = check_images(model, cfg)
    report["check_images"] = where
    tmp = _tmp(out)
    try:
        if fmt == "onnx":
            report.update(write_onnx(model, tmp, images, opset))
        elif fmt == "pt2":
            report.update(write_pt2(model, tmp, images))
        else:
            report.update(write_torchscript(model, tmp, images))
        os.replace(tmp, out)
    except VerifyError as exc:
        raise RunError(f"export --format {fmt}: {exc}; nothing was written to {out}") from None
    finally:
        tmp.unlink(missing_ok=True)
    report["bytes"] = out.stat().st_size
    return report


def _swap_folder(new: Path, old: Path) -> None:
    """Put folder ``new`` at ``old``; an existing ``old`` is removed only once ``new`` is complete."""
    if old.exists():
        trash = old.with_name(f".{old.name}.old{os.getpid()}")
        os.replace(old, trash)
        os.replace(new, old)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(new, old)
