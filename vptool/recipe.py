"""Recipes: a strict schema over YAML, method presets, and ``--set`` overrides.

A recipe is resolved in four layers, later ones winning: the schema's defaults, the method preset named by
``method``, the YAML file, then ``--set a.b=value`` overrides. Every layer goes through the same validation:
unknown keys are errors that name the dotted path and the nearest valid key, wrong types and missing required
keys likewise, and every problem is collected and reported at once (``RecipeError``).

The YAML is read with ``yaml.safe_load``; nothing in a recipe is ever executed. The presets live in
``vptool.presets``, the checks across fields in ``vptool.recipe_checks`` and the ``--set`` parsing in
``vptool.overrides``; this module re-exports their public names.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vptool.backbones.kwargs import SIZE_KWARGS, backbone_kwargs_problems, short_repr  # noqa: F401 (re-exported)
from vptool.config import ModelConfig, blocks_spec, recipe_field
from vptool.errors import RecipeError, UserError
from vptool.options import (
    BackboneDtypeSetting,
    BackboneFormat,
    Blocks,
    Checkpointing,
    CompileSetting,
    DataCache,
    FeatureCache,
    GateKind,
    HeadInit,
    HeadType,
    InitForm,
    InitSource,
    InitTransform,
    LocationForm,
    LrScaling,
    MaskToken,
    NumWorkers,
    Optimizer,
    Precision,
    PromptInit,
    PromptLocation,
    PromptMode,
    ReadoutNormSetting,
    ReadoutPoolSetting,
    SwinMerge,
    Temperature,
    TrainTransform,
    Tune,
    VtabSplit,
)
from vptool.overrides import deep_merge, flat_keys, parse_overrides  # noqa: F401 (re-exported)
from vptool.presets import PRESETS, Preset, register_preset  # noqa: F401 (re-exported)
from vptool.recipe_checks import cross_field_problems
from vptool.yamlio import (  # noqa: F401  (re-exported: the recipe's YAML reader lived here first)
    MAX_YAML_DEPTH,
    MAX_YAML_VALUES,
    RecipeLoader,
    YamlProblem,
    load_yaml_text,
    read_yaml,
)


def _f(default: Any = None, help: str = "", required: bool = False, factory=None):
    md = {"help": help, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=md)
    return field(default=default, metadata=md)


@dataclass
class BackboneConfig:
    name: str = _f(None, "embedded name (vit_digits_mae) or any timm model name", required=True)
    pretrained: bool = _f(True, "load the embedded weights / timm's pretrained weights (HF cache, offline)")
    checkpoint: Optional[str] = _f(None, "local weights file loaded strictly: timm state dict (.safetensors/.pth), "
                                         "MAE, MoCo v3, Google JAX .npz or BEiT v1/v2 pretraining release")
    format: BackboneFormat = _f(
        "auto", "checkpoint layout: auto (detected from the file's keys) or one of the converters' names")
    kwargs: dict = _f(help="extra timm constructor kwargs, e.g. {img_size: 32, depth: 2}", factory=dict)
    dtype: BackboneDtypeSetting = _f(
        "auto", "dtype the frozen backbone weights are stored in: fp32 | bf16 | fp16 (half the memory; trainable "
                "tensors, optimizer state and the adapter stay fp32) | auto (bf16 on a CUDA device with bf16 "
                "autocast: train.precision bf16 or auto there, else fp32). Not with train.tune all")


@dataclass
class DataConfig:
    dataset: str = _f(None, "digits (bundled) | imagefolder | cub200 | fgvc-json | vtab-1k | torchvision:<Name> "
                            "(CIFAR10, CIFAR100, Flowers102, Food101, EuroSAT, SVHN, OxfordIIITPet, DTD, PCAM)",
                      required=True)
    root: Optional[str] = _f(None, "dataset folder: imagefolder root/{train,val,test}/<class>/*; cub200 "
                                   "CUB_200_2011/; fgvc-json the folder with {train,val,test}.json; vtab-1k the "
                                   "vtab-1k/ folder; torchvision:<Name> the root torchvision reads")
    task: Optional[str] = _f(None, "fgvc-json: cub | nabirds | flowers | dogs | cars; vtab-1k: the task folder "
                                   "(cifar, caltech101, dtd, ...)")
    image_dir: Optional[str] = _f(None, "fgvc-json: folder (relative to root) the JSON image paths are relative to; "
                                        "default per task as in VPT (cub/nabirds images, dogs Images, others root)")
    vtab_split: VtabSplit = _f(
        "final", "vtab-1k: final (train on train800val200, test on test) | tune (train800, select on val200)")
    split_seed: int = _f(0, "seed of the stratified train/val/test split")
    val_fraction: float = _f(0.1, "fraction of train held out as val where a dataset has no val split "
                                  "(imagefolder without val/, cub200, some torchvision sets)")
    train_transform: TrainTransform = _f(
        "vtab", "vtab (square resize to the input size, no augmentation) | fgvc (train: random resized crop + "
                "horizontal flip; eval: resize to 256/224 of the input size, centre crop)")
    num_classes: Optional[int] = _f(None, "K; checked against the data when given (lets --dry-run size the head "
                                          "before the data is on disk)")
    batch_size: int = _f(64, "training batch size B")
    eval_batch_size: int = _f(256, "evaluation batch size")
    num_workers: NumWorkers = _f(0, "DataLoader worker processes per process, or auto: 0 for digits and splits under "
                                    "512 images, else min(8, CPUs per local rank - 1) (vptool.data.loading)")
    cache: DataCache = _f("auto", "auto: file datasets (imagefolder, cub200, fgvc-json, vtab-1k) decode each "
                                  "training and validation image once, resized, as uint8 in memory or "
                                  "RUN/.image_cache/ (vptool.data.cache) | off")


@dataclass
class PromptConfig:
    mode: PromptMode = recipe_field("prompt_mode")
    length: int = recipe_field("prompt_length")
    blocks: Optional[Blocks] = recipe_field("prompt_blocks")
    location: PromptLocation = recipe_field("prompt_location")
    location_form: LocationForm = recipe_field("prompt_location_form")
    swin_merge: SwinMerge = recipe_field("swin_merge")
    init: PromptInit = recipe_field("prompt_init")
    init_file: Optional[str] = recipe_field("prompt_file")
    init_fraction: float = _f(1.0, "SPT kmeans: fraction of the training split whose tokens are clustered")
    init_source: InitSource = _f(
        "same", "SPT: set i from the tokens entering block i+1 (same) | all sets from level 0 (first) | from the "
                "last block's output (last) (SPT Table S2)")
    init_form: InitForm = _f(
        "paper", "SPT: paper (the text) | official (the official code: level 0 without position embedding, "
                 "per-image pooling windows, init images through the training augmentation)")
    init_transform: InitTransform = _f(
        "auto", "SPT: the transform of the images the prompts are built from: eval (deterministic) | train (the "
                "training augmentation, data.train_transform, as the official code) | auto (train with "
                "init_form official, else eval)")
    dropout: float = recipe_field("prompt_dropout")
    trainable: bool = recipe_field("prompt_trainable")
    gate_init: float = recipe_field("gate_init")
    gate: GateKind = recipe_field("gate_kind")


@dataclass
class AttentionConfig:
    temperature: Temperature = recipe_field("temperature")
    temperature_min: float = _f(0.01, "learnable temperature lower clamp (official GateVPT code)")
    temperature_max: float = _f(10.0, "learnable temperature upper clamp (official GateVPT code)")


@dataclass
class TokensConfig:
    mask: MaskToken = recipe_field("mask_token")
    order: Optional[str] = recipe_field("token_order")


@dataclass
class ReadoutConfig:
    pool: ReadoutPoolSetting = recipe_field(
        "readout_pool", default="auto",
        help="auto (the method's official code on this backbone: vptool.conventions; resolved into recipe.yaml) | "
             "cls | avg (patch tokens) | avg_all (every token after CLS, prompts included) | mask (VPTM h[MASK])")
    norm: ReadoutNormSetting = recipe_field("readout_norm", default="auto", help="auto (as pool) | pretrained "
                                            "(backbone's final norm) | fresh (new LayerNorm, MAE fc_norm) | none")


@dataclass
class HeadConfig:
    type: HeadType = recipe_field("head")
    dim: int = recipe_field("head_dim")
    init: HeadInit = recipe_field("head_init")


@dataclass
class TrainConfig:
    tune: Tune = recipe_field("tune")
    epochs: int = _f(20, "training epochs")
    optimizer: Optimizer = _f("sgd", "sgd (momentum) or adamw")
    lr: float = _f(0.1, "base learning rate")
    lr_scaling: LrScaling = _f("none", "linear: lr = base lr * batch_size / 256")
    momentum: float = _f(0.9, "SGD momentum")
    weight_decay: float = _f(0.0, "weight decay")
    warmup_epochs: int = _f(0, "linear warmup epochs, then cosine decay")
    device: str = _f("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    precision: Precision = _f("auto", "auto (bf16 autocast on a CUDA device with bf16, else fp32; fp32 on CPU) | "
                                      "fp32 | bf16 (warns on a CPU without avx512_bf16/amx_bf16: emulated, ~10-100x "
                                      "slower)")
    compile: CompileSetting = _f("auto", "torch.compile the prompted model (and the head on cached features): "
                                         "true | false | auto (on when training on CUDA, off on the CPU)")
    activation_checkpointing: Checkpointing = _f(
        "auto", "recompute each transformer block in the backward pass instead of keeping its activations (less "
               "memory, ~1/3 more compute; ViT/BEiT): off | on | auto (on when the memory estimate without it "
               "exceeds the device's memory)")
    feature_cache: FeatureCache = _f("auto", "auto: when nothing before the readout trains (tune: head, or frozen "
                                     "prompts without gates, temperature or a learned [MASK]) and the train "
                                     "transform is deterministic (vtab), run the backbone once per split and train "
                                     "the head on the cached features | off")


@dataclass
class OutputConfig:
    dir: str = _f("runs", "parent folder of run directories")
    name: Optional[str] = _f(None, "run directory name (default: the recipe file's stem)")
    save_prompt_history: bool = _f(False, "save the prompts (and gates, temperature) before training and after "
                                          "each epoch to prompt_history/ for `vptool probe-nmi --history`")
    save_every_steps: int = _f(0, "also write checkpoints/last.pt every N optimizer steps (0: at each epoch's end "
                                  "only); for long epochs on preemptible machines")


@dataclass
class LogConfig:
    tensorboard: bool = _f(False, "also write each epoch's metrics.jsonl scalars (and gate values) as TensorBoard "
                                  "event files under <run>/tensorboard/ (needs the tensorboard package: "
                                  "pip install \"vptool[log]\")")
    mlflow: Optional[str] = _f(None, "also log to MLflow: a folder (holds mlflow.db, a SQLite store), a *.db file, "
                                     "sqlite:///path.db, a file: URI (MLflow's file store) or a server URI; "
                                     "relative paths against the working directory (needs vptool[log])")
    mlflow_experiment: Optional[str] = _f(None, "MLflow experiment name (default: vptool)")


@dataclass
class Recipe:
    method: str = _f(None, "method preset: see `vptool train --help`", required=True)
    seed: int = _f(0, "training seed (init, batch order, dropout)")
    backbone: BackboneConfig = _f(factory=BackboneConfig)
    data: DataConfig = _f(factory=DataConfig)
    prompt: PromptConfig = _f(factory=PromptConfig)
    attention: AttentionConfig = _f(factory=AttentionConfig)
    tokens: TokensConfig = _f(factory=TokensConfig)
    readout: ReadoutConfig = _f(factory=ReadoutConfig)
    head: HeadConfig = _f(factory=HeadConfig)
    train: TrainConfig = _f(factory=TrainConfig)
    output: OutputConfig = _f(factory=OutputConfig)
    log: LogConfig = _f(factory=LogConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_config(self, **given) -> ModelConfig:
        """The typed model options this recipe sets (``ModelConfig.from_recipe``); ``given`` (``num_classes``, ...)
        wins."""
        return ModelConfig.from_recipe(self, **given)


# --------------------------------------------------------------------------------------------------- validation
def key_paths(cls, prefix: str = "") -> list[str]:
    """Every key path of the dataclass ``cls`` (sections and leaves, in field order), e.g. ``train``, ``train.lr``."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        p = f"{prefix}{f.name}"
        out.append(p)
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(key_paths(hints[f.name], p + "."))
    return out


_all_paths = key_paths  # the former private name (kept for existing callers)


def _suggest(key: str, siblings: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {prefix}{close[0]}?"
    elsewhere = [p for p in key_paths(Recipe) if p.rsplit(".", 1)[-1] == key]
    if elsewhere:
        return f"; did you mean {elsewhere[0]}?"
    return f"; valid keys here: {', '.join(siblings)}"


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(tp, value, path: str, errors: list[str]):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check(inner[0], value, path, errors)
        for one in inner:  # several types (data.num_workers: int or 'auto'): the first that takes the value
            scratch: list[str] = []
            got = _check(one, value, path, scratch)
            if not scratch:
                return got
        errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {short_repr(value)}")
        return None
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if tp is Blocks:
        try:
            return blocks_spec(value, path)
        except ValueError as exc:
            errors.append(str(exc))
            return None
    if origin is Literal:
        choices = typing.get_args(tp)
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            return "off"
        if value is True and "on" in choices:  # ... and a bare `on` as true
            return "on"
        if isinstance(value, bool) and value in choices:  # a choice between a word and the booleans
            return value
        if isinstance(value, str) and value in choices:
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append(f"{path}: {short_repr(value)} is not one of {_type_name(tp)}{hint}")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                errors.append(f"{path}: {value} is not a finite number; give a finite value")
                return None
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {short_repr(value)}")
    return None


def _build(cls, raw, path: str, errors: list[str]):
    where = path or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where}: expected a mapping of keys, got {type(raw).__name__} {short_repr(raw)}")
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{path}." if path else ""
    for key in raw:
        if key not in fields:
            errors.append(f"{prefix}{short_repr(key) if not isinstance(key, str) else key[:80]}: unknown key"
                          f"{_suggest(str(key)[:80], list(fields), prefix)}")
    kwargs = {}
    for name, f in fields.items():
        p = prefix + name
        if name not in raw or (raw[name] is None and f.metadata.get("required")):
            if f.metadata.get("required"):
                errors.append(f"{p}: missing required key ({f.metadata['help']})")
            elif dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, p, errors)
            continue
        kwargs[name] = _check(hints[name], raw[name], p, errors)
    return cls(**kwargs)  # every field has a default; any problem is already in ``errors``


def _cross_checks(r: Recipe) -> list[str]:
    """Checks across fields; each problem names the keys and the fix."""
    if r.method not in PRESETS:
        close = difflib.get_close_matches(r.method, list(PRESETS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(PRESETS)}"
        return [f"method: unknown preset {r.method!r}; {hint}"]  # the rest depends on the preset
    return cross_field_problems(r)


def validate(raw: dict, source: str | None = None) -> Recipe:
    """Validate a raw mapping (after presets and overrides are merged) into a ``Recipe``.

    Raises:
        RecipeError: with every problem found, one line each.
    """
    errors: list[str] = []
    recipe = _build(Recipe, raw, "", errors)
    if recipe is not None and not errors:
        errors.extend(_cross_checks(recipe))
    if errors:
        raise RecipeError(errors, source=source)
    return recipe


def resolve(raw: dict, overrides: dict | None = None, source: str | None = None) -> Recipe:
    """Apply the method preset under ``raw`` and ``overrides`` over it, then validate.

    Raises:
        RecipeError: unknown, missing or mistyped keys (all of them), or an unknown method.
    """
    if not isinstance(raw, dict):
        raise RecipeError([f"recipe: expected a mapping of keys, got {type(raw).__name__}"], source=source)
    merged = deep_merge(raw, overrides or {})
    method = merged.get("method")
    if isinstance(method, str) and method in PRESETS:
        merged = deep_merge(PRESETS[method].defaults, merged)
    return validate(merged, source=source)


def drop_unknown_keys(raw: dict, cls=None, prefix: str = "") -> tuple[dict, list[str]]:
    """``raw`` without the keys the schema does not know (recursively), and their dotted paths.

    For reading what vptool itself saved (``recipe.yaml``, an adapter's recipe): a file written by another
    vptool version may hold keys this one does not know; they are dropped with a warning, not refused
    (STYLE.md: saved artifacts are read leniently).
    """
    cls = cls or Recipe
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out, dropped = {}, []
    for key, value in raw.items():
        if key not in names:
            dropped.append(f"{prefix}{key}")
            continue
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            value, more = drop_unknown_keys(value, hints[key], f"{prefix}{key}.")
            dropped.extend(more)
        out[key] = value
    return out, dropped


def resolve_saved(raw: dict, source: str) -> Recipe:
    """A recipe vptool saved (every default filled in), read leniently: unknown keys are logged as a warning
    and ignored; everything else is validated as ``resolve`` does.

    Raises:
        RecipeError: a known key with a bad value, or a mapping that is not a recipe.
    """
    import logging

    if not isinstance(raw, dict):
        raise RecipeError([f"recipe: expected a mapping of keys, got {type(raw).__name__}"], source=source)
    raw, dropped = drop_unknown_keys(raw)
    if dropped:
        logging.getLogger(__name__).warning("%s: ignoring keys this vptool version does not know: %s", source,
                                            ", ".join(dropped))
    return resolve(raw, source=source)


def log_problems(log: LogConfig) -> list[str]:
    """What stops the ``log`` section's loggers here, one line each naming the key: a missing optional package
    (the ``log`` extra), or a ``file:`` store this MLflow refuses (MLflow 3 wants ``MLFLOW_ALLOW_FILE_STORE=true``).
    Imports tensorboard / mlflow only when the section asks for them."""
    import importlib.util

    def missing(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is None
        except (ImportError, ValueError):  # a parent package missing, or set to None in sys.modules
            return True

    e, fix = [], 'pip install "vptool[log]"'
    if log.tensorboard and missing("tensorboard"):
        e.append(f"log.tensorboard: true needs the tensorboard package: {fix} (or set log.tensorboard: false)")
    local = log.mlflow is not None and not log.mlflow.startswith(("file:", "http:", "https:", "databricks"))
    if log.mlflow is not None and any(missing(m) for m in ["mlflow", *(["sqlalchemy", "alembic"] * local)]):
        e.append(f"log.mlflow: {log.mlflow} needs the mlflow package (and SQLAlchemy, alembic for a SQLite store): "
                 f"{fix} (or remove log.mlflow)")
    elif log.mlflow is not None and log.mlflow.startswith("file:"):
        from mlflow import environment_variables as env

        allow = getattr(env, "MLFLOW_ALLOW_FILE_STORE", None)  # MLflow 3.7+: the file store is opt-in
        if allow is not None and not allow.get():
            e.append(f"log.mlflow: {log.mlflow}: this MLflow refuses its file store; give a folder without file: "
                     "(vptool keeps a SQLite mlflow.db there), sqlite:///path.db, or set MLFLOW_ALLOW_FILE_STORE=true")
    elif log.mlflow is not None and not log.mlflow.strip():
        e.append("log.mlflow: empty; give a folder, sqlite:///path.db or a tracking URI, or remove the key")
    return e


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load, merge preset and ``--set`` overrides, and validate a recipe file.

    The run name defaults to the file's stem (``recipes/quickstart.yaml`` -> ``runs/quickstart``).

    Raises:
        UserError / RecipeError: see ``read_yaml``, ``resolve``; ``log_problems`` (a ``log`` section this machine cannot
        run: a missing optional package).
    """
    raw = read_yaml(path)
    ov = parse_overrides(overrides or [])
    recipe = resolve(raw, ov, source=str(path))
    if recipe.output.name is None:
        recipe.output.name = Path(path).stem
    problems = log_problems(recipe.log)  # a missing optional package: refused before any slow work
    if problems:
        raise RecipeError(problems, source=str(path))
    return recipe


def load_run_recipe(run_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe of a run directory (its ``recipe.yaml``, read leniently) with ``--set`` overrides, located at
    that directory (``output.dir`` its parent, ``output.name`` its name) wherever it has moved.

    Raises:
        UserError / RecipeError: no recipe.yaml, a bad value, or a ``log`` section this machine cannot run.
    """
    run = Path(run_dir)
    path = run / "recipe.yaml"
    if not path.is_file():
        raise UserError(f"{run}: no recipe.yaml; not a vptool run directory (pass a YAML recipe instead)")
    raw, dropped = drop_unknown_keys(read_yaml(path))
    ov = parse_overrides(overrides or [])
    ov = deep_merge(ov, {"output": {"dir": str(run.parent), "name": run.name}})
    recipe = resolve(raw, ov, source=str(path))
    if log_problems(recipe.log):
        raise RecipeError(log_problems(recipe.log), source=str(path))
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML (every default filled in)."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False, default_flow_style=False)
