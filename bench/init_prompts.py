"""Benchmark: SPT k-means prototypes for every layer in one streaming pass (``vptool init-prompts``).

Workload, shaped like SPT-deep on 100 % of CUB-200 (SPT Table 1: 27.3 days of k-means) at ViT-B width:
timm ``vit_base_patch16_224`` (D = 768, L = 12, 224 px, Ne = 196 patch tokens), random weights (seeded), k = Np = 20
prototypes for each of the 12 levels, images streamed in batches of 64. CUB-200's 5,994 training images are scaled
to ``--images`` (default 96) and 4x that, to fit 2 CPU cores; on a GPU pass ``--images 1500`` or more.
The images are synthetic (smooth random colour fields, generated per index, never held).

Prints, measured in this one run:
  (a) k-means seconds / feature-extraction seconds of the same pass (larger size). Target <= 0.5.
  (b) our inertia / scikit-learn ``KMeans`` inertia (default settings: k-means++, one init, Lloyd) on the same
      tokens of the smaller size, each a true eq. 9 inertia over every token, per level. Target <= 1.01.
  (c) peak RSS of the streaming pass at 4N images / at N images (separate processes). Target <= 1.2.

    python bench/init_prompts.py [--images 96] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

K, BATCH, SIZE = 20, 64, 224


class SyntheticImages(Dataset):
    """Smooth random colour fields (4x4 noise upsampled to 224 px), one per index; nothing is held."""

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed = n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        low = torch.randn(3, 4, 4, generator=g)
        img = torch.nn.functional.interpolate(low[None], size=(SIZE, SIZE), mode="bicubic", align_corners=False)[0]
        return img + 0.1 * torch.randn(3, SIZE, SIZE, generator=g), 0


def _model(device):
    import timm

    from vptool.prompting.model import PromptedViT

    torch.manual_seed(0)
    bb = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0)
    plain = PromptedViT(bb, 2, prompt_mode="none", readout_pool="avg", readout_norm="none", tune="head")
    return plain.to(device).eval()


def _device(spec: str) -> torch.device:
    return torch.device("cuda" if spec == "auto" and torch.cuda.is_available() else ("cpu" if spec == "auto" else spec))


def stream(n: int, device: torch.device) -> dict:
    """The streaming pass alone (what init-prompts runs); reports timings and peak RSS."""
    from vptool.engine.init_prompts import stream_kmeans
    from vptool.engine.setup import autocast_dtype

    plain = _model(device)
    loader = DataLoader(SyntheticImages(n), batch_size=BATCH, pin_memory=device.type == "cuda")
    levels = list(range(12))
    t0 = time.perf_counter()
    _, inertia, km, extract_s, kmeans_s = stream_kmeans(plain, loader, levels, K, 0, device,
                                                        autocast_dtype("auto", device))
    return {"images": n, "tokens_per_level": km.seen[0], "extract_s": extract_s, "kmeans_s": kmeans_s,
            "wall_s": time.perf_counter() - t0, "summary_size": km.m,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def quality(n: int, device: torch.device) -> dict:
    """Hold the tokens of n images (fp32, CPU), feed the same stream to StreamingKMeans, compare with sklearn."""
    from sklearn.cluster import KMeans

    from vptool.engine.init_prompts import level_tokens
    from vptool.prompting.kmeans import StreamingKMeans, inertia

    plain = _model(device)
    loader = DataLoader(SyntheticImages(n), batch_size=BATCH)
    km = StreamingKMeans(K, 12, seed=0)
    held = [[] for _ in range(12)]
    with torch.no_grad():
        for x, _ in loader:
            for t, tok in level_tokens(plain, x.to(device), 11):
                km.add(t, tok.float())
                held[t].append(tok.float().reshape(-1, tok.shape[-1]).cpu())
    centres, _ = km.result()
    ratios = []
    for t in range(12):
        X = torch.cat(held[t])
        ours = inertia(X, centres[t].cpu())
        ref = KMeans(K, random_state=0).fit(X.numpy()).inertia_
        ratios.append(ours / ref)
    return {"images": n, "tokens_per_level": int(X.shape[0]), "inertia_ratio_per_level": ratios}


def _worker(kind: str, n: int, device: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--images", str(n), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96, help="N; the larger run uses 4N")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--worker", choices=["stream", "quality"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    dev = _device(a.device)
    if a.worker == "stream":
        print(json.dumps(stream(a.images, dev)))
        return
    if a.worker == "quality":
        print(json.dumps(quality(a.images, dev)))
        return
    small = _worker("stream", a.images, a.device)
    large = _worker("stream", 4 * a.images, a.device)
    q = _worker("quality", a.images, a.device)
    ra = large["kmeans_s"] / large["extract_s"]
    rb = max(q["inertia_ratio_per_level"])
    rc = large["peak_rss_mb"] / small["peak_rss_mb"]
    from vptool.hardware import cpu_flags

    print(f"CPU flags: {' '.join(cpu_flags()) or '-'}")
    print(f"device {dev} ({torch.get_num_threads()} threads); ViT-B/16 width, 12 levels, k = {K}, "
          f"summary {large['summary_size']} micro-centres per level")
    print(f"streaming pass, {large['images']} images ({large['tokens_per_level']:,d} tokens per level): "
          f"extraction {large['extract_s']:.1f} s, k-means {large['kmeans_s']:.1f} s")
    print(f"(a) k-means / extraction seconds            {ra:.3f}   (target <= 0.5)")
    print(f"(b) inertia ours / sklearn KMeans, worst of 12 levels ({q['tokens_per_level']:,d} tokens each): "
          f"{rb:.4f}   (target <= 1.01); per level: " + " ".join(f"{r:.4f}" for r in q["inertia_ratio_per_level"]))
    print(f"(c) peak RSS {large['images']} / {small['images']} images: {large['peak_rss_mb']:.0f} MB / "
          f"{small['peak_rss_mb']:.0f} MB = {rc:.3f}   (target <= 1.2)")


if __name__ == "__main__":
    main()
