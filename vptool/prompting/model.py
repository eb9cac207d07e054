"""``PromptedViT``: the prompted model with its library face (the library layer, above ``vptool.prompting.core``).

The forward, the prompts, the readout and the adapter tensors are ``vptool.prompting.core.PromptedCore``'s (the
model layer, which imports nothing above it). This class adds what needs the library: ``predict``
(``vptool.inference``), ``save_pretrained`` and ``from_pretrained`` (``vptool.adapter``). ``load`` and
``from_preset`` here are ``vptool.load`` and ``vptool.from_preset``: they build this class through the one builder
(``vptool.builder``), which is handed the class instead of importing it, so the layers run one way:
core <- builder <- adapter <- this module.
"""

from __future__ import annotations

from pathlib import Path

from vptool.config import ModelConfig
from vptool.prompting.core import (
    CHOICE_OPTIONS,
    POSITIONAL_OPTIONS,
    PromptedCore,
    PromptGates,
    PromptTokens,
    check_finite,
    format_parameter_summary,
)

__all__ = ["CHOICE_OPTIONS", "POSITIONAL_OPTIONS", "ModelConfig", "PromptGates", "PromptTokens", "PromptedViT",
           "check_finite", "format_parameter_summary", "from_preset", "load"]


class PromptedViT(PromptedCore):
    __doc__ = PromptedCore.__doc__

    def predict(self, images, top_k: int = 5, batch_size: int = 64) -> list[dict]:
        """Classify images through this model's own evaluation transform (``data_config``, ``eval_transform``).

        Args:
            images: a path, a PIL image, a (3, H, W) or (B, 3, H, W) float tensor of pixel values in [0, 1]
                (uint8 tensors are scaled by 1/255), or a list of paths / PIL images / (3, H, W) tensors. Any
                PIL mode is converted to RGB (grayscale, palette, RGBA, 16-bit).
            top_k: classes per image (capped at K).
            batch_size: images per forward pass (on the model's device; bf16 autocast on a CUDA device with bf16,
                fp32 on CPU).

        Returns:
            One dict per image, in input order: ``{"classes": [k class names], "probs": [k softmax
            probabilities]}``, most probable first.

        Raises:
            UserError: an image file that cannot be read (named).
            ValueError: ``top_k`` or ``batch_size`` below 1.
        """
        from vptool.inference import predict_images

        return predict_images(self, images, top_k=top_k, batch_size=batch_size)

    def save_pretrained(self, directory) -> None:
        """Write an adapter folder: ``adapter.safetensors`` (the trained tensors only, never the frozen
        backbone), ``adapter_config.json`` (how to rebuild the model: options, backbone name, checkpoint and
        sha256, class names, data config) and a ``README.md`` model card. See ``vptool.adapter``.

        Raises:
            ValueError: the model was built around a backbone vptool did not build (nothing to name it by).
            UserError: ``directory`` is, contains or lies inside the folder the model was loaded from or its
                backbone checkpoint (nothing written).
        """
        from vptool.adapter import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, backbone_checkpoint=None, device=None) -> PromptedViT:
        """Rebuild a model from an adapter folder or a run directory (``vptool.load``).

        Raises:
            UserError: not an adapter folder, a missing backbone checkpoint or one with another sha256.
        """
        from vptool.adapter import load

        return load(directory, device=device, backbone_checkpoint=backbone_checkpoint, model_cls=cls)


def load(path: str | Path, device=None, backbone_checkpoint: str | Path | None = None) -> PromptedViT:
    """``vptool.load``: a trained ``PromptedViT`` from a run directory or an adapter folder (``vptool.adapter.load``,
    whose docstring gives the arguments and errors)."""
    from vptool.adapter import load as load_adapter

    return load_adapter(path, device=device, backbone_checkpoint=backbone_checkpoint, model_cls=PromptedViT)


def from_preset(name: str, backbone, num_classes: int, **kwargs) -> PromptedViT:
    """``vptool.from_preset``: a fresh ``PromptedViT`` for a method preset (``vptool.adapter.from_preset``, whose
    docstring gives the arguments and errors)."""
    from vptool.adapter import from_preset as build_preset

    return build_preset(name, backbone, num_classes, model_cls=PromptedViT, **kwargs)
