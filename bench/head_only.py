"""Benchmark: head-only training with and without the feature cache (``train.feature_cache``), issue 16.

What it measures, in one process, alternating A and B so that the shared CPU's drift hits both alike:

- ``uncached``: ``vptool.engine.train.train`` on ``recipes/linear_digits.yaml`` with ``train.epochs`` = E
  (default 100) and ``train.feature_cache: off``: the frozen backbone runs over the training and validation
  splits in every epoch;
- ``cached``: the same recipe with ``train.feature_cache: auto``: the backbone runs once per split;
- ``forward``: one frozen forward pass (eval mode, no grad) over the train and val splits, the floor of any
  cached run;
- ``head``: E epochs of the same SGD steps on the head alone over features already in memory, plus its
  validation pass: the floor of the head's own work.

Per pair it reports cached / uncached wall time, and cached / (forward + head), whose target is <= 2: the
cached run costs at most twice what it cannot avoid (it also builds the model, evaluates the test split and
writes the run directory). The medians over pairs are printed, with the CPU flags.

    python bench/head_only.py                    # 100 epochs, 2 pairs (~10 min on 2 shared cores)
    python bench/head_only.py --epochs 20 --pairs 1 --json head_only.json

A benchmark, not a test: it exits 0 whether or not the target is met.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "linear_digits.yaml"


def recipe(epochs: int, cache: str, out: Path, name: str):
    from vptool.recipe import load_recipe

    return load_recipe(RECIPE, [f"train.epochs={epochs}", f"train.feature_cache={cache}", f"output.dir={out}",
                                f"output.name={name}", "train.device=cpu"])


def time_train(epochs: int, cache: str, out: Path, name: str) -> tuple[float, dict]:
    from vptool.engine.train import Observer, train

    t = time.perf_counter()
    summary = train(recipe(epochs, cache, out, name), observer=Observer.silent())
    return time.perf_counter() - t, summary


def time_floors(epochs: int, out: Path) -> tuple[float, float]:
    """(one frozen forward over train + val, E epochs of the head's SGD steps + val passes on in-memory
    features), seconds."""
    from vptool.engine.evaluate import eval_loader
    from vptool.engine.features import FeatureHead, feature_fn
    from vptool.engine.setup import prepare
    from vptool.engine.train import make_optimizer

    r = recipe(epochs, "auto", out, "floors")
    setup = prepare(r, device=torch.device("cpu"))
    model = setup.model
    fn = feature_fn(model, pre_norm=False)
    feats = {}
    t = time.perf_counter()
    with torch.no_grad():
        model.eval()
        for split in ("train", "val"):
            zs, ys = [], []
            for x, y in eval_loader(setup, r, split):
                zs.append(fn(x))
                ys.append(torch.as_tensor(y))
            feats[split] = (torch.cat(zs), torch.cat(ys))
    forward = time.perf_counter() - t

    head = FeatureHead(model)
    opt = make_optimizer(r, model.trainable_parameters())
    (zt, yt), (zv, _) = feats["train"], feats["val"]
    B, n = r.data.batch_size, zt.shape[0]
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    for _ in range(epochs):
        head.train()
        order = torch.randperm(n, generator=g)
        for s in range(0, n, B):
            j = order[s:s + B]
            loss = F.cross_entropy(head(zt[j]), yt[j])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()  # the loop reads the loss each step, as training does
        with torch.no_grad():
            head.eval()
            for s in range(0, zv.shape[0], r.data.eval_batch_size):
                head(zv[s:s + r.data.eval_batch_size])
    return forward, time.perf_counter() - t


def main(argv=None) -> int:
    from vptool.hardware import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=2, help="alternations of uncached / cached (median reported)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"CPU flags: {' '.join(cpu_flags()) or '-'}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{RECIPE.relative_to(ROOT)}, {a.epochs} epochs, {a.pairs} pair(s), interleaved", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for i in range(a.pairs):
            unc, s_unc = time_train(a.epochs, "off", out, f"uncached{i}")
            cac, s_cac = time_train(a.epochs, "auto", out, f"cached{i}")
            fwd, head = time_floors(a.epochs, out)
            same = s_unc["test_top1"] == s_cac["test_top1"]
            rows.append({"uncached_s": unc, "cached_s": cac, "forward_s": fwd, "head_s": head,
                         "speedup": unc / cac, "cached_over_floor": cac / (fwd + head), "same_test_top1": same})
            print(f"pair {i + 1}: uncached {unc:.1f} s, cached {cac:.1f} s ({unc / cac:.1f}x faster); one frozen "
                  f"forward over train+val {fwd:.2f} s + {a.epochs} head epochs {head:.2f} s -> cached / floor "
                  f"{cac / (fwd + head):.2f} (target <= 2); test top-1 {s_cac['test_top1']:.2f}% "
                  f"{'==' if same else '!='} uncached {s_unc['test_top1']:.2f}%", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("speedup", "cached_over_floor")}
    ok = med["cached_over_floor"] <= 2 and all(r["same_test_top1"] for r in rows)
    print(f"median over pairs: cached is {med['speedup']:.1f}x faster than uncached; cached / (forward + head) "
          f"{med['cached_over_floor']:.2f} -> {'PASS' if ok else 'MISS'} (target <= 2, same test top-1)")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu_flags": cpu_flags(), "epochs": a.epochs, "pairs": rows,
                                            "median": med, "pass": ok}, indent=2))
    return 0 if math.isfinite(med["speedup"]) else 1


if __name__ == "__main__":
    sys.exit(main())
