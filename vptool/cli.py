"""The ``vptool`` command line (Typer): parse, load the recipe, call the engine, print.

Exit codes: 0 ok, 1 the run failed, 2 bad input (one line naming the key, path or value; no traceback
unless ``--debug``). Nothing is interactive. ``--json`` prints one JSON object on stdout; progress and
messages go to stderr.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from typer.core import TyperGroup

from vptool import __version__
from vptool.errors import RecipeError, RunError, UserError
from vptool.paths import check_new_file


def _click_exceptions():
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
        cx = _click_exceptions()
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
            err.print(_bounded(f"error: {message}; see {where} --help"), markup=False)
            sys.exit(exc.exit_code)
        except getattr(cx, "Abort", typer.Abort):
            if not standalone_mode:
                raise
            err.print("error: aborted", markup=False)
            sys.exit(1)
        if standalone_mode:
            sys.exit(rv if isinstance(rv, int) else 0)
        return rv


app = typer.Typer(
    name="vptool", cls=OneLineUsageErrors,
    help="Visual prompt tuning of frozen, pretrained Vision Transformers (VPT, GateVPT, SPT, VPTM).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err = Console(stderr=True, highlight=False, soft_wrap=True)

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe key, e.g. --set train.lr=0.05 (repeatable; same checks as the YAML).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show the traceback on errors.")]


#: an error line is cut to this many characters: a message never floods a CI log (a bad value's repr can be huge)
MAX_LINE = 300


def _bounded(line: str) -> str:
    return line if len(line) <= MAX_LINE else line[:MAX_LINE - 3] + "..."


def _fail(message: str, code: int, exc: BaseException | None = None) -> None:
    """Print ``error: ...`` and exit ``code``. Under torchrun, rank 0 prints; another rank prints only an error of
    its own (prefixed ``rank N:``, and left in the rendezvous store for the others to name), not one every rank
    raised alike (the recipe, a refusal decided by rank 0, a NaN or signal all ranks agreed on)."""
    import os

    rank = os.environ.get("RANK", "0")
    if "vptool.engine.dist" in sys.modules and sys.modules["vptool.engine.dist"].context().active and \
            not getattr(exc, "collective", False) and not getattr(exc, "peer_failure", False):  # for the others
        sys.modules["vptool.engine.dist"].report_failure(f"{message.splitlines()[0] if message else ''}")
    if rank not in ("", "0"):
        from vptool.engine import dist

        if not dist.context().active or getattr(exc, "collective", False):
            raise typer.Exit(code)
        lines = message.splitlines() or [""]
        if not lines[0].startswith(f"rank {rank}"):
            lines[0] = f"rank {rank}: {lines[0]}"
        message = "\n".join(lines)
    for line in message.splitlines() or [""]:
        err.print(_bounded(f"error: {line}"), markup=False)
    raise typer.Exit(code)


def _os_error_line(exc: OSError) -> str:
    """One line for a failed read or write: the path and the errno text (disk full, permission, ...)."""
    import os

    what = exc.strerror or (os.strerror(exc.errno) if exc.errno else None) or str(exc) or type(exc).__name__
    path = exc.filename if exc.filename is not None else None
    if path is None:
        return f"{what}; check free disk space and permissions"
    extra = f" -> {exc.filename2}" if exc.filename2 else ""
    return f"{path}{extra}: {what}; check free disk space and permissions, then rerun (an interrupted run: --resume)"


def _one_line(exc: Exception) -> str:
    """The message's one line; for an error re-raised from a DataLoader worker, the original error's line."""
    lines = [ln for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if lines[0].startswith("Caught ") and len(lines) > 1:
        marker = f"{type(exc).__name__}: "
        for ln in reversed(lines):
            if marker in ln:
                return ln.split(marker, 1)[1]
    return lines[0]


def _traceback(debug: bool) -> None:
    """With ``--debug``: the current exception's traceback on stderr (the exit code stays the error's own)."""
    if debug:
        import traceback

        traceback.print_exc(file=sys.stderr)


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
        except RecipeError as exc:
            _traceback(debug)
            _fail(str(exc), 2)
        except UserError as exc:
            _traceback(debug)
            _fail(_one_line(exc), 2, exc)
        except RunError as exc:  # a failed run (1), or one stopped by SIGINT/SIGTERM after its checkpoint (130/143)
            _traceback(debug)
            _fail(str(exc), getattr(exc, "exit_code", 1), exc)
        except KeyboardInterrupt:
            _traceback(debug)
            _fail("interrupted", 130)
        except BrokenPipeError:  # the reader went away (`vptool predict ... | head`): stop quietly, as cat does
            import os

            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(141) from None
        except OSError as exc:  # disk full, permission denied, ...: the path and the errno text, exit 1
            _traceback(debug)
            _fail(_os_error_line(exc), 1)
        except MemoryError:
            _traceback(debug)
            _fail("out of host memory; lower data.batch_size, data.eval_batch_size or prompt.length (an "
                  "interrupted run continues with --resume)", 1)
        except Exception as exc:  # a bug or an environment failure: exit 1, short message
            _traceback(debug)
            if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (CUDA), without importing torch
                _fail("out of GPU memory; lower data.batch_size, data.eval_batch_size or prompt.length, or set "
                      "train.precision: bf16 (an interrupted run continues with --resume)", 1)
            hint = "" if debug else " (rerun with --debug for the traceback)"
            _fail(f"{type(exc).__name__}: {_one_line(exc)}{hint}", 1)

    return wrapper


class RichObserver:
    """Progress bars (stderr) for training and evaluation."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=err,
                                 disable=quiet or not err.is_terminal, transient=False)
        self.task = None

    def _say(self, text: str) -> None:
        if not self.quiet:
            err.print(text, markup=False)

    def run_start(self, info: dict) -> None:
        self._say(info["params"])
        self._say(f"run: {info['run_dir']}  device: {info['device']} ({info['amp']})  images train/val/test: "
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
            self._say(f"epoch {r['epoch']}: train_loss {r['train_loss']:.4f} train_acc {r['train_acc']:.2f}% "
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


def _is_main() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints results and writes outputs."""
    import os

    return os.environ.get("RANK", "0") in ("", "0")


def _one_process(command: str) -> None:
    """Refuse a command that has no data-parallel form when it is started under torchrun."""
    import os

    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):
        raise UserError(f"{command} runs as one process; start it without torchrun (train, eval and init-prompts "
                        "are the data-parallel commands)")


def single_process(command: str):
    """Decorator form of ``_one_process`` (for commands defined in other modules)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            _one_process(command)
            return fn(*args, **kwargs)

        return inner

    return wrap


def _methods_table() -> str:
    from vptool.recipe import PRESETS

    return "\n".join(f"  {p.name:<12} {p.description}" for p in PRESETS.values())


@app.command(epilog="Examples:\n\n  vptool train recipes/quickstart.yaml\n\n"
             "  vptool train recipes/quickstart.yaml --set train.lr=0.05 --set output.name=lr005\n\n"
             "  vptool train recipes/quickstart.yaml --dry-run --json\n\n"
             "  vptool train runs/quickstart --resume --set train.epochs=40")
@cli_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (see recipes/), or with --resume a run directory.",
                                           show_default=False)],
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
    from vptool.recipe import dump_recipe, load_recipe, load_run_recipe

    if recipe.is_dir():
        if not (recipe / "recipe.yaml").is_file():
            raise UserError(f"{recipe}: is a folder, not a recipe or a run directory (no recipe.yaml); pass a YAML "
                            "recipe (see recipes/)")
        if not resume and not dry_run:
            raise UserError(f"{recipe}: is a run directory; continue it with --resume, or pass a YAML recipe")
        r = load_run_recipe(recipe, set_ or [])
    else:
        r = load_recipe(recipe, set_ or [])
    # torch, timm and torchvision load only now: --help and a bad recipe answer without them
    if dry_run:
        if not _is_main():  # under torchrun rank 0 alone checks and prints
            return
        from vptool.engine.setup import dry_run as dry_run_recipe
        from vptool.prompting.model import format_parameter_summary

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
              f"({plan['memory_available_bytes'] / 2**30:.1f} GiB available)")
        print("ready: all inputs found" if plan["ready"] else "not ready: inputs missing (see warnings)")
        return
    from vptool.engine.train import train as run_train

    command = " ".join(["vptool train", _shell_quote(str(recipe)), *(f"--set {_shell_quote(x)}" for x in set_ or []),
                        "--overwrite" if overwrite else "", "--resume"]).replace("  ", " ")
    summary = run_train(r, overwrite=overwrite, resume=resume, observer=RichObserver(quiet=json_out or not _is_main()),
                        resume_command=command, recipe_file=recipe / "recipe.yaml" if recipe.is_dir() else recipe)
    if not _is_main():
        return
    if json_out:
        print(json.dumps(summary))
    else:
        print(f"test top-1: {summary['test_top1']:.2f}%  top-5: {summary['test_top5']:.2f}%  "
              f"(best val {summary['val_acc']:.2f}% at epoch {summary['best_epoch']})  -> {summary['run_dir']}")
        if "gates" in summary:
            print(_gate_table(summary))


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


train.__doc__ += "\n\n" + _methods_table().replace("\n", "\n\n")


@app.command("init-prompts", epilog="Examples:\n\n"
             "  vptool init-prompts recipes/quickstart_spt.yaml --strategy kmeans -o prompts.safetensors\n\n"
             "  vptool init-prompts recipes/spt_deep_mae_cub.yaml --strategy kmeans --fraction 0.3 -o p.safetensors"
             "\n\n  vptool init-prompts RECIPE --strategy random --source last --seed 1 -o p.safetensors --json")
@cli_errors
def init_prompts(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (prompt mode and length, backbone, data).",
                                           show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors file (prompts.shallow or "
                                         "prompts.deep + metadata).", show_default=False)],
    strategy: Annotated[Optional[str], typer.Option(
        help="kmeans | mean-pool | max-pool | random (SPT §3.3-3.4); default: the recipe's prompt.init when it "
             "names one, else kmeans.")] = None,
    fraction: Annotated[Optional[float], typer.Option(
        help="kmeans: fraction of the training split to cluster, in (0, 1]; default prompt.init_fraction.")] = None,
    source: Annotated[Optional[str], typer.Option(
        help="same | first | last (SPT Table S2); default prompt.init_source.")] = None,
    form: Annotated[Optional[str], typer.Option(
        help="paper | official (the official code's level 0 and pooling); default prompt.init_form.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the image choice and k-means; default the "
                                                     "recipe's seed.")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build SPT prompts from the training split's patch tokens (frozen backbone, no prompts).

    kmeans clusters every token of the chosen fraction in one streaming pass (all layers at once, memory
    independent of the dataset size); the pooling and random strategies use one seeded batch. Train from the
    file with prompt.init: file and prompt.init_file: FILE.
    """
    from vptool.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    from vptool.engine.init_prompts import InitSpec, build_prompt_init, write_prompt_file
    from vptool.prompting.spt import STRATEGIES

    if strategy is None and r.prompt.init not in STRATEGIES:
        strategy = "kmeans"
    spec = InitSpec.from_recipe(r, strategy, fraction, source, form, seed)
    from vptool.paths import Read, recipe_reads, refuse_inputs

    refuse_inputs("-o", output, [Read("recipe", recipe), *recipe_reads(r)])
    check_new_file(output, "-o", ".safetensors", overwrite)  # refuse a bad or existing -o before any slow work
    obs = RichObserver(quiet=json_out or not _is_main())
    from vptool.engine.runtime import precision_warning, resolve_device

    slow = precision_warning(r.train.precision, resolve_device(r.train.device))
    if slow and _is_main():
        obs.note(slow)
    try:
        name, tensor, meta = build_prompt_init(r, spec, observer=obs)
    finally:
        obs.progress.stop()
    if not _is_main():  # under torchrun every rank has the same prompts; rank 0 writes them
        return
    write_prompt_file(output, name, tensor, meta, overwrite=overwrite)
    result = {"output": str(output), "tensor": name, "shape": list(tensor.shape), **meta}
    result.pop("batch_images", None)
    if json_out:
        print(json.dumps(result))
        return
    print(f"{name} {tuple(tensor.shape)} by {spec.strategy} (source {spec.source}, form {spec.form}, seed "
          f"{spec.seed}) from {meta['images']} images -> {output}")
    if meta.get("inertia") is not None:
        print(f"k-means: {meta['tokens_per_set']:,d} tokens per set, inertia per set: "
              + " ".join(f"{v:.4g}" for v in meta["inertia"]))
        print(f"seconds: extraction {meta['extract_seconds']:.2f}, k-means {meta['kmeans_seconds']:.2f}, "
              f"total {meta['seconds']:.2f}")
    else:
        print(f"seconds: {meta['seconds']:.2f}")


@app.command("probe-nmi", epilog="Examples:\n\n  vptool probe-nmi runs/quickstart\n\n"
             "  vptool probe-nmi runs/quickstart --history --max-images 256\n\n"
             "  vptool probe-nmi recipes/quickstart.yaml --prompts p.safetensors -o nmi_spt --json")
@cli_errors
def probe_nmi(
    target: Annotated[Path, typer.Argument(help="Run directory (trained prompts) or YAML recipe (the prompts a run "
                                           "starts from).", show_default=False)],
    prompts: Annotated[Optional[Path], typer.Option(
        "--prompts", help="Probe these prompts instead (init-prompts .safetensors: prompts.shallow/deep).")] = None,
    split: Annotated[str, typer.Option(help="train (eval transform), val or test.")] = "train",
    max_images: Annotated[Optional[int], typer.Option(
        "--max-images", help="A seeded random subset of N images (default: the whole split).")] = None,
    history: Annotated[bool, typer.Option(
        "--history", help="NMI per epoch from RUN_DIR/prompt_history (train with "
                          "output.save_prompt_history: true); plots NMI vs epoch, one line per block.")] = False,
    compare: Annotated[Optional[list[Path]], typer.Option(
        "--compare", help="With --history: also these runs (repeatable), one panel per block and one line per run "
                          "(e.g. VPT from xavier vs SPT from k-means); writes nmi_compare.*.")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Folder for nmi[_history|_compare].csv/.json/.png (default: RUN_DIR/analysis, or "
                               "<output.dir>/probe-nmi/<name> for a recipe).", show_default=False)] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Override train.device (auto, cpu, cuda).")] = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Per-block NMI between prompt tokens and patch tokens (SPT eq. 7-8), mean and std over images.

    For block i: P = the prompts entering it (deep: set i; shallow/gated: the propagated prompt rows), E = the
    patch tokens entering it. Writes a CSV, a JSON and a PNG plot (NMI vs block, or with --history NMI vs epoch).
    """
    from vptool.recipe import load_recipe

    _one_process("probe-nmi")
    if split not in ("train", "val", "test"):
        raise UserError(f"--split: {split!r} is not train, val or test")
    if history and not target.is_dir():
        raise UserError(f"--history: {target} is not a run directory; pass runs/NAME trained with "
                        "output.save_prompt_history: true")
    if history and prompts is not None:
        raise UserError("--prompts: not with --history (the history brings its own prompts per epoch)")
    if max_images is not None and max_images < 1:
        raise UserError(f"--max-images: {max_images} must be at least 1")
    if compare and not history:
        raise UserError("--compare: compares prompt histories; add --history")
    from vptool.engine import probe as pr

    recipe = None
    if target.is_file() and target.suffix in (".yaml", ".yml"):
        recipe = load_recipe(target, set_ or [])
    if output is None:
        output = pr.default_out_dir(target, recipe, prompts)
    outputs = pr.output_paths(output, history, bool(compare))
    from vptool.paths import Read, recipe_reads, refuse_inputs, source_reads

    reads = [Read("recipe", target), *recipe_reads(recipe)] if recipe is not None else source_reads(target)
    reads += [Read("prompt file (--prompts)", prompts)] if prompts is not None else []
    for run in compare or []:
        reads += source_reads(run, "run directory (--compare)")
    refuse_inputs("-o", outputs.values(), reads)
    pr.check_outputs(outputs, overwrite)  # refuse before any slow work
    if history:
        for run in [target, *(compare or [])]:
            if not run.is_dir():
                raise UserError(f"--compare: {run} is not a run directory")
            pr.list_snapshots(run)
    obs = RichObserver(quiet=json_out)
    obs.progress.start()
    try:
        if compare:
            result = pr.run_compare([target, *compare], split, max_images, output, device, observer=obs)
        else:
            result = pr.run_probe(pr.open_target(target, prompts, set_, device), split, max_images, history, output,
                               observer=obs)
    finally:
        obs.progress.stop()
    if json_out:
        print(json.dumps(result))
        return
    if compare:
        print(f"NMI per epoch (SPT eq. 7-8), {result['split']} split, {result['images']} images; mean over blocks:")
        for x in result["runs"]:
            first, last = x["nmi_mean"][0], x["nmi_mean"][-1]
            print(f"  {x['label']} ({x['method']}, init {x['prompt_init']}): epoch {x['epochs'][0]} "
                  f"{max(sum(first) / len(first), 0.0):.5f} -> epoch {x['epochs'][-1]} "
                  f"{max(sum(last) / len(last), 0.0):.5f}")
        print("-> " + ", ".join(result["outputs"].values()))
        return
    print(f"NMI(prompts; patch tokens), SPT eq. 7-8: {result['method']}, prompts {result['prompts']}, "
          f"{result['split']} split, {result['images']} images")
    if history:
        L = len(result["blocks"])
        print("epoch  " + " ".join(f"{f'block {b}':>9}" for b in result["blocks"]))
        for e, row in zip(result["epochs"], result["nmi_mean"]):
            print(f"{e:>5}  " + " ".join(f"{max(row[b], 0.0):>9.5f}" for b in range(L)))  # no -0.00000
    else:
        print("block  NMI mean   NMI std    saturated |P.E|>10")
        for b, m, sd, f in zip(result["blocks"], result["nmi_mean"], result["nmi_std"],
                               result["saturated_fraction"]):
            print(f"{b:>5}  {max(m, 0.0):.6f}  {sd:.6f}   {f:.3f}")
    print("-> " + ", ".join(result["outputs"].values()))


@app.command("eval", epilog="Examples:\n\n  vptool eval runs/quickstart\n\n"
             "  vptool eval runs/quickstart --split val --save-logits val_logits.npy --json")
@cli_errors
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `vptool train`.", show_default=False)],
    split: Annotated[str, typer.Option(help="test, val or train.")] = "test",
    save_logits: Annotated[Optional[Path], typer.Option(
        "--save-logits", help="Write float32 (N, K) logits in dataset order to FILE.npy.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --save-logits file.")] = False,
    device: Annotated[Optional[str], typer.Option(help="Override train.device (auto, cpu, cuda).")] = None,
    plots: Annotated[bool, typer.Option("--plots", help="Also write PNGs: the confusion matrix and, for gated "
                                        "prompts, the selection ratio per block (GateVPT Fig. 4).")] = False,
    last: Annotated[bool, typer.Option("--last", help="Evaluate checkpoints/last.pt (the latest epoch, not the "
                                       "best): the way to look at a run that has not finished.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rebuild a trained model from its run directory and report top-1/top-5 on a split.

    Writes RUN_DIR/eval/<split>.json (per-class accuracy, confusion matrix) and, for gated prompts,
    eval/gates.csv + gates.json (GateVPT eq. 10-11); a later eval of the same split replaces them.
    """
    if split not in ("train", "val", "test"):
        raise UserError(f"--split: {split!r} is not train, val or test")
    if save_logits is not None:
        from vptool.paths import refuse_inputs, source_reads

        refuse_inputs("--save-logits", save_logits, source_reads(run_dir))
        check_new_file(save_logits, "--save-logits", ".npy", overwrite)
    import numpy as np

    from vptool.engine.evaluate import (
        classification_report,
        eval_loader,
        load_run,
        method_report,
        predict,
        topk_accuracy,
        write_eval_report,
    )

    recipe, setup = load_run(run_dir, device, last=last)
    loader = eval_loader(setup, recipe, split)
    logits, labels = predict(setup.model, loader, setup.device, setup.amp_dtype)
    result = {"run_dir": str(run_dir), "split": split, "images": int(labels.shape[0]),
              "top1": topk_accuracy(logits, labels, 1), "top5": topk_accuracy(logits, labels, 5),
              **method_report(setup.model)}
    if setup.checkpoint is not None:
        result["checkpoint"] = {"path": str(Path(run_dir) / "checkpoints" / "last.pt"), **setup.checkpoint}
        split_name = f"{split}_last"
    else:
        split_name = split
    if not _is_main():  # under torchrun every rank has all the logits; rank 0 writes and prints
        return
    report = classification_report(logits, labels, setup.splits.classes)
    result["mean_per_class_accuracy"] = report["mean_per_class_accuracy"]
    if save_logits is not None:
        from vptool.paths import write_atomically

        arr = logits.numpy().astype(np.float32)

        def write_npy(tmp):
            with open(tmp, "wb") as fh:
                np.save(fh, arr)

        write_atomically(save_logits, write_npy)
        result["logits"] = str(save_logits)
    result["outputs"] = write_eval_report(run_dir, split_name, result, report, plots)
    if json_out:
        print(json.dumps(result))
    else:
        print(f"{split} top-1: {result['top1']:.2f}%  top-5: {result['top5']:.2f}%  mean per-class: "
              f"{result['mean_per_class_accuracy']:.2f}%  ({result['images']} images)")
        worst = sorted(((v, c) for c, v in report["per_class_accuracy"].items() if v is not None))[:3]
        print("lowest per-class accuracy: " + ", ".join(f"{c} {v:.1f}%" for v, c in worst))
        if "gates" in result:
            print(_gate_table(result))
        if "temperature" in result:
            print("temperature per block: " + " ".join(f"{t:.3f}" for t in result["temperature"]))
        if "mask_token" in result:
            print(f"[MASK] token: {result['mask_token']}")
        print("-> " + ", ".join(result["outputs"].values()))


SourceArg = Annotated[Path, typer.Argument(help="Run directory (runs/NAME) or adapter folder (export --format "
                                           "adapter).", show_default=False)]
BackboneOpt = Annotated[Optional[Path], typer.Option(
    "--backbone-checkpoint", help="The backbone checkpoint, when it has moved since training (its sha256 must "
                                  "match the one recorded).", show_default=False)]


@app.command(epilog="Examples:\n\n  vptool export runs/quickstart --format onnx -o quickstart.onnx\n\n"
             "  vptool export runs/quickstart --format adapter -o adapters/quickstart\n\n"
             "  vptool export runs/quickstart --format pt2 -o quickstart.pt2 --json | jq .max_abs_diff")
@cli_errors
def export(
    source: SourceArg,
    format: Annotated[str, typer.Option("--format", "-f", help="adapter (folder: adapter.safetensors, "
                                        "adapter_config.json, README.md model card) | onnx | pt2 (torch.export) | "
                                        "torchscript.", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output folder (adapter) or file (.onnx, .pt2, "
                                         ".pt).", show_default=False)],
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output (only once the new "
                                            "one is verified).")] = False,
    backbone_checkpoint: BackboneOpt = None,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Export a trained adapter: a portable folder, or the whole prompted model as one graph.

    onnx / pt2 / torchscript hold the frozen backbone, prompts, extra tokens, readout and head; input
    pixel_values (B, 3, H, W) with a dynamic batch, output logits (B, K). Each graph is run on a batch of the
    run's own images and must match PyTorch (max |diff logits| <= 1e-4, same argmax), else it is removed and
    the command exits 1.
    """
    from vptool.export import export as run_export

    _one_process("export")
    report = run_export(source, format, output, opset=opset, overwrite=overwrite,
                        backbone_checkpoint=backbone_checkpoint)
    if json_out:
        print(json.dumps(report))
        return
    line = f"{report['format']}: {report['output']} ({report['bytes'] / 1e6:.2f} MB, {report['classes']} classes)"
    if "max_abs_diff" in report:
        line += (f"; checked on {report['check_images']} at batch {' and '.join(map(str, report['batch_sizes']))}: "
                 f"max |diff logits| {report['max_abs_diff']:.2e}, same argmax")
    print(line)


@app.command(epilog="Examples:\n\n  vptool predict runs/quickstart digits/*.png\n\n"
             "  find photos -name '*.jpg' | vptool predict runs/birds - --json | jq -r '[.path, .classes[0]] | @tsv'"
             "\n\n  vptool predict quickstart.onnx images/ --csv -o predictions.csv --skip-bad")
@cli_errors
def predict(
    source: Annotated[Path, typer.Argument(help="Run directory, adapter folder, or an .onnx file from vptool export "
                                           "(run by onnxruntime alone).", show_default=False)],
    inputs: Annotated[list[str], typer.Argument(help="Image files, folders (searched recursively), or - for "
                                                "newline-separated paths on stdin.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per forward pass.")] = 64,
    json_lines: Annotated[bool, typer.Option("--json", help="JSON lines (the default): {path, classes, probs}.")
                          ] = False,
    csv_out: Annotated[bool, typer.Option("--csv", help="CSV: path, class_1, prob_1, ..., error.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the rows to FILE instead of stdout.",
                                                   show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file.")] = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Go on past unreadable images: they get a row with "
                                           "an error field, and their count goes to stderr.")] = False,
    backbone_checkpoint: BackboneOpt = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA when available), cpu, cuda, cuda:N.")] = None,
    debug: DebugOpt = False,
) -> None:
    """Classify images: one row per image with its top-k classes and probabilities.

    Images go through the model's own evaluation transform. Rows go to stdout (or -o), progress and messages
    to stderr. An unreadable image stops the command before any output (exit 2), unless --skip-bad.
    """
    _one_process("predict")
    if json_lines and csv_out:
        raise UserError("--json/--csv: choose one output format")
    if top_k < 1:
        raise UserError(f"--top-k: {top_k} must be at least 1")
    if batch_size < 1:
        raise UserError(f"--batch-size: {batch_size} must be at least 1")
    from vptool.engine.predict import run_predict

    obs = RichObserver(quiet=False)
    summary = run_predict(source, inputs, top_k=top_k, batch_size=batch_size, fmt="csv" if csv_out else "json",
                          output=output, skip_bad=skip_bad, backbone_checkpoint=backbone_checkpoint,
                          device=device, observer=obs, overwrite=overwrite)
    if summary["bad"]:
        err.print(f"{summary['bad']} of {summary['images']} images could not be read; their rows carry an error "
                  "field", markup=False)


def _gate_table(result: dict) -> str:
    """Gate values and GateVPT selection ratio (eq. 10-11) per block, one line each."""
    ratio = result["selection_ratio"]
    lines = ["block  gate      selection ratio (GateVPT eq. 11)"]
    for i, g in enumerate(result["gates"]):
        r = "n/a (all gates closed)" if ratio is None else f"{ratio[i]:.4f}"
        lines.append(f"{i + 1:>5}  {g:.4f}    {r}")
    return "\n".join(lines)


from vptool.cli_sweep import SWEEP_EPILOG, sweep_command  # noqa: E402  (the sweep command lives in its own module)

app.command("sweep", epilog=SWEEP_EPILOG)(cli_errors(single_process("sweep")(sweep_command)))


@app.command()
def version() -> None:
    """Print the vptool version."""
    print(__version__)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
