"""``vptool eval``: rebuild a trained model from its run directory and report top-1/top-5 on a split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, JsonOpt, cli_errors, gate_table, is_main
from vptool.errors import UserError
from vptool.paths import check_new_file

EPILOG = ("Examples:\n\n  vptool eval runs/quickstart\n\n"
          "  vptool eval runs/quickstart --split val --save-logits val_logits.npy --json")


def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `vptool train`.", show_default=False)],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    save_logits: Annotated[Optional[Path], typer.Option(
        "--save-logits", help="Write float32 (N, K) logits in dataset order to FILE.npy.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --save-logits file.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Override train.device (auto, cpu, cuda).")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Also write PNGs: the confusion matrix and, for gated "
                                        "prompts, the selection ratio per block (GateVPT Fig. 4).")] = False,
    last: Annotated[bool, typer.Option("--last", help="Evaluate checkpoints/last.pt (the latest epoch, not the "
                                       "best): the way to look at a run that has not finished.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild a trained model from its run directory and report top-1/top-5 on a split.

    Writes RUN_DIR/eval/<split>.json (per-class accuracy, confusion matrix) and, for gated prompts,
    eval/gates.csv + gates.json (GateVPT eq. 10-11); a later eval of the same split replaces them.
    """
    check_options(run_dir, split, save_logits, overwrite)
    from vptool.engine.evaluate import classification_report, write_eval_report

    result, split_name, setup, logits, labels = evaluate(run_dir, split, device, last)
    if not is_main():  # under torchrun every rank has all the logits; rank 0 writes and prints
        return
    report = classification_report(logits, labels, setup.splits.classes)
    result["mean_per_class_accuracy"] = report["mean_per_class_accuracy"]
    if save_logits is not None:
        write_logits(save_logits, logits)
        result["logits"] = str(save_logits)
    result["outputs"] = write_eval_report(run_dir, split_name, result, report, plots)
    if json_out:
        print(json.dumps(result))
    else:
        print_result(result, report, split)


def check_options(run_dir: Path, split: str, save_logits: Optional[Path], overwrite: bool) -> None:
    """A known split; --save-logits a new .npy file (or --overwrite) that is not one of the run's inputs."""
    if split not in ("train", "val", "test"):
        raise UserError(f"--split: {split!r} is not train, val or test")
    if save_logits is not None:
        from vptool.paths import refuse_inputs, source_reads

        refuse_inputs("--save-logits", save_logits, source_reads(run_dir))
        check_new_file(save_logits, "--save-logits", ".npy", overwrite)


def evaluate(run_dir: Path, split: str, device: Optional[str], last: bool):
    """Load the run, predict the split; returns (result, the report's split name, setup, logits, labels)."""
    from vptool.engine.evaluate import eval_loader, load_run, method_report, predict, topk_accuracy

    recipe, setup = load_run(run_dir, device, last=last)
    loader = eval_loader(setup, recipe, split)
    logits, labels = predict(setup.model, loader, setup.device, setup.amp_dtype)
    result = {"run_dir": str(run_dir), "split": split, "images": int(labels.shape[0]),
              "top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
              **method_report(setup.model)}
    if setup.checkpoint is not None:
        result["checkpoint"] = {"path": str(Path(run_dir) / "checkpoints" / "last.pt"), **setup.checkpoint}
        split_name = f"{split}_last"
    else:
        split_name = split
    return result, split_name, setup, logits, labels


def write_logits(path: Path, logits) -> None:
    """The logits as float32 (N, K) .npy, written atomically."""
    import numpy as np

    from vptool.paths import write_atomically

    arr = logits.numpy().astype(np.float32)

    def write_npy(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)

    write_atomically(path, write_npy)


def print_result(result: dict, report: dict, split: str) -> None:
    """The plain-text result: accuracy, the lowest per-class accuracies, the method's extras, the outputs."""
    print(f"{split} top-1: {result['top1']:.2f}%  top-5: {result['top5']:.2f}%  mean per-class: "
          f"{result['mean_per_class_accuracy']:.2f}%  ({result['images']} images)")
    worst = sorted(((v, c) for c, v in report["per_class_accuracy"].items() if v is not None))[:3]
    print("lowest per-class accuracy: " + ", ".join(f"{c} {v:.1f}%" for v, c in worst))
    if "gates" in result:
        print(gate_table(result))
    if "temperature" in result:
        print("temperature per block: " + " ".join(f"{t:.3f}" for t in result["temperature"]))
    if "mask_token" in result:
        print(f"[MASK] token: {result['mask_token']}")
    print("-> " + ", ".join(result["outputs"].values()))


def register(app: typer.Typer) -> None:
    app.command("eval", epilog=EPILOG)(cli_errors(eval_))
