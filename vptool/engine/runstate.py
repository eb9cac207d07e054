"""What keeps a run directory safe: its lock, its state, atomic checkpoints (with every RNG state: ``rng_state``),
signals, and a fault-injection hook.

Guarantees (README "Faults and resuming"):

- One ``vptool train`` per run directory at a time: an exclusive ``fcntl.flock`` on ``<output.dir>/.<name>.lock``,
  taken before anything else is written (and the file removed at the end); the kernel drops it when the process
  dies, even by SIGKILL, so a lock is never stale. A second train of the same run exits 2 at once, naming the
  lock file and the holder's pid.
- Every file is replaced atomically (temporary file, fsync, rename; ``write_bytes_durably``): a kill at any
  moment leaves either the old file or the new one, never half of one.
- ``--overwrite`` trains into the sibling ``<output.dir>/.<name>.overwrite`` and swaps it in only when the new run
  has finished (summary written): until then the old run is untouched, whatever happens to the new one.
  An interrupted replacement continues with ``--overwrite --resume``; a plain ``--overwrite`` starts it over.
- SIGINT / SIGTERM (``StopSignals``) let the current optimizer step finish (or abandon an evaluation), then the
  loop writes ``checkpoints/last.pt`` and exits 130 / 143 with one line naming ``--resume``. A second SIGINT exits
  at once (130); the previous ``last.pt`` is intact because of the atomic write.

``VPTOOL_FAULT`` is a test hook (``fault``): ``POINT:N[:SIGNAL]`` sends the process SIGNAL (default KILL) the N-th
time the loop reaches POINT (``step`` after an optimizer step, ``val`` after a validation batch, ``checkpoint``
half-way through writing ``last.pt``, ``test`` after a test batch); ``@R`` at the end limits it to torchrun rank R
(``step:3:KILL@1``); several hooks are comma-separated. Nothing happens without the variable.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vptool.errors import RunError, UserError

LOCK_SUFFIX = ".lock"
OVERWRITE_SUFFIX = ".overwrite"
OLD_SUFFIX = ".replaced"
CHECKPOINT = Path("checkpoints") / "last.pt"
CHECKPOINT_FORMAT = 1


class Interrupted(RunError):
    """Training stopped by SIGINT (exit 130) or SIGTERM (exit 143) after writing ``last.pt``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


# --------------------------------------------------------------------------------------------------- faults
_fault_counts: dict[str, int] = {}


def reset_faults() -> None:
    """Start counting ``VPTOOL_FAULT`` points from zero (each train call counts its own)."""
    _fault_counts.clear()


def fault(point: str) -> None:
    """The ``VPTOOL_FAULT`` test hook (see the module docstring); a no-op unless the variable names ``point``."""
    spec = os.environ.get("VPTOOL_FAULT")
    if not spec:
        return
    _fault_counts[point] = _fault_counts.get(point, 0) + 1
    rank = os.environ.get("RANK", "0") or "0"
    for item in spec.split(","):
        item, _, only = item.strip().partition("@")
        if only and only != rank:
            continue
        parts = item.split(":")
        if len(parts) >= 2 and parts[0] == point and parts[1].isdigit() and int(parts[1]) == _fault_counts[point]:
            sig = getattr(signal, f"SIG{parts[2].upper()}") if len(parts) > 2 else signal.SIGKILL
            os.kill(os.getpid(), sig)


# --------------------------------------------------------------------------------------------------- files
def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem supports it)."""
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes, fault_point: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically and durably: a temporary file beside it, fsync, rename, fsync of the
    folder. A kill or a full disk at any moment leaves the previous file (if any) as it was.

    Raises:
        OSError: the write failed (the temporary file is removed; ``path`` is untouched).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        _write_tmp(tmp, data, fault_point)
        os.replace(tmp, path)
    except OSError as exc:  # a failed write() carries no file name: name the file being written
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def _write_tmp(tmp: Path, data: bytes, fault_point: str | None) -> None:
    with open(tmp, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        if fault_point:
            fh.flush()
            fault(fault_point)
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(path: Path, state: dict) -> Path:
    """``torch.save`` ``state`` to ``path`` through ``write_bytes_durably`` (fault point ``checkpoint``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return write_bytes_durably(path, buf.getvalue(), fault_point="checkpoint")


def load_checkpoint(path: Path) -> dict:
    """Read ``last.pt`` with ``torch.load(weights_only=True)``.

    Raises:
        UserError: unreadable or not a vptool checkpoint (one line naming the file).
    """
    from vptool.safeload import torch_load

    try:
        state = torch_load(path, str(path), "start the run over with --overwrite")
    except UserError:
        raise
    except Exception as exc:  # truncated zip, ...
        line = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
        raise UserError(f"{path}: cannot read the checkpoint ({line}); start the run over with --overwrite") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "adapter" not in state:
        raise UserError(f"{path}: not a checkpoint this vptool version can resume (format "
                        f"{state.get('format') if isinstance(state, dict) else None!r}); start over with --overwrite")
    return state


def read_json(path: Path) -> dict:
    """A JSON object vptool wrote (``summary.json``, ``adapter_config.json``).

    Raises:
        UserError: missing, truncated or not a JSON object (one line naming the file).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: truncated or not JSON ({str(exc)[:80]}); the file is damaged: restore it, or "
                        "delete it and rerun the command that writes it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def dumps_strict(obj, indent: int | None = None) -> str:
    """``json.dumps`` that refuses NaN/inf (strict JSON): non-finite floats become ``null``."""
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False, indent=indent)


# --------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """Every RNG state this process draws from, as ``checkpoints/last.pt`` stores it (``weights_only``-loadable):
    ``torch``, ``python``, ``numpy`` (the key array as an int64 tensor) and, with CUDA, ``cuda`` (one per device)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned; the CUDA states only when this process sees as many devices."""
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------- lock
class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<output.dir>/.<name>.lock`` (released when the process ends).

    The lock file is removed on release (while still held, and an acquirer checks that the file it locked is
    still the one at the path, so removal never lets two holders in); ``output.dir`` is removed again when this
    created it and nothing else was written there. A kill leaves the file behind, unlocked: harmless.

    Raises:
        UserError: another process holds it (one line naming the run, the lock file and the holder's pid).
    """

    def __init__(self, run: Path):
        self.run = Path(run)
        self.path = self.run.with_name(f".{self.run.name}{LOCK_SUFFIX}")
        self.fd: int | None = None
        self.made: list[Path] = []

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            return self
        missing = []
        p = self.run.parent
        while not p.exists() and p.parent != p:
            missing.append(p)
            p = p.parent
        self.run.parent.mkdir(parents=True, exist_ok=True)
        self.made = missing  # deepest first
        while True:
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                try:
                    holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
                except OSError:
                    holder = "?"
                os.close(fd)
                self._remove_made()
                raise UserError(f"{self.run}: locked by another vptool train (pid {holder}, lock {self.path}); wait "
                                "for it to finish, or train under another name with --set output.name=NEW") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed it between our open and our lock: lock the new file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def _remove_made(self) -> None:
        for folder in self.made:
            try:
                folder.rmdir()  # only if empty
            except OSError:
                break

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            import fcntl

            self.path.unlink(missing_ok=True)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
            self._remove_made()


# --------------------------------------------------------------------------------------------------- state
@dataclass
class RunState:
    """What is at a run path: ``absent``, ``finished`` (summary.json), ``unfinished`` (recipe.yaml, no summary)
    or ``foreign`` (a folder vptool did not write); with the checkpoint's position when one is readable."""

    status: str
    epoch: int | None = None
    step: int | None = None
    epochs: int | None = None

    def describe(self) -> str:
        if self.epoch is None:
            return "no checkpoint yet"
        where = f"checkpoint after epoch {self.epoch}"
        if self.step:
            where += f" + {self.step} steps"
        return where + (f" of {self.epochs}" if self.epochs else "")


def inspect_run(run: Path) -> RunState:
    """The ``RunState`` of ``run`` (reads only the checkpoint's position)."""
    run = Path(run)
    if not run.exists():
        return RunState("absent")
    if not run.is_dir():
        return RunState("foreign")
    if (run / "summary.json").is_file():
        return RunState("finished")
    if not (run / "recipe.yaml").is_file():
        return RunState("foreign")
    ckpt = run / CHECKPOINT
    if ckpt.is_file():
        try:
            state = torch.load(str(ckpt), map_location="cpu", weights_only=True)
            return RunState("unfinished", int(state["epoch"]), int(state.get("step", 0)), state.get("epochs"))
        except Exception:
            pass
    return RunState("unfinished")


#: what a run directory holds before its first finished epoch: recomputed by a fresh start (nothing to keep)
_START_FILES = {"recipe.yaml", "checkpoints", "metrics.jsonl", "prompt_init.safetensors", ".feature_cache",
                ".image_cache", "prompt_history"}


def _is_temp(name: str) -> bool:
    return name.startswith(".") and ".tmp" in name


def failed_start(run: Path) -> bool:
    """``run`` is an unfinished run that stopped before anything finished (a bad image, a full disk, a NaN in
    the first epoch): no ``checkpoints/last.pt``, no ``adapter.safetensors``, an empty ``metrics.jsonl``, no
    prompt snapshot past epoch 0, and nothing vptool did not write at the start. Such a run holds nothing a
    fresh start would not write again, so ``vptool train`` starts it over instead of asking for ``--resume``."""
    run = Path(run)
    if not run.is_dir() or not (run / "recipe.yaml").is_file() or (run / "summary.json").exists():
        return False
    try:
        for entry in run.iterdir():
            if entry.name not in _START_FILES and not _is_temp(entry.name):
                return False
        ckpts = run / "checkpoints"
        if ckpts.exists() and (not ckpts.is_dir() or any(not _is_temp(f.name) for f in ckpts.iterdir())):
            return False
        metrics = run / "metrics.jsonl"
        if metrics.exists() and (not metrics.is_file() or metrics.stat().st_size and
                                 metrics.read_text(encoding="utf-8", errors="replace").strip()):
            return False
        history = run / "prompt_history"
        if history.exists() and (not history.is_dir() or any(
                f.name != "epoch_0000.safetensors" and not _is_temp(f.name) for f in history.iterdir())):
            return False
    except OSError:
        return False
    return True


def overwrite_dir(run: Path) -> Path:
    """The sibling folder an ``--overwrite`` run is trained in until it finishes."""
    return run.with_name(f".{run.name}{OVERWRITE_SUFFIX}")


def recover_swap(run: Path) -> None:
    """Finish or undo an ``--overwrite`` swap that a kill interrupted between its two renames (call under the lock).

    The swap is: rename ``run`` to ``.<name>.replaced``, rename ``.<name>.overwrite`` to ``run``, delete the old one.
    """
    old = run.with_name(f".{run.name}{OLD_SUFFIX}")
    if not old.exists():
        return
    if run.exists():  # the swap completed; only the deletion of the old run was left
        shutil.rmtree(old, ignore_errors=True)
        return
    new = overwrite_dir(run)
    if (new / "summary.json").is_file():
        os.replace(new, run)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(old, run)
    fsync_dir(run.parent)


def swap_in(new: Path, run: Path) -> None:
    """Replace ``run`` by the finished ``new`` (two renames; ``recover_swap`` repairs a kill between them)."""
    old = run.with_name(f".{run.name}{OLD_SUFFIX}")
    if old.exists():
        shutil.rmtree(old)
    if run.exists():
        os.replace(run, old)
    os.replace(new, run)
    fsync_dir(run.parent)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------------- signals
class StopSignals:
    """While active, SIGINT and SIGTERM set ``signum`` instead of killing the process; the training loop checks
    ``signum`` after each step and stops cleanly. A second SIGINT exits at once with code 130.

    Only the main thread can install handlers; elsewhere (a library caller's thread) this does nothing.
    """

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            os.write(2, b"error: interrupted again: exiting now (the last checkpoint is intact)\n")
            os._exit(130)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():  # restore only a handler still ours (a peer failure ignores SIGTERM)
            if signal.getsignal(s) == self._handle:
                signal.signal(s, h)
        self._old.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
