"""Ops file of the timm ``ResNet`` family (VPT Table 5: ResNet-50, ImageNet-1k): pad prompts, as ConvNeXt.

The ConvNet prompting (learnable pixels padded around the image, timm's own pooled features, what is refused) is
shared with the ConvNeXt family and documented there (``convnext.py``). The official code builds ResNets from
torchvision (``conv1``, ``bn1``, ``layer1``-``layer4``, ``fc``); timm's ``ResNet`` has the same module names, and
``resnet50.tv_in1k`` is torchvision's ImageNet-1k ResNet-50 in timm's layout.
"""

from __future__ import annotations

from torch import nn

from vptool.prompting.families import FamilySpec
from vptool.prompting.families.convnext import CONVNET_PRETRAINING, ConvNetOps


class ResNetOps(ConvNetOps):
    """timm ``ResNet``: pad prompts, then timm's ``forward_features`` and ``forward_head(pre_logits=True)``."""

    name = "resnet"
    title = "a ResNet"


def resnet_problem(model: nn.Module) -> str | None:
    """Why a ``ResNet`` cannot be prompted, or None: it must pool its features (``global_pool`` set)."""
    if not getattr(model.global_pool, "pool_type", ""):
        return "has no global pool (global_pool=''); build it with a pooling head"
    return None


def resnet_pretraining(name: str, family: str | None) -> str | None:
    """``convnet`` (declared by the ConvNeXt family) for a model of this family, else None."""
    return CONVNET_PRETRAINING if family == ResNetOps.name else None


def resnet_kwargs(format: str, kwargs: dict) -> dict:
    """Files in timm's layout need no constructor kwargs: the user's ``backbone.kwargs`` as they are."""
    return kwargs


#: the ResNet family: timm ``ResNet`` in timm's own layout (the ``timm`` format reads its files); its pretraining
#: and readout rows are the ConvNeXt family's ``convnet``.
FAMILY = FamilySpec(
    name=ResNetOps.name,
    timm_class="timm.models.resnet.ResNet",
    ops=ResNetOps(),
    problem=resnet_problem,
    pretraining=resnet_pretraining,
    constructor_kwargs=resnet_kwargs,
    timm_module="resnet",
    models="a timm ResNet model, e.g. resnet50.tv_in1k",
)
