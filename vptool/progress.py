"""``Progress``: the one set of progress hooks the engine calls (train, init-prompts, predict, probe-nmi).

The library itself only calls these hooks (and logs); every default does nothing, except ``note``, which logs a
warning. The CLI's rich implementation (``vptool.commands.common.RichProgress``) draws bars on stderr. Subclass it
and override what you need (tests count steps this way). This module must not import torch: the CLI imports it
at start-up.
"""

from __future__ import annotations

import logging

#: the logger ``note`` writes to when nobody shows progress (the training loop's, as before the hooks were merged)
log = logging.getLogger("vptool.engine.train")


class Progress:
    """Progress hooks with no-op defaults: the union of what training, SPT prompt construction and prediction
    report."""

    # the display's lifetime (a rich implementation starts and stops its live bars)
    def start(self) -> None: ...
    def stop(self) -> None: ...
    # training (``vptool.engine.train``)
    def run_start(self, info: dict) -> None: ...
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float, acc: float, lr: float) -> None: ...
    def epoch_end(self, record: dict) -> None: ...
    # evaluation passes (test split, probe-nmi, predict)
    def eval_start(self, split: str, steps: int) -> None: ...
    def eval_step(self) -> None: ...
    def run_end(self, summary: dict) -> None: ...
    # building SPT prompts (init-prompts, or train with ``prompt.init`` naming a strategy); see engine.init_prompts
    def extract_start(self, batches: int) -> None: ...
    def extract_step(self) -> None: ...
    def kmeans_start(self, steps: int) -> None: ...
    def kmeans_step(self) -> None: ...

    def note(self, text: str) -> None:  # a one-line notice (resuming, extending); the CLI prints it on stderr
        log.warning(text)

    @classmethod
    def silent(cls) -> Progress:
        """What ranks other than 0 report to: nothing."""
        obs = cls()
        obs.note = lambda text: None
        return obs
