"""SPT prompt construction from downstream patch tokens (Wang et al. 2024, §3.3-3.4, Table 1, Table S2).

Token levels: level 0 is the patch tokens entering block 1, ``PatchEmbed(x) + E_pos`` (SPT eq. 1); level t >= 1 is
the patch tokens leaving block t. Prefix (CLS) tokens are never used. Prompt set i (the set entering block i+1)
is built from level ``source_levels(...)[i]``:

- ``same`` (default, SPT's "self-prompt"): set i from level i; shallow uses level 0 only.
- ``first`` (Table S2 (b), P_i = P_0): every set from level 0.
- ``last`` (Table S2 (b), P_i = P_L): every set from level L (the last block's output, before the final norm).

Strategies on one batch of B images with Ne patch tokens each (``tokens`` (B, Ne, D)):

- ``mean-pool`` / ``max-pool`` (§3.4): the B·Ne tokens flattened image-major, raster order inside each image;
  non-overlapping windows of ``w = floor(B·Ne / Np)`` tokens; the first Np windows; mean / max per channel.
- ``random`` (§3.4): Np of the B·Ne tokens uniformly without replacement (an independent draw per set).
- ``kmeans`` (§3.3, eq. 9-10): see ``vptool.prompting.kmeans``; it needs every token, so it streams.

Where the official code differs (github.com/WangYZ1608/Self-Prompt-Tuning, ``prompt_generator``), ``form:
official`` selects its behaviour; the default ``paper`` follows the text:

- level 0 is the patch embedding *without* the position embedding;
- pooling windows run along each image's Ne tokens: ``w = floor(Ne / (Np - 1))``, Np - 1 windows of w tokens and
  a last window of the final ``Ne mod w`` tokens (all Ne when that is 0, as the code's ``x[:, -0:]`` does),
  giving Np·B pooled tokens, of which Np are then drawn at random without replacement.
"""

from __future__ import annotations

import torch

from vptool.errors import UserError

STRATEGIES = ("kmeans", "mean-pool", "max-pool", "random")
SOURCES = ("same", "first", "last")
FORMS = ("paper", "official")


def source_levels(num_sets: int, depth: int, source: str) -> list[int]:
    """Token level of each prompt set: ``same`` -> [0, 1, ..., S-1], ``first`` -> [0]*S, ``last`` -> [L]*S.

    Args:
        num_sets: S, 1 (shallow/gated) or L (deep).
        depth: L, the backbone's number of blocks.
        source: ``same``, ``first`` or ``last`` (SPT Table S2).
    """
    if source == "same":
        return list(range(num_sets))
    if source == "first":
        return [0] * num_sets
    if source == "last":
        return [depth] * num_sets
    raise ValueError(f"source {source!r}")


def pool_prompts(tokens: torch.Tensor, length: int, how: str, form: str = "paper",
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean or max pooling of one batch's patch tokens into Np prompts (SPT §3.4).

    Args:
        tokens: (B, Ne, D) patch tokens of one batch at one level.
        length: Np.
        how: ``mean`` or ``max``.
        form: ``paper`` (windows over the flattened B·Ne tokens) or ``official`` (per-image windows, then a
            random draw of Np pooled tokens; see module doc).
        generator: CPU RNG for the ``official`` draw.

    Returns:
        (Np, D) prompts, float32.

    Raises:
        UserError: fewer tokens than prompts (the window would be empty).
    """
    B, Ne, D = tokens.shape
    reduce = (lambda t: t.mean(dim=-2)) if how == "mean" else (lambda t: t.amax(dim=-2))
    x = tokens.float()
    if form == "paper":
        w = (B * Ne) // length
        if w < 1:
            raise UserError(f"prompt.length: {length} prompts need at least as many tokens, one batch has "
                            f"B*Ne = {B}*{Ne} = {B * Ne}; raise data.batch_size or lower prompt.length")
        flat = x.reshape(B * Ne, D)[: w * length]
        return reduce(flat.reshape(length, w, D))
    if length < 2 or Ne // (length - 1) < 1:
        raise UserError(f"prompt.length: the official pooling needs 2 <= Np <= Ne + 1 (Np = {length}, Ne = {Ne})")
    w = Ne // (length - 1)
    rem = Ne % w
    parts = [reduce(x[:, j * w:(j + 1) * w]) for j in range(length - 1)]
    parts.append(reduce(x[:, Ne - rem:] if rem else x))
    pooled = torch.stack(parts).reshape(-1, D)  # (Np * B, D), window-major like the official code
    pick = torch.randperm(pooled.shape[0], generator=generator)[:length]
    return pooled[pick.to(pooled.device)]


def sample_prompts(tokens: torch.Tensor, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Np of one batch's B·Ne patch tokens, uniformly without replacement (SPT §3.4 "random sample").

    Args:
        tokens: (B, Ne, D); length: Np; generator: CPU RNG.

    Returns:
        (Np, D) float32, the tokens at ``randperm(B·Ne)[:Np]`` of the image-major flattening.

    Raises:
        UserError: fewer than Np tokens.
    """
    B, Ne, D = tokens.shape
    if B * Ne < length:
        raise UserError(f"prompt.length: {length} prompts but one batch has only B*Ne = {B * Ne} tokens; raise "
                        "data.batch_size or lower prompt.length")
    pick = torch.randperm(B * Ne, generator=generator)[:length]
    return tokens.reshape(B * Ne, D)[pick.to(tokens.device)].float()
