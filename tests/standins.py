"""Stand-ins of a paper recipe's data layout with the benchmark's full class count (for `--dry-run` tests)."""

from __future__ import annotations

from pathlib import Path

import layouts


def full_class_stand_in(root: Path, dataset: str, task: str | None, num_classes: int) -> Path:
    """The folder to set as ``data.root``: ``layouts.make_full`` for the benchmark layouts; ``imagefolder`` (the
    Resisc45 recipe) as ``{train,test}/<class>/`` with two hard-linked images per class and split; for
    ``fgvc-json`` any ``num_classes`` (so a test can build one that disagrees with the recipe).
    """
    root = Path(root)
    if dataset == "imagefolder":
        imgs = layouts._Images(link=True)
        for split in ("train", "test"):
            for k in range(num_classes):
                for j in range(2 if split == "test" else 20):  # 20 train images: the 10 % hold-out covers K
                    imgs.write(root / split / f"class_{k:03d}" / f"{j}.png")
        return root
    if dataset == "fgvc-json":
        return layouts.make_fgvc_json(root, task, n_classes=num_classes, per_class=1, link=True)
    return layouts.make_full(root, dataset, task)
