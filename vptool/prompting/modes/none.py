"""``prompt.mode: none``: no prompt tokens (linear probe, full fine-tune; VPT Table 1 baselines)."""

from __future__ import annotations

from vptool.prompting.modes.base import PromptModeUnit


class NoPrompts(PromptModeUnit):
    """No prompts: every block runs on the class and patch tokens (and a [MASK] row) as they are."""

    name = "none"
    tensor = None
    rows = False

    def shape(self, L: int, Np: int, D: int) -> tuple[int, ...]:
        return ()

    def init_levels(self, L: int, source: str) -> list[int]:
        return []


UNIT = NoPrompts()
