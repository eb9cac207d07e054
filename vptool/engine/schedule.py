"""What a training step follows: the peak learning rate, its schedule, the optimizer, and the order of the images.

- ``effective_lr``: the recipe's ``train.lr``, scaled by batch_size / 256 with ``lr_scaling: linear``;
- ``lr_factor``: linear warmup then cosine decay, per optimizer step (the ``LambdaLR`` of the training loop);
- ``make_optimizer``: SGD with momentum or AdamW over the trainable parameters;
- ``TrainSampler`` and ``WeightedSplit``: the seeded, resumable training order that torchrun ranks share, its
  padding marked with weight 0.
"""

from __future__ import annotations

import math

import torch

from vptool.recipe import Recipe


def effective_lr(recipe: Recipe) -> float:
    """Peak learning rate: base lr, times batch_size / 256 with ``lr_scaling: linear`` (VPT §4, Goyal et al.)."""
    lr = recipe.train.lr
    if recipe.train.lr_scaling == "linear":
        lr = lr * recipe.data.batch_size / 256
    return lr


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    Warmup: (step + 1) / warmup_steps. Cosine: 0.5 (1 + cos(pi t / T)) with t = step - warmup_steps and
    T = total_steps - warmup_steps. No step trains at lr 0: warmup starts at 1/warmup_steps and the cosine's
    last step has t = T - 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    t, T = step - warmup_steps, max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * t / T))


def make_optimizer(recipe: Recipe, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW over the trainable parameters, at the peak lr."""
    t = recipe.train
    lr = effective_lr(recipe)
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=t.weight_decay)


class TrainSampler(torch.utils.data.DistributedSampler):
    """The training order: torch's ``DistributedSampler(shuffle=True, seed=seed)``, a permutation of the N images
    seeded by ``seed + epoch`` of which rank r takes positions r, r + W, r + 2W, ...; it pads the permutation
    with its first images so every rank gets ceil(N / W). Two additions:

    - padding is marked: a padded position yields ``index + N`` (``WeightedSplit`` gives it weight 0), so the
      images of global step t are exactly those one process sees (permutation positions tB .. tB + B - 1);
    - ``set_epoch(epoch, start)`` skips this rank's first ``start`` positions, when a run resumes mid-epoch.

    The order depends only on (seed, epoch), never on how many epochs ran before in this process, so a resumed
    epoch sees exactly the batches the uninterrupted run saw. With one process it is a plain seeded shuffle.
    """

    def __init__(self, n: int, seed: int, world: int = 1, rank: int = 0):
        super().__init__(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.n, self.start = n, 0
        self.epoch = 1

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        W, r, n = self.num_replicas, self.rank, self.n
        out = [idx if r + i * W < n else idx + n for i, idx in enumerate(super().__iter__())]
        return iter(out[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


class WeightedSplit(torch.utils.data.Dataset):
    """``(image, label, weight)``: index i < N is image i with weight 1, index N + i is image i as
    ``TrainSampler``'s padding, weight 0 (it contributes nothing to the loss, the gradient or the metrics)."""

    def __init__(self, dataset):
        self.dataset, self.n = dataset, len(dataset)

    def __len__(self) -> int:
        return 2 * self.n

    def __getitem__(self, i: int):
        x, y = self.dataset[i % self.n]
        return x, y, torch.tensor(1.0 if i < self.n else 0.0)
