"""The ``vptool`` command line (Typer): one module per command, each registering itself on ``app``.

Layout (after torchtune's ``_cli``): this package builds ``app`` and imports every command module; each module
defines its command function and a ``register(app)`` that adds it. ``common`` holds what they share (the error
contract, usage errors, torchrun guards, rich progress). Nothing imported here pulls in torch, timm or optuna:
``vptool --help`` and argument errors answer without them (heavy imports live inside the commands).
"""

from __future__ import annotations

import typer

import vptool.commands.eval as eval_command
import vptool.commands.export as export
import vptool.commands.init_prompts as init_prompts
import vptool.commands.predict as predict
import vptool.commands.probe_nmi as probe_nmi
import vptool.commands.recipes as recipes
import vptool.commands.sweep as sweep
import vptool.commands.table as table
import vptool.commands.train as train
import vptool.commands.version as version
from vptool.commands.common import OneLineUsageErrors

#: the command modules, in the order their commands are listed by ``vptool --help``
COMMANDS = (train, init_prompts, probe_nmi, eval_command, export, predict, sweep, table, recipes, version)


def build_app() -> typer.Typer:
    """The ``vptool`` Typer app with every command registered."""
    cli = typer.Typer(
        name="vptool", cls=OneLineUsageErrors,
        help="Visual prompt tuning of frozen, pretrained Vision Transformers (VPT, GateVPT, SPT, VPTM).",
        no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    for module in COMMANDS:
        module.register(cli)
    return cli


app = build_app()


def main() -> None:
    """Console-script entry point."""
    app()
