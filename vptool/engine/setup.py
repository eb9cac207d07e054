"""Build everything a run needs from a recipe: device, backbone, data splits, the prompted model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from vptool.backbones.build import BackboneInfo, build_backbone
from vptool.builder import backbone_record, resolve_readout_auto
from vptool.builder import build_model as build_from_config
from vptool.data import Splits, build_splits, check_layout
from vptool.data.catalog import expected_classes
from vptool.engine.runtime import (  # noqa: F401  (re-exported: setup was their home)
    autocast,
    autocast_dtype,
    precision_warning,
    resolve_device,
    seed_everything,
)
from vptool.errors import UserError
from vptool.prompting.families import family_for
from vptool.prompting.model import PromptedViT
from vptool.recipe import Recipe

log = logging.getLogger(__name__)

@dataclass
class Setup:
    """What ``prepare`` built."""

    model: PromptedViT
    splits: Splits
    backbone: BackboneInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    prompt_init: tuple[str, torch.Tensor, dict] | None = None  # (name, tensor, metadata) built by an SPT strategy
    checkpoint: dict | None = None  # {"epoch", "step"} when the model came from checkpoints/last.pt (eval --last)


def resolve_auto(recipe: Recipe, backbone: torch.nn.Module, info: BackboneInfo) -> list[str]:
    """Replace the recipe's ``auto`` conventions by what they mean for this method and backbone, in place, so
    ``recipe.yaml`` records the values that ran:

    - ``readout.pool`` / ``readout.norm: auto``: the method's official readout on the backbone's pretraining
      (``vptool.conventions``; the preset's ``convention``);
    - ``prompt.init_transform: auto``: ``train`` with ``prompt.init_form: official`` (the official SPT code
      draws its init images through the training augmentation), else ``eval``.

    Then a backbone family that owns its forward (Swin) checks the options (``Family.check_config``).

    Returns:
        one line per resolved key, e.g. ``readout.pool: auto -> avg_all (vpt convention, mae backbone)``.

    Raises:
        UserError: an option the backbone family cannot run (named).
    """
    from vptool.recipe import PRESETS

    notes = []
    r = recipe.readout
    if "auto" in (r.pool, r.norm):
        config, why = resolve_readout_auto(recipe.model_config(), PRESETS[recipe.method].convention,
                                           recipe.backbone.name, info.format or recipe.backbone.format, backbone)
        for key, old, new in (("readout.pool", r.pool, config.readout_pool),
                              ("readout.norm", r.norm, config.readout_norm)):
            if old == "auto":
                notes.append(f"{key}: auto -> {new} ({why})")
        r.pool, r.norm = config.readout_pool, config.readout_norm
    p = recipe.prompt
    if p.init_transform == "auto":
        p.init_transform = "train" if p.init_form == "official" else "eval"
    family = family_for(backbone, recipe.backbone.name)
    if family.owns_forward:  # e.g. Swin refuses SPT init before init-prompts would read a token sequence
        family.check_config(backbone, recipe.model_config())
    return notes


def build_model(recipe: Recipe, backbone: torch.nn.Module, info: BackboneInfo, num_classes: int,
                **overrides) -> PromptedViT:
    """The prompted model for ``recipe`` on ``backbone``, seeded by ``recipe.seed``, carrying what inference and
    ``save_pretrained`` need: the backbone's data config, the evaluation transform, the backbone's record.
    The recipe's ``auto`` conventions are resolved first, in place (``resolve_auto``).

    Raises:
        UserError: an option the backbone cannot support.
    """
    resolve_auto(recipe, backbone, info)  # a no-op after prepare; here for callers that build a model directly
    seed_everything(recipe.seed)
    g = torch.Generator().manual_seed(recipe.seed)
    given = {k: overrides.pop(k) for k in ("prompt_values", "pretrained_mask_token") if k in overrides}
    config = recipe.model_config(num_classes=num_classes).replace(**overrides)
    b = recipe.backbone
    return build_from_config(
        config, backbone, info, generator=g, eval_transform=recipe.data.train_transform, model_cls=PromptedViT,
        record=backbone_record(b.name, b.pretrained, b.checkpoint, b.format, b.kwargs, recipe.seed, info),
        adapter_info={"method": recipe.method, "dataset": recipe.data.dataset, "task": recipe.data.task,
                      "recipe": recipe.to_dict()}, **given)


def check_num_classes(recipe: Recipe, found: int) -> None:
    """Raises UserError when ``data.num_classes`` is set and the data has another number of classes."""
    want = recipe.data.num_classes
    if want is not None and want != found:
        where = recipe.data.root or recipe.data.dataset
        raise UserError(f"data.num_classes: {want} but {where} has {found} classes; fix data.root or "
                        "data.num_classes")


def prepare(recipe: Recipe, device: torch.device | None = None, observer=None, for_adapter: bool = False,
            train_eval_transform: bool = False, check_mem: bool = True) -> Setup:
    """Build backbone, data and model for ``recipe`` (model on ``device``, seeded by ``recipe.seed``).

    With an SPT strategy as ``prompt.init`` the prompts are built here from the training split (one streaming
    pass, ``vptool.engine.init_prompts``); with ``prompt.init: file`` the file's backbone must match.
    ``for_adapter`` skips the prompt init (zeros): the caller loads a trained adapter over it.
    ``train_eval_transform`` gives the training split the deterministic eval transform (analysis, not training).
    ``check_mem`` refuses, before the model is built, a recipe whose training cannot fit (``check_memory``).

    Raises:
        UserError: any bad key, path or value found while building.
    """
    from vptool.engine.init_prompts import InitSpec, build_prompt_init, check_prompt_file_backbone
    from vptool.prompting.spt import STRATEGIES

    device = device or resolve_device(recipe.train.device)
    slow = precision_warning(recipe.train.precision, device)
    if slow:
        (observer.note if observer is not None else log.warning)(slow)
    b = recipe.backbone
    seed_everything(recipe.seed)  # a backbone without weights (pretrained: false) is then rebuilt identically
    backbone, info = build_backbone(b.name, b.pretrained, b.checkpoint, b.kwargs, format=b.format)
    for line in resolve_auto(recipe, backbone, info):
        log.info(line)
    if check_mem:  # before the prompts are allocated and before any run file
        options = check_memory(recipe, backbone, device)
        options = {k: options[k] for k in ("activation_checkpointing", "backbone_dtype")}
    else:
        options = runtime_options(recipe, backbone, device)
    splits = build_splits(recipe.data, info.data_config, train_eval_transform=train_eval_transform)
    check_num_classes(recipe, len(splits.classes))
    overrides: dict = dict(options)
    built = None
    if for_adapter and recipe.prompt.mode != "none":
        overrides["prompt_init"] = "zeros"
    elif recipe.prompt.init in STRATEGIES:
        built = build_prompt_init(recipe, InitSpec.from_recipe(recipe), backbone, info, device, observer)
        overrides["prompt_values"] = built[1]
    elif recipe.prompt.init == "file" and recipe.prompt.mode != "none":
        check_prompt_file_backbone(recipe.prompt.init_file, info, backbone.embed_dim, len(backbone.blocks))
    model = build_model(recipe, backbone, info, len(splits.classes), **overrides)
    model.class_names = list(splits.classes)
    model.to(device)
    return Setup(model, splits, info, device, autocast_dtype(recipe.train.precision, device), built)


def available_memory(device: torch.device) -> int:
    """Bytes a run on ``device`` can use: the CUDA device's total memory, or the host's available memory
    (``MemAvailable`` in /proc/meminfo, else physical memory)."""
    import os

    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def estimate_memory(recipe: Recipe, backbone: torch.nn.Module, checkpointing: bool = False,
                    dtype: str = "fp32") -> dict:
    """A lower bound on the memory (bytes) training needs, from shapes alone (nothing is allocated).

    With D the width, L the blocks, T = prefix + patch + prompt tokens (+1 with a [MASK] token), B the batch
    (under torchrun this process's B / W):
    trainable prompts Np·D (·L for deep) in fp32 with their gradient and two optimizer states (4 copies), the
    frozen backbone's weights (2 bytes a value with ``dtype`` bf16/fp16, ``backbone.dtype``), and the activations
    backpropagation keeps: at least each block's input and attention output, 2·B·T·D fp32 values per block when
    gradients flow through the blocks (prompts, gates, temperature, a learned [MASK] token, full fine-tune), one
    block's worth for a linear probe. With ``checkpointing`` (``train.activation_checkpointing``) a block keeps its
    input only, B·T·D, plus the 2·B·T·D of the one block recomputed at a time. The real peak is higher (MLP
    activations, attention maps), so a run this refuses can never fit; one it accepts still may not.
    A ConvNet (no blocks: ``Family.sizes`` gives L = 0) counts its weights and its pad pixels only
    (``Family.memory_terms``).

    Returns:
        ``{"bytes", "tokens", "prompt_params"}``.
    """
    from vptool.prompting.lowp import DTYPES
    from vptool.prompting.modes import mode_for

    p, mode = recipe.prompt, mode_for(recipe.prompt.mode)
    Np = p.length if mode.has_prompts else 0
    # T rows, the prompt values and rows x width per block, from the family (a hierarchical one: per stage)
    T, prompt_params, per_block = family_for(backbone).memory_terms(
        backbone, mode, Np, p.blocks, 0 if recipe.tokens.mask == "none" else 1)
    params = {n for n, _ in backbone.named_parameters()}
    low = DTYPES[dtype].itemsize
    backbone_bytes = sum(t.numel() * (low if n in params and t.is_floating_point() else t.element_size())
                         for n, t in backbone.state_dict().items())
    from vptool.engine.dist import from_env

    B = max(1, recipe.data.batch_size // from_env().world)  # under torchrun each process holds B / W images
    through_blocks = recipe.train.tune != "head"
    if not through_blocks:
        act = 2 * B * 4 * max(per_block, default=0)
    elif checkpointing:
        act = B * 4 * (sum(per_block) + 2 * max(per_block, default=0))
    else:
        act = 2 * B * 4 * sum(per_block)
    full = 3 * backbone_bytes if recipe.train.tune == "all" else 0
    total = 4 * prompt_params * 4 + backbone_bytes + full + act
    return {"bytes": int(total), "tokens": T, "prompt_params": prompt_params}


def runtime_options(recipe: Recipe, backbone: torch.nn.Module, device: torch.device) -> dict:
    """``train.activation_checkpointing`` and ``backbone.dtype`` resolved for ``device``: the ``ModelConfig``
    values ``{"activation_checkpointing": bool, "backbone_dtype": "fp32" | "bf16" | "fp16"}``.

    ``backbone.dtype: auto`` is bf16 where the run computes in bf16 autocast on CUDA (``train.precision`` bf16,
    or auto on a GPU with bf16), whose matmuls round the weights to bf16 anyway, and fp32 elsewhere (the CPU,
    ``train.tune: all``). ``train.activation_checkpointing: auto`` is on when gradients flow through the blocks
    and ``estimate_memory`` without it exceeds what the device has (``available_memory``), for a family whose
    blocks vptool runs (ViT, BEiT).
    """
    dtype = recipe.backbone.dtype
    if dtype == "auto":
        amp = autocast_dtype(recipe.train.precision, device) if device.type == "cuda" else None
        dtype = "bf16" if amp == torch.bfloat16 and recipe.train.tune != "all" else "fp32"
    setting = recipe.train.activation_checkpointing
    on = setting == "on"
    if setting == "auto" and recipe.train.tune != "head" and not family_for(backbone).owns_forward:
        on = estimate_memory(recipe, backbone, False, dtype)["bytes"] > available_memory(device)
    return {"activation_checkpointing": on, "backbone_dtype": dtype}


def check_memory(recipe: Recipe, backbone: torch.nn.Module, device: torch.device) -> dict:
    """Refuse a recipe whose training cannot fit in ``device``'s memory (``estimate_memory``, a lower bound, with
    activation checkpointing and the backbone dtype as ``runtime_options`` resolves them).

    Returns:
        the estimate, ``available`` (bytes) and the resolved ``runtime_options``.

    Raises:
        UserError: naming ``prompt.length`` when the prompt tokens dominate the sequence, else
            ``data.batch_size``, with the estimate and what the device has.
    """
    options = runtime_options(recipe, backbone, device)
    est = estimate_memory(recipe, backbone, options["activation_checkpointing"], options["backbone_dtype"])
    have = available_memory(device)
    est["available"] = have
    est.update(options)
    if est["bytes"] > have:
        gib = 1024 ** 3
        Np = recipe.prompt.length if recipe.prompt.mode != "none" else 0
        key = "prompt.length" if Np > est["tokens"] - Np else "data.batch_size"
        what = (f"{Np:,d} prompt tokens" if key == "prompt.length"
                else f"data.batch_size {recipe.data.batch_size:,d}")
        raise UserError(f"{key}: {what} need at least {est['bytes'] / gib:,.1f} GiB to train ({est['tokens']:,d} "
                        f"tokens per image, batch {recipe.data.batch_size}) but {device.type} has "
                        f"{have / gib:,.1f} GiB; lower prompt.length or data.batch_size")
    return est


def recipe_inputs(recipe: Recipe) -> list[dict]:
    """The files and folders a run of ``recipe`` reads: ``[{key, path, exists}]``."""
    items = []
    if recipe.backbone.checkpoint:
        items.append(("backbone.checkpoint", recipe.backbone.checkpoint))
    if recipe.data.dataset != "digits" and recipe.data.root:
        items.append(("data.root", recipe.data.root))
    if recipe.prompt.init == "file" and recipe.prompt.init_file:
        items.append(("prompt.init_file", recipe.prompt.init_file))
    return [{"key": k, "path": str(v), "exists": Path(v).exists()} for k, v in items]


def dry_run(recipe: Recipe) -> dict:
    """Check a recipe without training: its inputs, and the model it builds (parameter counts).

    Inputs that are not on disk yet (data, checkpoint, prompt file) are reported, not raised: the model is
    then built from the backbone's architecture and ``data.num_classes``, so a recipe can be checked before its
    data arrives. Without its checkpoint the backbone is built on the ``meta`` device (shapes only, no weights,
    no memory), which is enough to count parameters. ``ready`` says whether a real run would find every input.

    Data that is on disk is checked: its layout (``vptool.data.check_layout``: every split or index file the
    reader needs), and for vptool's own readers (imagefolder, cub200, fgvc-json, vtab-1k) the splits themselves
    (labels, class count, every listed image present). A ``torchvision:<Name>`` set is only layout-checked (its
    reader loads whole archives); its class count is the dataset's known K.

    Raises:
        UserError: the recipe cannot build a model (bad backbone name or kwargs, unsupported option, ...), or data
            on disk is incomplete or does not match ``data.num_classes``.
    """
    device = resolve_device(recipe.train.device)
    inputs = recipe_inputs(recipe)
    have = {i["key"]: i["exists"] for i in inputs}
    backbone, info = _dry_run_backbone(recipe, have.get("backbone.checkpoint", True))
    resolved = resolve_auto(recipe, backbone, info)
    memory = check_memory(recipe, backbone, device)
    num_classes = _dry_run_classes(recipe, info, have.get("data.root", True))
    if resolved and not have.get("backbone.checkpoint", True):
        resolved = [f"{line}; from the name alone: the checkpoint is not read yet, its format may change it"
                    for line in resolved]
    out = {"recipe": recipe.to_dict(), "resolved": resolved, "inputs": inputs, "ready": all(have.values()),
           "device": str(device),
           "trainable_params": None, "total_params": None, "mask_token": None,
           "memory_estimate_bytes": memory["bytes"], "memory_available_bytes": memory["available"],
           "activation_checkpointing": memory["activation_checkpointing"], "backbone_dtype": memory["backbone_dtype"]}
    if num_classes is None:
        out["note"] = "data not found and data.num_classes unset: model not built"
        return out
    return _dry_run_model(recipe, backbone, info, num_classes, have, out)


def _dry_run_backbone(recipe: Recipe, checkpoint_on_disk: bool) -> tuple[torch.nn.Module, BackboneInfo]:
    """The recipe's backbone, seeded; on the ``meta`` device (shapes only) when its checkpoint is not on disk."""
    b = recipe.backbone
    seed_everything(recipe.seed)
    if checkpoint_on_disk:
        return build_backbone(b.name, b.pretrained, b.checkpoint, b.kwargs, format=b.format)
    with torch.device("meta"):
        return build_backbone(b.name, False, None, b.kwargs, format=b.format)


def _dry_run_classes(recipe: Recipe, info: BackboneInfo, root_on_disk: bool) -> int | None:
    """K from the data where it is on disk (its layout and, for vptool's own readers, its splits checked), else
    ``data.num_classes``.

    Raises:
        UserError: data on disk is incomplete or does not match ``data.num_classes``.
    """
    num_classes = recipe.data.num_classes
    if recipe.data.dataset != "digits" and root_on_disk:
        check_layout(recipe.data)
        if recipe.data.dataset.startswith("torchvision:"):
            num_classes = expected_classes(recipe.data.dataset, None)
            check_num_classes(recipe, num_classes)
        else:
            splits = build_splits(recipe.data, info.data_config)
            check_num_classes(recipe, len(splits.classes))
            num_classes = len(splits.classes)
    elif recipe.data.dataset == "digits":
        splits = build_splits(recipe.data, info.data_config)
        check_num_classes(recipe, len(splits.classes))
        num_classes = len(splits.classes)
    return num_classes


def _dry_run_model(recipe: Recipe, backbone: torch.nn.Module, info: BackboneInfo, num_classes: int,
                   have: dict, out: dict) -> dict:
    """``out`` with the parameter counts, [MASK] source and K of the model the recipe builds (on the ``meta``
    device when the checkpoint is not on disk; zeros or xavier prompts where their init is not available yet)."""
    overrides = {} if have.get("prompt.init_file", True) else {"prompt_init": "xavier"}
    if recipe.prompt.init not in ("xavier", "zeros", "file") and recipe.prompt.mode != "none":
        overrides["prompt_init"] = "zeros"  # an SPT strategy runs when training starts; same shapes
        out_note = f"prompt.init {recipe.prompt.init}: prompts are built from the training split when training starts"
    else:
        out_note = None
    if not have.get("backbone.checkpoint", True):
        out["note"] = "checkpoint not read: backbone built from backbone.name on the meta device (shapes only)"
        if recipe.tokens.mask == "pretrained":  # the checkpoint will bring it; a placeholder of the same size
            overrides["pretrained_mask_token"] = torch.zeros(1, 1, backbone.embed_dim, device="meta")
        with torch.device("meta"):
            model = build_model(recipe, backbone, info, num_classes, **overrides)
    else:
        model = build_model(recipe, backbone, info, num_classes, **overrides)
    if out_note:
        out["prompt_init"] = out_note
    out["trainable_params"], out["total_params"] = model.parameter_summary()
    out["mask_token"] = model.mask_source
    out["num_classes"] = num_classes
    return out
