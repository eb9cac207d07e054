"""``ModelConfig``: the one typed config of the prompted model (no torch).

As peft's ``PeftConfig``, one dataclass is three things at once:

- the **constructor input**: ``PromptedViT(backbone, ModelConfig(prompt_mode="deep", num_classes=200))``;
- the **schema**: each field declares its type (a ``vptool.options`` choice table), default and help once; the
  recipe's sections take the same declaration for their model keys (``recipe_field``), so a value the recipe
  refuses is refused in Python too, with the same allowed values named;
- the **saved form**: ``to_dict()`` is ``adapter_config.json``'s ``"model"`` section, ``from_dict()`` reads it
  back (leniently: keys another vptool version wrote are returned, for a warning, not refused).

Each field names the recipe key that sets it (``key``), so ``ModelConfig.from_recipe(recipe)`` needs no table
of its own. Shapes: Np prompt tokens per set, D width, K classes, L blocks.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from vptool.options import (
    BackboneDtype,
    Blocks,
    DeepForm,
    GateKind,
    HeadInit,
    HeadType,
    LocationForm,
    MaskToken,
    PromptInit,
    PromptLocation,
    PromptMode,
    ReadoutNorm,
    ReadoutPool,
    SwinMerge,
    Temperature,
    Tune,
    check_choice,
)


def option(default: Any, help: str, key: str | tuple[str, ...] | None = None, saved: bool = True):
    """A ``ModelConfig`` field: its default, help, the recipe key(s) that set it, and whether ``to_dict`` saves it."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: default, metadata={"help": help, "key": key, "saved": saved})
    return field(default=default, metadata={"help": help, "key": key, "saved": saved})


@dataclass
class ModelConfig:
    """The options of one ``PromptedViT`` (DESIGN.md §1): every method is a point of this space.

    Raises (``validate``, run by the constructor of ``PromptedViT``):
        ValueError: an option outside its allowed values; the message names the option, the value and every
            allowed value (``vptool.options.check_choice``).
    """

    num_classes: Optional[int] = option(None, "K, the classes the head scores", saved=False)
    prompt_mode: PromptMode = option(
        "none", "none | shallow (VPT eq. 4-5) | deep (VPT eq. 7) | gated (GateVPT eq. 6-8: shallow + gates)",
        "prompt.mode")
    prompt_length: int = option(10, "Np, prompt tokens per set", "prompt.length")
    prompt_location: PromptLocation = option(
        "prepend", "where the prompts enter (VPT Fig. 5): prepend (rows after the class token, eq. 4) | add (an "
                   "(N, D) prompt added to the patch embeddings) | add-1 (one (1, D) prompt added to every patch) | "
                   "prepend-pixel (learnable pixels embedded as Np extra patches) | concat-channel (a learnable input "
                   "channel; official: below) | pad (learnable pixels padded around the image)", "prompt.location")
    prompt_location_form: LocationForm = option(
        "paper", "where the paper and the official VPT code differ on prompt.location (vptool.prompting.locations): "
                 "paper | official (add/add-1 also on the class token; concat-channel tunes the whole patch "
                 "embedding, new weights xavier; pad pixels in [0, 1] through ImageNet mean/std)",
        "prompt.location_form")
    prompt_init: PromptInit = option(
        "xavier", "xavier (VPT) | zeros (VPTM) | file (an init-prompts output, prompt.init_file) | an SPT strategy "
                  "built when training starts: kmeans | mean-pool | max-pool | random (SPT §3.3-3.4)", "prompt.init")
    prompt_file: Optional[str] = option(None, "init: file -> safetensors with prompts.shallow / prompts.deep",
                                        "prompt.init_file", saved=False)
    prompt_blocks: Optional[Blocks] = option(
        None, "deep: the blocks that receive a prompt set, 1-based as VPT Fig. 7: a range (1-6, 7-12), one block "
              "(12) or a list ([1, 5, 9]); null = every block. A block outside the set carries the prompt rows the "
              "block before it output (none before the first set)", "prompt.blocks")
    swin_merge: SwinMerge = option(
        "drop", "Swin: prompt rows at patch merging (VPT §4.2): drop (the paper: \"ignored during patch merging\"; "
                "shallow prompts stay in stage 1) | official (the official code: tiled 4x through the merging's norm "
                "and reduction)", "prompt.swin_merge")
    prompt_dropout: float = option(0.0, "dropout on each prompt set when inserted (train mode only)",
                                   "prompt.dropout")
    prompt_trainable: bool = option(True, "false freezes the prompts (head only, SPT Tab. 4a)", "prompt.trainable")
    gate_init: float = option(5.0, "gated: gate priors start at -gate_init (GateVPT official code; Table 5 per "
                                   "task)", "prompt.gate_init")
    gate_kind: GateKind = option("soft", "gated: soft sigmoid gates | hard (straight-through Gumbel-sigmoid)",
                                 "prompt.gate")
    temperature: Temperature = option(
        "fixed", "fixed (tau = 1) | learnable (one tau per block, GateVPT eq. 9)", "attention.temperature")
    temperature_range: tuple = option(
        (0.01, 10.0), "learnable temperature (lower, upper) clamp (official GateVPT code)",
        ("attention.temperature_min", "attention.temperature_max"))
    mask_token: MaskToken = option(
        "none", "[MASK] token (VPTM): none | auto (pretrained if the backbone has one, else learnable) | "
                "pretrained | learnable", "tokens.mask")
    token_order: Optional[str] = option(
        None, "token order over C (class), X (patches), P (prompts), M (mask), C first; default CPX, or CXPM with a "
              "mask token (VPTM Table 5: CXPM CXMP CPMX CMPX)", "tokens.order")
    readout_pool: ReadoutPool = option(
        "cls", "cls | avg (patch tokens, VPT Fig. 8 Image-pool) | avg_all (every token after CLS, prompts included: "
               "Global-pool) | prompt (the prompt tokens: Prompt-pool) | mask (VPTM h[MASK])",
        "readout.pool")
    readout_norm: ReadoutNorm = option(
        "pretrained", "pretrained (backbone's final norm) | fresh (new LayerNorm, MAE fc_norm) | none",
        "readout.norm")
    head: HeadType = option("linear", "linear | verbalizer (VPTM eq. 7-9) | mlp1 | mlp2 (VPTM Table 4 baselines)",
                            "head.type")
    head_dim: int = option(128, "verbalizer prototype width t (VPTM default 128) or the mlp2 hidden width",
                           "head.dim")
    head_init: HeadInit = option(
        "trunc_normal", "trunc_normal (std 0.02, zero bias) | official (the VPT/GateVPT code: kaiming-normal "
                        "fan_out weights, logit bias -log(99))", "head.init")
    tune: Tune = option("prompts", "prompts (+head) | head (linear probe) | all (full fine-tune)", "train.tune")
    deep_form: DeepForm = option("prefix", "deep prompts as prefix keys/values (prefix) or concatenated rows "
                                           "(concat, the reference form for tests and benchmarks)")
    # runtime settings, never saved (the adapter does not depend on them; recipes set them through
    # train.activation_checkpointing and backbone.dtype, resolved by vptool.engine.setup.runtime_options)
    activation_checkpointing: bool = option(
        False, "recompute each transformer block (prompts, gates, dropout included) in the backward pass instead of "
               "keeping its activations: training only, ViT/BEiT blocks", saved=False)
    backbone_dtype: BackboneDtype = option(
        "fp32", "dtype the frozen backbone weights are stored in: fp32 | bf16 | fp16 (trainable tensors stay fp32; "
                "vptool.prompting.lowp)", saved=False)

    # ------------------------------------------------------------------------------------------- checks
    def validate(self) -> ModelConfig:
        """Check every choice against its table; a copy with the numbers in their types (``prompt_length: 10.0``
        -> 10, the temperature range a float pair).

        Raises:
            ValueError: one line naming the option, the bad value and every allowed value.
        """
        for name, tp in choice_fields().items():
            check_choice(name, getattr(self, name), tp)
        return dataclasses.replace(
            self, prompt_blocks=blocks_spec(self.prompt_blocks, "prompt_blocks"),
            prompt_length=int(self.prompt_length), prompt_dropout=float(self.prompt_dropout),
            prompt_trainable=bool(self.prompt_trainable),
            activation_checkpointing=bool(self.activation_checkpointing), gate_init=float(self.gate_init),
            temperature_range=tuple(float(v) for v in self.temperature_range), head_dim=int(self.head_dim))

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes`` applied (``dataclasses.replace``).

        Raises:
            ValueError: an unknown option (named, with the options there are).
        """
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown option {unknown[0]!r}; options: {', '.join(sorted(field_names()))}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------- saved form
    def to_dict(self) -> dict:
        """``adapter_config.json``'s ``"model"`` section: every saved option, JSON types only."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata["saved"]:
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, data: dict, **given) -> tuple[ModelConfig, list[str]]:
        """Read a saved ``"model"`` section (or ``PromptedViT`` keywords): ``(config, unknown keys)``.

        Keys this version does not know are returned, not refused (saved artifacts are read leniently);
        ``given`` (e.g. ``num_classes``) wins over ``data``. Values are not validated here (``validate``).
        """
        names = set(field_names())
        known = {k: v for k, v in {**data, **given}.items() if k in names}
        if "temperature_range" in known and known["temperature_range"] is not None:
            known["temperature_range"] = tuple(float(v) for v in known["temperature_range"])
        return cls(**known), sorted(set(data) - names)

    @classmethod
    def from_recipe(cls, recipe, **given) -> ModelConfig:
        """The model options a recipe (a ``vptool.recipe.Recipe`` or its ``to_dict()`` mapping) sets, each read
        at the recipe key its field names; ``given`` (``num_classes``, ...) wins."""
        d = recipe if isinstance(recipe, dict) else recipe.to_dict()
        values = {}
        for f in dataclasses.fields(cls):
            key = f.metadata["key"]
            if key is None:
                continue
            keys = key if isinstance(key, tuple) else (key,)
            got = tuple(_at(d, k) for k in keys)
            values[f.name] = got if isinstance(key, tuple) else got[0]
        return cls(**{**values, **given})


def blocks_spec(value, key: str = "prompt.blocks") -> str | None:
    """``prompt.blocks`` in its canonical string: runs of consecutive blocks as ``a-b``, joined by commas
    (``[1, 2, 3, 7]`` -> ``"1-3,7"``); None (or ``all``) for every block. Takes an int, a string of ranges and
    numbers (``"7-12"``, ``"1,5"``) or a list of them; 1-based, as VPT Fig. 7.

    Raises:
        ValueError: one line naming ``key``, the value and the accepted forms.
    """
    if value is None or value == "all":
        return None
    blocks = _block_numbers(value, key)
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def block_indices(value, depth: int, key: str = "prompt.blocks") -> tuple[int, ...]:
    """The 0-based indices of the blocks ``value`` (``blocks_spec``'s forms) names, sorted; every block of
    ``depth`` for None.

    Raises:
        ValueError: a form ``blocks_spec`` refuses, or a block outside 1..depth (named, with the depth).
    """
    if value is None or value == "all":
        return tuple(range(depth))
    blocks = _block_numbers(value, key)
    if blocks[-1] > depth:
        raise ValueError(f"{key}: block {blocks[-1]} is outside this backbone's blocks 1-{depth}; name blocks "
                         f"among 1-{depth}")
    return tuple(b - 1 for b in blocks)


def _block_numbers(value, key: str) -> list[int]:
    """The sorted, distinct 1-based block numbers of a ``prompt.blocks`` value."""
    bad = ValueError(f"{key}: {value!r} is not a block list; give 1-based blocks as a range (1-6), one block (12), "
                     "a list ([1, 5, 9]) or all")
    items = value if isinstance(value, (list, tuple)) else [value]
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool):
            raise bad
        parts = [item] if isinstance(item, int) else str(item).replace(" ", "").split(",")
        for part in parts:
            lo, _, hi = str(part).partition("-")
            if not lo.isdigit() or (hi and not hi.isdigit()):
                raise bad
            a, b = int(lo), int(hi or lo)
            if a < 1 or b < a:
                raise bad
            out.update(range(a, b + 1))
    if not out:
        raise bad
    return sorted(out)


def _at(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d[part]
    return d


def field_names() -> tuple[str, ...]:
    """Every ``ModelConfig`` option, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(ModelConfig))


def choice_fields() -> dict[str, Any]:
    """The options that are choices, and their ``vptool.options`` tables."""
    hints = typing.get_type_hints(ModelConfig)
    return {name: tp for name, tp in hints.items() if typing.get_origin(tp) is typing.Literal}


def recipe_field(name: str, **changes):
    """A recipe section's field declared by ``ModelConfig.<name>``: the same default and help (``changes``
    overrides, e.g. the recipe's ``auto`` default for the readout); the section's annotation gives the type."""
    f = {x.name: x for x in dataclasses.fields(ModelConfig)}[name]
    default = changes.get("default", f.default)
    md = {"help": changes.get("help", f.metadata["help"]), "required": False, "model": name}
    return field(default=default, metadata=md)
