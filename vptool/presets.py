"""Method presets (no torch): a registry ``name -> defaults + one-line description`` over the recipe's options.

A preset is a point in the option space (DESIGN.md §1): ``vptool.recipe.resolve`` merges the named preset's
``defaults`` under the YAML recipe. ``vptool.recipe`` re-exports ``Preset``, ``PRESETS`` and ``register_preset``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    defaults: dict
    paper: str = ""  # the method's source, as the model card cites it
    convention: str = "vpt"  # whose official code ``readout: auto`` follows (``vptool.conventions``)


PRESETS: dict[str, Preset] = {}

VPT_PAPER = "Jia et al., Visual Prompt Tuning, ECCV 2022"
GATEVPT_PAPER = "Yoo et al., Improving Visual Prompt Tuning for Self-supervised Vision Transformers, ICML 2023"
SPT_PAPER = "Wang et al., Revisiting the Power of Prompt for Visual Tuning (SPT), ICML 2024"
VPTM_PAPER = "Visual Prompting via Masked Visual Token Modeling (VPTM)"


def register_preset(name: str, description: str, defaults: dict, paper: str = "", convention: str = "vpt") -> Preset:
    """Register a method preset (a point in the option space). Rejects a name that is already taken.

    ``convention`` (``vpt``, ``gatevpt``, ``spt``, ``vptm``) names whose official code ``readout.pool/norm: auto``
    follows on each backbone (``vptool.conventions``).

    Raises:
        ValueError: ``name`` is registered already, or an unknown convention.
    """
    from vptool.conventions import CONVENTIONS

    if name in PRESETS:
        raise ValueError(f"method preset {name!r} is registered already ({PRESETS[name].description})")
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is not one of {', '.join(CONVENTIONS)}")
    PRESETS[name] = Preset(name, description, copy.deepcopy(defaults), paper, convention)
    return PRESETS[name]


register_preset("linear", "linear probe: frozen backbone, train the head only",
                {"prompt": {"mode": "none"}, "train": {"tune": "head", "optimizer": "sgd"}},
                "linear probe of a frozen backbone (baseline in VPT, Jia et al. 2022, Table 1)")
register_preset("full", "full fine-tune: every backbone tensor and the head (AdamW)",
                {"prompt": {"mode": "none"},
                 "train": {"tune": "all", "optimizer": "adamw", "lr": 1e-3, "lr_scaling": "linear",
                           "weight_decay": 1e-4}},
                "full fine-tuning (baseline in VPT, Jia et al. 2022, Table 1)")
register_preset("vpt-shallow", "VPT-shallow (Jia et al. 2022, eq. 4-5): Np prompts before block 1",
                {"prompt": {"mode": "shallow", "length": 10, "init": "xavier", "dropout": 0.0},
                 "train": {"tune": "prompts", "optimizer": "sgd"}}, VPT_PAPER)
register_preset("vpt-deep", "VPT-deep (Jia et al. 2022, eq. 7): a prompt set before every block",
                {"prompt": {"mode": "deep", "length": 10, "init": "xavier", "dropout": 0.1},
                 "train": {"tune": "prompts", "optimizer": "sgd"}}, VPT_PAPER)
_SPT_TRAIN = {"data": {"batch_size": 32},  # SPT §4.1; lr and weight decay: the official code's defaults
              "train": {"tune": "prompts", "optimizer": "adamw", "lr": 1e-5, "weight_decay": 0.05,
                        "warmup_epochs": 10, "epochs": 100}}
register_preset("spt-shallow", "SPT-shallow (Wang et al. 2024, eq. 9-12): 100 shallow prompts from k-means "
                               "token prototypes (AdamW)",
                {"prompt": {"mode": "shallow", "length": 100, "init": "kmeans", "dropout": 0.0}, **_SPT_TRAIN},
                SPT_PAPER, "spt")
register_preset("spt-deep", "SPT-deep (Wang et al. 2024, eq. 9-10, 13): 20 prompts per block from k-means "
                            "token prototypes of that block's input (AdamW)",
                {"prompt": {"mode": "deep", "length": 20, "init": "kmeans", "dropout": 0.0}, **_SPT_TRAIN}, SPT_PAPER,
                "spt")
register_preset("gatevpt", "GateVPT (Yoo et al. 2023, eq. 6-9): gated shallow prompts + learnable temperature",
                {"prompt": {"mode": "gated", "length": 100, "init": "xavier", "dropout": 0.1, "gate_init": 5.0,
                            "gate": "soft"},
                 "attention": {"temperature": "learnable"},
                 "train": {"tune": "prompts", "optimizer": "sgd", "lr": 0.1, "weight_decay": 0.0}}, GATEVPT_PAPER,
                "gatevpt")
register_preset("vptm", "VPTM (§4, eq. 6-9): [MASK] token + zero-init shallow prompts + prototypical verbalizer",
                {"prompt": {"mode": "shallow", "length": 20, "init": "zeros", "dropout": 0.0},
                 "tokens": {"mask": "auto", "order": "CXPM"},
                 "readout": {"pool": "mask", "norm": "pretrained"},
                 "head": {"type": "verbalizer", "dim": 128},
                 "train": {"tune": "prompts", "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01,
                           "warmup_epochs": 5}}, VPTM_PAPER, "vptm")
