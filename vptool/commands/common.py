"""What every ``vptool`` command shares: the stderr console, the one-line error contract (``cli_errors``), the
one-line usage errors (``OneLineUsageErrors``), the torchrun guards and the rich progress bars (``RichProgress``).

Exit codes: 0 ok, 1 the run failed, 2 bad input (one line naming the key, path or value; no traceback
unless ``--debug``). Nothing is interactive. ``--json`` prints one JSON object on stdout; progress and
messages go to stderr. Nothing here imports torch.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichBars
from typer.core import TyperGroup

from vptool.errors import RecipeError, RunError, UserError
from vptool.progress import Progress

err = Console(stderr=True, highlight=False, soft_wrap=True)

#: an error line is cut to this many characters: a message never floods a CI log (a bad value's repr can be huge)
MAX_LINE = 300

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe key, e.g. --set train.lr=0.05 (repeatable; same checks as the YAML).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors.")]


# --------------------------------------------------------------------------------------------------- error lines
def bounded(line: str) -> str:
    """``line`` cut to ``MAX_LINE`` characters (ending in ``...`` when cut)."""
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def _report_to_peers(message: str, exc: BaseException | None) -> None:
    """Under torchrun, leave this rank's own error in the rendezvous store for the other ranks to name."""
    dist = sys.modules.get("vptool.engine.dist")
    if dist is not None and dist.context().active and \
            not getattr(exc, "collective", False) and not getattr(exc, "peer_failure", False):  # for the others
        dist.report_failure(f"{message.splitlines()[0] if message else ''}")


def fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print ``error: ...`` and exit ``code``. Under torchrun, rank 0 prints; another rank prints only an error of
    its own (prefixed ``rank N:``, and left in the rendezvous store for the others to name), not one every rank
    raised alike (the recipe, a refusal decided by rank 0, a NaN or signal all ranks agreed on)."""
    rank = os.environ.get("RANK", "0")
    _report_to_peers(message, exc)
    if rank not in ("", "0"):
        from vptool.engine import dist

        if not dist.context().active or getattr(exc, "collective", False):
            raise typer.Exit(code)
        lines = message.splitlines() or [""]
        if not lines[0].startswith(f"rank {rank}"):
            lines[0] = f"rank {rank}: {lines[0]}"
        message = "\n".join(lines)
    for line in message.splitlines() or [""]:
        err.print(bounded(f"error: {line}"), markup=False)
    raise typer.Exit(code)


def os_error_line(exc: OSError) -> str:
    """One line for a failed read or write: the path and the errno text (disk full, permission, ...)."""
    what = exc.strerror or (os.strerror(exc.errno) if exc.errno else None) or str(exc) or type(exc).__name__
    path = exc.filename if exc.filename is not None else None
    if path is None:
        return f"{what}; check free disk space and permissions"
    extra = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{path}{extra}: {what}; check free disk space and permissions, then rerun (an interrupted run: --resume)"


def one_line(exc: Exception) -> str:
    """The message's one line; for an error re-raised from a DataLoader worker, the original error's line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:
        marker = f"{type(exc).__name__}: "
        for ln in reversed(lines):
            if marker in ln:
                return ln.split(marker, 1)[1]
    return lines[0]


def print_traceback(debug: bool) -> None:
    """With ``--debug``: the current exception's traceback on stderr (the exit code stays the error's own)."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)


def _quiet_broken_pipe() -> None:
    """The reader went away (``vptool predict ... | head``): stop quietly, as cat does (exit 141)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(141) from None


def _fail_unexpected(exc: Exception, debug: bool) -> None:
    """A bug or an environment failure: exit 1, short message (out of GPU memory named with its remedies)."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch
        fail("out of GPU memory; lower data.batch_size, data.eval_batch_size or prompt.length, or set "
             "train.precision: bf16 (an interrupted run continues with --resume)", 1)
    hint = "" if debug else " (rerun with --debug for the traceback)"
    fail(f"{type(exc).__name__}: {one_line(exc)}{hint}", 1)


def _handle(exc: BaseException, debug: bool) -> None:
    """Map an exception a command raised to its message and exit code (always raises ``typer.Exit``); the checks
    run in this order: the first that matches decides."""
    if isinstance(exc, RecipeError):
        print_traceback(debug)
        fail(str(exc), 2)
    elif isinstance(exc, UserError):
        print_traceback(debug)
        fail(one_line(exc), 2, exc)
    elif isinstance(exc, RunError):  # a failed run (1), or one stopped by SIGINT/SIGTERM after its checkpoint (130/143)
        print_traceback(debug)
        fail(str(exc), getattr(exc, "exit_code", 1), exc)
    elif isinstance(exc, KeyboardInterrupt):
        print_traceback(debug)
        fail("interrupted", 130)
    elif isinstance(exc, BrokenPipeError):
        _quiet_broken_pipe()
    elif isinstance(exc, OSError):  # disk full, permission denied, ...: the path and the errno text, exit 1
        print_traceback(debug)
        fail(os_error_line(exc), 1)
    elif isinstance(exc, MemoryError):
        print_traceback(debug)
        fail("out of host memory; lower data.batch_size, data.eval_batch_size or prompt.length (an "
             "interrupted run continues with --resume)", 1)
    else:
        print_traceback(debug)
        _fail_unexpected(exc, debug)


def cli_errors(fn):
    """Map exceptions to exit codes: UserError -> 2 (one line each), a failed run -> 1 (its signal: 130/143),
    anything else -> 1. ``--debug`` prints the traceback first and keeps the exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug", False)
        logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        try:
            result = fn(*args, **kwargs)
            if "vptool.engine.dist" in sys.modules:  # leave a torchrun job's process group cleanly
                sys.modules["vptool.engine.dist"].shutdown()
            return result
        except typer.Exit:
            raise
        except (KeyboardInterrupt, Exception) as exc:
            _handle(exc, debug)

    return wrapper


# --------------------------------------------------------------------------------------------------- usage errors
def click_exceptions():
    """The click exceptions module Typer raises (Typer >= 0.22 vendors click as ``typer._click``)."""
    import typer.core

    vendored = getattr(typer.core, "_click", None)
    if vendored is not None:
        return vendored.exceptions
    import click

    return click.exceptions


class OneLineUsageErrors(TyperGroup):
    """Typer's group whose usage errors (unknown option, bad option value, missing argument) are one
    ``error:`` line on stderr and exit 2, like every other bad input, instead of a multi-line box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        cx = click_exceptions()
        no_args = getattr(cx, "NoArgsIsHelpError", ())
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except no_args as exc:
            if not standalone_mode:
                raise
            exc.show()
            sys.exit(exc.exit_code)
        except cx.ClickException as exc:
            if not standalone_mode:
                raise
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "vptool"
            message = exc.format_message().strip().rstrip(".")
            err.print(bounded(f"error: {message}; see {where} --help"), markup=False)
            sys.exit(exc.exit_code)
        except getattr(cx, "Abort", typer.Abort):
            if not standalone_mode:
                raise
            err.print("error: aborted", markup=False)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


# --------------------------------------------------------------------------------------------------- processes
def is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints results and writes outputs."""
    return os.environ.get("RANK", "0") in ("", "0")


def one_process(command: str) -> None:
    """Refuse a command that has no data-parallel form when it is started under torchrun."""
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError(f"{command} runs as one process; start it without torchrun (train, eval and init-prompts "
                        "are the data-parallel commands)")


def single_process(command: str):
    """Decorator form of ``one_process``."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            one_process(command)
            return fn(*args, **kwargs)

        return inner

    return wrap


# --------------------------------------------------------------------------------------------------- output
def gate_table(result: dict) -> str:
    """Gate values and GateVPT selection ratio (eq. 10-11) per block, one line each."""
    ratio = result["selection_ratio"]
    lines = ["block  gate      selection ratio (GateVPT eq. 11)"]
    for i, g in enumerate(result["gates"]):
        r = "n/a (all gates closed)" if ratio is None else f"{ratio[i]:.4f}"
        lines.append(f"{i + 1:>5}  {g:.4f}    {r}")
    return "\n".join(lines)


class RichProgress(Progress):
    """Progress bars (stderr) for training, evaluation and SPT prompt construction."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = RichBars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=err,
                                 disable=quiet or not err.is_terminal, transient=False)
        self.task = None

    def say(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False)

    def start(self) -> None:
        self.progress.start()

    def stop(self) -> None:
        self.progress.stop()

    def run_start(self, info: dict) -> None:
        self.say(info["params"])
        self.say(f"run: {info['run_dir']}  device: {info['device']} ({info['amp']})  images train/val/test: "
                 f"{info['train_images']}/{info['val_images']}/{info['test_images']}  classes: {info['classes']}")
        self.progress.start()

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, stats="")

    def step(self, loss: float, acc: float, lr: float) -> None:
        self.progress.update(self.task, advance=1, stats=f"loss {loss:.4f} acc {acc:.1f}% lr {lr:.3g}")

    def epoch_end(self, r: dict) -> None:
        self.progress.update(self.task, stats=f"loss {r['train_loss']:.4f} acc {r['train_acc']:.1f}% "
                                              f"val {r['val_acc']:.2f}%")
        if not err.is_terminal:
            self.say(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} train_acc {r['train_acc']:.2f}% "
                     f"val_acc {r['val_acc']:.2f}% lr {r['lr']:.4g} ({r['seconds']:.1f}s)")

    def eval_start(self, split: str, steps: int) -> None:
        self.task = self.progress.add_task(f"{split}", total=steps, stats="")

    def eval_step(self) -> None:
        self.progress.update(self.task, advance=1)

    def run_end(self, summary: dict) -> None:
        self.progress.stop()

    # SPT prompt construction (init-prompts, or train with prompt.init naming a strategy)
    def extract_start(self, batches: int) -> None:
        self.progress.start()
        self.task = self.progress.add_task("extract tokens", total=batches, stats="")

    def extract_step(self) -> None:
        self.progress.update(self.task, advance=1)

    def kmeans_start(self, steps: int) -> None:
        self.task = self.progress.add_task("k-means per set", total=steps, stats="")

    def kmeans_step(self) -> None:
        self.progress.update(self.task, advance=1)

    def note(self, text: str) -> None:
        err.print(f"note: {text}", markup=False)
