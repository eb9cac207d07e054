"""``prompt.mode: deep``: VPT-deep (Jia et al. 2022, eq. 7).

L sets P (L, Np, D): set i enters block i + 1 and the block's outputs at the prompt rows are dropped,
``[x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])``. Computed in the prefix form (the set adds keys and values
only: ``vptool.prompting.attention.prompted_attention(prefix=...)``), equal to the concatenated form on every
other row. When the readout needs the last block's prompt outputs (``avg_all``) the last block runs concatenated;
``deep_form: concat`` runs every block concatenated (the reference form, for tests and benchmarks).
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.prompting.modes.base import BlockStep, PromptModeUnit


class DeepPrompts(PromptModeUnit):
    """A prompt set per block, as prefix keys/values (see the module doc)."""

    name = "deep"
    tensor = "deep"
    rows = False

    def block(self, model, step: BlockStep, i: int, blk: nn.Module, h: torch.Tensor,
              order: str) -> tuple[torch.Tensor, str]:
        B, N = step.B, step.N
        p = model.prompts.set(i, B).to(h.dtype)
        keep_rows = i == len(model.backbone.blocks) - 1 and model.readout_pool == "avg_all"
        if model.deep_form == "prefix" and not keep_rows:
            return model.run_block(step, blk, h, order, prefix=p), order
        full = model.row_order(with_prompts=True)
        rows = model.assemble({**model.split(h, order, N), "P": p.expand(B, -1, -1)}, full)
        y = model.run_block(step, blk, rows, full)
        if keep_rows:
            return y, full
        return model.assemble(model.split(y, full, N), order), order

    def output_rows(self, model) -> bool:
        return model.readout_pool == "avg_all"

    def entering(self, model, i: int, B: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        return model.prompts.set(i, B)  # the learned set i, the same for every image


UNIT = DeepPrompts()
