"""``vptool export``: a trained adapter as a portable folder, or the whole prompted model as one graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, JsonOpt, cli_errors, one_process

EPILOG = ("Examples:\n\n  vptool export runs/quickstart --format onnx -o quickstart.onnx\n\n"
          "  vptool export runs/quickstart --format adapter -o adapters/quickstart\n\n"
          "  vptool export runs/quickstart --format pt2 -o quickstart.pt2 --json | jq .max_abs_diff")

SourceArg = Annotated[Path, typer.Argument(help="Run directory (runs/NAME) or adapter folder (export --format "
                                           "adapter).", show_default=False)]
BackboneOpt = Annotated[Optional[Path], typer.Option(
    "--backbone-checkpoint", help="The backbone checkpoint, when it has moved since training (its sha256 must "
                                  "match the one recorded).", show_default=False)]


def export(
    source: SourceArg,
    format: Annotated[str, typer.Option("--format", "-f", help="adapter (folder: adapter.safetensors, "
                                        "adapter_config.json, README.md model card) | onnx | pt2 (torch.export) | "
                                        "torchscript.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (adapter) or file (.onnx, .pt2, "
                                         ".pt).", show_default=False)],
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (only once the new "
                                            "one is verified).")] = False,
    backbone_checkpoint: BackboneOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export a trained adapter: a portable folder, or the whole prompted model as one graph.

    onnx / pt2 / torchscript hold the frozen backbone, prompts, extra tokens, readout and head; input
    pixel_values (B, 3, H, W) with a dynamic batch, output logits (B, K). Each graph is run on a batch of the
    run's own images and must match PyTorch (max |diff logits| <= 1e-4, same argmax), else it is removed and
    the command exits 1.
    """
    from vptool.export import export as run_export

    one_process("export")
    report = run_export(source, format, output, opset=opset, overwrite=overwrite,
                        backbone_checkpoint=backbone_checkpoint)
    if json_out:
        print(json.dumps(report))
        return
    print(report_line(report))


def report_line(report: dict) -> str:
    """The plain-text result: the output, its size and classes, and the check against PyTorch."""
    line = f"{report['format']}: {report['output']} ({report['bytes'] / 1e6:.2f} MB, {report['classes']} classes)"
    if "max_abs_diff" in report:
        line += (f"; checked on {report['check_images']} at batch {' and '.join(map(str, report['batch_sizes']))}: "
                 f"max |diff logits| {report['max_abs_diff']:.2e}, same argmax")
    return line


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(cli_errors(export))
