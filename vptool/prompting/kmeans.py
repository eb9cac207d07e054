"""Streaming k-means for SPT token prototypes (SPT, Wang et al. 2024, §3.3, eq. 9-10).

SPT clusters every patch token of the training split into Np prototypes per layer (eq. 9 minimises the inertia,
eq. 10 makes each prototype its cluster's mean). The paper reports 27.3 days for SPT-deep on 100 % of CUB-200
(Table 1), and holding those tokens (5,994 images x 196 tokens x 12 layers x 768 floats) takes 43 GB. This module
never holds them: it sees the tokens once, batch by batch, and keeps a fixed-size summary per layer.

Algorithm (two levels, the scheme of Guha et al. 2003 "Clustering data streams" and Ailon et al. 2009 "Streaming
k-means approximation"):

1. **Summary by mini-batch k-means** (Sculley 2010, "Web-scale k-means clustering") with ``m`` micro-centres,
   ``m`` much larger than Np. The first ``seed_factor * m`` tokens are buffered and ``m`` of them, drawn
   uniformly, seed the micro-centres (the tokens arrive in a seeded random image order). After that each batch
   is assigned to its nearest micro-centre, and each micro-centre keeps the sufficient statistics of the tokens
   assigned to it: count w, sum s and sum of squared norms q (BIRCH's clustering feature, Zhang et al. 1996).
   A micro-centre is the running mean s / w, which is exactly Sculley's per-centre learning rate 1 / count.
2. **Final k-means** on the summary: greedy weighted k-means++ seeding (Arthur & Vassilvitskii 2007) and
   weighted Lloyd iterations on the ``m`` micro-centres (weights w), ``n_init`` restarts (default 10), the
   lowest objective wins.

Memory is O(L m D) whatever the dataset size. Cost per token is one (m, D) distance computation, on the tokens'
device (CUDA when the backbone is there). With fewer than ``seed_factor * m`` tokens in total the summary *is*
the tokens and step 2 is plain k-means++ + Lloyd on all of them.

The reported inertia is exact for the summary's grouping: sum over micro-centres of
``q - w ||s/w||^2 + w ||s/w - c_a||^2`` (parallel-axis theorem), i.e. the inertia of the final prototypes when
every token goes to the prototype of its micro-centre. Assigning each token to its own nearest prototype can only
lower it, so the figure is an upper bound on eq. 9's inertia of the returned prototypes, equal to it when the
summary holds every token.

**Several processes** (``torchrun``, ``vptool.engine.dist``): the two levels compose by design (Guha et al.'s
divide-and-conquer: a summary of summaries is a summary). Each rank streams its own shard of the images into its
own ``StreamingKMeans``; the per-set summaries (points, weights, within-group sums of squares) of all ranks are
gathered and concatenated, and the final weighted k-means (``final_kmeans``) runs on the union, identically on
every rank. The inertia bound above holds for the merged summary unchanged.

Where the paper differs: eq. 9-10 start from a uniform partition of the tokens; this module seeds with k-means++
(better and standard). The official SPT repository ships no k-means code (it reads precomputed prototypes).
"""

from __future__ import annotations

import math

import torch


def _sq_dists(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (n, k) between rows of x (n, D) and c (k, D), clamped at 0."""
    x_sq = (x * x).sum(1, keepdim=True)
    c_sq = (c * c).sum(1) if c_sq is None else c_sq
    return (x_sq - 2.0 * (x @ c.T) + c_sq.unsqueeze(0)).clamp_min_(0.0)


def kmeans_plusplus(x: torch.Tensor, k: int, generator: torch.Generator, weights: torch.Tensor | None = None,
                    candidates: int | None = None) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007), optionally weighted, with greedy candidates.

    Each new centre is drawn with probability proportional to ``w * d^2`` (d: distance to the nearest centre so
    far); with ``candidates`` > 1, that many are drawn and the one lowering the objective most is kept (the
    "greedy k-means++" that scikit-learn uses, 2 + log k candidates by default).

    Args:
        x: (n, D) points, n >= k.
        k: number of centres.
        generator: CPU RNG (draws are made on the CPU so CUDA and CPU runs pick the same indices).
        weights: (n,) non-negative point weights, or None for 1.

    Returns:
        (k, D) centres, rows of ``x``.
    """
    n = x.shape[0]
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.detach().double().cpu()
    cand = candidates or (2 + int(math.log(k)))
    first = int(torch.multinomial(w / w.sum(), 1, generator=generator))
    idx = [first]
    d2 = _sq_dists(x, x[first:first + 1]).squeeze(1).double().cpu()
    for _ in range(1, k):
        p = w * d2
        total = float(p.sum())
        if total <= 0:  # every remaining point sits on a centre: take any point not chosen yet
            rest = [i for i in range(n) if i not in set(idx)]
            idx.append(rest[0])
            continue
        picks = torch.multinomial(p / total, min(cand, int((p > 0).sum())), replacement=False, generator=generator)
        dc = _sq_dists(x, x[picks.to(x.device)]).double().cpu()  # (n, cand)
        new = torch.minimum(d2.unsqueeze(1), dc)
        best = int((w.unsqueeze(1) * new).sum(0).argmin())
        idx.append(int(picks[best]))
        d2 = new[:, best]
    return x[torch.tensor(idx, device=x.device)].clone()


def weighted_lloyd(x: torch.Tensor, w: torch.Tensor, centres: torch.Tensor, max_iter: int = 300,
                   tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weighted Lloyd iterations (eq. 9-10 with point weights) until the centres move less than ``tol``.

    ``tol`` is relative, as in scikit-learn: the squared centre shift summed over centres is compared with
    ``tol`` times the mean per-feature variance of the data. An emptied cluster is re-seeded at the point that
    contributes most to the objective.

    Args:
        x: (n, D) points; w: (n,) weights; centres: (k, D) start.

    Returns:
        ``(centres (k, D), labels (n,), objective)`` where objective = sum_i w_i ||x_i - c_{label_i}||^2.
    """
    xd, wd = x.double(), w.double()
    mean = (wd.unsqueeze(1) * xd).sum(0) / wd.sum()
    var = (wd.unsqueeze(1) * (xd - mean) ** 2).sum(0) / wd.sum()
    thresh = tol * float(var.mean())
    c = centres.double().clone()
    k = c.shape[0]
    for _ in range(max_iter):
        d = _sq_dists(xd, c)
        labels = d.argmin(1)
        mass = torch.zeros(k, dtype=torch.float64, device=x.device).index_add_(0, labels, wd)
        sums = torch.zeros_like(c).index_add_(0, labels, wd.unsqueeze(1) * xd)
        new = c.clone()
        full = mass > 0
        new[full] = sums[full] / mass[full].unsqueeze(1)
        if not bool(full.all()):  # empty clusters: move each to the point farthest from its centre (weighted)
            cost = wd * d.gather(1, labels.unsqueeze(1)).squeeze(1)
            for j in torch.nonzero(~full).flatten().tolist():
                far = int(cost.argmax())
                new[j] = xd[far]
                cost[far] = -1.0
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= thresh:
            break
    d = _sq_dists(xd, c)
    labels = d.argmin(1)
    obj = float((wd * d.gather(1, labels.unsqueeze(1)).squeeze(1)).sum())
    return c, labels, obj


class StreamingKMeans:
    """k = Np prototypes for each of S token sets, from tokens seen once in batches (see module doc).

    Args:
        k: prototypes per set (Np).
        num_sets: S (1 for shallow, L for deep).
        summary_size: m micro-centres per set (default ``max(1024, 50 k)``).
        seed: seeds k-means++ and the restarts.
        n_init: restarts of the final weighted k-means (best objective kept).
        max_iter, tol: Lloyd stopping rule of the final stage (see ``weighted_lloyd``).
        seed_factor: tokens buffered before the summary is seeded, as a multiple of m.
        micro_seeding: ``random`` (uniform draw of m buffered tokens, default) or ``kmeans++``.

    Use ``add(i, tokens)`` for every batch of set i's tokens (n, D), then ``result()``.
    """

    def __init__(self, k: int, num_sets: int, summary_size: int | None = None, seed: int = 0, n_init: int = 10,
                 max_iter: int = 300, tol: float = 1e-4, seed_factor: int = 4, micro_seeding: str = "random"):
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k, self.num_sets = k, num_sets
        self.m = summary_size or max(1024, 50 * k)
        self.n_init, self.max_iter, self.tol = n_init, max_iter, tol
        self.seed_factor = seed_factor
        self.micro_seeding = micro_seeding
        self.generator = torch.Generator().manual_seed(seed)
        self.buffers: list[list[torch.Tensor]] = [[] for _ in range(num_sets)]
        self.buffered = [0] * num_sets
        self.centres: list[torch.Tensor | None] = [None] * num_sets  # (m, D) float32 micro-centres
        self.w: list[torch.Tensor | None] = [None] * num_sets  # (m,) float64 counts
        self.s: list[torch.Tensor | None] = [None] * num_sets  # (m, D) float64 sums
        self.q: list[torch.Tensor | None] = [None] * num_sets  # (m,) float64 sums of squared norms
        self.seen = [0] * num_sets

    # ------------------------------------------------------------------------------------- summary
    def add(self, i: int, tokens: torch.Tensor) -> None:
        """Feed set i's tokens (n, D) (any float dtype, any device; kept on that device)."""
        x = tokens.detach().reshape(-1, tokens.shape[-1]).float()
        self.seen[i] += x.shape[0]
        if self.centres[i] is None:
            self.buffers[i].append(x)
            self.buffered[i] += x.shape[0]
            if self.buffered[i] >= self.seed_factor * self.m:
                self._seed(i)
            return
        self._assign(i, x)

    def _seed(self, i: int) -> None:
        buf = torch.cat(self.buffers[i])
        self.buffers[i], self.buffered[i] = [], 0
        if self.micro_seeding == "kmeans++":
            c = kmeans_plusplus(buf, self.m, self.generator, candidates=1)
        else:  # uniform sample of the buffered tokens (the data arrives in a seeded random order)
            pick = torch.randperm(buf.shape[0], generator=self.generator)[:self.m].to(buf.device)
            c = buf[pick].clone()
        D = buf.shape[1]
        self.centres[i] = c
        self.w[i] = torch.zeros(self.m, dtype=torch.float64, device=buf.device)
        self.s[i] = torch.zeros(self.m, D, dtype=torch.float64, device=buf.device)
        self.q[i] = torch.zeros(self.m, dtype=torch.float64, device=buf.device)
        self._assign(i, buf)

    def _assign(self, i: int, x: torch.Tensor, chunk: int = 16384) -> None:
        c = self.centres[i]
        c_sq = (c * c).sum(1)
        for start in range(0, x.shape[0], chunk):
            xb = x[start:start + chunk]
            a = (c_sq.unsqueeze(0) - 2.0 * (xb @ c.T)).argmin(1)  # ||x||^2 is the same for every centre
            xd = xb.double()
            self.w[i].index_add_(0, a, torch.ones_like(a, dtype=torch.float64))
            self.s[i].index_add_(0, a, xd)
            self.q[i].index_add_(0, a, (xd * xd).sum(1))
        hit = self.w[i] > 0
        c[hit] = (self.s[i][hit] / self.w[i][hit].unsqueeze(1)).float()

    def summary(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Set i's summary: points (m', D) float64, weights (m',), and the within-group sum of squares."""
        if self.centres[i] is None:  # fewer tokens than the seeding buffer: the summary is the tokens themselves
            if not self.buffers[i]:
                raise ValueError(f"set {i} received no tokens")
            x = torch.cat(self.buffers[i]).double()
            return x, torch.ones(x.shape[0], dtype=torch.float64, device=x.device), 0.0
        hit = self.w[i] > 0
        w, s, q = self.w[i][hit], self.s[i][hit], self.q[i][hit]
        pts = s / w.unsqueeze(1)
        within = float((q - w * (pts * pts).sum(1)).clamp_min(0).sum())
        return pts, w, within

    # ------------------------------------------------------------------------------------- final stage
    def result(self, on_set=None) -> tuple[torch.Tensor, list[float]]:
        """Prototypes (S, k, D) float32 on the tokens' device, and the inertia per set (see module doc).

        ``on_set`` (optional) is called after each set is done (progress).

        Raises:
            ValueError: a set has fewer distinct summary points than k.
        """
        return final_kmeans([self.summary(i) for i in range(self.num_sets)], self.k, self.generator, self.n_init,
                            self.max_iter, self.tol, on_set)


def merge_summaries(parts: list[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      float]:
    """One set's summaries from several streams (ranks) as one: points (m_r, D) and weights (m_r,) concatenated
    to (sum m_r, D) and (sum m_r,), within-group sums of squares (squared token units) added. Each point keeps the
    tokens it stands for, so the union summarises all tokens (Guha et al. 2003, divide and conquer).

    Raises:
        RuntimeError: ``parts`` is empty (torch.cat of nothing).
    """
    pts = torch.cat([p for p, _, _ in parts])
    w = torch.cat([x for _, x, _ in parts])
    return pts, w, float(sum(v for _, _, v in parts))


def final_kmeans(summaries: list[tuple[torch.Tensor, torch.Tensor, float]], k: int, generator: torch.Generator,
                 n_init: int = 10, max_iter: int = 300, tol: float = 1e-4, on_set=None
                 ) -> tuple[torch.Tensor, list[float]]:
    """The final stage on each set's summary: ``n_init`` weighted k-means++ + Lloyd restarts, best objective kept.

    Args:
        summaries: per set, ``(points (m, D), weights (m,), within-group sum of squares)``.

    Returns:
        prototypes (S, k, D) float32 and the inertia per set (within + the best weighted objective).

    Raises:
        ValueError: a set has fewer summary points than k.
    """
    out, inertia = [], []
    for pts, w, within in summaries:
        if pts.shape[0] < k:
            raise ValueError(f"only {pts.shape[0]} tokens for {k} prototypes")
        best = None
        for _ in range(n_init):
            start = kmeans_plusplus(pts, k, generator, weights=w)
            c, _, obj = weighted_lloyd(pts, w, start, max_iter, tol)
            if best is None or obj < best[1]:
                best = (c, obj)
        out.append(best[0].float())
        inertia.append(within + best[1])
        if on_set is not None:
            on_set()
    return torch.stack(out), inertia


def inertia(x: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> float:
    """Eq. 9's objective: sum over tokens x (n, D) of the squared distance to the nearest of centres (k, D)."""
    total = 0.0
    c = centres.double()
    for start in range(0, x.shape[0], chunk):
        total += float(_sq_dists(x[start:start + chunk].double(), c).min(1).values.sum())
    return total
