"""``vptool predict``: classify images with a run, an adapter folder or an exported ``.onnx`` graph."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, RichProgress, cli_errors, err, one_process
from vptool.commands.export import BackboneOpt
from vptool.errors import UserError

EPILOG = ("Examples:\n\n  vptool predict runs/quickstart digits/*.png\n\n"
          "  find photos -name '*.jpg' | vptool predict runs/birds - --json | jq -r '[.path, .classes[0]] | @tsv'"
          "\n\n  vptool predict quickstart.onnx images/ --csv -o predictions.csv --skip-bad")


def predict(
    source: Annotated[Path, typer.Argument(help="Run directory, adapter folder, or an .onnx file from vptool export "
                                           "(run by onnxruntime alone).", show_default=False)],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively), or - for "
                                                "newline-separated paths on stdin.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    json_lines: Annotated[bool, typer.Option("--json", help="JSON lines (the default): {path, classes, probs}.")
                          ] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV: path, class_1, prob_1, ..., error.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the rows to FILE instead of stdout.",
                                                   show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Go on past unreadable images: they get a row with "
                                           "an error field, and their count goes to stderr.")] = False,
    backbone_checkpoint: BackboneOpt = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Classify images: one row per image with its top-k classes and probabilities.

    Images go through the model's own evaluation transform. Rows go to stdout (or -o), progress and messages
    to stderr. An unreadable image stops the command before any output (exit 2), unless --skip-bad.
    """
    one_process("predict")
    check_options(json_lines, csv_out, top_k, batch_size)
    from vptool.engine.predict import run_predict

    summary = run_predict(source, inputs, top_k=top_k, batch_size=batch_size, fmt="csv" if csv_out else "json",
                          output=output, skip_bad=skip_bad, backbone_checkpoint=backbone_checkpoint,
                          device=device, observer=RichProgress(quiet=False), overwrite=overwrite)
    if summary["bad"]:
        err.print(f"{summary['bad']} of {summary['images']} images could not be read; their rows carry an error "
                  "field", markup=False)


def check_options(json_lines: bool, csv_out: bool, top_k: int, batch_size: int) -> None:
    """Refuse contradictory or out-of-range options (one line each, exit 2)."""
    if json_lines and csv_out:
        raise UserError("--json/--csv: choose one output format")
    if top_k < 1:
        raise UserError(f"--top-k: {top_k} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size: {batch_size} must be at least 1")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(cli_errors(predict))
