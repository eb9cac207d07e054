"""``prompt.mode: shallow``: VPT-shallow (Jia et al. 2022, eq. 4-5).

One set P (Np, D) is inserted before block 1 (at the ``P`` position of the token order) and carried through
every block as ordinary rows: ``[x_i, Z_i, E_i] = L_i([x_{i-1}, Z_{i-1}, E_{i-1}])``.
"""

from __future__ import annotations

from vptool.prompting.modes.base import PromptModeUnit


class ShallowPrompts(PromptModeUnit):
    """Prompt rows in every block's input; the base class's defaults are this mode's rules."""

    name = "shallow"
    tensor = "shallow"
    rows = True


UNIT = ShallowPrompts()
