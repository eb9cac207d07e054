"""Exceptions that map to the CLI's exit codes.

``UserError`` (exit code 2) means bad input: a recipe key, a path, a value. Its message is one line that names
the bad thing and says how to fix it. ``RunError`` (exit code 1) means the input was fine but the run failed.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (recipe key, path, value). The CLI prints the message on one line and exits with code 2."""

    exit_code = 2


class RecipeError(UserError):
    """A recipe is not well-formed. Holds every problem found, each a one-line string.

    Args:
        problems: one line per problem, each naming the dotted key path.
        source: where the recipe came from (a path or ``"--set"``), prefixed to each line.
    """

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        super().__init__("\n".join(prefix + p for p in self.problems))


class RunError(Exception):
    """The run itself failed (not the user's input). The CLI exits with code 1."""

    exit_code = 1
