"""``prompt.mode: deep``: VPT-deep (Jia et al. 2022, eq. 7), and its prompt depth (Fig. 7, ``prompt.blocks``).

L sets P (L, Np, D): set i enters block i + 1 and the block's outputs at the prompt rows are dropped,
``[x_i, _, E_i] = L_i([x_{i-1}, P_{i-1}, E_{i-1}])``. Computed in the prefix form (the set adds keys and values
only: ``vptool.prompting.attention.prompted_attention(prefix=...)``), equal to the concatenated form on every
other row. When the readout needs the last block's prompt outputs (``avg_all``, ``prompt``) the last block runs
concatenated; ``deep_form: concat`` runs every block concatenated (the reference form, for tests and benchmarks).

``prompt.blocks`` (VPT Fig. 7) gives sets to some blocks only, (S, Np, D) for S prompted blocks, as the official
code's ``NUM_DEEP_LAYERS`` (blocks 1..k) and ``REVERSE_DEEP`` (the last k blocks): a block without a set runs on
the rows it is given, so the prompt outputs of the block before it are carried on as rows (blocks 7-12 of ``1-6``
see the outputs of block 6's prompts, as VPT-shallow's do), and a block before the first set has no prompt rows.
``1`` is VPT-shallow's forward with the set named ``prompts.deep`` (1, Np, D). Where the official code's
``REVERSE_DEEP`` first inserts prompts it writes them over the first Np patch tokens (its slice assumes prompt rows
are already there); vptool inserts them, as the paper describes, and keeps every patch token.
"""

from __future__ import annotations

import torch
from torch import nn

from vptool.prompting.modes.base import BlockStep, PromptModeUnit

ROW_POOLS = ("avg_all", "prompt")  # the readouts that pool the last block's prompt outputs


class DeepPrompts(PromptModeUnit):
    """A prompt set per prompted block, as prefix keys/values (see the module doc)."""

    name = "deep"
    tensor = "deep"
    rows = False

    def block(self, model, step: BlockStep, i: int, blk: nn.Module, h: torch.Tensor,
              order: str) -> tuple[torch.Tensor, str]:
        j = model.prompt_set_at.get(i)
        if j is None:  # no set enters here: the block runs on its rows as they are (carried prompt rows included)
            return model.run_block(step, blk, h, order), order
        B, N = step.B, step.N
        bare = model.row_order(with_prompts=False)
        if bare != order:  # prompt rows a block before left: this block's set takes their place
            h = model.assemble(model.split(h, order, N), bare)
        p = model.prompts.set(j, B).to(h.dtype)
        keep_rows = self.keeps_rows(model, i)
        if model.deep_form == "prefix" and not keep_rows:
            return model.run_block(step, blk, h, bare, prefix=p), bare
        full = model.row_order(with_prompts=True)
        rows = model.assemble({**model.split(h, bare, N), "P": p.expand(B, -1, -1)}, full)
        y = model.run_block(step, blk, rows, full)
        if keep_rows:
            return y, full
        return model.assemble(model.split(y, full, N), bare), bare

    @staticmethod
    def keeps_rows(model, i: int) -> bool:
        """Whether block i's outputs at the prompt rows are used: by the next block when no set replaces them
        (``prompt.blocks``), or after the last block by a readout that pools them."""
        if i == len(model.backbone.blocks) - 1:
            return model.readout_pool in ROW_POOLS
        return i + 1 not in model.prompt_set_at

    def output_rows(self, model) -> bool:
        L = len(model.backbone.blocks)
        return model.readout_pool in ROW_POOLS or L - 1 not in model.prompt_set_at

    def entering(self, model, i: int, B: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        j = model.prompt_set_at.get(i)  # the learned set, the same for every image, or the rows carried in
        return rows if j is None else model.prompts.set(j, B)


UNIT = DeepPrompts()
