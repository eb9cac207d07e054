"""``python -m vptool`` runs the CLI."""

from vptool.cli import main

main()
