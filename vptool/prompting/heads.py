"""Classification heads on the readout feature h (B, D).

- ``linear``: ``Linear(D, K)`` (VPT, GateVPT, linear probe, full fine-tune).
- ``verbalizer``: VPTM's prototypical verbalizer (VPTM §4.2, eq. 7-9): ``u = F(h)`` with ``F = Linear(D, t)``
  (eq. 7), class prototypes ``C`` (K, t) initialised to zeros (§5.3), logits ``u C^T`` (eq. 8); the loss is the
  cross-entropy over those logits (eq. 9). ``F`` is initialised like the linear head (truncated normal, std 0.02,
  zero bias): the paper does not say, and with zero prototypes a zero ``F`` would never receive a gradient.
- ``mlp1``: ``Linear(D, K)`` on h[MASK] (VPTM Table 4 "MLP-1"); the same function as ``linear``.
- ``mlp2``: ``Linear(D, 128) -> GELU -> Linear(128, K)`` (VPTM Table 4 "MLP-2"; the paper does not name the
  activation, GELU is our choice, the hidden width is ``head.dim``).

Adapter tensor names: ``head.weight``/``head.bias`` (linear, mlp1), ``head.fc1.*``/``head.fc2.*`` (mlp2),
``verbalizer.proj.weight`` (t, D), ``verbalizer.proj.bias`` (t,), ``verbalizer.prototypes`` (K, t).
"""

from __future__ import annotations

import torch
from torch import nn


def _init_linear(layer: nn.Linear, generator: torch.Generator | None) -> None:
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=0.02, generator=generator)
        layer.bias.zero_()


class Verbalizer(nn.Module):
    """VPTM prototypical verbalizer (eq. 7-8): logits = Linear(D, t)(h) @ prototypes^T.

    Args:
        dim: D, the feature width.
        num_classes: K.
        proto_dim: t, the prototype width (VPTM default 128).
        generator: RNG for the projection init.

    Input Shape:
        (B, D) features h[MASK].
    Output Shape:
        (B, K) similarities u · c_k.
    """

    def __init__(self, dim: int, num_classes: int, proto_dim: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.proj = nn.Linear(dim, proto_dim)
        _init_linear(self.proj, generator)
        self.prototypes = nn.Parameter(torch.zeros(num_classes, proto_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        u = self.proj(h)  # eq. 7
        return u @ self.prototypes.to(u.dtype).t()  # eq. 8


class MLP2(nn.Module):
    """VPTM's MLP-2 baseline: Linear(D, hidden) -> GELU -> Linear(hidden, K)."""

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_classes)
        _init_linear(self.fc1, generator)
        _init_linear(self.fc2, generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))


def build_head(kind: str, dim: int, num_classes: int, head_dim: int = 128,
               generator: torch.Generator | None = None) -> tuple[str, nn.Module]:
    """The head module and its adapter name (``head`` or ``verbalizer``).

    Args:
        kind: ``linear``, ``verbalizer``, ``mlp1`` or ``mlp2``.
        dim: D.
        num_classes: K.
        head_dim: t for the verbalizer, the hidden width for ``mlp2``.
    """
    if kind == "verbalizer":
        return "verbalizer", Verbalizer(dim, num_classes, head_dim, generator)
    if kind == "mlp2":
        return "head", MLP2(dim, num_classes, head_dim, generator)
    if kind in ("linear", "mlp1"):
        layer = nn.Linear(dim, num_classes)
        _init_linear(layer, generator)
        return "head", layer
    raise ValueError(f"unknown head {kind!r}")
