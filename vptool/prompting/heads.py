"""Classification heads on the readout feature h (B, D).

- ``linear``: ``Linear(D, K)`` (VPT, GateVPT, linear probe, full fine-tune).
- ``verbalizer``: VPTM's prototypical verbalizer (VPTM §4.2, eq. 7-9): ``u = F(h)`` with ``F = Linear(D, t)``
  (eq. 7), class prototypes ``C`` (K, t) initialised to zeros (§5.3), logits ``u C^T`` (eq. 8); the loss is the
  cross-entropy over those logits (eq. 9). ``F`` is initialised like the linear head (truncated normal, std 0.02,
  zero bias): the paper does not say, and with zero prototypes a zero ``F`` would never receive a gradient.
- ``mlp1``: ``Linear(D, K)`` on h[MASK] (VPTM Table 4 "MLP-1"); the same function as ``linear``.
- ``mlp2``: ``Linear(D, 128) -> GELU -> Linear(128, K)`` (VPTM Table 4 "MLP-2"; the paper does not name the
  activation, GELU is our choice, the hidden width is ``head.dim``).

Initialisation (``head.init``):

- ``trunc_normal`` (default): weights truncated normal, std 0.02, biases zero (timm's head init).
- ``official``: the official VPT / GateVPT code's head (its ``MLP`` class, which both repositories share):
  kaiming-normal weights with ``mode="fan_out"`` (std sqrt(2 / fan_out) = sqrt(2 / K) for the logit layer), the
  logit layer's bias set to ``-log((1 - pi) / pi)`` with prior pi = 0.01 (= -log(99) ~ -4.595), hidden biases
  zero. For ``mlp2`` both layers get the kaiming weights. The verbalizer has no logit bias and keeps
  ``trunc_normal`` (the recipe refuses ``official`` with it).

Adapter tensor names: ``head.weight``/``head.bias`` (linear, mlp1), ``head.fc1.*``/``head.fc2.*`` (mlp2),
``verbalizer.proj.weight`` (t, D), ``verbalizer.proj.bias`` (t,), ``verbalizer.prototypes`` (K, t).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the official VPT/GateVPT head's logit prior: every class starts at probability ~0.01 under a sigmoid
OFFICIAL_PRIOR = 0.01


def _init_linear(layer: nn.Linear, generator: torch.Generator | None, init: str = "trunc_normal",
                 logits: bool = True) -> None:
    """Initialise one head layer: ``trunc_normal`` or ``official`` (see the module doc); ``logits`` marks the
    layer that produces the class logits (it gets the prior bias under ``official``)."""
    with torch.no_grad():
        if init == "official":
            nn.init.kaiming_normal_(layer.weight, a=0, mode="fan_out", generator=generator)
            layer.bias.fill_(-math.log((1 - OFFICIAL_PRIOR) / OFFICIAL_PRIOR) if logits else 0.0)
        else:
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

    def __init__(self, dim: int, num_classes: int, hidden: int = 128, generator: torch.Generator | None = None,
                 init: str = "trunc_normal"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, num_classes)
        _init_linear(self.fc1, generator, init, logits=False)
        _init_linear(self.fc2, generator, init)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(h)))


def build_head(kind: str, dim: int, num_classes: int, head_dim: int = 128,
               generator: torch.Generator | None = None, init: str = "trunc_normal") -> tuple[str, nn.Module]:
    """The head module and its adapter name (``head`` or ``verbalizer``).

    Args:
        kind: ``linear``, ``verbalizer``, ``mlp1`` or ``mlp2``.
        dim: D.
        num_classes: K.
        head_dim: t for the verbalizer, the hidden width for ``mlp2``.
        init: ``trunc_normal`` or ``official`` (module doc).

    Raises:
        ValueError: an unknown ``kind``, or ``official`` for the verbalizer (it has no logit bias).
    """
    if kind == "verbalizer":
        if init == "official":
            raise ValueError("head_init='official' is the VPT/GateVPT linear head's; the verbalizer has no logit "
                             "bias: use 'trunc_normal'")
        return "verbalizer", Verbalizer(dim, num_classes, head_dim, generator)
    if kind == "mlp2":
        return "head", MLP2(dim, num_classes, head_dim, generator, init)
    if kind in ("linear", "mlp1"):
        layer = nn.Linear(dim, num_classes)
        _init_linear(layer, generator, init)
        return "head", layer
    raise ValueError(f"unknown head {kind!r}")
