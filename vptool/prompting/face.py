"""The timm-style face of a prompted model (a mixin of ``vptool.prompting.core.PromptedCore``):
``forward_intermediates`` as timm's ``VisionTransformer`` has it, the data config timm's
``resolve_model_data_config`` reads (``data_config``, ``pretrained_cfg``), and parameter counts in peft's format.

Shapes: B images, N patch tokens, Np prompts, D width, K classes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from vptool.options import TrainTransform, check_choice
from vptool.prompting.families import family_for


class TimmFace:
    """``forward_intermediates``, ``data_config``/``pretrained_cfg`` and parameter counts of a ``PromptedCore``."""

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False, stop_early: bool = False,
                              output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prompt_tokens: bool = False):
        """The outputs of chosen blocks, as timm's ``VisionTransformer.forward_intermediates``.

        Args:
            x: (B, 3, H, W) images.
            indices: block indices (0-based; negative counts from the end), or an int n for the last n blocks;
                None for every block.
            return_prefix_tokens: also return each block's prefix tokens (CLS, registers), (B, n_prefix, D).
            norm: apply the backbone's final norm to each intermediate.
            stop_early: run no block after the last index.
            output_fmt: ``NCHW`` (patch tokens as (B, D, h, w) with h, w the patch grid) or ``NLC`` ((B, N, D)).
            intermediates_only: return only the list of intermediates.
            return_prompt_tokens: vptool's addition: also return the prompt rows after each block, (B, Np, D),
                i.e. the rows entering the next block (after the gate for gated prompts); None where a block's
                prompt outputs are not kept (deep prompts in the prefix form: the next block gets its learned set)
                and without prompts.

        Returns:
            ``intermediates`` (``intermediates_only``) or ``(final, intermediates)``. Each intermediate is the
            patch tensor, or a tuple ``(patches, prefix tokens[, prompt tokens])`` with the flags above (prompt
            tokens last). ``final`` is, unlike timm's normed sequence, what ``forward_head`` consumes: the tokens
            after the last block run, before any norm (``forward_features`` when every block ran).

        Raises:
            ValueError: an index outside the blocks or an unknown ``output_fmt``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not one of 'NCHW', 'NLC'")
        L = self.family.sizes(self.backbone)[1]  # blocks (over every stage: Swin, refused in _blocks)
        if indices is None:
            take = list(range(L))
        elif isinstance(indices, int):
            take = list(range(L - indices, L))
        else:
            take = [i + L if i < 0 else i for i in indices]
        if not take or min(take) < 0 or max(take) >= L:
            raise ValueError(f"indices={indices!r} must select blocks among 0..{L - 1}")
        norm_layer = self.family.final_norm(self.backbone) if norm else None
        grid = self.location.grid(self) if output_fmt == "NCHW" else None
        out: list = []
        h = None
        for i, h, order, N in self._blocks(x, last=max(take) if stop_early else None):
            if i not in take:
                continue
            y = h
            if norm_layer is not None:
                with self.computing(norm_layer):  # weights stored in bf16 (backbone.dtype) are upcast around it
                    y = norm_layer(h)
            sl = self.slices(order, N)
            patches = y[:, sl["X"]]
            if grid is not None:
                patches = patches.reshape(y.shape[0], *grid, -1).permute(0, 3, 1, 2).contiguous()
            extra = []
            if return_prefix_tokens:
                extra.append(y[:, sl["C"]])
            if return_prompt_tokens:
                extra.append(y[:, sl["P"]] if "P" in sl else None)
            out.append(tuple([patches, *extra]) if extra else patches)
        return out if intermediates_only else (h, out)



    def set_data_config(self, data_config: dict, eval_transform: str = "vtab") -> None:
        """Record the input size and normalisation the backbone expects (``input_size``, ``mean``, ``std``) and
        the protocol (``vtab`` | ``fgvc``, ``data.train_transform``) whose evaluation transform images get.

        Raises:
            ValueError: an unknown ``eval_transform``.
        """
        self.eval_transform = check_choice("eval_transform", eval_transform, TrainTransform)
        self._data_config = {"input_size": tuple(int(v) for v in data_config["input_size"]),
                             "mean": tuple(float(v) for v in data_config["mean"]),
                             "std": tuple(float(v) for v in data_config["std"])}

    @property
    def data_config(self) -> dict:
        """The preprocessing this model expects, in timm's ``resolve_model_data_config`` form: ``input_size``
        (3, H, W) in pixels, ``mean``/``std`` per channel (of [0, 1] pixel values), ``interpolation``
        (``bilinear``, the resize vptool's transforms use), ``crop_pct`` and ``crop_mode`` (``vtab``: a square
        resize = ``squash`` at 1.0; ``fgvc``: resize to 256/224 of the size, then a centre crop = 0.875)."""
        fgvc = self.eval_transform == "fgvc"
        return {**self._data_config, "interpolation": "bilinear", "crop_pct": 224 / 256 if fgvc else 1.0,
                "crop_mode": "center" if fgvc else "squash"}

    @property
    def pretrained_cfg(self) -> dict:
        """timm's name for the model's config: ``data_config`` plus ``num_classes`` and ``label_names``, so
        ``timm.data.resolve_model_data_config(model)`` gives this model's real input size, mean and std."""
        return {**self.data_config, "num_classes": self.num_classes, "label_names": self.class_names}

    # ------------------------------------------------------------------------------------------- summary
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (``requires_grad``), in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; ``all`` counts backbone + every added tensor."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total


def backbone_data_config(backbone: nn.Module) -> dict:
    """``input_size`` (the size the backbone was built for), ``mean`` and ``std`` from timm's data config of the
    backbone. ``vptool.backbones.build_backbone``'s ``info.data_config`` is more exact (it knows the checkpoint
    format's normalisation); vptool's builders pass that one through ``set_data_config``."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(backbone)
    return {"input_size": family_for(backbone).input_size(backbone), "mean": tuple(cfg["mean"]),
            "std": tuple(cfg["std"])}


def format_parameter_summary(trainable: int, total: int) -> str:
    """``trainable params: 1,234 || all params: 86,000,000 || trainable%: 0.0014`` (peft's format)."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
