"""Prompt modes: each one a small unit (``PromptModeUnit``) in a file of its own.

A unit says everything that differs between prompt modes: the prompt tensor's shape and name (``prompts.shallow``
(Np, D) or ``prompts.deep`` (L, Np, D)), the extra modules it trains (GateVPT's gates), how it runs block i of the
prompted forward (``block``), which prompts enter block i (the NMI probe), which token levels its SPT init needs
(``init-prompts``) and how many prompt values it trains (the memory estimate). ``PromptedViT``, ``init-prompts``,
``probe-nmi``, the NMI probe and the memory check ask the unit; none of them names a mode.

========== ============================================================== =============
mode       what it is                                                     file
========== ============================================================== =============
``none``   no prompts (linear probe, full fine-tune)                      ``none.py``
``shallow`` VPT-shallow (Jia et al. 2022, eq. 4-5)                        ``shallow.py``
``deep``   VPT-deep (Jia et al. 2022, eq. 7), prefix keys/values          ``deep.py``
``gated``  GateVPT (Yoo et al. 2023, eq. 6-8): shallow rows + gates       ``gated.py``
========== ============================================================== =============

Adding a mode: one file here defining ``UNIT`` (a ``PromptModeUnit``), and its registration, one line in
``vptool.options.PROMPT_MODES`` (name -> file), which also makes the name a valid ``prompt.mode`` value.
"""

from __future__ import annotations

import functools
import importlib

from vptool.options import PROMPT_MODES, PromptMode, check_choice
from vptool.prompting.modes.base import BlockStep, PromptModeUnit, PromptTokens

__all__ = ["BlockStep", "PromptModeUnit", "PromptTokens", "mode_for"]


@functools.cache
def mode_for(name: str) -> PromptModeUnit:
    """The unit of prompt mode ``name``.

    Raises:
        ValueError: ``name`` is not a registered mode (the message names every mode).
    """
    check_choice("prompt_mode", name, PromptMode)
    unit = importlib.import_module(f"vptool.prompting.modes.{PROMPT_MODES[name]}").UNIT
    if unit.name != name:
        raise ValueError(f"vptool.prompting.modes.{PROMPT_MODES[name]}: UNIT.name is {unit.name!r}, registered as "
                         f"{name!r}")
    return unit
