"""The cost of prompting each backbone family VPT reports (VPT Table 1 ViT, Table 2 Swin, Table 5 ConvNets).

For every family, in one process, interleaved (A, B, A, B, ...), on the same batch:

- A: a VPT training step (forward, cross-entropy, backward through the frozen backbone to the prompts, SGD step
  over prompts + head);
- B: the linear probe's step on the same frozen backbone (forward without gradients, head step).

It prints images/s of each, the per-pair ratio prompted / probe and its median (how much a prompt costs over
the cheapest way to adapt that backbone), the trainable parameters, peak GPU memory on CUDA, and the CPU flags.
Backbones are timm models with random weights at their real size (seeded): the timing does not depend on the
weights.

    python bench/families.py                 # ViT-B/16, Swin-B, ConvNeXt-B, ResNet-50 at 224 px, batch 8
    python bench/families.py --quick         # tiny models, seconds (a smoke check)
    python bench/families.py --device cuda --batch 64 --json families.json

Run it on an otherwise idle machine; the shared CPU's speed drifts, which is why only ratios measured pair by
pair are compared.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from vptool.backbones.build import build_backbone
from vptool.config import ModelConfig
from vptool.hardware import cpu_flags
from vptool.prompting.model import PromptedViT

SMALL = {"input_size": (3, 32, 32)}  # --quick: the pad prompts' image size (timm's data config) for a ConvNet

#: family -> (timm name, size kwargs for --quick, the VPT variant the paper reports on it, as ModelConfig options)
FAMILIES = {
    "vit": ("vit_base_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
            dict(prompt_mode="deep", prompt_length=10, readout_pool="cls")),
    "swin": ("swin_base_patch4_window7_224",
             dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2)),
             dict(prompt_mode="deep", prompt_length=10, readout_pool="avg")),
    "convnext": ("convnext_base", dict(dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), pretrained_cfg_overlay=SMALL),
                 dict(prompt_mode="shallow", prompt_length=5, prompt_location="pad", readout_pool="avg")),
    "resnet": ("resnet50", dict(layers=(1, 1, 1, 1), pretrained_cfg_overlay=SMALL),
               dict(prompt_mode="shallow", prompt_length=5, prompt_location="pad", readout_pool="avg")),
}


def build(family: str, quick: bool, num_classes: int, device: torch.device):
    """(prompted model, linear-probe model) on one frozen backbone of ``family`` (random weights, seed 0)."""
    name, tiny, options = FAMILIES[family]
    torch.manual_seed(0)
    backbone, _ = build_backbone(name, pretrained=False, kwargs=tiny if quick else {})
    g = torch.Generator().manual_seed(1)
    prompted = PromptedViT(backbone, ModelConfig(num_classes=num_classes, readout_norm="pretrained", **options),
                           generator=g)
    probe = PromptedViT(backbone, ModelConfig(num_classes=num_classes, prompt_mode="none", tune="head",
                                              readout_pool=options["readout_pool"], readout_norm="pretrained"),
                        generator=torch.Generator().manual_seed(1))
    return prompted.to(device), probe.to(device)


def step_fn(model: PromptedViT, x: torch.Tensor, y: torch.Tensor, precision: str):
    """One optimizer step of ``model`` on (x, y); the frozen part runs without gradients when nothing before the
    head trains (the linear probe)."""
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    model.train()
    head_only = model.config.tune == "head"

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            if head_only:
                with torch.no_grad():
                    z = model.forward_features(x)
                loss = F.cross_entropy(model.forward_head(z), y)
            else:
                loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def bench_family(family: str, args, device: torch.device) -> dict:
    prompted, probe = build(family, args.quick, args.num_classes, device)
    size = prompted.data_config["input_size"][-1]  # the size the backbone (and its pad prompts) was built for
    g = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, 3, size, size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    steps = {"prompted": step_fn(prompted, x, y, args.precision), "probe": step_fn(probe, x, y, args.precision)}
    for fn in steps.values():  # warm-up (allocator, kernels)
        fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    peak: dict[str, float] = {}
    for _ in range(args.pairs):
        for k, fn in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[k].append(timed(fn, device))
            if device.type == "cuda":
                peak[k] = max(peak.get(k, 0.0), torch.cuda.max_memory_allocated(device) / 2**20)
    ratios = [a / b for a, b in zip(times["prompted"], times["probe"])]
    trainable = sum(p.numel() for p in prompted.trainable_parameters())
    return {"family": family, "backbone": FAMILIES[family][0], "options": FAMILIES[family][2],
            "trainable_params": trainable, "batch": args.batch,
            "prompted_img_s": args.batch / statistics.median(times["prompted"]),
            "probe_img_s": args.batch / statistics.median(times["probe"]),
            "time_ratio_per_pair": ratios, "time_ratio_median": statistics.median(ratios),
            **({"peak_gpu_mib": peak} if peak else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma-separated subset of " + ", ".join(FAMILIES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=3, help="interleaved (prompted, probe) pairs per family")
    ap.add_argument("--num-classes", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--quick", action="store_true", help="tiny models at 32 px (seconds)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, cpu flags: {' '.join(cpu_flags()) or '-'}"
          + (f", gpu: {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    rows = []
    print(f"{'family':9s} {'backbone':30s} {'trainable':>10s} {'VPT img/s':>10s} {'probe img/s':>12s} "
          f"{'VPT/probe time (median)':>24s}")
    for fam in args.families.split(","):
        r = bench_family(fam, args, device)
        rows.append(r)
        print(f"{fam:9s} {r['backbone']:30s} {r['trainable_params']:10,d} {r['prompted_img_s']:10.1f} "
              f"{r['probe_img_s']:12.1f} {r['time_ratio_median']:24.2f}"
              + (f"  peak GPU MiB {r['peak_gpu_mib']}" if "peak_gpu_mib" in r else ""))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"cpu_flags": cpu_flags(), "device": str(device), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
