"""scikit-learn's bundled handwritten digits (1,797 real 8x8 greyscale images, 10 classes) as an image dataset.

The split is stratified and seeded: train/val/test = 70/10/20 % of the images, the same for a given
``split_seed`` on every machine (scikit-learn's ``train_test_split``).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset

from vptool.data.files import is_deterministic

CLASSES = [str(i) for i in range(10)]


def digits_split(split_seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified seeded 70/10/20 split of the digits.

    Returns:
        ``{"train"|"val"|"test": (images, labels)}``; images float32 (n, 8, 8) in [0, 1] (pixel value / 16),
        labels int64 (n,). Sizes 1257 / 180 / 360.
    """
    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.2, stratify=labels, random_state=split_seed)
    train, val = train_test_split(rest, test_size=0.125, stratify=labels[rest], random_state=split_seed)
    return {name: (images[i], labels[i]) for name, i in (("train", train), ("val", val), ("test", test))}


class DigitsDataset(Dataset):
    """One split of the digits as (3, S, S) image tensors.

    Each 8x8 image in [0, 1] is repeated to 3 channels and passed through ``transform`` (a torchvision transform
    on a float tensor (3, 8, 8); resize and normalisation come from the backbone's data config).

    Args:
        split: ``train``, ``val`` or ``test``.
        transform: callable on a float tensor (3, 8, 8).
        split_seed: seed of the stratified split.
    """

    classes = CLASSES

    def __init__(self, split: str, transform=None, split_seed: int = 0):
        images, labels = digits_split(split_seed)[split]
        self.images = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
        self.targets = labels.tolist()
        self.transform = transform
        # a deterministic transform (vtab resize + normalise, every eval transform) gives the same tensor every
        # epoch: apply it once to the whole split (one batched call) instead of per image per epoch
        self.transformed = None
        if transform is not None and is_deterministic(transform):
            self.transformed = transform(self.images).contiguous()

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        if self.transformed is not None:
            return self.transformed[i], self.targets[i]
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.targets[i]
