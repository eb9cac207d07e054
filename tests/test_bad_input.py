"""A battery of bad input and faults through the real CLI (``vptool train/eval/predict/export/...``).

Every row of ``CASES`` builds its input files in a fresh tmp dir (``Case.setup``), snapshots every path under
that dir (path -> sha256), runs one CLI call there (in this process with ``invoke_cli``; a few rows in a real
process, ``Case.how``) and checks the contract of ``vptool.cli``:

1. the exit code: 2 for bad input, 1 for a run that failed (a non-finite loss, a disk error), 0 for the few
   acceptance rows (``Case.code``);
2. stderr holds exactly one ``error:`` line (none for an acceptance row), at most ``MAX_LINE`` characters, and
   neither stream carries a ``Traceback``;
3. that line names every ``Case.needles`` substring (the key, the path or the value; ``{tmp}`` is the row's dir)
   and none of ``Case.absent``;
4. the bytes on disk: every path that existed before is still there, byte-identical; nothing new exists except
   what ``Case.allow_new`` names (globs relative to the tmp dir, e.g. the run dir of a failed run); no
   ``*.tmp*`` file is left anywhere.

Rows that need a finished run copy one tiny run trained once per module (``finished_run``). A row that shows
vptool breaking the contract is marked ``xfail(strict=True)`` with the reason; fixing vptool turns it into an
XPASS failure, and the mark goes.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import invoke_cli, run_cli, tiny_recipe, write_recipe
from PIL import Image

#: the CLI cuts every error line to this many characters (vptool.cli.MAX_LINE)
MAX_LINE = 300
#: the module's finished run is trained with these overrides (1 epoch, no warm-up)
SHORT = ("--set", "train.epochs=1", "--set", "train.warmup_epochs=0")


# --------------------------------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` (relative, posix) -> ``sha256:<hex>`` for a file, ``dir`` for a folder,
    ``link:<target>`` for a symlink (never followed: a link to /dev/full must not be read)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = f"link:{os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_unchanged(before: dict[str, str], after: dict[str, str], allowed_new: tuple[str, ...] = ()) -> None:
    """Every path of ``before`` is in ``after`` with the same bytes; every new path matches an ``allowed_new``
    glob; no temporary file (``*.tmp*``) is left, allowed or not."""
    changed = {p: (v, after.get(p, "<gone>")) for p, v in before.items() if after.get(p) != v}
    assert not changed, f"pre-existing paths changed or removed: {changed}"
    new = sorted(set(after) - set(before))
    stray = [p for p in new if not any(fnmatch.fnmatch(p, g) for g in allowed_new)]
    assert not stray, f"new paths the row does not allow: {stray}"
    temps = [p for p in after if ".tmp" in p.rsplit("/", 1)[-1]]
    assert not temps, f"half-written temporary files left: {temps}"


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


@dataclass
class Ctx:
    """What a row's setup gets: its tmp dir, the module's finished run, and cleanups run after the call."""

    tmp: Path
    finished: Path
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def p(self, rel: str) -> str:
        return str(self.tmp / rel)

    def recipe(self, name: str = "tiny.yaml", **sections) -> str:
        """The tiny recipe (output.dir = tmp/runs), sections merged over it."""
        return str(write_recipe(self.tmp, tiny_recipe(self.tmp, **sections), name))

    def text(self, rel: str, text: str) -> str:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return str(path)

    def run(self, rel: str = "run", finished: bool = True) -> str:
        """A copy of the module's finished run at ``tmp/rel`` (``finished=False``: without summary.json)."""
        dest = self.tmp / rel
        shutil.copytree(self.finished, dest)
        if not finished:
            (dest / "summary.json").unlink()
        return str(dest)

    def image(self, rel: str = "ok.png") -> str:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)).save(path)
        return str(path)


@dataclass(frozen=True)
class Case:
    """One row: ``setup(ctx) -> CLI args`` (it writes the row's input files), and what the call must give."""

    id: str
    setup: Callable[[Ctx], list[str]]
    needles: tuple[str, ...] = ()
    code: int = 2
    allow_new: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    check: Callable[[Ctx, Outcome], None] | None = None
    how: str = "inproc"  # inproc: invoke_cli; process: run_cli (fresh interpreter); fsize: process, RLIMIT_FSIZE
    stdin: str | None = None
    slow: bool = False  # a row whose setup exports a whole graph

    @property
    def ok(self) -> bool:
        return self.code == 0


def xfail(case: Case, reason: str):
    """A row vptool fails today (see the module docstring)."""
    return pytest.param(case, id=case.id, marks=pytest.mark.xfail(strict=True, reason=reason))


def train(*sets: str, extra: tuple[str, ...] = (), **sections) -> Callable[[Ctx], list[str]]:
    """``train tmp/tiny.yaml [--set S]... EXTRA`` with the tiny recipe (``sections`` merged over it)."""

    def setup(ctx: Ctx) -> list[str]:
        args = ["train", ctx.recipe(**sections)]
        for s in sets:
            args += ["--set", s]
        return args + list(extra)

    return setup


def dry(*sets: str) -> Callable[[Ctx], list[str]]:
    return train(*sets, extra=("--dry-run", "--json"))


def train_text(text: str, name: str = "r.yaml") -> Callable[[Ctx], list[str]]:
    """``train FILE`` where FILE holds ``text`` (raw YAML: duplicate keys, aliases, nesting)."""
    return lambda ctx: ["train", ctx.text(name, text)]


def on_run(*args: str, finished: bool = True, image: bool = False) -> Callable[[Ctx], list[str]]:
    """``args[0] tmp/run args[1:]`` on a copy of the finished run (``{img}`` in args: a valid PNG)."""

    def setup(ctx: Ctx) -> list[str]:
        run = ctx.run(finished=finished)
        img = ctx.image() if image else ""
        return [args[0], run, *(a.replace("{img}", img).replace("{tmp}", str(ctx.tmp)) for a in args[1:])]

    return setup


def damaged_run(name: str, how: str, *args: str) -> Callable[[Ctx], list[str]]:
    """A copy of the finished run with ``name`` truncated to half (``how='truncate'``), replaced by random bytes
    (``'random'``) or removed (``'remove'``); then ``args`` as in ``on_run``."""

    def setup(ctx: Ctx) -> list[str]:
        out = on_run(*args, image=True)(ctx)
        f = ctx.tmp / "run" / name
        if how == "truncate":
            data = f.read_bytes()
            f.write_bytes(data[:len(data) // 2])
        elif how == "random":
            f.write_bytes(np.random.default_rng(0).bytes(300))
        else:
            f.unlink()
        return out

    return setup


def edited_run_recipe(old: str, new: str, *args: str) -> Callable[[Ctx], list[str]]:
    def setup(ctx: Ctx) -> list[str]:
        out = on_run(*args)(ctx)
        f = ctx.tmp / "run" / "recipe.yaml"
        text = f.read_text()
        assert old in text
        f.write_text(text.replace(old, new))
        return out

    return setup


# --------------------------------------------------------------------------------------------------- setups
def dry_json_lr(value: float) -> Callable[[Ctx, Outcome], None]:
    def check(ctx: Ctx, out: Outcome) -> None:
        lr = json.loads(out.stdout)["recipe"]["train"]["lr"]
        assert isinstance(lr, float) and lr == value, lr

    return check


def checkpoint_file(payload) -> Callable[[Ctx], list[str]]:
    """``backbone.checkpoint`` = a torch.save of ``payload`` (a non-tensor global: numpy, a custom class)."""

    def setup(ctx: Ctx) -> list[str]:
        path = ctx.tmp / "ckpt.pth"
        torch.save(payload, path)
        return ["train", ctx.recipe(backbone={"checkpoint": str(path)})]

    return setup


def checkpoint_bytes(kind: str) -> Callable[[Ctx], list[str]]:
    """``backbone.checkpoint`` = a truncated timm .safetensors (``truncated``) or random bytes (``random``)."""

    def setup(ctx: Ctx) -> list[str]:
        from safetensors.torch import save

        if kind == "truncated":
            path = ctx.tmp / "vit.safetensors"
            data = save({"cls_token": torch.zeros(1, 1, 32), "pos_embed": torch.zeros(1, 17, 32)})
            path.write_bytes(data[:len(data) // 2])
        else:
            path = ctx.tmp / "vit.pth"
            path.write_bytes(np.random.default_rng(1).bytes(4096))
        return ["train", ctx.recipe(backbone={"checkpoint": str(path)})]

    return setup


class Payload:
    """A custom class in a checkpoint: unpickling it would run this module's code."""


def imagefolder_with_corrupt_image(ctx: Ctx) -> list[str]:
    root = ctx.tmp / "images"
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(6):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    return ["train", ctx.recipe(data={"dataset": "imagefolder", "root": str(root), "val_fraction": 0.25},
                                train={"epochs": 1, "warmup_epochs": 0})]


def check_run_unfinished(ctx: Ctx, out: Outcome) -> None:
    run = ctx.tmp / "runs" / "tiny"
    assert (run / "recipe.yaml").is_file() and not (run / "summary.json").exists()


def existing_run(finished: bool) -> Callable[[Ctx], list[str]]:
    """tmp/tiny.yaml whose run dir (tmp/runs/tiny) already exists, finished or not; plain ``train``."""

    def setup(ctx: Ctx) -> list[str]:
        ctx.run("runs/tiny", finished=finished)
        return ["train", ctx.recipe(train={"epochs": 1, "warmup_epochs": 0})]

    return setup


def foreign_run_dir(ctx: Ctx) -> list[str]:
    ctx.text("runs/tiny/notes.txt", "my own files\n")
    return ["train", ctx.recipe()]


def resume_changed_lr(ctx: Ctx) -> list[str]:
    ctx.run("runs/tiny", finished=False)
    return ["train", ctx.recipe(train={"epochs": 1, "warmup_epochs": 0}), "--resume", "--set", "train.lr=0.3"]


def resume_bad_checkpoint(ctx: Ctx) -> list[str]:
    run = Path(ctx.run(finished=False))
    ck = run / "checkpoints" / "last.pt"
    data = ck.read_bytes()
    ck.write_bytes(data[:len(data) // 2])
    return ["train", str(run), "--resume"]


def lock_held(ctx: Ctx) -> list[str]:
    """Hold ``<output.dir>/.tiny.lock`` (flock LOCK_EX) in this process while the CLI runs in another one."""
    (ctx.tmp / "runs").mkdir()
    fd = os.open(ctx.tmp / "runs" / ".tiny.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    ctx.cleanups.append(lambda: os.close(fd))
    return ["train", ctx.recipe()]


def scan_run_finite(ctx: Ctx, out: Outcome) -> None:
    """After a non-finite loss: every tensor the run left on disk is finite and metrics.jsonl is strict JSON."""
    from safetensors.torch import load_file

    run = ctx.tmp / "runs" / "tiny"
    assert run.is_dir()

    def refuse(name: str):
        raise ValueError(f"metrics.jsonl holds {name}")

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for v in obj.values():
                yield from tensors(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                yield from tensors(v)

    for f in run.rglob("*"):
        if f.suffix == ".safetensors":
            for k, t in load_file(str(f)).items():
                assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f}: {k} is not finite"
        elif f.name == "last.pt":
            for t in tensors(torch.load(f, map_location="cpu", weights_only=True)):
                assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f}: a tensor is not finite"
        elif f.name == "metrics.jsonl":
            for line in f.read_text().splitlines():
                json.loads(line, parse_constant=refuse)
                assert all(not isinstance(v, float) or math.isfinite(v) for v in json.loads(line).values())


def predict_stdin(ctx: Ctx) -> list[str]:
    return ["predict", ctx.run(), "-"]


def g16_image(ctx: Ctx) -> list[str]:
    a = np.zeros((16, 16), np.uint16)
    a[:8], a[8:] = 65535, 32768
    Image.fromarray(a).save(ctx.tmp / "g16.png")
    return ["predict", ctx.run(), ctx.p("g16.png")]


def check_one_row(ctx: Ctx, out: Outcome) -> None:
    rows = [json.loads(x) for x in out.stdout.splitlines() if x.strip()]
    assert len(rows) == 1 and len(rows[0]["classes"]) == 5, out.stdout


def check_eval_last(ctx: Ctx, out: Outcome) -> None:
    result = json.loads(out.stdout)
    assert result["checkpoint"]["epoch"] == 1 and result["images"] == 360


def init_prompts_existing(ctx: Ctx) -> list[str]:
    target = ctx.text("p.safetensors", "not mine to replace")
    return ["init-prompts", ctx.recipe(), "-o", target]


def export_existing(ctx: Ctx) -> list[str]:
    ctx.text("adapter/keep.txt", "keep me")
    return ["export", ctx.run(), "--format", "adapter", "-o", ctx.p("adapter")]


def predict_existing_output(ctx: Ctx) -> list[str]:
    return ["predict", ctx.run(), ctx.image(), "-o", ctx.text("rows.jsonl", "old rows\n")]


def predict_empty_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "empty").mkdir()
    return ["predict", ctx.run(), ctx.p("empty")]


def predict_truncated_png(ctx: Ctx) -> list[str]:
    data = Path(ctx.image("whole.png")).read_bytes()
    (ctx.tmp / "cut.png").write_bytes(data[:len(data) // 2])
    return ["predict", ctx.run(), ctx.p("cut.png")]


def predict_not_image(ctx: Ctx) -> list[str]:
    return ["predict", ctx.run(), ctx.text("notes.png", "just text\n")]


class RunsCode:
    """Unpickling this runs ``os.system`` (it would create the file ``marker``); torch's tensor-only loader must
    refuse it, and vptool must name the global without suggesting ``weights_only=False``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def code_checkpoint(legacy: bool) -> Callable[[Ctx], list[str]]:
    """``backbone.checkpoint`` = a .pth whose pickle calls ``os.system`` (torch's zip format, or a plain pickle)."""

    def setup(ctx: Ctx) -> list[str]:
        import pickle

        path = ctx.tmp / "ckpt.pth"
        payload = {"w": torch.zeros(2), "x": RunsCode(ctx.tmp / "pwned")}
        if legacy:
            path.write_bytes(pickle.dumps(payload, protocol=2))
        else:
            torch.save(payload, path)
        return ["train", ctx.recipe(backbone={"checkpoint": str(path)})]

    return setup


def resume_code_checkpoint(ctx: Ctx) -> list[str]:
    run = Path(ctx.run(finished=False))
    torch.save({"format": 1, "adapter": RunsCode(ctx.tmp / "pwned")}, run / "checkpoints" / "last.pt")
    return ["train", str(run), "--resume"]


def predict_onnx_over_itself(ctx: Ctx) -> list[str]:
    """The issue's case: ``vptool predict M.onnx img.png -o M.onnx --overwrite`` on a real export."""
    model = ctx.tmp / "M.onnx"
    res = invoke_cli("export", ctx.run(), "--format", "onnx", "-o", str(model))
    assert res.exit_code == 0, res.output
    return ["predict", str(model), ctx.image("img.png"), "-o", str(model), "--overwrite"]


def recipe_folder(ctx: Ctx) -> list[str]:
    (ctx.tmp / "folder").mkdir()
    return ["train", ctx.p("folder")]


def recipe_binary(ctx: Ctx) -> list[str]:
    (ctx.tmp / "r.yaml").write_bytes(bytes(range(256)) * 4)
    return ["train", ctx.p("r.yaml")]


DUPLICATE_KEYS = """\
method: vpt-deep
seed: 0
train:
  epochs: 2
  lr: 0.5
backbone:
  name: vit_tiny_patch16_224
  pretrained: false
train:
  warmup_epochs: 1
"""
ALIAS_BOMB = "".join(f"{k}: &{k} [{', '.join([f'*{p}' if p else '1'] * 9)}]\n"
                     for k, p in zip("abcdefg", ["", *"abcdef"])) + "method: *g\n"
NESTED_50 = "method: " + "[" * 50 + "]" * 50 + "\n"
NESTED_5000 = "method: " + "[" * 5000 + "\n"
NO_METHOD = yaml.safe_dump({k: v for k, v in tiny_recipe(Path("runs")).items() if k != "method"})


CASES = [
    # ---- --set values: accepted (YAML 1.2 floats) and refused (before anything is written)
    Case("set-lr-1e-3-is-float", dry("train.lr=1e-3"), code=0, check=dry_json_lr(0.001)),
    Case("set-lr-1e12-is-float", dry("train.lr=1e12"), code=0, check=dry_json_lr(1e12)),
    Case("set-lr-.5-is-float", dry("train.lr=.5"), code=0, check=dry_json_lr(0.5)),
    Case("set-lr-inf", train("train.lr=.inf"), ("train.lr", "finite")),
    Case("set-lr-nan", train("train.lr=.nan"), ("train.lr", "finite")),
    Case("set-lr-1e400-overflows", train("train.lr=1e400"), ("train.lr", "finite")),
    Case("set-lr-negative", train("train.lr=-1e-3"), ("train.lr", "-0.001")),
    Case("set-lr-not-a-number", train("train.lr=1e-3x"), ("train.lr", "1e-3x")),
    Case("set-momentum-negative", train("train.momentum=-0.5"), ("train.momentum", "-0.5")),
    Case("set-split-seed-negative", train("data.split_seed=-1"), ("data.split_seed", "-1")),
    Case("set-seed-past-2**32", train("seed=5000000000"), ("seed: 5000000000",)),
    Case("set-depth-negative", train("backbone.kwargs.depth=-1"), ("backbone.kwargs.depth",)),
    Case("set-mlp-ratio-negative", train("backbone.kwargs.mlp_ratio=-1"), ("backbone.kwargs.mlp_ratio",)),
    Case("set-kwargs-unknown", train("backbone.kwargs.bogus=1"), ("backbone.kwargs", "bogus")),
    Case("set-prompt-length-huge-dry-run", dry("prompt.length=100000000"), ("prompt.length", "GiB")),
    Case("set-prompt-length-huge-train", train("prompt.length=100000000"), ("prompt.length", "GiB")),
    Case("set-prompt-length-0", train("prompt.length=0"), ("prompt.length: 0", "train.tune: head")),
    Case("set-prompt-length-negative", train("prompt.length=-1"), ("prompt.length", "minimum 0")),
    Case("set-batch-size-0", train("data.batch_size=0"), ("data.batch_size", "minimum 1")),
    Case("set-num-workers-negative", train("data.num_workers=-1"), ("data.num_workers",)),
    Case("set-warmup-not-below-epochs", train("train.warmup_epochs=2"), ("train.warmup_epochs", "train.epochs")),
    Case("set-dropout-1.5", train("prompt.dropout=1.5"), ("prompt.dropout", "1.5")),
    Case("set-val-fraction-0", train("data.val_fraction=0"), ("data.val_fraction",)),
    Case("set-weight-decay-negative", train("train.weight_decay=-1"), ("train.weight_decay",)),
    Case("set-temperature-min-0", train("attention.temperature_min=0"), ("attention.temperature_min",)),
    Case("set-num-classes-wrong", train("data.num_classes=5"), ("data.num_classes", "10")),
    Case("set-task-on-digits", train("data.task=cub"), ("data.task",)),
    Case("set-init-file-missing-key", train("prompt.init=file"), ("prompt.init_file",)),
    Case("set-init-file-not-found", train("prompt.init=file", "prompt.init_file=/nonexistent/p.safetensors"),
         ("prompt.init_file", "/nonexistent/p.safetensors")),
    Case("set-readout-mask-without-token", train("readout.pool=mask"), ("readout.pool", "tokens.mask")),
    Case("set-token-order-bad", train("tokens.order=XYZ"), ("tokens.order", "XYZ")),
    Case("set-output-name-slash", train("output.name=a/b"), ("output.name", "a/b")),
    Case("set-output-dir-is-file", lambda ctx: ["train", ctx.recipe(output={"dir": ctx.text("afile", "x")})],
         ("output.dir", "{tmp}/afile")),
    Case("set-device-tpu", train("train.device=tpu"), ("train.device", "tpu")),
    Case("set-device-cuda-x", train("train.device=cuda:x"), ("train.device", "cuda:x")),
    Case("set-device-cuda-99", train("train.device=cuda:99"), ("train.device", "cuda:99")),
    Case("set-unknown-key", train("train.lrr=0.1"), ("train.lrr", "did you mean train.lr")),
    Case("set-epochs-abc", train("train.epochs=abc"), ("train.epochs", "expected int")),
    Case("set-epochs-float", train("train.epochs=1e3"), ("train.epochs", "expected int")),
    Case("set-mode-typo", train("prompt.mode=deeep"), ("prompt.mode", "did you mean 'deep'")),
    Case("set-optimizer-typo", train("train.optimizer=adam"), ("train.optimizer", "'adamw'")),
    Case("set-method-unknown", train("method=vpt-deeep"), ("method", "did you mean 'vpt-deep'")),
    Case("set-backbone-format-unknown", train("backbone.format=foo"), ("backbone.format", "'foo'")),
    Case("set-backbone-name-unknown", train("backbone.name=vit_nonexistent_model"),
         ("backbone.name", "vit_nonexistent_model")),
    Case("set-dataset-unknown", train("data.dataset=foo"), ("data.dataset", "'foo'")),
    Case("set-imagefolder-without-root", train("data.dataset=imagefolder"), ("data.root", "imagefolder")),
    Case("set-cub-root-missing", train("data.dataset=cub200", "data.root=/nonexistent/cub"),
         ("data.root", "/nonexistent/cub")),
    Case("set-without-equals", train("train.lr"), ("train.lr", "KEY=VALUE")),
    Case("set-empty-key-part", train(".lr=1"), (".lr=1", "KEY=VALUE")),
    Case("set-value-then-mapping", train("train=1", "train.lr=0.1"), ("--set", "train is set twice")),
    Case("set-duplicate-key-in-value", train("train={lr: 1, lr: 2}"), ("--set", "'lr' appears twice")),
    # ---- the recipe file itself
    Case("recipe-missing", lambda ctx: ["train", ctx.p("nope.yaml")], ("{tmp}/nope.yaml", "not found")),
    Case("recipe-is-folder", recipe_folder, ("{tmp}/folder", "is a folder, not a recipe")),
    Case("recipe-is-a-list", train_text("- method\n- vpt-deep\n"), ("{tmp}/r.yaml", "mapping", "list")),
    Case("recipe-bad-syntax", train_text("method: [\n  foo: : bar\n"), ("{tmp}/r.yaml", "line 2", "YAML syntax")),
    Case("recipe-binary", recipe_binary, ("{tmp}/r.yaml", "cannot read")),
    Case("recipe-missing-method", train_text(NO_METHOD), ("method", "missing required key")),
    Case("recipe-duplicate-keys", train_text(DUPLICATE_KEYS), ("{tmp}/r.yaml", "'train'", "lines 3 and 9")),
    Case("recipe-alias-bomb", train_text(ALIAS_BOMB), ("{tmp}/r.yaml", "aliases")),
    Case("recipe-nested-50", train_text(NESTED_50), ("{tmp}/r.yaml", "nested")),
    Case("recipe-nested-5000-open", train_text(NESTED_5000), ("{tmp}/r.yaml", "nested")),
    # ---- backbone checkpoints
    Case("ckpt-missing", train(backbone={"checkpoint": "/nonexistent/vit.safetensors"}),
         ("backbone.checkpoint", "/nonexistent/vit.safetensors")),
    Case("ckpt-truncated", checkpoint_bytes("truncated"), ("backbone.checkpoint", "{tmp}/vit.safetensors")),
    Case("ckpt-random-bytes", checkpoint_bytes("random"), ("backbone.checkpoint", "{tmp}/vit.pth")),
    Case("ckpt-numpy-global", checkpoint_file({"w": np.zeros(3)}),
         ("backbone.checkpoint", "{tmp}/ckpt.pth", "asks to run code or load a non-tensor object", "numpy"),
         absent=("weights_only=False",)),
    Case("ckpt-custom-class", checkpoint_file({"w": Payload()}),
         ("backbone.checkpoint", "asks to run code or load a non-tensor object", "Payload"),
         absent=("weights_only=False",)),
    Case("ckpt-pickle-runs-code", code_checkpoint(legacy=False),
         ("backbone.checkpoint", "{tmp}/ckpt.pth", "posix.system", "holds code as well as tensors"),
         absent=("weights_only=False", "weights_only` set to `False")),
    Case("ckpt-legacy-pickle-runs-code", code_checkpoint(legacy=True),
         ("backbone.checkpoint", "{tmp}/ckpt.pth", "posix.system", "holds code as well as tensors"),
         absent=("weights_only=False", "weights_only` set to `False")),
    Case("train-resume-checkpoint-runs-code", resume_code_checkpoint,
         ("{tmp}/run/checkpoints/last.pt", "posix.system", "holds code as well as tensors"),
         absent=("weights_only=False", "weights_only` set to `False")),
    # ---- an output is never one of the command's inputs, --overwrite or not (the three found by hand)
    Case("export-adapter-over-its-own-run", on_run("export", "--format", "adapter", "-o", "{tmp}/run", "--overwrite"),
         ("-o", "{tmp}/run is the run directory {tmp}/run")),
    Case("predict-onnx-rows-over-the-model", predict_onnx_over_itself,
         ("-o", "{tmp}/M.onnx is the model file {tmp}/M.onnx"), slow=True),
    Case("sweep-grid-value-not-a-number", lambda ctx: ["sweep", ctx.recipe(), "--grid", "train.lr=abc,0.1"],
         ("--grid train.lr=abc", "train.lr", "abc")),
    # ---- data read at training time: the run dir then exists, unfinished
    Case("imagefolder-corrupt-image", imagefolder_with_corrupt_image, ("{tmp}/images/train/a/broken.png",),
         allow_new=("runs", "runs/*"), check=check_run_unfinished),
    # ---- the run directory: state, resume, lock
    Case("train-over-unfinished-run", existing_run(finished=False), ("has not finished", "--resume", "--overwrite")),
    Case("train-over-finished-run", existing_run(finished=True), ("{tmp}/runs/tiny", "already exists")),
    Case("train-over-foreign-folder", foreign_run_dir, ("{tmp}/runs/tiny", "not a vptool run directory")),
    Case("train-resume-nothing", train(extra=("--resume",)), ("--resume", "{tmp}/runs/tiny", "does not exist")),
    Case("train-overwrite-resume-nothing", train(extra=("--overwrite", "--resume")), ("--resume",)),
    Case("train-resume-changed-lr", resume_changed_lr, ("--resume", "train.lr", "0.3")),
    Case("train-resume-bad-checkpoint", resume_bad_checkpoint, ("{tmp}/run/checkpoints/last.pt", "cannot read")),
    Case("train-run-dir-without-resume", on_run("train"), ("{tmp}/run", "--resume")),
    Case("train-resume-folder-without-recipe", lambda ctx: ["train", str(ctx.tmp), "--resume"],
         ("{tmp}", "no recipe.yaml")),
    Case("train-lock-held", lock_held, ("lock", "{tmp}/runs/.tiny.lock"), how="process"),
    # ---- run failures (exit 1)
    Case("train-nan-loss", train("train.lr=1e38", "train.warmup_epochs=0"), ("non-finite", "train.lr"), code=1,
         allow_new=("runs", "runs/*"), check=scan_run_finite),
    Case("train-nan-adamw", train("train.lr=1e38", "train.warmup_epochs=0", "train.optimizer=adamw"),
         ("non-finite", "train.lr"), code=1, allow_new=("runs", "runs/*"), check=scan_run_finite),
    Case("train-output-dir-unwritable", train("output.dir=/proc/vptool-runs"), ("/proc/vptool-runs",), code=1),
    Case("train-file-size-limit", train("train.epochs=1", "train.warmup_epochs=0"), ("last.pt", "File too large"),
         code=1, allow_new=("runs", "runs/*"), how="fsize"),
    Case("eval-save-logits-unwritable", on_run("eval", "--save-logits", "/proc/x.npy"), ("/proc/x.npy",), code=1),
    Case("eval-save-logits-file-size-limit", on_run("eval", "--save-logits", "{tmp}/logits.npy"),
         ("logits.npy", "write failed", "check free disk space"), code=1, how="fsize"),
    Case("predict-output-unwritable", on_run("predict", "{img}", "-o", "/proc/rows.csv", image=True),
         ("rows.csv",), code=1),
    # ---- eval
    Case("eval-device-tpu", on_run("eval", "--device", "tpu"), ("tpu",)),
    Case("eval-truncated-summary", damaged_run("summary.json", "truncate", "eval"), ("{tmp}/run/summary.json",)),
    Case("eval-truncated-adapter-config", damaged_run("adapter_config.json", "truncate", "eval"),
         ("{tmp}/run/adapter_config.json",)),
    Case("eval-random-adapter", damaged_run("adapter.safetensors", "random", "eval"),
         ("{tmp}/run/adapter.safetensors",)),
    Case("eval-missing-adapter", damaged_run("adapter.safetensors", "remove", "eval"), ("adapter.safetensors",)),
    Case("eval-bad-value-in-run-recipe", edited_run_recipe("lr: 0.5", "lr: -1", "eval"),
         ("{tmp}/run/recipe.yaml", "train.lr")),
    Case("eval-unfinished", on_run("eval", finished=False), ("has not finished", "--resume")),
    Case("eval-last-of-unfinished", on_run("eval", "--last", "--json", finished=False), code=0,
         allow_new=("run/eval", "run/eval/*"), check=check_eval_last),
    Case("eval-last-without-checkpoint", damaged_run("checkpoints/last.pt", "remove", "eval", "--last"),
         ("last.pt", "not found")),
    Case("eval-not-found", lambda ctx: ["eval", ctx.p("nothere")], ("{tmp}/nothere", "not found")),
    Case("eval-of-recipe-file", lambda ctx: ["eval", ctx.recipe()], ("{tmp}/tiny.yaml", "is a recipe")),
    Case("eval-folder-without-recipe", lambda ctx: ["eval", str(ctx.tmp)], ("{tmp}", "no recipe.yaml")),
    Case("eval-split-foo", on_run("eval", "--split", "foo"), ("--split", "'foo'")),
    Case("eval-save-logits-no-folder", on_run("eval", "--save-logits", "{tmp}/no/such/x.npy"),
         ("--save-logits", "{tmp}/no/such")),
    Case("eval-save-logits-suffix", on_run("eval", "--save-logits", "{tmp}/x.txt"), ("--save-logits", ".npy")),
    # ---- predict
    Case("predict-device-tpu", on_run("predict", "{img}", "--device", "tpu", image=True), ("tpu",)),
    Case("predict-16-bit-png", g16_image, code=0, check=check_one_row),
    Case("predict-missing-image", on_run("predict", "{tmp}/missing.png"), ("{tmp}/missing.png",)),
    Case("predict-not-an-image", predict_not_image, ("{tmp}/notes.png", "cannot read image")),
    Case("predict-truncated-png", predict_truncated_png, ("{tmp}/cut.png", "cannot read image")),
    Case("predict-empty-folder", predict_empty_folder, ("{tmp}/empty", "no image file")),
    Case("predict-stdin-missing-path", predict_stdin, ("{tmp}/gone.png",), how="process", stdin="{tmp}/gone.png\n"),
    Case("predict-top-k-0", on_run("predict", "{img}", "--top-k", "0", image=True), ("--top-k", "0")),
    Case("predict-batch-size-0", on_run("predict", "{img}", "--batch-size", "0", image=True), ("--batch-size",)),
    Case("predict-json-and-csv", on_run("predict", "{img}", "--json", "--csv", image=True), ("--json/--csv",)),
    Case("predict-output-exists", predict_existing_output, ("-o", "{tmp}/rows.jsonl", "already exists")),
    Case("predict-truncated-adapter-config", damaged_run("adapter_config.json", "truncate", "predict", "{img}"),
         ("{tmp}/run/adapter_config.json",)),
    Case("predict-source-not-a-run", lambda ctx: ["predict", str(ctx.tmp), ctx.image()],
         ("{tmp}", "adapter_config.json")),
    Case("predict-top-k-not-int", on_run("predict", "{img}", "--top-k", "abc", image=True), ("--top-k", "--help")),
    # ---- export, init-prompts, probe-nmi
    Case("export-format-foo", on_run("export", "--format", "foo", "-o", "{tmp}/x.onnx"), ("--format", "'foo'")),
    Case("export-onnx-suffix", on_run("export", "--format", "onnx", "-o", "{tmp}/x.pt2"), ("-o", ".onnx")),
    Case("export-output-exists", export_existing, ("-o", "{tmp}/adapter", "already exists")),
    Case("export-source-missing", lambda ctx: ["export", ctx.p("nothere"), "--format", "adapter", "-o",
                                               ctx.p("out")], ("{tmp}/nothere", "not found")),
    Case("export-truncated-adapter-config",
         damaged_run("adapter_config.json", "truncate", "export", "--format", "adapter", "-o", "{tmp}/out"),
         ("{tmp}/run/adapter_config.json",)),
    Case("init-prompts-output-exists", init_prompts_existing, ("-o", "{tmp}/p.safetensors", "already exists")),
    Case("init-prompts-output-suffix", lambda ctx: ["init-prompts", ctx.recipe(), "-o", ctx.p("p.npy")],
         ("-o", ".safetensors")),
    Case("init-prompts-fraction-2", lambda ctx: ["init-prompts", ctx.recipe(), "-o", ctx.p("p.safetensors"),
                                                 "--fraction", "2"], ("--fraction", "2")),
    Case("init-prompts-strategy-foo", lambda ctx: ["init-prompts", ctx.recipe(), "-o", ctx.p("p.safetensors"),
                                                   "--strategy", "foo"], ("--strategy", "'foo'")),
    Case("probe-nmi-split-foo", on_run("probe-nmi", "--split", "foo"), ("--split", "'foo'")),
    Case("probe-nmi-max-images-0", on_run("probe-nmi", "--max-images", "0"), ("--max-images",)),
    Case("probe-nmi-compare-without-history", on_run("probe-nmi", "--compare", "{tmp}/run"), ("--compare",)),
    Case("probe-nmi-prompts-missing", on_run("probe-nmi", "--prompts", "{tmp}/p.safetensors"),
         ("--prompts", "{tmp}/p.safetensors")),
    Case("train-unknown-option", train(extra=("--bogus",)), ("--bogus", "vptool train --help")),
]


# --------------------------------------------------------------------------------------------------- running
def _run(case: Case, ctx: Ctx, args: list[str]) -> Outcome:
    stdin = case.stdin.replace("{tmp}", str(ctx.tmp)) if case.stdin is not None else None
    if case.how == "inproc":
        res = invoke_cli(*args, cwd=ctx.tmp)
        return Outcome(res.exit_code, res.stdout, res.stderr)
    if case.how == "process":
        proc = run_cli(*args, cwd=ctx.tmp, input=stdin)
        return Outcome(proc.returncode, proc.stdout, proc.stderr)
    assert case.how == "fsize"

    def limit() -> None:  # files above 8 KiB cannot be written (checkpoints/last.pt is ~22 KiB): EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))

    proc = subprocess.run([sys.executable, "-m", "vptool", *args], capture_output=True, text=True, cwd=ctx.tmp,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300, preexec_fn=limit)
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One finished tiny run (1 epoch), copied by the rows that need a run directory."""
    tmp = tmp_path_factory.mktemp("finished")
    res = invoke_cli("train", str(write_recipe(tmp, tiny_recipe(tmp))), *SHORT, "--json", cwd=tmp)
    assert res.exit_code == 0, res.output
    run = tmp / "runs" / "tiny"
    assert (run / "summary.json").is_file() and (run / "checkpoints" / "last.pt").is_file()
    return run


def test_battery_has_enough_rows():
    ids = [c.values[0].id if hasattr(c, "values") else c.id for c in CASES]
    assert len(ids) >= 60 and len(set(ids)) == len(ids)


def _lane(c, debug: bool = False):
    """Rows that start a fresh interpreter (a lock held by another process, a file-size limit) or export a graph run
    in the slow lane. ``debug``: the row again with ``--debug`` (same exit code and line, plus the traceback)."""
    case = c.values[0] if hasattr(c, "values") else c
    marks = list(c.marks) if hasattr(c, "marks") else []
    if case.how != "inproc" or case.slow:
        marks.append(pytest.mark.slow)
    return pytest.param(case, debug, id=case.id + ("-debug" if debug else ""), marks=marks)


@pytest.mark.parametrize("case,debug", [_lane(c) for c in CASES] + [
    _lane(c, debug=True) for c in CASES if not (c.values[0] if hasattr(c, "values") else c).ok])
def test_bad_input(case: Case, debug: bool, tmp_path: Path, finished_run: Path):
    ctx = Ctx(tmp_path, finished_run)
    try:
        args = case.setup(ctx) + (["--debug"] if debug else [])
        before = snapshot(tmp_path)
        out = _run(case, ctx, args)
    finally:
        for fn in ctx.cleanups:
            fn()
    report = f"vptool {' '.join(args)} -> {out.code}\nstdout: {out.stdout[-2000:]}\nstderr: {out.stderr[-2000:]}"
    assert out.code == case.code, report
    if not debug:  # --debug adds the traceback, and keeps the exit code and the error line
        assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, report
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == (0 if case.ok else 1), report
    if not case.ok:
        line = errors[0]
        assert len(line) <= MAX_LINE, f"{len(line)} characters: {line[:400]}"
        for needle in case.needles:
            needle = needle.replace("{tmp}", str(tmp_path))
            assert needle in line, f"{needle!r} not named in {line!r}"
        for bad in case.absent:
            assert bad not in line, f"{bad!r} in {line!r}"
    check_unchanged(before, snapshot(tmp_path), case.allow_new)
    if case.check is not None:
        case.check(ctx, out)


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    """The image loader maps a 16-bit PNG's 0..65535 onto 0..255 (PIL's own convert would clip at 255)."""
    from vptool.data.files import checked_loader

    a = np.zeros((4, 6), np.uint16)
    a[0], a[1], a[2] = 65535, 32768, 257
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I;16")
    rgb = np.asarray(checked_loader(path))
    assert rgb.shape == (4, 6, 3) and rgb.dtype == np.uint8
    assert (rgb[0] == 255).all() and (rgb[1] == 128).all() and (rgb[2] == 1).all() and (rgb[3] == 0).all()
