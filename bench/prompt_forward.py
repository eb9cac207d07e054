"""Benchmark: VPT-deep prefix form vs concatenated form (and VPT-shallow) on a frozen timm ViT.

What it measures
----------------
For each prompt length Np (default 50 and 200), each precision (fp32, and bf16 autocast) and each variant

- ``deep-prefix``  ``PromptedViT(prompt_mode="deep", deep_form="prefix")``: the prompts of block i only add
  keys/values to block i (``vptool.prompting.attention.prompted_attention(prefix=...)``),
- ``deep-concat``  ``PromptedViT(prompt_mode="deep", deep_form="concat")``: the reference form, block i runs on
  ``[CLS, P_i, E]`` and the prompt rows are dropped afterwards,
- ``shallow``      ``PromptedViT(prompt_mode="shallow")``: one prompt set carried through every block,

it times, on ViT-B/16 at 224 px (``build_backbone("vit_base_patch16_224", pretrained=False)``: random init,
no download; timing does not depend on the weights), batch 8, 10 classes, CLS readout with the pretrained norm,
prompt dropout 0.1 for deep (VPT's setting; 0 for shallow unless ``--shallow-dropout``):

- one TRAINING step: ``model.train()`` (the backbone itself always stays in eval mode), forward,
  cross-entropy, backward, ``SGD(momentum=0.9)`` step over ``model.trainable_parameters()`` (backbone frozen, so
  only prompts + head have gradients);
- one EVAL forward: ``model.eval()`` under ``torch.no_grad()``.

Each number is the median over ``--steps`` timed steps (default 5) after ``--warmup`` untimed steps (default 1),
reported as images/s (batch / median step time). bf16 uses ``torch.autocast(device_type, dtype=torch.bfloat16)``
around forward + loss (backward and the optimizer step run outside autocast, as usual). On CUDA every timing is
bracketed by ``torch.cuda.synchronize()`` and the peak GPU memory (``torch.cuda.max_memory_allocated``, reset
before each phase) is reported per variant. Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss``; on
Linux the kernel's RSS high-water mark is reset (``echo 5 > /proc/self/clear_refs``) before each phase so the
value is per phase, and the table also gives the process-wide peak. The per-phase RSS includes what the process
already holds (torch, the shared backbone weights, the input batch).

Before any timing, for each Np the prefix and the concatenated form are built with identical prompts and head
and compared in eval mode, fp32, on the same images: the max |difference| of the CLS output after the last block
(and of all CLS/patch rows and of the logits) is printed; it should be <= 1e-4 at ViT-B (``--tol``).

Ratios and targets
------------------
``ratio = prefix images/s / concat images/s``, for the training step and for the eval forward, at each Np and
precision. Targets for the TRAINING-step ratio (ViT-B/16, default settings only; shown as PASS/MISS):

- Np = 50:  ratio >= 1.1
- Np = 200: ratio >= 1.6

They come from a simple analytic FLOP count (printed next to them), per block with D the width, N+1 the
CLS + patch rows and an MLP of ratio 4:

- concat: ``(N+1+Np)`` rows through qkv/proj/MLP (``12 (N+1+Np) D^2`` MACs) and ``(N+1+Np)^2`` attention
  (``2 (N+1+Np)^2 D`` MACs);
- prefix: ``N+1`` rows through qkv/proj/MLP plus K/V for the Np prompts (``12 (N+1) D^2 + 2 Np D^2``) and
  ``(N+1)(N+1+Np)`` attention (``2 (N+1)(N+1+Np) D``);

plus the shared patch embedding. That predicts a forward ratio of about 1.2 at Np = 50 and 1.75 at Np = 200.
The training-step prediction adds a backward with frozen weights (input gradients only: the linear layers cost
the same as forward, attention twice its forward). The targets are set a little below the prediction because
the element-wise work (LayerNorm, GELU, softmax, residuals, the concat/slice copies), which the count ignores, and
fixed per-step overheads dilute the gain. In eval mode the prefix form computes prompt K/V once per batch
(prompts are not expanded without dropout); the ``eval`` prediction column accounts for that.

How to run
----------
    python bench/prompt_forward.py                       # full run: ~11 min on 2 idle AVX-512 cores
    python bench/prompt_forward.py --json bench.json     # also write every number as JSON
    python bench/prompt_forward.py --quick               # smoke check: tiny ViT, 1 step, a few seconds
    python bench/prompt_forward.py --device cuda         # on a GPU (auto picks cuda when available)
    python bench/prompt_forward.py --variants deep-prefix --prompt-lengths 50 --precisions fp32 \\
        --modes train --steps 2 --warmup 1               # one cell, e.g. to estimate step times

This is a benchmark, not a test: it exits 0 whether or not targets are met (use the JSON to check them). Run it
on an otherwise idle machine; the numbers from a shared CPU are not meaningful. On CPU each phase also records the
process CPU time per step; when it is well below ``wall x threads`` the table says the CPU looked shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from vptool.backbones.build import build_backbone
from vptool.hardware import cpu_flags, cpu_native_bf16
from vptool.prompting.model import PromptedViT

VARIANTS = {
    "deep-prefix": dict(prompt_mode="deep", deep_form="prefix"),
    "deep-concat": dict(prompt_mode="deep", deep_form="concat"),
    "shallow": dict(prompt_mode="shallow"),
}
MODEL = "vit_base_patch16_224"
#: Training-step ratio targets (prefix / concat images/s), valid for ViT-B/16 224 px at the default settings.
TARGETS = {50: 1.1, 200: 1.6}
#: The tiny configuration of ``--quick`` (constructor kwargs of the timm model).
QUICK_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


# ------------------------------------------------------------------------------------------------ FLOP model
def flop_model(n_tokens: int, n_patch_macs: int, depth: int, dim: int, mlp_ratio: float, np_: int,
               batch: int) -> dict:
    """Analytic GFLOPs per image (2 x multiply-adds) of the concat and prefix forms and their ratios.

    Args:
        n_tokens: N+1, the CLS/prefix + patch rows.
        n_patch_macs: MACs of the patch embedding per image (shared by both forms).
        depth, dim, mlp_ratio: L, D and the MLP expansion of the blocks.
        np_: Np prompts per block.
        batch: B; in eval mode the prefix form computes the prompt K/V once per batch.
    """
    T, D = n_tokens, dim
    lin = 4 + 2 * mlp_ratio  # qkv (3) + proj (1) + MLP (2 * ratio), in units of rows * D^2
    c_lin, c_att = lin * (T + np_) * D * D, 2 * (T + np_) ** 2 * D
    p_lin, p_att = lin * T * D * D + 2 * np_ * D * D, 2 * T * (T + np_) * D
    p_lin_eval = lin * T * D * D + 2 * np_ * D * D / batch

    def gf(macs):
        return 2 * macs / 1e9

    fwd_c = n_patch_macs + depth * (c_lin + c_att)
    fwd_p = n_patch_macs + depth * (p_lin + p_att)
    fwd_p_eval = n_patch_macs + depth * (p_lin_eval + p_att)
    # backward with frozen weights: input grads only (linear = forward, attention = 2 x forward); no patch embed
    bwd_c = depth * (c_lin + 2 * c_att)
    bwd_p = depth * (p_lin + 2 * p_att)
    return {
        "concat_fwd_gflop_per_img": gf(fwd_c), "prefix_fwd_gflop_per_img": gf(fwd_p),
        "concat_train_gflop_per_img": gf(fwd_c + bwd_c), "prefix_train_gflop_per_img": gf(fwd_p + bwd_p),
        "pred_ratio_fwd": fwd_c / fwd_p,
        "pred_ratio_eval": fwd_c / fwd_p_eval,
        "pred_ratio_train": (fwd_c + bwd_c) / (fwd_p + bwd_p),
    }


# ------------------------------------------------------------------------------------------------ memory
def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux ``clear_refs`` 5) so ru_maxrss becomes per phase."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _ru_maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


class Memory:
    """Per-phase peak RSS (and peak GPU memory on CUDA), plus the process-wide peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process_peak = _ru_maxrss_mib()
        self.per_phase = _reset_rss_peak()

    def start(self) -> None:
        self.process_peak = max(self.process_peak, _ru_maxrss_mib())
        if self.per_phase:
            _reset_rss_peak()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict:
        rss = _ru_maxrss_mib()
        self.process_peak = max(self.process_peak, rss)
        out = {"peak_rss_mib": rss}
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            out["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return out


# ------------------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(fn, warmup: int, steps: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds (all threads) of each of ``steps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times, cpu = [], []
    for _ in range(steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return times, cpu


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def bench_train(model: PromptedViT, x, y, precision, device, warmup, steps, mem: Memory,
                compiled: bool = False) -> dict:
    """One training step, eager or with ``torch.compile(model)`` (what ``train.compile: true`` does); the
    compile happens in the first warm-up step, whose time is reported as ``first_step_s``."""
    opt = torch.optim.SGD(model.trainable_parameters(), lr=1e-3, momentum=0.9)
    model.train()
    fwd = torch.compile(model) if compiled else model

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast_ctx(device, precision):
            loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        opt.step()

    mem.start()
    t = time.perf_counter()
    step()  # the first step (for a compiled model: the compile)
    _sync(device)
    first = time.perf_counter() - t
    times, cpu = time_steps(step, max(0, warmup - 1), steps, device)
    out = mem.stop()
    return {"times_s": times, "cpu_s": cpu, "first_step_s": first, **out}


def bench_eval(model: PromptedViT, x, precision, device, warmup, steps, mem: Memory) -> dict:
    model.eval()

    def step():
        with torch.no_grad(), autocast_ctx(device, precision):
            model(x)

    mem.start()
    times, cpu = time_steps(step, warmup, steps, device)
    out = mem.stop()
    return {"times_s": times, "cpu_s": cpu, **out}


# ------------------------------------------------------------------------------------------------ build
def make_model(backbone, variant: str, np_: int, args, seed: int) -> PromptedViT:
    """A PromptedViT on the shared frozen ``backbone``; the same ``seed`` gives the same prompts and head."""
    kw = VARIANTS[variant]
    dropout = args.prompt_dropout if kw["prompt_mode"] == "deep" else args.shallow_dropout
    g = torch.Generator().manual_seed(seed)
    return PromptedViT(backbone, num_classes=args.num_classes, prompt_length=np_, prompt_init="xavier",
                       prompt_dropout=dropout, readout_pool="cls", readout_norm="pretrained", tune="prompts",
                       generator=g, **kw)


@torch.no_grad()
def check_prefix_vs_concat(backbone, np_: int, x: torch.Tensor, args, device) -> dict:
    """Max |prefix - concat| of the CLS output, of all rows and of the logits (eval, fp32)."""
    models = {v: make_model(backbone, v, np_, args, seed=1000 + np_).to(device).eval()
              for v in ("deep-prefix", "deep-concat")}
    feats = {v: m.forward_features(x) for v, m in models.items()}
    logits = {v: m.forward_head(feats[v]) for v, m in models.items()}
    fp, fc = feats["deep-prefix"], feats["deep-concat"]
    cls = (fp[:, 0] - fc[:, 0]).abs().max().item()
    return {
        "cls_max_abs_diff": cls,
        "all_rows_max_abs_diff": (fp - fc).abs().max().item(),
        "logits_max_abs_diff": (logits["deep-prefix"] - logits["deep-concat"]).abs().max().item(),
        "cls_max_abs": fc[:, 0].abs().max().item(),
        "tol": args.tol,
        "pass": bool(cls <= args.tol),
    }


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per cell, median reported (default 5)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before timing (default 1)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--prompt-lengths", default=None, help="comma-separated Np values (default 50,200)")
    ap.add_argument("--precisions", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("--modes", default="train,eval", help="comma-separated subset of train,eval")
    ap.add_argument("--prompt-dropout", type=float, default=0.1, help="deep prompt dropout (VPT: 0.1)")
    ap.add_argument("--shallow-dropout", type=float, default=0.0, help="shallow prompt dropout (default 0)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max |prefix - concat| on the CLS output")
    ap.add_argument("--no-check", action="store_true", help="skip the prefix/concat correctness check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="FILE", help="also write all numbers to FILE as JSON")
    ap.add_argument("--compile-variants", default="deep-prefix",
                    help="variants whose training step is also timed under torch.compile (train.compile: true), "
                         "for the eager-vs-compiled column; comma-separated, 'none' to skip (default deep-prefix)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke check: tiny ViT (32 px, D=64, depth 2), Np 4,16, 1 warm-up + 1 timed step")
    args = ap.parse_args(argv)
    if args.steps is None:
        args.steps = 1 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1
    if args.prompt_lengths is None:
        args.prompt_lengths = "4,16" if args.quick else "50,200"
    args.prompt_lengths = [int(s) for s in args.prompt_lengths.split(",") if s.strip()]
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    args.modes = [s.strip() for s in args.modes.split(",") if s.strip()]
    args.compile_variants = [s.strip() for s in args.compile_variants.split(",") if s.strip() not in ("", "none")]
    for name, vals, allowed in (("--precisions", args.precisions, ("fp32", "bf16")),
                                ("--variants", args.variants, tuple(VARIANTS)),
                                ("--modes", args.modes, ("train", "eval")),
                                ("--compile-variants", args.compile_variants or ["deep-prefix"], tuple(VARIANTS))):
        bad = [v for v in vals if v not in allowed]
        if bad or not vals:
            ap.error(f"{name}: {bad or 'empty'}; choose from {','.join(allowed)}")
    if args.steps < 1 or args.warmup < 0 or any(n < 1 for n in args.prompt_lengths):
        ap.error("--steps >= 1, --warmup >= 0, prompt lengths >= 1")
    return args


def log(t0: float, msg: str) -> None:
    print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def fmt(v, spec=".2f", missing="-"):
    return missing if v is None else format(v, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("--device cuda: CUDA is not available", file=sys.stderr)
            return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    kwargs = dict(QUICK_KWARGS) if args.quick else {}
    backbone, _ = build_backbone(MODEL, pretrained=False, kwargs=kwargs)
    backbone.to(device)
    D, L = backbone.embed_dim, len(backbone.blocks)
    H, W = backbone.patch_embed.img_size
    ph, pw = backbone.patch_embed.patch_size
    N = backbone.patch_embed.num_patches
    n_tokens = N + backbone.num_prefix_tokens
    mlp_ratio = backbone.blocks[0].mlp.fc1.out_features / D
    targets_apply = not args.quick
    B = args.batch_size

    env = {
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "os_cpu_count": os.cpu_count(),
        "cpu_capability": getattr(torch.backends.cpu, "get_cpu_capability", lambda: None)(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cpu_flags": cpu_flags(), "cpu_native_bf16": cpu_native_bf16(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }
    try:
        import timm
        env["timm"] = timm.__version__
    except Exception:  # pragma: no cover
        pass
    config = {
        "model": MODEL, "model_kwargs": kwargs, "quick": args.quick, "img_size": [H, W],
        "patch_size": [ph, pw], "num_patches": N, "embed_dim": D, "depth": L, "mlp_ratio": mlp_ratio,
        "batch_size": B, "num_classes": args.num_classes, "prompt_lengths": args.prompt_lengths,
        "precisions": args.precisions, "variants": args.variants, "modes": args.modes, "steps": args.steps,
        "warmup": args.warmup, "prompt_dropout_deep": args.prompt_dropout,
        "prompt_dropout_shallow": args.shallow_dropout, "readout": "cls/pretrained",
        "optimizer": "SGD(lr=1e-3, momentum=0.9) over trainable_parameters()",
    }
    log(t0, f"{MODEL}{' (quick: ' + str(kwargs) + ')' if args.quick else ''} on {device}, "
            f"{torch.get_num_threads()} threads, batch {B}, Np {args.prompt_lengths}, "
            f"{args.warmup} warm-up + {args.steps} timed steps")
    if args.steps < 5:
        log(t0, f"note: only {args.steps} timed step(s); publishable numbers need a median of >= 5")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(B, 3, H, W, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (B,), generator=g).to(device)
    mem = Memory(device)

    patch_macs = N * (3 * ph * pw) * D
    flops = {n: flop_model(n_tokens, patch_macs, L, D, mlp_ratio, n, B) for n in args.prompt_lengths}

    checks: dict[int, dict] = {}
    results: list[dict] = []
    for np_ in args.prompt_lengths:
        if not args.no_check:
            checks[np_] = check_prefix_vs_concat(backbone, np_, x[:2], args, device)
            c = checks[np_]
            log(t0, f"check Np={np_}: CLS max|prefix-concat| = {c['cls_max_abs_diff']:.2e} "
                    f"(all rows {c['all_rows_max_abs_diff']:.2e}, logits {c['logits_max_abs_diff']:.2e}) "
                    f"{'PASS' if c['pass'] else 'FAIL'} (tol {args.tol:g})")
        for prec in args.precisions:
            for variant in args.variants:
                model = make_model(backbone, variant, np_, args, seed=1000 + np_).to(device)
                row = {"variant": variant, "prompt_length": np_, "precision": prec,
                       "trainable_params": sum(p.numel() for p in model.trainable_parameters())}
                for mode in args.modes:
                    if mode == "train":
                        r = bench_train(model, x, y, prec, device, args.warmup, args.steps, mem)
                    else:
                        r = bench_eval(model, x, prec, device, args.warmup, args.steps, mem)
                    med = statistics.median(r["times_s"])
                    util = (statistics.median(r["cpu_s"]) / (med * torch.get_num_threads())
                            if device.type == "cpu" else None)
                    row[mode] = {"step_s_median": med, "images_per_s": B / med, "cpu_utilisation": util, **r}
                    log(t0, f"{prec:4s} Np={np_:<4d} {variant:11s} {mode:5s}: {B / med:8.2f} img/s "
                            f"(median {med:.3f}s of {[f'{t:.3f}' for t in r['times_s']]}"
                            + (f", CPU use {util:.0%} of {torch.get_num_threads()} threads" if util else "") + "), "
                            f"peak RSS {r['peak_rss_mib']:.0f} MiB"
                            + (f", peak GPU {r['peak_gpu_mib']:.0f} MiB" if "peak_gpu_mib" in r else ""))
                if "train" in args.modes and variant in args.compile_variants:
                    r = bench_train(model, x, y, prec, device, args.warmup, args.steps, mem, compiled=True)
                    med = statistics.median(r["times_s"])
                    row["train_compiled"] = {"step_s_median": med, "images_per_s": B / med, **r}
                    log(t0, f"{prec:4s} Np={np_:<4d} {variant:11s} train, torch.compile: {B / med:8.2f} img/s "
                            f"(median {med:.3f}s; first step with the compile {r['first_step_s']:.1f}s; "
                            f"{row['train']['step_s_median'] / med:.2f}x eager)")
                results.append(row)
                del model
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    # ------------------------------------------------------------------ ratios and targets
    def ips(variant, np_, prec, mode):
        for r in results:
            if (r["variant"], r["prompt_length"], r["precision"]) == (variant, np_, prec) and mode in r:
                return r[mode]["images_per_s"]
        return None

    ratios = []
    for np_ in args.prompt_lengths:
        for prec in args.precisions:
            rr = {"prompt_length": np_, "precision": prec, **{k: v for k, v in flops[np_].items()
                                                               if k.startswith("pred_")}}
            for mode in ("train", "eval"):
                p, c = ips("deep-prefix", np_, prec, mode), ips("deep-concat", np_, prec, mode)
                rr[f"{mode}_ratio"] = p / c if p is not None and c is not None else None
            tgt = TARGETS.get(np_) if targets_apply else None
            rr["train_target"] = tgt
            rr["train_target_result"] = (None if tgt is None or rr["train_ratio"] is None
                                         else ("PASS" if rr["train_ratio"] >= tgt else "MISS"))
            ratios.append(rr)

    mem.process_peak = max(mem.process_peak, _ru_maxrss_mib())
    elapsed = time.perf_counter() - t0

    # ------------------------------------------------------------------ report
    out = []
    title = f"VPT prompt forward benchmark: {MODEL}"
    if args.quick:
        title += f" [QUICK: {kwargs}; numbers are a smoke check only]"
    out += [title,
            f"device {device}{' (' + env['device_name'] + ')' if env['device_name'] else ''}, "
            f"threads {env['threads']}, cpu capability {env['cpu_capability']}, torch {env['torch']}, "
            f"timm {env.get('timm')}",
            f"CPU flags: {' '.join(env['cpu_flags']) or '-'} (native bf16: "
            f"{'yes' if env['cpu_native_bf16'] else 'no' if env['cpu_native_bf16'] is False else 'unknown'})",
            f"{H}x{W} px, patch {ph}, N+1={n_tokens} tokens, D={D}, L={L}, batch {B}, {args.num_classes} classes, "
            f"median of {args.steps} step(s) after {args.warmup} warm-up; deep prompt dropout "
            f"{args.prompt_dropout}, shallow {args.shallow_dropout}", ""]

    if checks:
        out += ["Correctness (eval, fp32, 2 images): max |prefix - concat|",
                f"  {'Np':>4}  {'CLS':>9}  {'all rows':>9}  {'logits':>9}  {'|CLS| max':>9}  result (tol {args.tol:g})"]
        for np_, c in checks.items():
            out.append(f"  {np_:>4}  {c['cls_max_abs_diff']:9.2e}  {c['all_rows_max_abs_diff']:9.2e}  "
                       f"{c['logits_max_abs_diff']:9.2e}  {c['cls_max_abs']:9.2e}  {'PASS' if c['pass'] else 'FAIL'}")
        out.append("")

    gpu = device.type == "cuda"
    out.append("Throughput (images/s; median step time in s; 'compiled': the train step under torch.compile, "
               "'/eager' its ratio to the eager step); peak RSS per phase (MiB)"
               + ("; peak GPU memory per phase (MiB)" if gpu else ""))
    hdr = (f"  {'prec':4}  {'Np':>4}  {'variant':11}  {'train img/s':>11}  {'(s/step)':>8}  "
           f"{'compiled':>8}  {'/eager':>6}  {'eval img/s':>10}  {'(s/step)':>8}  {'RSS train':>9}  {'RSS eval':>8}")
    if gpu:
        hdr += f"  {'GPU train':>9}  {'GPU eval':>8}"
    out.append(hdr)
    for r in results:
        tr, ev, tc = r.get("train", {}), r.get("eval", {}), r.get("train_compiled", {})
        speedup = (tc["images_per_s"] / tr["images_per_s"]) if tc and tr else None
        line = (f"  {r['precision']:4}  {r['prompt_length']:>4}  {r['variant']:11}  "
                f"{fmt(tr.get('images_per_s')):>11}  {fmt(tr.get('step_s_median'), '.3f'):>8}  "
                f"{fmt(tc.get('images_per_s')):>8}  {fmt(speedup, '.2f'):>6}  "
                f"{fmt(ev.get('images_per_s')):>10}  {fmt(ev.get('step_s_median'), '.3f'):>8}  "
                f"{fmt(tr.get('peak_rss_mib'), '.0f'):>9}  {fmt(ev.get('peak_rss_mib'), '.0f'):>8}")
        if gpu:
            line += f"  {fmt(tr.get('peak_gpu_mib'), '.0f'):>9}  {fmt(ev.get('peak_gpu_mib'), '.0f'):>8}"
        out.append(line)
    utils = [r[m]["cpu_utilisation"] for r in results for m in ("train", "eval")
             if m in r and r[m]["cpu_utilisation"] is not None]
    if utils and min(utils) < 0.75:
        out.append(f"  WARNING: process CPU time was only {min(utils):.0%}-{max(utils):.0%} of wall x threads: "
                   "the CPU looks shared with other work, so these timings and ratios are not reliable")
    out.append(f"  process peak RSS (ru_maxrss): {mem.process_peak:.0f} MiB"
               + ("" if mem.per_phase else "  (per-phase reset unavailable: RSS columns are cumulative peaks)"))
    out.append("")

    out.append("FLOP model (GFLOP per image, 2 x MACs) and prefix/concat ratios")
    out.append(f"  {'Np':>4}  {'concat fwd':>10}  {'prefix fwd':>10}  {'pred fwd':>8}  {'pred eval':>9}  "
               f"{'pred train':>10}")
    for np_, f in flops.items():
        out.append(f"  {np_:>4}  {f['concat_fwd_gflop_per_img']:10.4g}  {f['prefix_fwd_gflop_per_img']:10.4g}  "
                   f"{f['pred_ratio_fwd']:8.3f}  {f['pred_ratio_eval']:9.3f}  {f['pred_ratio_train']:10.3f}")
    out.append("")
    out.append("Measured ratio = deep-prefix img/s / deep-concat img/s")
    out.append(f"  {'prec':4}  {'Np':>4}  {'train':>6}  {'eval':>6}  {'pred fwd':>8}  {'pred train':>10}  "
               f"{'target (train)':>14}  result")
    for rr in ratios:
        tgt = f">= {rr['train_target']:.2f}" if rr["train_target"] is not None else "n/a"
        out.append(f"  {rr['precision']:4}  {rr['prompt_length']:>4}  {fmt(rr['train_ratio'], '.3f'):>6}  "
                   f"{fmt(rr['eval_ratio'], '.3f'):>6}  {rr['pred_ratio_fwd']:8.3f}  {rr['pred_ratio_train']:10.3f}  "
                   f"{tgt:>14}  {rr['train_target_result'] or '-'}")
    if not targets_apply:
        out.append("  (targets apply to ViT-B/16 at Np 50 and 200 only; not to --quick)")
    out.append("")
    out.append(f"total wall time {elapsed:.1f}s")
    print("\n".join(out), flush=True)

    if args.json:
        doc = {"env": env, "config": config, "flop_model": {str(k): v for k, v in flops.items()},
               "correctness": {str(k): v for k, v in checks.items()}, "results": results, "ratios": ratios,
               "targets": {str(k): v for k, v in TARGETS.items()} if targets_apply else {},
               "peak_rss_mib_process": mem.process_peak, "rss_per_phase": mem.per_phase,
               "wall_time_s": elapsed}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=2)
        log(t0, f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
