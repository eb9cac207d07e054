"""``vptool sweep``: a grid search over recipe keys, each grid point one ``vptool train`` run (``vptool.engine.sweep``).

Keeps optuna and torch out of its imports so that ``vptool --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import cli_errors, err, single_process

SWEEP_EPILOG = (
    "Examples:\n\n"
    "  vptool sweep recipes/quickstart.yaml --grid train.lr=0.5,0.1 --grid train.weight_decay=0,0.001 "
    "--set train.epochs=3\n\n"
    "  vptool sweep recipes/quickstart.yaml --grid train.lr=0.5,0.1 --json | jq .val_acc\n\n"
    "  vptool sweep recipes/vpt_deep_mae_cub.yaml --grid train.lr=50,25,10,5 --grid train.weight_decay=0.01,0.001,0 "
    "--storage postgresql://user@db/sweeps   (start it on every machine: they share the grid)\n\n"
    "  vptool sweep recipes/vpt_deep_mae_cub.yaml --grid train.lr=50,25 --trial-command \"torchrun --nproc_per_node 4 "
    "-m vptool\""
)

GridOpt = Annotated[Optional[list[str]], typer.Option(
    "--grid", help="KEY=V1,V2,...: a recipe key and the values to try (repeatable; the grid is the cross product). "
                   "Values are passed verbatim to --set.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe key in every trial, e.g. --set train.epochs=3 (repeatable; applied before the "
                  "grid values).")]
StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="SQLAlchemy URL of the Optuna study shared by the workers, e.g. postgresql://user@host/db "
                      "(default: sqlite:///<output.dir>/<output.name>-sweep/study.db).", show_default=False)]
StudyOpt = Annotated[Optional[str], typer.Option(
    "--study", help="Optuna study name (default: the recipe's output.name).", show_default=False)]
TrialCommandOpt = Annotated[Optional[str], typer.Option(
    "--trial-command", help="What runs `train ...` for each trial, split like a shell would (default: this python "
                            "-m vptool), e.g. \"torchrun --nproc_per_node 4 -m vptool\".", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout: the best trial and the "
                                       "report files.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors.")]


def sweep_command(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/) every trial trains.", show_default=False)],
    grid: GridOpt = None,
    set_: SetOpt = None,
    storage: StorageOpt = None,
    study: StudyOpt = None,
    trial_command: TrialCommandOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Grid search over recipe keys; selects the trial with the best validation accuracy (VPT §4.1).

    Each grid point is one `vptool train` subprocess in <output.dir>/<output.name>-sweep/<TRIAL>/, coordinated
    through an Optuna study (GridSampler): start the same command several times (or on several machines with
    --storage) and each point still trains exactly once; a killed worker's trial is resumed by the next one.
    A failing trial (e.g. train.lr=-1) is recorded as FAIL and not retried on a rerun. Writes sweep.csv,
    sweep.json and sweep.png in the sweep directory. SIGINT/SIGTERM stop after the running trial's checkpoint
    (exit 130/143); rerun the same command to continue.
    """
    from vptool.engine import sweep as sw
    from vptool.errors import RunError
    from vptool.shipped import resolve_recipe

    recipe = resolve_recipe(recipe)  # a path, or a shipped recipe's name
    plan = sw.plan_sweep(recipe, grid or [], set_ or [], storage=storage, study=study, trial_command=trial_command)
    try:
        report = plan.run(say=lambda line: err.print(line, markup=False))
    except RunError as exc:
        if isinstance(exc, sw.SweepStopped) or not (plan.sweep_dir / "sweep.json").is_file():
            raise
        report = json.loads((plan.sweep_dir / "sweep.json").read_text(encoding="utf-8"))
        print_report(report, json_out)
        raise
    print_report(report, json_out)


def print_report(report: dict, json_out: bool) -> None:
    """The sweep's result: the best trial as JSON, or the table."""
    from vptool.engine import sweep as sw

    if json_out:
        print(json.dumps(sw.json_result(report)))
    else:
        print(sw.format_table(report))


def register(app: typer.Typer) -> None:
    app.command("sweep", epilog=SWEEP_EPILOG)(cli_errors(single_process("sweep")(sweep_command)))
