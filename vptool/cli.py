"""The ``vptool`` command line: a compatibility module over ``vptool.commands`` (one module per command).

``pyproject``'s entry point is ``vptool.cli:main``, and callers import ``app``, ``main``, ``MAX_LINE`` and
``cli_errors`` from here. Exit codes: 0 ok, 1 the run failed, 2 bad input (one line naming the key, path or
value; no traceback unless ``--debug``). ``--json`` prints one JSON object on stdout; progress and messages go
to stderr.
"""

from __future__ import annotations

import sys

from vptool.commands import app, main
from vptool.commands.common import (
    MAX_LINE,
    OneLineUsageErrors,
    RichProgress,
    cli_errors,
    err,
    single_process,
)

#: the former name of the rich progress implementation
RichObserver = RichProgress

__all__ = ["MAX_LINE", "OneLineUsageErrors", "RichObserver", "RichProgress", "app", "cli_errors", "err", "main",
           "single_process"]

if __name__ == "__main__":
    sys.exit(main())
