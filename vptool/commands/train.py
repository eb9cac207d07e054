"""``vptool train``: train prompts (and head) on a frozen backbone; writes runs/<name>/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vptool.commands.common import DebugOpt, JsonOpt, RichProgress, SetOpt, cli_errors, err, gate_table, is_main
from vptool.errors import UserError

EPILOG = ("Examples:\n\n  vptool train quickstart\n\n  vptool train recipes/quickstart.yaml\n\n"
          "  vptool train recipes/quickstart.yaml --set train.lr=0.05 --set output.name=lr005\n\n"
          "  vptool train recipes/quickstart.yaml --dry-run --json\n\n"
          "  vptool train runs/quickstart --resume --set train.epochs=40")


def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe, a shipped recipe's name (vptool recipes ls), or with "
                                           "--resume a run directory.", show_default=False)],
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the "
                                          "trainable-parameter summary, then exit; writes nothing. Inputs not "
                                          "on disk yet are named in a warning (exit 0, ready: false).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from checkpoints/last.pt (killed, "
                                         "stopped or failed; or a finished run with a larger train.epochs). The "
                                         "recipe must match the run's recipe.yaml except train.epochs.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run directory: the new run "
                                            "trains beside it and replaces it only when it finishes.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Train prompts (and head) on a frozen backbone; writes runs/<name>/.

    SIGINT/SIGTERM stop after the current step, write checkpoints/last.pt and exit 130/143; --resume continues.
    Method presets (recipe key `method`) fill defaults the recipe can override.
    """
    from vptool.shipped import resolve_recipe

    path = resolve_recipe(recipe)  # an existing path, or a shipped recipe's name (vptool recipes ls)
    if path != recipe and is_main():
        err.print(f"recipe: {path} (shipped)", markup=False)
    recipe = path
    r = load_train_recipe(recipe, set_ or [], resume, dry_run)
    # torch, timm and torchvision load only now: --help and a bad recipe answer without them
    if dry_run:
        if is_main():  # under torchrun rank 0 alone checks and prints
            print_dry_run(r, json_out)
        return
    from vptool.engine.train import train as run_train

    summary = run_train(r, overwrite=overwrite, resume=resume, observer=RichProgress(quiet=json_out or not is_main()),
                        resume_command=resume_command(recipe, set_ or [], overwrite),
                        recipe_file=recipe / "recipe.yaml" if recipe.is_dir() else recipe)
    if is_main():
        print_summary(summary, json_out)


def load_train_recipe(recipe: Path, sets: list[str], resume: bool, dry_run: bool):
    """The recipe to train: a YAML file, or with --resume (or --dry-run) a run directory's recipe.yaml."""
    from vptool.recipe import load_recipe, load_run_recipe

    if not recipe.is_dir():
        return load_recipe(recipe, sets)
    if not (recipe / "recipe.yaml").is_file():
        raise UserError(f"{recipe}: is a folder, not a recipe or a run directory (no recipe.yaml); pass a YAML "
                        "recipe (see recipes/)")
    if not resume and not dry_run:
        raise UserError(f"{recipe}: is a run directory; continue it with --resume, or pass a YAML recipe")
    return load_run_recipe(recipe, sets)


def print_dry_run(r, json_out: bool) -> None:
    """--dry-run: warnings for missing inputs, then the plan as JSON or as the resolved recipe and its summary."""
    from vptool.engine.setup import dry_run as dry_run_recipe
    from vptool.prompting.model import format_parameter_summary
    from vptool.recipe import dump_recipe

    plan = dry_run_recipe(r)
    for item in plan["inputs"]:
        if not item["exists"]:
            err.print(f"warning: {item['key']}: {item['path']} not found; the run will need it", markup=False)
    if json_out:
        print(json.dumps(plan))
        return
    print(dump_recipe(r), end="")
    for line in plan["resolved"]:
        print(f"resolved {line}")
    if plan["trainable_params"] is None:
        print(f"model not built: {plan['note']}")
    else:
        print(format_parameter_summary(plan["trainable_params"], plan["total_params"]))
    if plan["mask_token"]:
        print(f"[MASK] token: {plan['mask_token']}")
    print(f"memory: at least {plan['memory_estimate_bytes'] / 2**30:.2f} GiB to train "
          f"({plan['memory_available_bytes'] / 2**30:.1f} GiB available; activation checkpointing "
          f"{'on' if plan['activation_checkpointing'] else 'off'}, backbone weights {plan['backbone_dtype']})")
    print("ready: all inputs found" if plan["ready"] else "not ready: inputs missing (see warnings)")


def resume_command(recipe: Path, sets: list[str], overwrite: bool) -> str:
    """The command line that continues this run (named when the run is stopped)."""
    import shlex

    return " ".join(["vptool train", shlex.quote(str(recipe)), *(f"--set {shlex.quote(x)}" for x in sets),
                     "--overwrite" if overwrite else "", "--resume"]).replace("  ", " ")


def print_summary(summary: dict, json_out: bool) -> None:
    """The run's result: its summary as JSON, or the test accuracy line (and the gate table)."""
    if json_out:
        print(json.dumps(summary))
        return
    print(f"test top-1: {summary['test_top1']:.2f}%  top-5: {summary['test_top5']:.2f}%  "
          f"(best val {summary['val_acc']:.2f}% at epoch {summary['best_epoch']})  -> {summary['run_dir']}")
    if "gates" in summary:
        print(gate_table(summary))


def methods_table() -> str:
    """The method presets, one line each (appended to train's help)."""
    from vptool.recipe import PRESETS

    return "\n".join(f"  {p.name:<12} {p.description}" for p in PRESETS.values())


def register(app: typer.Typer) -> None:
    command = cli_errors(train)
    command.__doc__ += "\n\n" + methods_table().replace("\n", "\n\n")
    app.command(epilog=EPILOG)(command)
