"""Data parallelism under ``torchrun``: torch.distributed (DDP), nothing home-made.

``torchrun --nproc_per_node N -m vptool train RECIPE`` (and ``--nnodes M`` across machines) sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK`` and the rendezvous (``MASTER_ADDR``/``MASTER_PORT``); vptool reads them and initialises
the default process group: **nccl** when the run's device is CUDA (each process takes ``cuda:LOCAL_RANK``),
**gloo** on CPU. Without ``WORLD_SIZE`` (or with 1) nothing here does anything: one process, as always.

What each command does with W processes (``vptool.engine.train``, ``evaluate``, ``init_prompts``):

- every rank builds the frozen backbone from the same checkpoint itself (never broadcast); the trainable tensors
  (prompts, head, gates, ...) are wrapped in ``DistributedDataParallel``, which averages their gradients;
- ``data.batch_size`` is the global batch B; each rank takes B / W images per step (a B that does not divide by W
  is refused), drawn by ``DistributedSampler(shuffle=True, seed=recipe.seed)`` with ``set_epoch``. Its padding
  (it repeats images so that every rank gets ceil(N / W)) is given weight 0 in the loss, and each rank's loss is
  its weighted sum over the *global* count of real images times W, so DDP's mean of the gradients is exactly the
  one-process gradient of the global batch (same images, same mean);
- evaluation shards the split with ``DistributedSampler(shuffle=False)``, gathers every rank's logits and drops
  the padding: the metrics are computed on exactly the N images in dataset order, as by one process;
- only rank 0 writes files and prints; the other ranks write nothing.

Failure: a rank that dies (killed, out of memory, an error of its own) makes the next collective on the others
fail. They then stop with one line naming the rank that failed (its own error line when it left one in the
rendezvous store, else its pid when it is gone from this machine) and exit 1. A rank that hangs instead is
given up on after ``VPTOOL_DIST_TIMEOUT`` seconds (default 300), the process group's timeout. In practice the
others stop within seconds: gloo sees the closed connection at once, and torchrun stops the remaining workers
as soon as one exits non-zero.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import torch

from vptool.errors import RunError, UserError

TIMEOUT_ENV = "VPTOOL_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 300.0


@dataclass
class Dist:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


_ctx: Dist | None = None
_peers: list[tuple[int, int]] = []  # (host id, pid) per rank, exchanged at init


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"{name}: {raw!r} is not an integer (set by torchrun; unset it to run one process)") from None


def from_env() -> Dist:
    """The job as the launcher's environment describes it (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    Raises:
        UserError: a variable that is not an integer, or a rank outside the world.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK/WORLD_SIZE: rank {rank} of {world} processes is impossible; launch with torchrun")
    return Dist(rank, world, local)


def context() -> Dist:
    """This process's ``Dist`` (one process unless ``init`` ran under a launcher)."""
    return _ctx if _ctx is not None else Dist()


def timeout_seconds() -> float:
    """``VPTOOL_DIST_TIMEOUT`` (seconds, default 300): how long a collective waits for a rank that hangs.

    Raises:
        UserError: not a positive number.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise UserError(f"{TIMEOUT_ENV}: {raw!r} must be a positive number of seconds")
    return value


def device_for(dev: torch.device) -> torch.device:
    """``dev`` as this rank uses it: under a launcher, CUDA without an index becomes ``cuda:LOCAL_RANK``.

    Raises:
        UserError: an explicit ``cuda:N`` under a launcher, or more local ranks than CUDA devices.
    """
    job = from_env()
    if not job.active or dev.type != "cuda":
        return dev
    if dev.index is not None:
        raise UserError(f"train.device: {dev} under torchrun; use cuda or auto (each process takes "
                        "cuda:LOCAL_RANK)")
    if job.local_rank >= torch.cuda.device_count():
        raise UserError(f"LOCAL_RANK: {job.local_rank} but this machine has {torch.cuda.device_count()} CUDA "
                        "device(s); lower --nproc_per_node")
    return torch.device("cuda", job.local_rank)


def init(device: torch.device) -> Dist:
    """Join the job the environment describes (idempotent); one process returns ``Dist()`` untouched.

    Backend: nccl for a CUDA ``device`` (made the current device), gloo otherwise; timeout ``timeout_seconds()``.

    Raises:
        UserError: bad launcher variables or timeout.
        RunError: the rendezvous failed (one line with the reason).
    """
    global _ctx, _peers
    if _ctx is not None:
        return _ctx
    job = from_env()
    if not job.active:
        _ctx = job
        return job
    import torch.distributed as td

    timeout = datetime.timedelta(seconds=timeout_seconds())
    if not td.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            td.init_process_group(backend, rank=job.rank, world_size=job.world, timeout=timeout)
        except Exception as exc:  # rendezvous: unreachable MASTER_ADDR, a port in use, ...
            raise RunError(f"rank {job.rank}: cannot join the torch.distributed job ({_first_line(exc)}); check "
                           "MASTER_ADDR/MASTER_PORT or launch with torchrun") from None
    _ctx = job
    me = torch.tensor([_host_id(), os.getpid()], dtype=torch.int64, device=_collective_device(device))
    got = [torch.zeros_like(me) for _ in range(job.world)]
    collective("start-up", lambda: td.all_gather(got, me))
    _peers = [(int(t[0]), int(t[1])) for t in got]
    return job


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:160]


def _host_id() -> int:
    import zlib

    return zlib.crc32(socket.gethostname().encode())


_device: torch.device | None = None


def _collective_device(device: torch.device | None = None) -> torch.device:
    """Where collective tensors live: the rank's CUDA device with nccl, the CPU with gloo."""
    global _device
    if device is not None:
        _device = device if device.type == "cuda" else torch.device("cpu")
    return _device or torch.device("cpu")


def _store():
    try:
        from torch.distributed import distributed_c10d

        return distributed_c10d._get_default_store()
    except Exception:
        return None


def report_failure(message: str) -> None:
    """Leave this rank's error line in the rendezvous store, for the ranks that see it fail (best effort)."""
    job = context()
    if not job.active:
        return
    store = _store()
    if store is None:
        return
    try:
        store.set(f"vptool/failed/{job.rank}", message[:200])
    except Exception:
        pass


def _gone(pid: int) -> bool:
    """The process has exited (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def failed_peers(wait_s: float = 3.0) -> str:
    """Which rank failed, as far as this rank can tell: its own error line (rendezvous store), a pid gone from
    this machine, or "another rank" when neither is known."""
    job = context()
    store = _store()
    host = _host_id()
    deadline = time.time() + wait_s
    while True:
        found = []
        for r in range(job.world):
            if r == job.rank:
                continue
            msg = None
            if store is not None:
                try:
                    if store.check([f"vptool/failed/{r}"]):
                        msg = store.get(f"vptool/failed/{r}").decode(errors="replace")
                except Exception:
                    store = None
            if msg is not None:
                found.append(f"rank {r} failed: {msg}")
            elif r < len(_peers) and _peers[r][0] == host and _gone(_peers[r][1]):
                found.append(f"rank {r} (pid {_peers[r][1]}) died")
        if found or time.time() >= deadline:
            return "; ".join(found) if found else "another rank stopped responding"
        time.sleep(0.2)


def collective(what: str, fn):
    """Run ``fn`` (a torch.distributed call); a failure becomes one ``RunError`` line naming the failed rank.

    Raises:
        RunError: a peer died or hung past the timeout (exit 1).
    """
    try:
        return fn()
    except RunError:
        raise
    except Exception as exc:  # DistBackendError / RuntimeError from gloo or nccl
        if not _is_comm_error(exc):
            raise
        _ignore_sigterm()
        err = RunError(f"rank {context().rank}: {failed_peers()} during {what}; stopping this rank too "
                       f"({_first_line(exc)})")
        err.peer_failure = True  # not this rank's own error: not relayed to the others
        raise err from None


def _ignore_sigterm() -> None:
    """A peer has failed: torchrun is about to SIGTERM this rank too (it stops the other workers as soon as one
    exits non-zero), which would end it before it prints its line naming the failed rank. Ignore SIGTERM from
    now on; this rank exits by itself within moments, and torchrun's SIGKILL after its grace period still ends
    it should it hang. Only the main thread can change a handler; elsewhere this does nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _is_comm_error(exc: BaseException) -> bool:
    """A failure of the communication itself (a peer gone, a timeout), not of the computation."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in (
        "gloo", "NCCL", "nccl", "Connection reset", "Connection closed", "Broken pipe", "Timed out", "timed out"))


def all_reduce(t: torch.Tensor, what: str, op: str = "sum") -> torch.Tensor:
    """Sum (or max) ``t`` over the ranks, in place on a copy on the collective device; returns it on ``t``'s
    device. A no-op with one process."""
    if not context().active:
        return t
    import torch.distributed as td

    buf = t.detach().to(_collective_device()).clone()
    red = td.ReduceOp.MAX if op == "max" else td.ReduceOp.SUM
    collective(what, lambda: td.all_reduce(buf, op=red))
    return buf.to(t.device)


def gather_rows(t: torch.Tensor, n: int, what: str) -> torch.Tensor:
    """Undo a ``DistributedSampler(shuffle=False)`` sharding: each rank's ``t`` holds rows for dataset positions
    rank, rank + W, rank + 2W, ... (the same count on every rank, padding included); returns all N rows in
    dataset order on every rank (padding dropped), on ``t``'s device.

    Args:
        t: (M, ...) this rank's rows, M = ceil(N / W).
        n: N, the dataset size.
    """
    job = context()
    if not job.active:
        return t
    import torch.distributed as td

    buf = t.detach().to(_collective_device()).contiguous()
    got = [torch.empty_like(buf) for _ in range(job.world)]
    collective(what, lambda: td.all_gather(got, buf))
    # position p = i * W + r lives at row i of rank r: stack to (M, W, ...) and flatten in that order
    return torch.stack(got, dim=1).reshape(-1, *buf.shape[1:])[:n].to(t.device)


def broadcast_object(obj, what: str):
    """Rank 0's ``obj`` on every rank (``broadcast_object_list``: pickled between this job's own processes,
    never read from a file)."""
    if not context().active:
        return obj
    import torch.distributed as td

    box = [obj]
    kw = {"device": _collective_device()} if _collective_device().type == "cuda" else {}
    collective(what, lambda: td.broadcast_object_list(box, src=0, **kw))
    return box[0]


def gather_objects(obj, what: str) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``all_gather_object``)."""
    if not context().active:
        return [obj]
    import torch.distributed as td

    out = [None] * context().world
    collective(what, lambda: td.all_gather_object(out, obj))
    return out


def shared_decision(fn, what: str):
    """Run ``fn`` on rank 0 only and give every rank its result, or its ``UserError`` (raised on every rank, so
    the ranks agree on refusing; only rank 0 prints it)."""
    job = context()
    if not job.active:
        return fn()
    result = error = None
    if job.main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    error, result = broadcast_object((error, result), what)
    if error is not None:
        exc = UserError(error)
        exc.collective = True
        raise exc
    return result


def shutdown() -> None:
    """Leave the process group (end of a command)."""
    global _ctx
    if _ctx is not None and _ctx.active:
        import torch.distributed as td

        if td.is_initialized():
            try:
                td.destroy_process_group()
            except Exception:
                pass
    _ctx = None
