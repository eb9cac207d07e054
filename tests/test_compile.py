"""``train.compile: true``: the training run under ``torch.compile`` (inductor) gives the eager run's step losses
within 1e-5 (3 optimizer steps), also with activation checkpointing and bf16 frozen weights. Compiling takes tens
of seconds on a CPU: the slow lane. ``auto`` (the default) compiles on CUDA only."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_recipe

from vptool.engine.train import Observer, train
from vptool.recipe import deep_merge, resolve


class Steps(Observer):
    def __init__(self):
        self.losses: list[float] = []

    def step(self, loss: float, acc: float, lr: float) -> None:
        self.losses.append(loss)


def test_auto_compiles_on_cuda_only(tmp_path):
    from vptool.engine.runtime import compile_wanted

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [compile_wanted(s, cpu) for s in ("auto", True, False)] == [False, True, False]
    assert [compile_wanted(s, cuda) for s in ("auto", True, False)] == [True, True, False]
    assert resolve(tiny_recipe(tmp_path)).train.compile == "auto"
    for given in ("auto", True, False):
        assert resolve(tiny_recipe(tmp_path, train={"compile": given})).train.compile == given


#: a plain run, and one with each block recomputed in backward and the frozen weights stored in bf16
VARIANTS = {"plain": {}, "checkpointed-bf16": {"train": {"activation_checkpointing": "on"},
                                               "backbone": {"dtype": "bf16"}}}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_training_gives_the_eager_losses(tmp_path, variant):
    losses = {}
    for compiled in (False, True):
        # 1257 digits in batches of 512: 3 optimizer steps; no prompt dropout, so both runs see the same numbers
        raw = tiny_recipe(tmp_path, data={"dataset": "digits", "batch_size": 512, "eval_batch_size": 1024},
                          prompt={"length": 4, "dropout": 0.0},
                          train={"epochs": 1, "warmup_epochs": 0, "lr": 0.5, "compile": compiled},
                          output={"dir": str(tmp_path / "runs"), "name": f"compile_{compiled}"})
        raw = deep_merge(raw, VARIANTS[variant])
        obs = Steps()
        summary = train(resolve(raw), observer=obs)
        losses[compiled] = obs.losses
        assert summary["best_epoch"] == 1
    assert len(losses[False]) == 3 and len(losses[True]) == 3
    assert losses[False][0] != losses[False][2]  # the steps train: the loss moves
    for eager, comp in zip(losses[False], losses[True]):
        assert abs(eager - comp) <= 1e-5, (losses[False], losses[True])
