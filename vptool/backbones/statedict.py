"""What every checkpoint converter shares (no vptool imports): the converter result type and the DDP prefix.

A converter is a pure function ``sd -> (timm_sd, extras, ignored_keys)`` (see ``vptool.backbones.convert``); the
converters themselves live in the family files (``vptool.prompting.families.<family>``), which import this module,
never ``vptool.backbones.build``/``convert``.
"""

from __future__ import annotations

import torch

#: a converter's result: (tensors in the timm layout, pretrained tensors the model has no slot for, dropped keys)
Converted = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]

#: the key prefix ``torch.nn.parallel.DistributedDataParallel`` adds to every parameter of a saved model.
DDP_PREFIX = "module."
