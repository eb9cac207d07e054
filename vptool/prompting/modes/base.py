"""The interface every prompt mode implements, and the prompt tokens they share.

Shapes: B images, N patch tokens, Np prompts per set, D width, L blocks, T rows of a block's input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vptool.config import block_indices
from vptool.errors import UserError


class PromptTokens(nn.Module):
    """Learnable prompt tokens: ``shallow`` (Np, D) or ``deep`` (L, Np, D), with prompt dropout.

    Prompt dropout (VPT code, deep default 0.1) is applied to a prompt set each time it is inserted, per image
    (B, Np, D masks), in train mode only.
    """

    def __init__(self, mode: str, init: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.mode = mode
        self.length = init.shape[-2]  # Np
        setattr(self, mode, nn.Parameter(init))
        self.dropout = nn.Dropout(dropout)

    def set(self, i: int | None, B: int) -> torch.Tensor:
        """Prompt set to insert: (B, Np, D) in train mode with dropout, else (1, Np, D)."""
        p = (self.shallow if i is None else self.deep[i]).unsqueeze(0)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(B, -1, -1))
        return p


@dataclass
class BlockStep:
    """What one forward of ``PromptedViT`` hands every block: B images, N patch tokens, the temperatures tau (L,)
    or None, the mode's per-forward values (``PromptModeUnit.begin``: e.g. the gates) and the family's state."""

    B: int
    N: int
    taus: torch.Tensor | None
    values: object = None
    state: dict = field(default_factory=dict)


class PromptModeUnit:
    """One prompt mode (see ``vptool.prompting.modes``). Subclasses set the class attributes and override what
    differs; the defaults are those of a mode whose prompts are rows of every block's input.

    Attributes:
        name: the ``prompt.mode`` value.
        tensor: ``shallow`` or ``deep`` (the adapter tensor ``prompts.<tensor>``), or None without prompts.
        rows: the prompts are rows of every block's input (shallow, gated); otherwise each block gets its own set.
        min_length: the least ``prompt.length`` the mode takes; 0 (no prompt tokens: VPTM Fig. 7's verbalizer-only
            point) unless the mode needs prompt tokens (gated: its gates act on them).
    """

    name = ""
    tensor: str | None = "shallow"
    rows = True
    min_length = 0

    # ------------------------------------------------------------------------------------------- tensors
    @property
    def has_prompts(self) -> bool:
        return self.tensor is not None

    @property
    def tensor_name(self) -> str | None:
        """``prompts.shallow`` / ``prompts.deep`` (the adapter and init-prompts file name), or None."""
        return None if self.tensor is None else f"prompts.{self.tensor}"

    def sets(self, L: int, blocks: str | None = None) -> tuple[int, ...]:
        """The blocks (0-based, ascending) a prompt set enters, one per set: () without prompts, (0,) for one set
        carried through the blocks, every block for a set per block, or those ``blocks`` (``prompt.blocks``,
        VPT Fig. 7; deep prompts only) names.

        Raises:
            UserError: ``blocks`` given to a mode whose prompts enter block 1 only, or naming a block past L.
        """
        if self.tensor is None or self.tensor == "shallow":
            if blocks is not None:
                has = "no prompts" if self.tensor is None else "one prompt set, entering block 1"
                raise UserError(f"prompt.blocks: {blocks!r} chooses the blocks of deep prompts (VPT Fig. 7); "
                                f"prompt.mode {self.name} has {has}; drop prompt.blocks or use prompt.mode deep")
            return () if self.tensor is None else (0,)
        try:
            return block_indices(blocks, L)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def shape(self, L: int, Np: int, D: int, blocks: str | None = None) -> tuple[int, ...]:
        """The prompt tensor's shape: (Np, D), or (S, Np, D) for a set per prompted block (S = L by default)."""
        return (Np, D) if self.tensor == "shallow" else (len(self.sets(L, blocks)), Np, D)

    def trained_values(self, L: int, Np: int, D: int, blocks: str | None = None) -> int:
        """How many prompt values train (the memory estimate): Np·D per set."""
        return len(self.sets(L, blocks)) * Np * D

    def extras(self, L: int, config) -> dict[str, nn.Module]:
        """Modules the mode adds beside the prompts (attribute name -> module), e.g. GateVPT's ``gates``."""
        return {}

    # ------------------------------------------------------------------------------------------- forward
    def begin(self, model, B: int):
        """Per-forward values the blocks share (``BlockStep.values``), e.g. the gate values; None by default."""
        return None

    def block(self, model, step: BlockStep, i: int, blk: nn.Module, h: torch.Tensor,
              order: str) -> tuple[torch.Tensor, str]:
        """Run block i (0-based) on the rows ``h`` (B, T, D) in ``order``: ``(rows after the block, their order)``.
        Default: the block on the rows as they are (``PromptedViT.run_block``)."""
        return model.run_block(step, blk, h, order), order

    def output_rows(self, model) -> bool:
        """Whether ``forward_features``' output holds prompt rows."""
        return self.rows

    def entering(self, model, i: int, B: int, rows: torch.Tensor | None) -> torch.Tensor | None:
        """The prompts entering block i, for the NMI probe: block 0 gets the prompts themselves (1 or B, Np, D),
        a later block the propagated prompt rows ``rows`` (B, Np, D) that left block i - 1."""
        if self.tensor is None:
            return None
        return model.prompts.set(None, B) if i == 0 else rows

    # ------------------------------------------------------------------------------------------- init
    def init_levels(self, L: int, source: str, blocks: str | None = None) -> list[int]:
        """The token levels SPT's init needs, one per set: level t is the input of block t + 1 (t = 0: the
        embedding; t = L: the last block's output). ``source`` (``prompt.init_source``): ``same`` (the set
        entering block b from the tokens entering it, level b - 1 for 1-based b), ``first`` (every set from level
        0) or ``last`` (every set from level L)."""
        from vptool.prompting.spt import source_levels

        sets = self.sets(L, blocks)
        levels = source_levels(len(sets), L, source)  # checks source
        return list(sets) if source == "same" else levels

    def from_sets(self, sets: list[torch.Tensor]) -> torch.Tensor:
        """The prompt tensor from its sets, each (Np, D): (Np, D) for one set, (S, Np, D) for a set per block."""
        return torch.stack(sets) if self.tensor == "deep" else sets[0]
