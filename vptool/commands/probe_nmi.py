"""``vptool probe-nmi``: per-block NMI between prompt tokens and patch tokens (SPT eq. 7-8)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, JsonOpt, RichProgress, SetOpt, cli_errors, one_process
from vptool.errors import UserError

EPILOG = ("Examples:\n\n  vptool probe-nmi runs/quickstart\n\n"
          "  vptool probe-nmi runs/quickstart --history --max-images 256\n\n"
          "  vptool probe-nmi recipes/quickstart.yaml --prompts p.safetensors -o nmi_spt --json")


def probe_nmi(
    target: Annotated[Path, typer.Argument(help="Run directory (trained prompts) or YAML recipe (the prompts a run "
                                           "starts from).", show_default=False)],
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Probe these prompts instead (init-prompts .safetensors: prompts.shallow/deep).")] = None,
    split: Annotated[str, typer.Option(help="train (eval transform), val or test.")] = "train",
    max_images: Annotated[Optional[int], typer.Option(
        "--max-images", help="A seeded random subset of N images (default: the whole split).")] = None,
    history: Annotated[bool, typer.Option(
        "--history", help="NMI per epoch from RUN_DIR/prompt_history (train with "
                          "output.save_prompt_history: true); plots NMI vs epoch, one line per block.")] = False,
    compare: Annotated[Optional[list[Path]], typer.Option(
        "--compare", help="With --history: also these runs (repeatable), one panel per block and one line per run "
                          "(e.g. VPT from xavier vs SPT from k-means); writes nmi_compare.*.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Folder for nmi[_history|_compare].csv/.json/.png (default: RUN_DIR/analysis, or "
                               "<output.dir>/probe-nmi/<name> for a recipe).", show_default=False)] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Override train.device (auto, cpu, cuda).")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-block NMI between prompt tokens and patch tokens (SPT eq. 7-8), mean and std over images.

    For block i: P = the prompts entering it (deep: set i; shallow/gated: the propagated prompt rows), E = the
    patch tokens entering it. Writes a CSV, a JSON and a PNG plot (NMI vs block, or with --history NMI vs epoch).
    """
    from vptool.recipe import load_recipe
    from vptool.shipped import find_shipped

    one_process("probe-nmi")
    if not target.exists():  # a shipped recipe's name (vptool recipes ls)
        target = find_shipped(target) or target
    check_options(target, prompts, split, max_images, history, compare)
    from vptool.engine import probe as pr

    recipe = None
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        recipe = load_recipe(target, set_ or [])
    if output is None:
        output = pr.default_out_dir(target, recipe, prompts)
    check_outputs(target, recipe, prompts, compare, output, history, overwrite)
    result = run(target, prompts, set_, split, max_images, history, compare, output, device, quiet=json_out)
    if json_out:
        print(json.dumps(result))
    elif compare:
        print_compare(result)
    else:
        print_probe(result, history)


def check_options(target: Path, prompts, split: str, max_images, history: bool, compare) -> None:
    """Refuse a bad split, --history without a run directory, and options that do not go together."""
    if split not in ("train", "val", "test"):
        raise UserError(f"--split: {split!r} is not train, val or test")
    if history and not target.is_dir():
        raise UserError(f"--history: {target} is not a run directory; pass runs/NAME trained with "
                        "output.save_prompt_history: true")
    if history and prompts is not None:
        raise UserError("--prompts: not with --history (the history brings its own prompts per epoch)")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images: {max_images} must be at least 1")
    if compare and not history:
        raise UserError("--compare: compares prompt histories; add --history")


def check_outputs(target: Path, recipe, prompts, compare, output: Path, history: bool, overwrite: bool) -> None:
    """Before any slow work: the outputs may not be inputs, nor exist without --overwrite; every run compared
    has a prompt history."""
    from vptool.engine import probe as pr
    from vptool.paths import Read, recipe_reads, refuse_inputs, source_reads

    outputs = pr.output_paths(output, history, bool(compare))
    reads = [Read("recipe", target), *recipe_reads(recipe)] if recipe is not None else source_reads(target)
    reads += [Read("prompt file (--prompts)", prompts)] if prompts is not None else []
    for run_dir in compare or []:
        reads += source_reads(run_dir, "run directory (--compare)")
    refuse_inputs("-o", outputs.values(), reads)
    pr.check_outputs(outputs, overwrite)  # refuse before any slow work
    if history:
        for run_dir in [target, *(compare or [])]:
            if not run_dir.is_dir():
                raise UserError(f"--compare: {run_dir} is not a run directory")
            pr.list_snapshots(run_dir)


def run(target: Path, prompts, set_, split: str, max_images, history: bool, compare, output: Path, device,
        quiet: bool) -> dict:
    """Probe (or compare the histories), with progress bars on stderr."""
    from vptool.engine import probe as pr

    obs = RichProgress(quiet=quiet)
    obs.start()
    try:
        if compare:
            return pr.run_compare([target, *compare], split, max_images, output, device, observer=obs)
        return pr.run_probe(pr.open_target(target, prompts, set_, device), split, max_images, history, output,
                            observer=obs)
    finally:
        obs.stop()


def _num(v, spec: str, width: int = 0) -> str:
    """``v`` formatted (negative zero as 0), or ``-`` for a block no prompt enters (None)."""
    return f"{'-':>{width}}" if v is None else f"{max(v, 0.0):>{width}{spec}}"


def _mean(row: list) -> float:
    """The mean over the blocks that have prompts."""
    got = [v for v in row if v is not None]
    return sum(got) / len(got) if got else 0.0


def print_compare(result: dict) -> None:
    """--compare: the mean NMI over blocks, first and last epoch, per run."""
    print(f"NMI per epoch (SPT eq. 7-8), {result['split']} split, {result['images']} images; mean over blocks:")
    for x in result["runs"]:
        first, last = x["nmi_mean"][0], x["nmi_mean"][-1]
        print(f"  {x['label']} ({x['method']}, init {x['prompt_init']}): epoch {x['epochs'][0]} "
              f"{_num(_mean(first), '.5f')} -> epoch {x['epochs'][-1]} {_num(_mean(last), '.5f')}")
    print("-> " + ", ".join(result["outputs"].values()))


def print_probe(result: dict, history: bool) -> None:
    """NMI per block (mean, std, saturated fraction), or with --history per epoch and block."""
    print(f"NMI(prompts; patch tokens), SPT eq. 7-8: {result['method']}, prompts {result['prompts']}, "
          f"{result['split']} split, {result['images']} images")
    if history:
        L = len(result["blocks"])
        print("epoch  " + " ".join(f"{f'block {b}':>9}" for b in result["blocks"]))
        for e, row in zip(result["epochs"], result["nmi_mean"]):
            print(f"{e:>5}  " + " ".join(_num(row[b], ".5f", 9) for b in range(L)))  # no -0.00000
    else:
        print("block  NMI mean   NMI std    saturated |P.E|>10")
        for b, m, sd, f in zip(result["blocks"], result["nmi_mean"], result["nmi_std"],
                               result["saturated_fraction"]):
            print(f"{b:>5}  {_num(m, '.6f', 8)}  {_num(sd, '.6f', 8)}   {_num(f, '.3f', 5)}")
    print("-> " + ", ".join(result["outputs"].values()))


def register(app: typer.Typer) -> None:
    app.command("probe-nmi", epilog=EPILOG)(cli_errors(probe_nmi))
