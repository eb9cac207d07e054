"""The processes of a ``vptool sweep`` worker: its ``vptool train`` children, the signals that stop it, and how a
worker tells that another worker on this machine has gone.

A worker killed (even by SIGKILL) leaves its trial RUNNING; its ``vptool train`` child gets SIGTERM (Linux
``PR_SET_PDEATHSIG``), writes ``checkpoints/last.pt`` and exits; the next worker to look fails the trial and resumes
the run. SIGINT/SIGTERM to the sweep are forwarded to the running child, which checkpoints; the trial is enqueued
again and the sweep exits 130/143: rerunning the same command resumes it.

Each trial's full stderr is appended to ``<SWEEP_DIR>/logs/<TRIAL>.log`` (one ``=== attempt`` header per train
process started).
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from vptool.errors import RunError

#: seconds between looks at the study while waiting for another worker's trial (or a run directory's lock)
POLL_SECONDS = 1.0


# --------------------------------------------------------------------------------------------------- outcomes
class TrialFailed(Exception):
    """The trial's ``vptool train`` failed (exit 1 or 2): recorded as FAIL with its error line; final."""


class TrialKilled(Exception):
    """The trial's ``vptool train`` was killed by a signal the sweep did not send: FAIL, not final (retried)."""


class SweepStopped(RunError):
    """The sweep was stopped by SIGINT (exit 130) or SIGTERM (exit 143); rerunning it resumes."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def signame(signum: int) -> str:
    """``SIGTERM`` for 15 (``signal N`` for a number that names no signal)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --------------------------------------------------------------------------------------------------- this machine
def _host_id() -> str | None:
    """This machine (and pid namespace), so a worker can tell that a trial's worker ran here; None if unknown."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{socket.gethostname()}/{boot}/{ns}"


HOST_ID = _host_id()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def child_preexec():
    """A ``preexec_fn`` that makes the child get SIGTERM when this process dies (Linux ``PR_SET_PDEATHSIG``),
    so a killed worker's ``vptool train`` writes its checkpoint and exits instead of training on unattended; None
    where that is not available."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent, sigterm = os.getpid(), int(signal.SIGTERM)

    def preexec() -> None:  # runs in the child between fork and exec: keep it to two system calls
        prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the worker died before the call: nobody would signal us
            os._exit(143)

    return preexec


# --------------------------------------------------------------------------------------------------- run folders
def last_error_line(text: str) -> str | None:
    """The message of the last ``error: ...`` line of a train's stderr (at most 300 characters), or None."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip().startswith("error:")]
    return lines[-1][len("error:"):].strip()[:300] if lines else None


def _only_empty_dirs(path: Path) -> bool:
    return path.is_dir() and all(p.is_dir() for p in path.rglob("*"))


def clear_empty_run(run: Path) -> None:
    """Remove a trial's folder that holds only empty folders (a train killed right after creating it).

    Raises:
        TrialFailed: the folder holds something else (not a vptool run directory).
    """
    if not _only_empty_dirs(run):
        raise TrialFailed(f"{run} exists and is not a vptool run directory (no recipe.yaml); delete it, or "
                          "sweep under another name with --set output.name=NEW")
    for d in sorted(run.rglob("*"), key=lambda p: len(p.parts), reverse=True) + [run]:
        with contextlib.suppress(OSError):
            d.rmdir()  # a train killed right after creating the folder: nothing in it


# --------------------------------------------------------------------------------------------------- the child
class TrialProcesses:
    """One worker's stop signals and its one running ``vptool train`` child.

    ``signals()`` installs the SIGINT/SIGTERM handlers (main thread only): the first signal is remembered in
    ``stop`` and every one is forwarded to the running child; ``check_stop()`` and ``sleep()`` then raise
    ``SweepStopped``. ``spawn()`` runs one child and counts it in ``started``.

    Args:
        poll: seconds ``sleep()`` waits by default.
        where: what ``SweepStopped`` says is stopped, e.g. ``study lr-wd, runs/tiny-sweep``.
    """

    def __init__(self, poll: float, where: str):
        self.poll, self.where = poll, where
        self.stop: int | None = None
        self.started = 0  # train processes started
        self._child: subprocess.Popen | None = None
        self._forwarded = 0

    @contextlib.contextmanager
    def signals(self):
        """Handle SIGINT/SIGTERM while inside (main thread only; elsewhere nothing is installed)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _on_signal(self, signum, frame) -> None:
        if self.stop is None:
            self.stop = signum
            os.write(2, f"sweep: {signame(signum)}: stopping; the running trial writes its checkpoint (rerun the "
                        "same command to continue)\n".encode())
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        """Pass the signal to the running trial command (it runs in its own session, so a terminal's Ctrl-C
        reaches it only this way, once; torchrun passes it on to its workers)."""
        child = self._child
        if child is not None and child.poll() is None:
            self._forwarded += 1
            with contextlib.suppress(OSError):
                child.send_signal(signum)

    def check_stop(self) -> None:
        """Raise ``SweepStopped`` once a stop signal came."""
        if self.stop is not None:
            raise SweepStopped(f"sweep stopped by {signame(self.stop)}; rerun the same command to continue it "
                               f"({self.where})", self.stop)

    def sleep(self, seconds: float | None = None) -> None:
        """Wait ``seconds`` (default ``poll``), raising ``SweepStopped`` as soon as a stop signal comes."""
        end = time.monotonic() + (self.poll if seconds is None else seconds)
        while True:
            self.check_stop()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.2, left))

    def spawn(self, argv: list[str], log: Path, attempt: str) -> tuple[int, str, str | None]:
        """Run one train process: stderr appended to ``log`` after an ``=== attempt <time> <attempt>, worker pid
        <pid>: <argv>`` header, stdout captured. Returns (exit code, stdout, the last ``error:`` line of this
        attempt)."""
        self.check_stop()
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        with open(log, "ab") as fh:
            fh.write(f"=== attempt {stamp} {attempt}, worker pid {os.getpid()}: {shlex.join(argv)}\n".encode())
            fh.flush()
            start = os.fstat(fh.fileno()).st_size
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fh, env=env,
                                    preexec_fn=child_preexec(), start_new_session=True)
            before = self._forwarded
            self._child = proc
            try:
                if self.stop is not None and self._forwarded == before:
                    self._forward(self.stop)  # the signal came while Popen ran: the handler had no child to tell
                out, _ = proc.communicate()
            finally:
                self._child = None
            self.started += 1
            rc = proc.returncode
            fh.write(f"=== exit {rc}\n".encode())
        with open(log, "rb") as fh:
            fh.seek(start)
            text = fh.read().decode(errors="replace")
        return rc, out.decode(errors="replace"), last_error_line(text)
