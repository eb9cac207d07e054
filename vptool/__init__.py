"""vptool: visual prompt tuning of frozen, pretrained Vision Transformers (VPT, GateVPT, SPT, VPTM).

The library face (imported on first use, so ``import vptool`` and the CLI's start stay light):

- ``vptool.load(path, device=None, backbone_checkpoint=None)``: a trained ``PromptedViT`` from a run directory
  or an adapter folder, without the dataset (``vptool.adapter.load``).
- ``vptool.from_preset(name, backbone, num_classes, **overrides)``: a fresh model for a method preset.
- ``vptool.PromptedViT``: the prompted model (``forward``, ``predict``, ``save_pretrained``,
  ``from_pretrained``, ``data_config``).
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "from_preset", "PromptedViT"]

_LAZY = {"load": ("vptool.prompting.model", "load"), "from_preset": ("vptool.prompting.model", "from_preset"),
         "PromptedViT": ("vptool.prompting.model", "PromptedViT")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vptool' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
