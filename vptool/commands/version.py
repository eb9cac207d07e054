"""``vptool version``: print the vptool version."""

from __future__ import annotations

import typer

from vptool import __version__


def version() -> None:
    """Print the vptool version."""
    print(__version__)


def register(app: typer.Typer) -> None:
    app.command()(version)
