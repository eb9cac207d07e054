"""Benchmark: evaluation images/s of an exported prompted ViT-B against the PyTorch model it came from.

What it measures
----------------
For VPT-deep (prefix form) and VPT-shallow, Np = 50 each (``--prompt-length``), on timm ``vit_base_patch16_224``
at 224 px (random init, seeded: no download; the timing does not depend on the weights), 10 classes, CLS readout
with the pretrained norm, prompts and head given random values, it times one evaluation forward of a batch of 8
(``--batch``) with

- ``eager fp32``: the ``PromptedViT`` in eval mode under ``torch.no_grad()``;
- ``eager bf16``: the same under ``torch.autocast("cpu", torch.bfloat16)`` (skipped, with a line saying so, on a
  CPU without native bf16 (no ``avx512_bf16`` / ``amx_bf16``), where it runs ~100x slower; ``--bf16`` forces it);
- ``onnxruntime``: the graph ``vptool export --format onnx`` writes (``vptool.export.write_onnx``: dynamo
  exporter, verified), in ``onnxruntime.InferenceSession`` with the CPU provider, default graph optimisations;
- ``pt2``: the ``torch.export`` program ``vptool export --format pt2`` writes, reloaded with
  ``torch.export.load(...).module()``, under ``torch.no_grad()``.

torch and onnxruntime each use ``--threads`` intra-op threads (default 2). The four runners are timed in
interleaved rounds in one process (round r: eager fp32, bf16, onnxruntime, pt2, one batch each, after
``--warmup`` untimed rounds), so a drift of the shared CPU's speed hits them alike. The reported ratio of a
runner is the median over rounds of ``eager fp32 seconds / runner seconds`` in the same round (> 1: faster than
eager fp32); images/s are ``batch / median seconds``. Each runner's max |logits - eager fp32 logits| on the timed
batch is printed next to it (bf16 differs by its precision; the exported fp32 graphs must stay <= 1e-4).

Target
------
onnxruntime >= 1.2x eager fp32 at equal precision (fp32), for both variants; shown as PASS/MISS.

How to run
----------
    python bench/export.py                 # ViT-B/16, deep and shallow, 7 rounds: a few minutes on 2 cores
    python bench/export.py --json out.json # also every number as JSON
    python bench/export.py --opset 23 --profile   # ONNX Attention op; where each runner spends its time
    python bench/export.py --quick         # tiny ViT, 2 rounds: a smoke check in seconds

This is a benchmark, not a test: it exits 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vptool.hardware import FLAGS, cpu_flags

TARGET = 1.2
MODEL = "vit_base_patch16_224"
QUICK_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
VARIANTS = {"vpt-deep": "deep", "vpt-shallow": "shallow"}
def build(variant: str, np_: int, quick: bool, seed: int = 0):
    """A PromptedViT with random prompts and head (eval mode, no grad), and the backbone name."""
    import vptool

    kwargs = dict(QUICK_KWARGS) if quick else {}
    torch.manual_seed(seed)
    model = vptool.from_preset(variant, MODEL, 10, pretrained=False, backbone_kwargs=kwargs, seed=seed,
                               prompt_length=np_, prompt_dropout=0.0, readout_pool="cls",
                               readout_norm="pretrained")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval().requires_grad_(False)


def timed(fn, x) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    y = fn(x)
    return time.perf_counter() - t, torch.as_tensor(y).float()


def profile(model, x: torch.Tensor, onnx_path: Path, threads: int, top: int = 8) -> None:
    """Print the ops eager fp32 (torch.profiler, self CPU time) and onnxruntime (its node profiler) spend a
    batch's time on, the largest first."""
    import collections

    import onnxruntime as ort
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch.no_grad():
        model(x)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print("  eager fp32, self CPU time: " + ", ".join(
        f"{e.key} {e.self_cpu_time_total / 1e3:.1f} ms ({100 * e.self_cpu_time_total / total:.0f} %)"
        for e in events[:top]))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.enable_profiling = threads, 1, True
    opts.profile_file_prefix = str(onnx_path.with_suffix(""))
    sess = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"pixel_values": x.numpy()})
    trace = json.loads(Path(sess.end_profiling()).read_text())
    ops = collections.Counter()
    for e in trace:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            ops[e["args"]["op_name"]] += e["dur"]
    total = sum(ops.values())
    print("  onnxruntime, kernel time: " + ", ".join(
        f"{k} {v / 1e3:.1f} ms ({100 * v / total:.0f} %)" for k, v in ops.most_common(top)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt-length", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--bf16", action="store_true", help="time bf16 autocast even without native CPU bf16")
    ap.add_argument("--quick", action="store_true", help="tiny ViT, 2 rounds (smoke check)")
    ap.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's; 23 maps SDPA "
                                                            "to ONNX Attention)")
    ap.add_argument("--profile", action="store_true", help="also print where eager fp32 and onnxruntime spend "
                                                          "their time (torch.profiler, onnxruntime's profiler)")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.warmup = 2, 1

    import onnxruntime as ort

    from vptool.export import write_onnx, write_pt2

    torch.set_num_threads(args.threads)
    flags = cpu_flags()
    native_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(flags))
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {platform.processor() or platform.machine()}, "
          f"threads {args.threads}")
    print(f"CPU flags: {' '.join(flags) or '(none of ' + ' '.join(FLAGS) + ')'}")
    run_bf16 = native_bf16 or args.bf16
    if not run_bf16:
        print("eager bf16: skipped (no avx512_bf16/amx_bf16: bf16 autocast runs ~100x slower here; --bf16 forces it)")
    results = {"torch": torch.__version__, "onnxruntime": ort.__version__, "cpu_flags": flags,
               "threads": args.threads, "batch": args.batch, "prompt_length": args.prompt_length,
               "backbone": "tiny" if args.quick else MODEL, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            model = build(variant, args.prompt_length, args.quick)
            size = model.data_config["input_size"]
            x = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(2))
            check = x[: min(4, args.batch)]
            t0 = time.perf_counter()
            onnx_report = write_onnx(model, Path(tmp) / f"{variant}.onnx", check, args.opset)
            t_onnx = time.perf_counter() - t0
            t0 = time.perf_counter()
            write_pt2(model, Path(tmp) / f"{variant}.pt2", check)
            t_pt2 = time.perf_counter() - t0
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = args.threads
            opts.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(Path(tmp) / f"{variant}.onnx"), sess_options=opts,
                                        providers=["CPUExecutionProvider"])
            program = torch.export.load(str(Path(tmp) / f"{variant}.pt2")).module()

            def eager(t, m=model):
                with torch.no_grad():
                    return m(t)

            def bf16(t, m=model):
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    return m(t)

            def onnxrt(t, s=sess):
                return torch.from_numpy(s.run(None, {"pixel_values": t.numpy()})[0])

            def pt2(t, p=program):
                with torch.no_grad():
                    return p(t)

            runners = {"eager fp32": eager, **({"eager bf16": bf16} if run_bf16 else {}), "onnxruntime": onnxrt,
                       "pt2": pt2}
            secs = {k: [] for k in runners}
            ratios = {k: [] for k in runners}
            diffs = {}
            for r in range(args.warmup + args.rounds):
                this = {}
                for name, fn in runners.items():
                    this[name], y = timed(fn, x)
                    if name == "eager fp32":
                        ref = y
                    diffs[name] = max(diffs.get(name, 0.0), float((y - ref).abs().max()))
                if r < args.warmup:
                    continue
                for name in runners:
                    secs[name].append(this[name])
                    ratios[name].append(this["eager fp32"] / this[name])
            print(f"\n{variant}, Np = {args.prompt_length}, {'tiny ViT' if args.quick else 'ViT-B/16 224 px'}, "
                  f"batch {args.batch} (export: onnx opset {onnx_report['opset']} {t_onnx:.1f} s, verified max "
                  f"|diff| {onnx_report['max_abs_diff']:.1e}; pt2 {t_pt2:.1f} s)")
            print(f"{'runner':<12} {'images/s':>9} {'x eager fp32':>13} {'max |diff logits|':>18}")
            rows = {}
            for name in runners:
                ips = args.batch / statistics.median(secs[name])
                ratio = statistics.median(ratios[name])
                mark = ""
                if name == "onnxruntime":
                    mark = f"  target >= {TARGET}: {'PASS' if ratio >= TARGET else 'MISS'}"
                print(f"{name:<12} {ips:>9.2f} {ratio:>13.2f} {diffs[name]:>18.2e}{mark}")
                rows[name] = {"images_per_s": ips, "ratio_to_eager_fp32": ratio, "max_abs_diff": diffs[name],
                              "seconds": secs[name], "ratios": ratios[name]}
            results["variants"][variant] = rows
            if args.profile:
                profile(model, x, Path(tmp) / f"{variant}.onnx", args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
