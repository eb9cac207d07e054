"""Normalized mutual information between prompt tokens and patch tokens (SPT, Wang et al. 2024, §3.2, eq. 7-8).

For block i, P (Np, D) are the prompt representations entering it and E (Ne, D) the patch tokens entering it
(raw, before the block's LayerNorm). Per image:

    pi(p^k, e^j) = sigmoid(p^k . e^j) / sum_{j,k} sigmoid(p^k . e^j)              (eq. 7)
    pi(p) = sum_j pi,  pi(e) = sum_k pi                                          (marginals, §3.2)
    I = sum_{k,j} pi log(pi / (pi(p) pi(e)))
    H(P) = -sum_k pi(p) log pi(p),  H(E) = -sum_j pi(e) log pi(e)
    NMI = 2 I / (H(P) + H(E))                                                      (eq. 8)

Which P: deep prompts (VPT eq. 7) enter block i as the learned set P_{i-1}, the same for every image; shallow and
gated prompts are rows of every block's input, so P is the propagated prompt rows Z_{i-1}, which depend on the
image (block 1 sees the prompts themselves). ``block_inputs`` gets both from ``PromptedViT.embed`` (block 1) and
``PromptedViT.forward_intermediates`` (the outputs of blocks 1..L-1, prompt rows after the gate).

The computation runs in float64 in log space (``logsigmoid``, ``logsumexp``): raw ViT tokens have norms in the
tens, so P.E reaches hundreds, where float32 ``sigmoid`` rounds to exactly 0 or 1 and a direct ``pi log pi``
loses the small terms. 0 log 0 is 0. Mathematically 0 <= I <= min(H(P), H(E)), so 0 <= NMI <= 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def pair_logits(prompts: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """p^k . e^j for every prompt-patch pair, float64.

    Args:
        prompts: P, (B, Np, D) or (1, Np, D) (one prompt set for every image) or (Np, D).
        patches: E, (B, Ne, D) or (Ne, D).

    Returns:
        (B, Np, Ne) float64 (B = 1 when both inputs are unbatched).

    Raises:
        ValueError: P and E widths differ, or their batch sizes are neither equal nor 1.
    """
    p = prompts.double()
    e = patches.double()
    p = p.unsqueeze(0) if p.dim() == 2 else p
    e = e.unsqueeze(0) if e.dim() == 2 else e
    if p.shape[-1] != e.shape[-1]:
        raise ValueError(f"prompt width {p.shape[-1]} != patch width {e.shape[-1]}")
    if p.shape[0] not in (1, e.shape[0]) and e.shape[0] != 1:
        raise ValueError(f"batch sizes {p.shape[0]} and {e.shape[0]} do not broadcast")
    return p @ e.transpose(-1, -2)


def nmi_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """SPT eq. 7-8 from the pair logits p^k . e^j, (B, Np, Ne) -> float64 (B,)."""
    log_s = F.logsigmoid(logits.double())  # log sigmoid(p^k . e^j)
    log_pi = log_s - torch.logsumexp(log_s, dim=(-2, -1), keepdim=True)  # eq. 7
    log_pp = torch.logsumexp(log_pi, dim=-1)  # (B, Np): log pi(p)
    log_pe = torch.logsumexp(log_pi, dim=-2)  # (B, Ne): log pi(e)
    pi = log_pi.exp()
    mi = (pi * (log_pi - log_pp.unsqueeze(-1) - log_pe.unsqueeze(-2))).sum(dim=(-2, -1))
    h_p = -(log_pp.exp() * log_pp).sum(-1)
    h_e = -(log_pe.exp() * log_pe).sum(-1)
    return 2 * mi / (h_p + h_e)  # eq. 8


def nmi(prompts: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Per-image NMI between prompt tokens and patch tokens (SPT eq. 7-8).

    Args:
        prompts: P, (B, Np, D) or (1, Np, D) (one prompt set for every image) or (Np, D).
        patches: E, (B, Ne, D) or (Ne, D).

    Returns:
        float64 (B,) NMI per image, in [0, 1]; 0 when Np = 1 (H(P) = I = 0). NaN only when Np = Ne = 1.

    Raises:
        ValueError: P and E widths differ, or their batch sizes are neither equal nor 1.
    """
    return nmi_from_logits(pair_logits(prompts, patches))


SATURATION_LOGIT = 10.0  # |P.E| above this puts sigmoid within 4.6e-5 of 0 or 1


def saturated_fraction(logits: torch.Tensor, limit: float = SATURATION_LOGIT) -> torch.Tensor:
    """Per-image share of prompt-patch pairs with |p^k . e^j| > ``limit``, where sigmoid is flat at 0 or 1.

    A diagnostic next to the NMI: when nearly every pair is saturated at 1 (prompts aligned with the tokens'
    common direction, e.g. k-means prototypes of raw tokens), pi in eq. 7 is uniform and the NMI is ~0 whatever
    the prompts encode.

    Args:
        logits: (B, Np, Ne) pair logits from ``pair_logits``.

    Returns:
        float64 (B,) in [0, 1].
    """
    return (logits.abs() > limit).double().mean(dim=(-2, -1))


def block_inputs(model, x: torch.Tensor):
    """Yield ``(i, prompts, patches)`` entering each block i = 0..L-1 of a prompted model.

    ``patches`` (B, N, D) is the embedding output for block 0 and the output of block i - 1 after it
    (``forward_intermediates``); ``prompts`` is the learned set i, (1, Np, D) in eval mode, for deep prompts, and
    for shallow/gated ones the prompts themselves for block 0, then the propagated prompt rows (B, Np, D)
    (after the gate); with ``prompt.blocks`` a block without a set gets the prompt rows carried in. ``prompts`` is
    None where no prompt enters the block (a model without prompts; blocks before the first set).
    """
    L = len(model.backbone.blocks)
    B = x.shape[0]
    yield 0, model.mode.entering(model, 0, B, None), model.embed(x)[:, model.num_prefix_tokens:]
    if L == 1:
        return
    after = model.forward_intermediates(x, indices=list(range(L - 1)), stop_early=True, output_fmt="NLC",
                                        intermediates_only=True, return_prompt_tokens=True)
    for i in range(1, L):
        patches, rows = after[i - 1]
        yield i, model.mode.entering(model, i, B, rows), patches


class NMIRecorder:
    """Collects per-image NMI per block from ``block_inputs``: ``for i, p, e in block_inputs(model, x): rec(i, p, e)``.

    Call ``start_batch()`` before each forward; ``values()`` returns (images, L) float64 after all batches, and
    ``saturation()`` the matching ``saturated_fraction``.
    """

    def __init__(self, depth: int, unprompted: tuple[int, ...] = ()):
        self.depth = depth
        self.unprompted = set(unprompted)  # blocks no prompt enters (before the first set of prompt.blocks): NaN
        self._rows: list[np.ndarray] = []
        self._sat_rows: list[np.ndarray] = []
        self._batch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def start_batch(self) -> None:
        self._flush()

    def __call__(self, i: int, prompts: torch.Tensor | None, patches: torch.Tensor) -> None:
        B = patches.shape[0]
        if prompts is None:  # no prompt enters block i: NMI is undefined there (NaN), or the model has none
            if i not in self.unprompted:
                raise ValueError("the model has no prompts: NMI needs prompt tokens")
            nan = torch.full((B,), float("nan"), dtype=torch.float64)
            self._batch[i] = (nan, nan)
            return
        logits = pair_logits(prompts, patches)
        self._batch[i] = (nmi_from_logits(logits).expand(B).cpu(), saturated_fraction(logits).expand(B).cpu())

    def _flush(self) -> None:
        if self._batch:
            if sorted(self._batch) != list(range(self.depth)):
                raise RuntimeError(f"NMI recorded for blocks {sorted(self._batch)}, expected 0..{self.depth - 1}")
            self._rows.append(torch.stack([self._batch[i][0] for i in range(self.depth)], dim=1).numpy())
            self._sat_rows.append(torch.stack([self._batch[i][1] for i in range(self.depth)], dim=1).numpy())
            self._batch = {}

    def values(self) -> np.ndarray:
        """Per-image NMI, (images, L) float64; column i is block i + 1."""
        self._flush()
        return np.concatenate(self._rows) if self._rows else np.zeros((0, self.depth))

    def saturation(self) -> np.ndarray:
        """Per-image saturated fraction (``saturated_fraction``), (images, L) float64."""
        self._flush()
        return np.concatenate(self._sat_rows) if self._sat_rows else np.zeros((0, self.depth))


def summarize(values: np.ndarray, saturation: np.ndarray | None = None) -> dict:
    """Mean and (population) standard deviation over images of an (images, L) NMI array, per block 1..L, and the
    mean saturated fraction when given."""
    def numbers(col: np.ndarray) -> list[float | None]:  # None (JSON null) for a block no prompt enters
        return [float(v) if np.isfinite(v) else None for v in col]

    out = {"blocks": list(range(1, values.shape[1] + 1)),
           "nmi_mean": numbers(values.mean(axis=0)),
           "nmi_std": numbers(values.std(axis=0)),
           "images": int(values.shape[0])}
    if saturation is not None:
        out["saturated_fraction"] = numbers(saturation.mean(axis=0))
    return out
