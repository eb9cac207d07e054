"""Real workloads (issue 28): the memory of a ViT-L/16 VPT-deep train step with activation checkpointing and
low-precision frozen weights, and the images/s of the data pipeline against the images/s a train step consumes.

Part 1, memory and step time (``--part memory``): one VPT-deep train step (forward, cross-entropy, backward to the
prompts and head, SGD step) of ViT-L/16 at 224 px, Np = 50, batch 8, random weights (seeded; memory and time do not
depend on the weights), in four settings, each in a fresh process, interleaved over ``--repeats`` rounds:

- A ``train.activation_checkpointing: off``, ``backbone.dtype: fp32`` (vptool before issue 28);
- B checkpointing on, fp32;  C off, bf16 frozen weights;  D on, bf16.

Peak memory: on CPU the process's peak resident set (``VmHWM``, reset with ``/proc/self/clear_refs`` just before the
step, after ``malloc_trim`` has returned the heap pages the build freed, so the one-off fp32 copy of the weights at
build time is not counted) minus the resident set after the imports (torch's own libraries are not the model's),
with glibc's mmap threshold fixed at 128 KiB so that freed tensors leave the resident set; on CUDA
``torch.cuda.max_memory_allocated`` of the step.
Step time: the median of the steps after the first. Printed: each setting's peak and time, and per round the ratios
to A (the targets: D's peak <= 0.35x A's; B's time <= 1.4x A's).

Part 2, the data pipeline (``--part data``): a folder of 2,000 generated 500x375 JPEGs (CUB-like sizes; written
once under ``--data``), read through vptool's training pipeline at 224 px (``data.train_transform: fgvc``: random
resized crop + flip), ``data.num_workers`` 0 vs auto, ``data.cache`` off vs on (the cache's first pass builds it
and is timed separately), and the pipeline vptool had before (the same transform on float tensors, workers 0, no
cache: "before"); images/s and images/s per busy core, interleaved; then the images/s that one ViT-B/16
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


def _trim() -> None:
    """glibc ``malloc_trim(0)``: return freed heap memory to the OS (no-op where there is no glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    times, peak, built = [], None, None
    for s in range(steps):
        if s == 0:
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            else:
                _trim()  # heap pages freed by the build (the fp32 weights before a bf16 cast) back to the OS
                built = _status("VmRSS") - rss0
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
    step = statistics.median(times[1:]) if len(times) > 1 else times[0]
    return {"peak_bytes": peak, "model_bytes": built, "step_s": step, "loss": float(loss.detach())}


def memory_part(args) -> dict:
    """Part 1 (module docstring): every setting in its own process, interleaved over the rounds."""
    rows = {k: [] for k in SETTINGS}
    for r in range(args.repeats):
        for key, (ckpt, dtype) in SETTINGS.items():
            cmd = [sys.executable, __file__, "--one", ckpt, dtype, "--device", args.device, "--steps", str(args.steps)]
            if args.quick:
                cmd.append("--quick")
            # a fixed mmap threshold: every tensor over 128 KiB is its own mapping, returned to the OS when freed, so
            # the resident set follows the live tensors (glibc's default threshold rises after the first large free
            # and then keeps freed tensor memory in the heap: the RSS would measure the allocator's history)
            env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            rows[key].append(res)
            model = f" (model before the step {res['model_bytes'] / 2**30:.3f} GiB)" if res["model_bytes"] else ""
            print(f"round {r + 1} {key} (checkpointing {ckpt}, frozen {dtype}): peak "
                  f"{res['peak_bytes'] / 2**30:.3f} GiB{model}, step {res['step_s']:.2f} s", flush=True)
    ratios = {k: [rows[k][i]["peak_bytes"] / rows["A"][i]["peak_bytes"] for i in range(args.repeats)]
              for k in SETTINGS}
    times = {k: [rows[k][i]["step_s"] / rows["A"][i]["step_s"] for i in range(args.repeats)] for k in SETTINGS}
    print("\nsetting                          peak GiB   peak / A   step s   step / A (median of rounds)")
    for k, (ckpt, dtype) in SETTINGS.items():
        peak = statistics.median(r["peak_bytes"] for r in rows[k]) / 2**30
        step = statistics.median(r["step_s"] for r in rows[k])
        print(f"{k} checkpointing {ckpt:<3} frozen {dtype:<5}  {peak:8.3f}   {statistics.median(ratios[k]):7.3f}   "
              f"{step:6.2f}   {statistics.median(times[k]):7.3f}")
    d, b = statistics.median(ratios["D"]), statistics.median(times["B"])
    print(f"target: D peak <= 0.35 x A: {d:.3f} ({'met' if d <= 0.35 else 'NOT met'}); "
          f"B step <= 1.4 x A: {b:.3f} ({'met' if b <= 1.4 else 'NOT met'})")
    return {"rows": rows, "peak_ratio_median": {k: statistics.median(v) for k, v in ratios.items()},
            "time_ratio_median": {k: statistics.median(v) for k, v in times.items()}}


# --------------------------------------------------------------------------------------------------- data
IMAGES, SIZE = 2000, (500, 375)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_jpegs(root: Path, n: int = IMAGES, classes: int = 20) -> Path:
    """``root/{train,val,test}/<class>/*.jpg``: ``n`` training JPEGs of 500x375 (smooth random content, quality 90,
    about CUB's sizes) and 2 per class in val and test; written once (reused when complete)."""
    import numpy as np
    from PIL import Image

    done = root / "done"
    if done.is_file():
        return root
    rng = np.random.default_rng(0)
    plan = [("train", i) for i in range(n)] + [(s, i) for s in ("val", "test") for i in range(2 * classes)]
    for split, i in plan:
        folder = root / split / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize(SIZE, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    done.write_text("ok")
    return root


def _recipe(root: Path, workers: str, cache: str, batch: int):
    from vptool.recipe import resolve

    raw = {"method": "vpt-deep", "seed": 0, "backbone": {"name": "vit_base_patch16_224", "pretrained": False},
           "data": {"dataset": "imagefolder", "root": str(root), "train_transform": "fgvc", "batch_size": batch,
                    "num_workers": workers if workers == "auto" else int(workers), "cache": cache}}
    return resolve(raw, {}, source="bench/scale.py")


def _loader_rate(root: Path, workers: str, cache: str, batches: int, work: Path) -> dict:
    """(seconds to build the cache, images/s over ``batches`` batches of the training loader, busy cores)."""
    import torch

    from vptool.data.loading import num_workers
    from vptool.engine.images import training_loader

    recipe = _recipe(root, workers, cache, 32)
    t0 = time.perf_counter()
    loader, caches = training_loader(recipe, {"input_size": (3, 224, 224), "mean": MEAN, "std": STD}, work)
    build = time.perf_counter() - t0
    try:
        it, seen = iter(loader), 0
        x, *_ = next(it)  # the workers' start-up is not the pipeline's rate
        t0 = time.perf_counter()
        for _ in range(batches):
            try:
                x, *_ = next(it)
            except StopIteration:
                break
            seen += x.shape[0]
        rate = seen / (time.perf_counter() - t0)
        assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, 224, 224)
    finally:
        if caches is not None:
            caches.close()
    n = num_workers(recipe.data, IMAGES)
    return {"cache_build_s": build, "images_per_s": rate, "workers": n, "cores": max(1, min(n, os.cpu_count()))}


def _before_rate(root: Path, batches: int) -> dict:
    """The pipeline vptool had before issue 28 (workers 0, no cache, the ``fgvc`` train transform on float: decode,
    to float, random resized crop, flip, normalise), over the same folder: torchvision's ImageFolder + DataLoader."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    tf = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.RandomResizedCrop((224, 224),
                     antialias=True), v2.RandomHorizontalFlip(), v2.Normalize(list(MEAN), list(STD))])
    loader = DataLoader(ImageFolder(str(root / "train"), transform=tf), batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    it, seen = iter(loader), 0
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        x, _ = next(it)
        seen += x.shape[0]
    return {"cache_build_s": 0.0, "images_per_s": seen / (time.perf_counter() - t0), "workers": 0, "cores": 1}


def _train_rate(device: str, steps: int = 3) -> float:
    """Images/s one ViT-B/16 VPT-deep (Np 50) train step at 224 px, batch 32, consumes (median over steps)."""
    import torch
    import torch.nn.functional as F

    from vptool.backbones.build import build_backbone
    from vptool.config import ModelConfig
    from vptool.prompting.model import PromptedViT

    dev = torch.device(device)
    torch.manual_seed(0)
    backbone, _ = build_backbone("vit_base_patch16_224", pretrained=False)
    model = PromptedViT(backbone, ModelConfig(num_classes=20, prompt_mode="deep", prompt_length=50,
                                              readout_pool="cls", readout_norm="pretrained"),
                        generator=torch.Generator().manual_seed(1)).to(dev).train()
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(32, 3, 224, 224, device=dev), torch.randint(0, 20, (32,), device=dev)
    amp = dev.type == "cuda" and torch.cuda.is_bf16_supported()
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 32 / statistics.median(times[1:])


def data_part(args) -> dict:
    """Part 2 (module docstring): the loader's images/s in four settings, interleaved, and the train step's."""
    import tempfile

    root = write_jpegs(Path(args.data))
    settings = {"before": (None, None), "0/off": ("0", "off"), "0/cache": ("0", "auto"), "auto/off": ("auto", "off"),
                "auto/cache": ("auto", "auto")}
    rows = {k: [] for k in settings}
    batches = 4 if args.quick else 30  # after the first batch (with workers, 2 per worker may be prefetched)
    with tempfile.TemporaryDirectory() as work:
        for r in range(args.repeats):
            for key, (workers, cache) in settings.items():
                if workers is None:
                    res = _before_rate(root, batches)
                    rows[key].append(res)
                    print(f"round {r + 1} before issue 28 (float transform, workers 0, no cache): "
                          f"{res['images_per_s']:8.1f} images/s", flush=True)
                    continue
                res = _loader_rate(root, workers, cache, batches, Path(work))
                rows[key].append(res)
                print(f"round {r + 1} workers {workers:<4} cache {cache:<4}: {res['images_per_s']:8.1f} images/s "
                      f"({res['workers']} workers; cache built in {res['cache_build_s']:.1f} s)", flush=True)
    per_core = {k: [x["images_per_s"] / x["cores"] for x in v] for k, v in rows.items()}
    ratio = [a / b for a, b in zip(per_core["0/cache"], per_core["before"])]
    ratio_now = [a / b for a, b in zip(per_core["0/cache"], per_core["0/off"])]
    train = _train_rate(args.device, steps=1 if args.quick else 3)
    auto = statistics.median(x["images_per_s"] for x in rows["auto/cache"])
    print("\nsetting        images/s   per core   (median of rounds)")
    for k in settings:
        print(f"{k:<12} {statistics.median(x['images_per_s'] for x in rows[k]):10.1f} "
              f"{statistics.median(per_core[k]):10.1f}")
    print(f"cached (workers 0) / before issue 28, images/s per core: median of rounds {statistics.median(ratio):.2f} "
          f"(target >= 4); cached / uncached now (both uint8 geometry): {statistics.median(ratio_now):.2f}")
    print(f"one ViT-B/16 VPT-deep train step consumes {train:.1f} images/s on {args.device}; the auto-workers cached "
          f"pipeline gives {auto:.1f} ({'the model' if auto >= train else 'the loader'} is the bottleneck)")
    return {"rows": rows, "cached_per_core_ratio_median": statistics.median(ratio),
            "cached_over_uncached_now_median": statistics.median(ratio_now), "train_images_per_s": train}


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
