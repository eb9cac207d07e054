"""Benchmark: ``vptool train`` as one process against the same run under ``torchrun --nproc_per_node N``.

What it measures
----------------
The training seconds of one recipe (default ``recipes/quickstart.yaml``: VPT-deep on the embedded digits ViT,
``--epochs`` epochs) run by ``python -m vptool train`` (one process) and by ``torchrun --standalone
--nproc_per_node N -m vptool train`` (N processes: gloo on CPU, nccl on CUDA; same global batch), each in a fresh
process, alternating A, B, A, B, ... for ``--rounds`` pairs so that a drift of the shared CPU's speed hits both
alike. The figure is the training time the run itself reports (the sum of ``metrics.jsonl``'s per-epoch
``seconds``: training + validation, without interpreter start-up and the final test pass); the start-up is shown
apart (wall time minus it). The reported ratio is the median over pairs of ``one-process seconds / N-process
seconds`` (> 1: N processes are faster). Each pair's two runs must agree (test top-1 equal, the check the test
suite makes exactly), else the script says so.

On CPU the N processes share the machine's cores (torchrun sets ``OMP_NUM_THREADS=1`` per process; the one
process uses ``--threads``): expect no gain on a 2-core machine, the point there is correctness. On a machine
with N GPUs, ``--device cuda`` compares 1 GPU with N (nccl).

How to run
----------
    python bench/distributed.py                         # quickstart, 2 epochs, 2 processes, 3 pairs: ~2 min on 2 cores
    python bench/distributed.py --nproc 4 --device cuda --epochs 5 --recipe recipes/quickstart.yaml
    python bench/distributed.py --json out.json

This is a benchmark, not a test: it exits 0 whatever the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vptool.hardware import cpu_flags  # the CPU flags that decide fp32/bf16 speed


def run_once(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """(training seconds from metrics.jsonl, wall seconds, test top-1) of one train command."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    rows = [json.loads(ln) for ln in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in rows), wall, summary["test_top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default=str(Path(__file__).resolve().parent.parent / "recipes" / "quickstart.yaml"))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of the one process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", help="also write the numbers to this file")
    a = ap.parse_args()

    import torch

    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"flags: {' '.join(cpu_flags()) or '-'}; device {a.device}"
          + (f" ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})" if a.device.startswith("cuda")
             and torch.cuda.is_available() else ""))
    tmp = Path(tempfile.mkdtemp(prefix="vptool-bench-dist-"))
    sets = ["--set", f"train.epochs={a.epochs}", "--set", f"train.device={a.device}", "--set",
            "train.warmup_epochs=1", "--set", "prompt.dropout=0", "--json"]
    base_env = {**os.environ, "COLUMNS": "200"}
    one_env = {**base_env, "OMP_NUM_THREADS": str(a.threads)}
    rows = []
    for r in range(a.rounds + 1):  # round 0 warms the file cache and is not counted
        one = run_once([sys.executable, "-m", "vptool", "train", a.recipe, *sets, "--set",
                        f"output.dir={tmp}", "--set", f"output.name=one{r}"], one_env)
        many = run_once([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                         str(a.nproc), "-m", "vptool", "train", a.recipe, *sets, "--set", f"output.dir={tmp}",
                         "--set", f"output.name=many{r}"], base_env)
        if r == 0:
            continue
        rows.append({"one_s": one[0], "many_s": many[0], "one_wall_s": one[1], "many_wall_s": many[1],
                     "ratio": one[0] / many[0], "same_top1": one[2] == many[2]})
        print(f"pair {r}: 1 process {one[0]:.2f} s (wall {one[1]:.1f}), {a.nproc} processes {many[0]:.2f} s "
              f"(wall {many[1]:.1f}); ratio {one[0] / many[0]:.2f}; test top-1 {one[2]:.2f} vs {many[2]:.2f}")
    ratio = statistics.median(x["ratio"] for x in rows)
    print(f"median speed-up of {a.nproc} processes over 1 (training seconds, {len(rows)} pairs): {ratio:.2f}x"
          + ("" if all(x["same_top1"] for x in rows) else "  WARNING: test top-1 differed in some pair"))
    if a.json:
        Path(a.json).write_text(json.dumps({"nproc": a.nproc, "device": a.device, "epochs": a.epochs,
                                            "pairs": rows, "median_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
