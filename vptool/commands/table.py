"""``vptool table``: a paper's benchmark table, every cell trained with the papers' protocol on the sweep machinery
(``vptool.engine.table``).

Keeps optuna and torch out of its imports so that ``vptool --help`` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, cli_errors, err, single_process
from vptool.commands.sweep import TrialCommandOpt  # the same --trial-command as vptool sweep

TABLE_EPILOG = (
    "Examples:\n\n"
    "  python -m vptool.data.digits_vtab data/digits-vtab-1k && vptool table recipes/tables/digits_vtab.yaml\n\n"
    "  vptool table recipes/tables/vpt_table1.yaml --dry-run   (names every missing data and checkpoint path)\n\n"
    "  vptool table recipes/tables/vpt_table1.yaml --storage postgresql://user@db/tables   (start it on every "
    "machine: they share the cells)\n\n"
    "  vptool table recipes/tables/digits_vtab.yaml --json | jq '.rows[] | {row, total_params}'"
)

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe key in every cell, e.g. --set train.epochs=3 (repeatable; after the table "
                  "file's own overrides).")]
StorageOpt = Annotated[Optional[str], typer.Option(
    "--storage", help="SQLAlchemy URL of the Optuna storage shared by the workers, e.g. postgresql://user@host/db "
                      "(default: sqlite:///<output-dir>/<table>-table/table.db).", show_default=False)]
OutputOpt = Annotated[Path, typer.Option("--output-dir", help="Folder that holds <table>-table/ (the cells' sweeps "
                                                              "and the reports).")]
WorkersOpt = Annotated[int, typer.Option("--workers", min=1, help="Workers on this machine: the command starts "
                                          "N-1 more of itself on the same storage (each trains one trial at a "
                                          "time; give each its share of the cores, e.g. OMP_NUM_THREADS).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Check every cell's recipe, grid and inputs; name each "
                                         "missing data or checkpoint path; train nothing (exit 0, ready true/false).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (the report's summary, or the "
                                       "dry run).")]


def table_command(
    table: Annotated[Path, typer.Argument(help="Table YAML (see recipes/tables/).", show_default=False)],
    set_: SetOpt = None,
    storage: StorageOpt = None,
    output_dir: OutputOpt = Path("runs"),
    trial_command: TrialCommandOpt = None,
    workers: WorkersOpt = 1,
    dry_run: DryRunOpt = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run a paper's benchmark table: rows (methods) x columns (tasks), with the papers' protocol.

    FGVC columns select the grid point with the best val top-1 and report its test top-1; VTAB-1k columns tune on
    train800/val200, retrain the selected point on train800val200 and report its test top-1 (VPT §4.1). Every cell
    is a `vptool sweep` in one shared Optuna storage: start the same command several times (or on several machines
    with --storage) and each training still runs once; rerun a killed command to resume. Writes table.md,
    table.csv, table.tex and table.json in <output-dir>/<table>-table/, with the group means, the parameter
    totals and the paper's number beside ours; unfinished or failed cells are marked and never averaged in.
    """
    from vptool.engine import table as tb

    path = _resolve(table)
    if dry_run:
        plan = tb.dry_run(path, set_ or [], output_dir)
        print_dry_run(plan, json_out)
        return
    worker = tb.plan_table(path, set_ or [], storage=storage, output_dir=output_dir, trial_command=trial_command)
    argv = [str(path), *(x for item in set_ or [] for x in ("--set", item)), "--storage", worker.storage,
            "--output-dir", str(output_dir), *(["--trial-command", trial_command] if trial_command else [])]
    with tb.more_workers(workers - 1, argv, worker):
        report = worker.run(say=lambda line: err.print(line, markup=False))
    if json_out:
        print(json.dumps(json_summary(report)))
    else:
        print((Path(report["outputs"]["md"])).read_text(encoding="utf-8"), end="")
        print("-> " + ", ".join(report["outputs"].values()))


def _resolve(table: Path) -> Path:
    """A table file's path (an existing path wins), or a shipped table's name (``digits_vtab``)."""
    from vptool.shipped import resolve_table

    return resolve_table(str(table))


def json_summary(report: dict) -> dict:
    """``--json``: per row its group means, parameter totals and cell states; the counts and the report files."""
    rows = [{"row": r["row"], "groups": {g["group"]: g["mean"] for g in r["groups"]},
             "paper": {g["group"]: g["paper"] for g in r["groups"]}, "tuned_params_m": r["tuned_params_m"],
             "total_params": r["total_params"],
             "cells": {c["column"]: {"state": c["state"], "top1": c["test_top1"], "paper": c["paper"]}
                       for c in r["cells"]}} for r in report["rows"]]
    return {"table": report["table"], "complete": report["complete"], "counts": report["counts"], "rows": rows,
            **report["outputs"], "table_dir": report["table_dir"], "storage": report["storage"]}


def print_dry_run(plan: dict, json_out: bool) -> None:
    """--dry-run: every missing input (stderr lines, or the JSON object), then ready true/false."""
    if json_out:
        print(json.dumps(plan))
        return
    for m in plan["missing"]:
        cells = m["cells"]
        more = f" and {len(cells) - 3} more" if len(cells) > 3 else ""
        print(f"missing: {m['key']}: {m['path']}  (cells {', '.join(cells[:3])}{more})")
    print(f"table {plan['table']}: {plan['cells']} cells, {plan['trainings']} trainings; "
          + ("ready: all inputs found" if plan["ready"] else f"not ready: {len(plan['missing'])} inputs missing"))


def register(app: typer.Typer) -> None:
    app.command("table", epilog=TABLE_EPILOG)(cli_errors(single_process("table")(table_command)))
