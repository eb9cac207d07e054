"""Backbones that ship inside vptool, loadable by name from a recipe (``backbone.name: vit_digits_mae``).

Each entry gives the timm ``VisionTransformer`` constructor kwargs, the weights file under ``vptool/assets``,
the data config (input size, mean, std, in timm's ``resolve_model_data_config`` form), and how the weights
were made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"


@dataclass(frozen=True)
class EmbeddedBackbone:
    name: str
    arch: dict
    weights: str
    mean: tuple = (0.5, 0.5, 0.5)
    std: tuple = (0.5, 0.5, 0.5)
    made_by: str = ""
    pretraining: str = "supervised"  # the objective the weights come from (``vptool.conventions``)
    extra: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return ASSETS / self.weights

    @property
    def input_size(self) -> tuple:
        s = self.arch["img_size"]
        return (3, s, s)


EMBEDDED: dict[str, EmbeddedBackbone] = {
    "vit_digits_mae": EmbeddedBackbone(
        name="vit_digits_mae",
        # ViT, 24 px input, 4 px patches (N = 36 patch tokens), D = 128, L = 6 blocks, 4 heads: 1.2 M params.
        arch=dict(img_size=24, patch_size=4, embed_dim=128, depth=6, num_heads=4, mlp_ratio=4.0,
                  qkv_bias=True, class_token=True, global_pool="token", num_classes=0),
        weights="vit_digits_mae.safetensors",
        pretraining="mae",
        made_by="python -m vptool.backbones.pretrain_digits_mae "
                "(MAE objective on the digits training split, fixed seed)",
    ),
}
