"""``vptool recipes ls`` and ``vptool recipes cp``: list and copy the recipes (and benchmark tables) shipped with
vptool (``vptool.shipped``), after torchtune's ``tune ls`` / ``tune cp``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from vptool.commands.common import DebugOpt, cli_errors
from vptool.errors import UserError

LS_EPILOG = ("Examples:\n\n  vptool recipes ls\n\n  vptool recipes ls --tables\n\n"
             "  vptool recipes ls --json | jq -r '.[] | select(.needs == []) | .name'")
CP_EPILOG = ("Examples:\n\n  vptool recipes cp vpt_deep_mae_cub my.yaml\n\n  vptool recipes cp quickstart configs/\n\n"
             "  vptool recipes cp quickstart my.yaml --force")

def ls(
    tables: Annotated[bool, typer.Option("--tables", help="List the benchmark tables too (kind: table).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON array on stdout, one object per recipe "
                                           "(and table): name, method, paper_tables, needs, path, ...")] = False,
    debug: DebugOpt = False,
) -> None:
    """List the shipped recipes: name, method, the paper table it reproduces, the data it needs.

    "bundled" means the recipe runs as shipped (scikit-learn's digits, an embedded or random backbone); otherwise
    the data root and checkpoint to provide (vptool downloads nothing). Run one with `vptool train NAME`.
    """
    from vptool import shipped

    entries = shipped.list_recipes() + (shipped.list_tables() if tables else [])
    if json_out:
        print(json.dumps(entries))
        return
    recipes = [e for e in entries if e["kind"] == "recipe"]
    print_rows(["NAME", "METHOD", "PAPER TABLE", "DATA NEEDED"],
               [[e["name"], e["method"] or "", ", ".join(e["paper_tables"]), needs(e)] for e in recipes])
    if tables:
        rows = [[e["name"], e["title"] or "", e["source"] or "", needs(e)] for e in entries if e["kind"] == "table"]
        print()
        if rows:
            print_rows(["TABLE", "TITLE", "SOURCE", "DATA NEEDED"], rows)
        else:
            print("no benchmark tables shipped")


def needs(entry: dict) -> str:
    return ", ".join(entry["needs"]) or "bundled"


def print_rows(header: list[str], rows: list[list[str]]) -> None:
    """Aligned columns, the last one unpadded (plain text: greppable, no wrapping)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        print("  ".join([f"{c:<{w}}" for c, w in zip(row, widths)] + [str(row[-1])]).rstrip())


def cp(
    name: Annotated[str, typer.Argument(help="A shipped recipe's name (see `vptool recipes ls`), or a table's "
                                        "(`ls --tables`).", show_default=False)],
    dest: Annotated[Path, typer.Argument(help="File to write, or an existing folder (writes NAME.yaml there).",
                                         show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    debug: DebugOpt = False,
) -> None:
    """Copy a shipped recipe (or table) to DEST, byte for byte, to edit and run with `vptool train DEST`."""
    from vptool import shipped
    from vptool.paths import write_atomically

    source = shipped.find_shipped(name) or shipped.find_shipped(name, tables=True)
    if source is None:
        known = [*shipped.shipped_recipes(), *shipped.shipped_tables()]
        raise UserError(f"{name}: no shipped recipe or table of that name{shipped.closest(name, known)} "
                        "(see `vptool recipes ls`)")
    target = dest / source.name if dest.is_dir() else dest
    if target.is_dir():
        raise UserError(f"{target}: is a folder; pass a file path as DEST")
    if target.exists() and not force:
        raise UserError(f"{target}: already exists; choose another DEST or pass --force to replace it")
    if not target.parent.is_dir():
        raise UserError(f"{target.parent}: folder not found; create it or choose another DEST")
    data = source.read_bytes()
    write_atomically(target, lambda tmp: tmp.write_bytes(data))
    print(f"copied {source.stem} to {target}")


def register(app: typer.Typer) -> None:
    group = typer.Typer(name="recipes", help="List and copy the recipes and benchmark tables shipped with vptool.",
                        no_args_is_help=True)
    group.command("ls", epilog=LS_EPILOG)(cli_errors(ls))
    group.command("cp", epilog=CP_EPILOG)(cli_errors(cp))
    app.add_typer(group)
