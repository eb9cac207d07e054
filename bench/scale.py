"""Real workloads (issue 28): the memory of a ViT-L/16 VPT-deep train step with activation checkpointing and
low-precision frozen weights, and the images/s of the data pipeline against the images/s a train step consumes.

Part 1, memory and step time (``--part memory``): one VPT-deep train step (forward, cross-entropy, backward to the
prompts and head, SGD step) of ViT-L/16 at 224 px, Np = 50, batch 8, random weights (seeded; memory and time do not
depend on the weights), in four settings, each in a fresh process, interleaved over ``--repeats`` rounds:

- A ``train.activation_checkpointing: off``, ``backbone.dtype: fp32`` (vptool before issue 28);
- B checkpointing on, fp32;  C off, bf16 frozen weights;  D on, bf16.

Peak memory: on CPU the process's peak resident set (``VmHWM``, reset with ``/proc/self/clear_refs`` just before the
step, so the one-off fp32 copy of the weights at build time is not counted) minus the resident set after the
imports (torch's own libraries are not the model's); on CUDA ``torch.cuda.max_memory_allocated`` of the step.
Step time: the median of the steps after the first. Printed: each setting's peak and time, and per round the ratios
to A (the targets: D's peak <= 0.35x A's; B's time <= 1.4x A's).

Part 2, the data pipeline (``--part data``): a folder of 2,000 generated 500x375 JPEGs (CUB-like sizes; written
once under ``--data``), read through vptool's training pipeline at 224 px (``data.train_transform: fgvc``: random
resized crop + flip), ``data.num_workers`` 0 vs auto, ``data.cache`` off vs on (the cache's first pass builds it
and is timed separately); images/s and images/s per busy core, interleaved; then the images/s that one ViT-B/16
VPT-deep train step consumes on the same machine, so the loader can be compared with the model.

    python bench/scale.py                      # both parts (minutes on a CPU)
    python bench/scale.py --part memory --quick  # a small ViT, seconds (a smoke check)
    python bench/scale.py --device cuda        # on a GPU

CPU flags are printed first: bf16 matmuls are ~100x slower without ``avx512_bf16``/``amx_bf16``, which is why the
bf16 weights are upcast one block at a time on the CPU (``vptool.prompting.lowp``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"A": ("off", "fp32"), "B": ("on", "fp32"), "C": ("off", "bf16"), "D": ("on", "bf16")}


# --------------------------------------------------------------------------------------------------- memory
def _status(key: str) -> int:
    """``/proc/self/status``'s ``key`` (VmRSS, VmHWM) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def one_setting(ckpt: str, dtype: str, quick: bool, device: str, steps: int) -> dict:
    """Build the model of one setting and train ``steps`` steps; runs inside a fresh process (``--one``)."""
    import torch
    import torch.nn.functional as F

    from vptool.backbones.build import build_backbone
    from vptool.config import ModelConfig
    from vptool.prompting.model import PromptedViT

    dev = torch.device(device)
    rss0 = _status("VmRSS")
    torch.manual_seed(0)
    name, kwargs, size = ("vit_large_patch16_224", {}, 224)
    if quick:
        name, kwargs, size = "vit_base_patch16_224", dict(img_size=64, depth=4), 64
    backbone, _ = build_backbone(name, pretrained=False, kwargs=kwargs)
    cfg = ModelConfig(num_classes=200, prompt_mode="deep", prompt_length=50, readout_pool="cls",
                      readout_norm="pretrained", activation_checkpointing=ckpt == "on", backbone_dtype=dtype)
    model = PromptedViT(backbone, cfg, generator=torch.Generator().manual_seed(1)).to(dev)
    model.train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(2)).to(dev)
    y = torch.randint(0, 200, (8,), generator=torch.Generator().manual_seed(3)).to(dev)
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    times, peak = [], None
    for s in range(steps):
        if s == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if s == 0:
            peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _status("VmHWM") - rss0
    return {"peak_bytes": peak, "step_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "loss": float(loss)}


def memory_part(args) -> dict:
    """Part 1 (module docstring): every setting in its own process, interleaved over the rounds."""
    rows = {k: [] for k in SETTINGS}
    for r in range(args.repeats):
        for key, (ckpt, dtype) in SETTINGS.items():
            cmd = [sys.executable, __file__, "--one", ckpt, dtype, "--device", args.device, "--steps", str(args.steps)]
            if args.quick:
                cmd.append("--quick")
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows[key].append(res)
            print(f"round {r + 1} {key} (checkpointing {ckpt}, frozen {dtype}): peak "
                  f"{res['peak_bytes'] / 2**30:.3f} GiB, step {res['step_s']:.2f} s", flush=True)
    ratios = {k: [rows[k][i]["peak_bytes"] / rows["A"][i]["peak_bytes"] for i in range(args.repeats)]
              for k in SETTINGS}
    times = {k: [rows[k][i]["step_s"] / rows["A"][i]["step_s"] for i in range(args.repeats)] for k in SETTINGS}
    print("\nsetting                          peak GiB   peak / A   step s   step / A (median of rounds)")
    for k, (ckpt, dtype) in SETTINGS.items():
        print(f"{k} checkpointing {ckpt:<3} frozen {dtype:<5}  {statistics.median(r['peak_bytes'] for r in rows[k]) / 2**30:8.3f}"
              f"   {statistics.median(ratios[k]):7.3f}   {statistics.median(r['step_s'] for r in rows[k]):6.2f}"
              f"   {statistics.median(times[k]):7.3f}")
    d, b = statistics.median(ratios["D"]), statistics.median(times["B"])
    print(f"target: D peak <= 0.35 x A: {d:.3f} ({'met' if d <= 0.35 else 'NOT met'}); "
          f"B step <= 1.4 x A: {b:.3f} ({'met' if b <= 1.4 else 'NOT met'})")
    return {"rows": rows, "peak_ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
            "time_ratio_median": {k: statistics.median(v) for k, v in times.items()}}


# --------------------------------------------------------------------------------------------------- entry
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["memory", "data", "all"], default="all")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="train steps per setting (the first gives the peak)")
    ap.add_argument("--quick", action="store_true", help="a small ViT (seconds), for a smoke check")
    ap.add_argument("--data", default="bench-data/jpeg-2000", help="folder of the generated JPEGs (part 2)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--one", nargs=2, metavar=("CKPT", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_setting(args.one[0], args.one[1], args.quick, args.device, args.steps)))
        return
    from vptool.hardware import cpu_flags

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, flags: "
          f"{' '.join(cpu_flags()) or 'none of interest'}; device {args.device}")
    out = {}
    if args.part in ("memory", "all"):
        out["memory"] = memory_part(args)
    if args.part in ("data", "all"):
        out["data"] = data_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
