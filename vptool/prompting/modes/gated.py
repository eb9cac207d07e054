"""``prompt.mode: gated``: GateVPT (Yoo et al. 2023, eq. 6-8, Alg. 1).

Shallow prompt rows; after block l (l = 1..L-1, not the last) the prompt rows become
``g_l * out + (1 - g_l) * in`` with ``g_l = sigmoid(gamma_l)`` (eq. 6-7). Gate priors start at
``gamma_l = -gate_init`` (official code). ``hard`` gates (Table 4 ablation) are a straight-through
Gumbel-sigmoid: in training ``s = sigmoid(gamma + log u - log(1 - u))``, u ~ U(0, 1) drawn per image and gate,
forward value ``1[s > 0.5]``, gradient of ``s``; in evaluation ``1[gamma > 0]``.
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.options import GateKind, check_choice
from vptool.prompting.modes.base import BlockStep, PromptModeUnit


class PromptGates(nn.Module):
    """GateVPT gate priors gamma (L-1,) (eq. 6), soft or straight-through Gumbel-sigmoid (``hard``).

    Args:
        num_gates: L - 1.
        gate_init: gamma starts at ``-gate_init`` (official code; ``5`` gives g ~ 0.0067).
        kind: ``soft`` or ``hard``.
    """

    def __init__(self, num_gates: int, gate_init: float = 5.0, kind: str = "soft"):
        super().__init__()
        check_choice("gate_kind", kind, GateKind)
        self.kind = kind
        self.logit = nn.Parameter(torch.full((num_gates,), -float(gate_init)))

    def values(self, B: int) -> torch.Tensor:
        """Gate values used in this forward: (L-1,) or, for hard gates in training, (B, L-1)."""
        if self.kind == "soft":
            return self.logit.sigmoid()
        if not self.training:
            return (self.logit > 0).to(self.logit.dtype)
        u = torch.rand(B, self.logit.shape[0], device=self.logit.device).clamp_(1e-6, 1 - 1e-6)
        s = (self.logit + torch.log(u) - torch.log1p(-u)).sigmoid()
        hard = (s > 0.5).to(s.dtype)
        return hard + (s - s.detach())  # straight-through: exactly 0/1 forward, the Gumbel-sigmoid's gradient

    @torch.no_grad()
    def eval_values(self) -> torch.Tensor:
        """The gates evaluation uses: sigmoid(gamma) (soft) or 1[gamma > 0] (hard), (L-1,)."""
        return self.logit.sigmoid() if self.kind == "soft" else (self.logit > 0).float()


class GatedPrompts(PromptModeUnit):
    """Shallow prompt rows mixed by a gate after every block but the last (see the module doc)."""

    name = "gated"
    tensor = "shallow"
    rows = True
    min_length = 1  # the gates mix prompt rows (eq. 7): no prompt tokens, nothing to gate

    def extras(self, L: int, config) -> dict[str, nn.Module]:
        return {"gates": PromptGates(L - 1, config.gate_init, config.gate_kind)}

    def begin(self, model, B: int):
        return model.gates.values(B)

    def block(self, model, step: BlockStep, i: int, blk: nn.Module, h: torch.Tensor,
              order: str) -> tuple[torch.Tensor, str]:
        out = model.run_block(step, blk, h, order)
        if i == len(model.backbone.blocks) - 1:  # GateVPT eq. 7: no gate after the last block
            return out, order
        g = step.values[..., i]
        g = (g.view(-1, 1, 1) if g.dim() == 1 else g).to(out.dtype)
        sl = model.slices(order, step.N)["P"]
        gated = g * out[:, sl] + (1 - g) * h[:, sl]
        return torch.cat([out[:, :sl.start], gated, out[:, sl.stop:]], dim=1), order


UNIT = GatedPrompts()
