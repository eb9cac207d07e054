"""Adapter folders and the library's face: ``vptool.load``, ``save_pretrained`` / ``from_pretrained``,
``vptool.from_preset`` (in the style of peft's ``save_pretrained`` and timm's ``create_model``).

An adapter folder holds three files; a run directory (``vptool train``) holds the first two and more:

- ``adapter.safetensors``: the trained tensors only (names as in DESIGN.md §4: ``prompts.deep`` (L, Np, D),
  ``head.weight`` (K, D), ...), metadata ``format: pt``. Never a frozen backbone tensor; a full fine-tune
  (``tune: all``) is the exception, since its backbone is what trained.
- ``adapter_config.json``: what rebuilds the model without the dataset: ``model`` (the ``PromptedViT``
  options), ``backbone`` (name, kwargs, checkpoint path, its sha256, format, seed), ``classes`` (K names),
  ``data_config`` (input size, mean, std) and ``eval_transform``; and what the model card shows: method and
  paper, dataset, ``metrics`` (val/test accuracy), parameter counts, the resolved ``recipe``.
- ``README.md``: the model card (``model_card``).

``load`` reads the config leniently: an unknown key (from another vptool version) is a warning, not an
error. The backbone is rebuilt from its checkpoint and checked against the recorded sha256; a moved file is
named with ``backbone_checkpoint=`` (CLI: ``--backbone-checkpoint``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from vptool.builder import backbone_record  # noqa: F401  (re-exported: adapter was its home)
from vptool.config import ModelConfig, field_names
from vptool.errors import UserError

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter.safetensors"
CARD_NAME = "README.md"
FORMAT_VERSION = 1

#: the keys of adapter_config.json this version writes and reads (others are warned about and ignored).
CONFIG_KEYS = ("format_version", "vptool_version", "method", "paper", "model", "num_classes", "classes",
               "backbone", "data_config", "eval_transform", "tensors", "trainable_params", "total_params",
               "dataset", "metrics", "recipe")


# ------------------------------------------------------------------------------------------------ writing
def adapter_config(model) -> dict:
    """The ``adapter_config.json`` mapping of a model built by vptool (``build_model``, ``load``,
    ``from_preset``).

    Raises:
        ValueError: the model has no backbone record (its backbone was not built by vptool).
    """
    import vptool
    from vptool.recipe import PRESETS

    if model.backbone_config is None:
        raise ValueError("save_pretrained: this model's backbone was not built by vptool, so the folder could not "
                         "name it; build the model with vptool.from_preset(name, '<timm or embedded name>', K) "
                         "or vptool.load(...)")
    info = model.adapter_info
    method = info.get("method")
    trainable, total = model.parameter_summary()
    cfg = {
        "format_version": FORMAT_VERSION, "vptool_version": vptool.__version__, "method": method,
        "paper": PRESETS[method].paper if method in PRESETS else "",
        "model": dict(model.options), "num_classes": model.num_classes,
        "classes": list(model.class_names) if model.class_names is not None else
        [str(k) for k in range(model.num_classes)],
        "backbone": dict(model.backbone_config),
        "data_config": {k: list(model.data_config[k]) for k in ("input_size", "mean", "std")},
        "eval_transform": model.eval_transform,
        "tensors": {k: list(v.shape) for k, v in model.adapter_state_dict().items()},
        "trainable_params": trainable, "total_params": total,
        "dataset": {"name": info.get("dataset"), "task": info.get("task")},
    }
    if info.get("metrics"):
        cfg["metrics"] = dict(info["metrics"])
    if info.get("recipe"):
        cfg["recipe"] = info["recipe"]
    return cfg


def write_config(model, path: str | Path) -> Path:
    """Write ``adapter_config.json`` (sorted keys) atomically."""
    from vptool.paths import write_text_atomically

    return write_text_atomically(path, json.dumps(adapter_config(model), indent=2, sort_keys=True) + "\n")


def save_pretrained(model, directory: str | Path, name: str | None = None) -> Path:
    """Write ``directory/{adapter.safetensors, adapter_config.json, README.md}`` (created if missing; files of
    the same names are replaced, each atomically). ``name``: what the model card calls the folder (default: its
    name).

    Raises:
        ValueError: the model's backbone was not built by vptool (see ``adapter_config``).
        UserError: ``directory`` is, contains or lies inside what the model was built from: the run directory or
            adapter folder ``vptool.load`` read it from, or its backbone checkpoint (``input_reads``); one line
            naming both paths, nothing written.
    """

    from vptool.paths import refuse_inputs, write_safetensors, write_text_atomically
    from vptool.prompting.core import check_finite

    refuse_inputs("save_pretrained", directory, input_reads(model))
    cfg = adapter_config(model)  # refuses before anything is written
    check_finite(model.adapter_state_dict(), str(directory))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "vptool_version": cfg["vptool_version"], "method": str(cfg["method"]),
            "backbone": cfg["backbone"]["name"]}
    write_safetensors(out / WEIGHTS_NAME, model.adapter_state_dict(), meta)
    write_text_atomically(out / CONFIG_NAME, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_text_atomically(out / CARD_NAME, model_card(cfg, name or out.name))
    return out


def input_reads(model) -> list:
    """What ``model`` was built from, as ``paths.Read`` items: the folder ``vptool.load`` read it from (a run
    directory's report folders excepted, with the checkpoint and dataset folder its config records) and the
    backbone checkpoint file. ``save_pretrained`` and ``vptool export`` never write over these."""
    from vptool.paths import Read, source_reads

    reads = list(source_reads(model.loaded_from)) if getattr(model, "loaded_from", None) is not None else []
    rec = model.backbone_config or {}
    for key in ("checkpoint", "file"):
        if isinstance(rec.get(key), str) and rec[key]:
            reads.append(Read("backbone checkpoint", rec[key]))
    return reads


def _pct(v) -> str:
    return "—" if v is None else f"{float(v):.2f} %"


def model_card(cfg: dict, name: str) -> str:
    """The adapter folder's ``README.md``: method and paper, backbone (name, file, sha256), dataset and class
    names, accuracy, trainable parameters, the lines that load it, and the resolved recipe."""
    import yaml

    b, m = cfg["backbone"], cfg.get("metrics") or {}
    ds = cfg.get("dataset") or {}
    classes = cfg["classes"]
    shown = ", ".join(f"`{c}`" for c in classes[:50]) + (f", … ({len(classes)} in all)" if len(classes) > 50 else "")
    trainable, total = cfg["trainable_params"], cfg["total_params"]
    dc = cfg["data_config"]
    size = dc["input_size"]
    dataset = ds.get("name") or "—"
    if ds.get("task"):
        dataset += f" (task {ds['task']})"
    lines = [
        f"# {name}: a {cfg['method'] or 'vptool'} adapter",
        "",
        "Prompts and head trained with vptool on a frozen backbone. This folder holds only the trained tensors; "
        "the backbone is read from its own checkpoint.",
        "",
        "| | |",
        "|---|---|",
        f"| method | `{cfg['method']}`{': ' + cfg['paper'] if cfg.get('paper') else ''} |",
        f"| backbone | `{b['name']}` |",
        f"| backbone checkpoint | {('`' + str(b['file']) + '`') if b.get('file') else 'none (random init)'} |",
        f"| backbone sha256 | `{b.get('checkpoint_sha256') or '—'}` |",
        f"| dataset | {dataset} |",
        f"| classes (K = {len(classes)}) | {shown} |",
        f"| val accuracy | {_pct(m.get('val_acc'))} (best epoch {m.get('best_epoch', '—')}) |",
        f"| test top-1 / top-5 | {_pct(m.get('test_top1'))} / {_pct(m.get('test_top5'))} |",
        f"| trainable parameters | {trainable:,d} of {total:,d} ({100 * trainable / total:.2f} %) |",
        f"| input | {size[1]} × {size[2]} px RGB, mean {tuple(dc['mean'])}, std {tuple(dc['std'])}, "
        f"`{cfg['eval_transform']}` evaluation transform |",
        "",
        "## Load it",
        "",
        "```python",
        "import vptool",
        "",
        f'model = vptool.load("{name}")  # backbone_checkpoint="..." if the checkpoint has moved',
        'print(model.predict(["image.png"], top_k=3))',
        "```",
        "",
        "```bash",
        f"vptool predict {name} images/ --json",
        f"vptool export {name} --format onnx -o {name}.onnx",
        "```",
    ]
    if cfg.get("recipe"):
        from vptool.recipe import dump_recipe, resolve_saved

        try:
            text = dump_recipe(resolve_saved(cfg["recipe"], CONFIG_NAME))  # in the schema's order
        except UserError:
            text = yaml.safe_dump(cfg["recipe"], sort_keys=False, default_flow_style=False)
        lines += ["", "## Resolved recipe", "", "```yaml", text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ reading
def read_config(directory: str | Path) -> dict:
    """``adapter_config.json`` of a run directory or adapter folder, read leniently.

    Unknown keys are logged as a warning and ignored. A config written before the ``model`` section existed
    (``recipe`` only) is upgraded from its recipe.

    Raises:
        UserError: no such folder, no config (not a run directory or adapter folder), unreadable JSON, or
            ``adapter.safetensors`` missing.
    """
    d = Path(directory)
    if not d.is_dir():
        raise UserError(f"{d}: not found; pass a run directory (runs/NAME) or an adapter folder "
                        "(vptool export RUN --format adapter -o DIR)")
    path = d / CONFIG_NAME
    if not path.is_file():
        if (d / "recipe.yaml").is_file():
            raise UserError(f"{d}: no {CONFIG_NAME} yet: the run has not finished (vptool train writes it at the "
                            "end); train it to the end first")
        raise UserError(f"{d}: no {CONFIG_NAME}; not a vptool run directory or adapter folder (vptool train "
                        "writes runs/NAME; vptool export RUN --format adapter -o DIR writes a folder)")
    if not (d / WEIGHTS_NAME).is_file():
        raise UserError(f"{d}: no {WEIGHTS_NAME}; the run did not finish, or the folder is incomplete")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc}); the file is corrupt: export the adapter again") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object")
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        log.warning("%s: ignoring keys this vptool version does not know: %s", path, ", ".join(unknown))
    if "model" not in cfg:
        cfg = _from_recipe(cfg, path)
    missing = [k for k in ("model", "backbone", "classes", "data_config") if k not in cfg]
    if missing:
        raise UserError(f"{path}: missing {', '.join(missing)}; not an adapter config vptool can read")
    return cfg


def _from_recipe(cfg: dict, path: Path) -> dict:
    """Upgrade a config that holds only the run's ``recipe`` (vptool before adapter folders existed)."""
    from vptool.recipe import resolve_saved

    if "recipe" not in cfg:
        raise UserError(f"{path}: has neither a model section nor a recipe; not an adapter config")
    recipe = resolve_saved(cfg["recipe"], str(path))
    kw = recipe.model_config().to_dict()
    b, old = recipe.backbone, cfg.get("backbone") or {}
    return {**cfg, "model": kw, "eval_transform": recipe.data.train_transform,
            "backbone": {"name": b.name, "pretrained": b.pretrained, "checkpoint": b.checkpoint, "format": b.format,
                         "kwargs": dict(b.kwargs), "seed": recipe.seed, "file": old.get("checkpoint"),
                         "checkpoint_sha256": old.get("checkpoint_sha256"), "detected_format": old.get("format")},
            "dataset": {"name": recipe.data.dataset, "task": recipe.data.task}}


def saved_model_config(cfg: dict, path: Path) -> ModelConfig:
    """The ``model`` section as a ``ModelConfig`` (K from ``classes``); keys this version does not know are
    warned about and ignored. The prompts start at zeros: the adapter brings the trained ones (no init file, no
    k-means).

    Raises:
        UserError: a ``model`` section that is not a mapping.
    """
    if not isinstance(cfg["model"], dict):
        raise UserError(f"{path}: model: expected a mapping of options")
    config, unknown = ModelConfig.from_dict(cfg["model"], num_classes=len(cfg["classes"]))
    unknown = [k for k in unknown if k != "num_classes"]
    if unknown:
        log.warning("%s: ignoring model options this vptool version does not know: %s", path, ", ".join(unknown))
    if config.prompt_mode != "none":
        config = config.replace(prompt_init="zeros")
    return config.replace(prompt_file=None)


def _backbone(rec: dict, backbone_checkpoint: str | Path | None):
    """Rebuild the recorded backbone and check its checkpoint's sha256.

    Raises:
        UserError: the checkpoint is missing (naming its sha256 and ``--backbone-checkpoint``), or the file
            found has another sha256.
    """
    from vptool.backbones.build import build_backbone

    want = rec.get("checkpoint_sha256")
    how = "pass --backbone-checkpoint FILE (Python: backbone_checkpoint=FILE)"
    if backbone_checkpoint is not None:
        ckpt = Path(backbone_checkpoint)
        if not ckpt.is_file():
            raise UserError(f"--backbone-checkpoint: {ckpt} not found; point it at the backbone checkpoint "
                            f"(sha256 {want or 'not recorded'})")
    else:
        ckpt = Path(rec["checkpoint"]) if rec.get("checkpoint") else None
        if ckpt is not None and not ckpt.is_file():
            raise UserError(f"backbone checkpoint {ckpt} not found; the adapter needs the {rec['name']} file with "
                            f"sha256 {want}: {how}")
    with torch.random.fork_rng(devices=[]):  # a random-init backbone (pretrained: false) is rebuilt from its seed
        torch.manual_seed(int(rec.get("seed") or 0))
        backbone, info = build_backbone(rec["name"], bool(rec.get("pretrained", True)),
                                        str(ckpt) if ckpt is not None else None, dict(rec.get("kwargs") or {}),
                                        format=rec.get("format") or "auto")
    got = info.checkpoint_sha256
    if want and got != want:
        raise UserError(f"backbone checkpoint {info.checkpoint} has sha256 {got[:12]}..., but the adapter was "
                        f"trained on sha256 {want}; {how} with that file")
    if not want and backbone_checkpoint is not None:
        log.warning("the adapter records no backbone checkpoint (random init); %s is loaded unchecked", ckpt)
    return backbone, info


def load_with_info(path: str | Path, device=None, backbone_checkpoint: str | Path | None = None, model_cls=None):
    """``load``, also returning the rebuilt backbone's ``BackboneInfo`` and the config read.

    Returns:
        ``(model, info, cfg)``.
    """
    from vptool.builder import build_model
    from vptool.engine.runtime import resolve_device

    p = Path(path)
    if p.is_file() and p.suffix == ".onnx":
        raise UserError(f"{p}: an ONNX graph runs in onnxruntime (vptool predict {p} IMAGES); vptool.load takes a "
                        "run directory or an adapter folder")
    cfg = read_config(p)
    cfg_path = p / CONFIG_NAME
    dev = resolve_device(device if device is not None else "auto", key="device")
    config = saved_model_config(cfg, cfg_path)
    backbone, info = _backbone(cfg["backbone"], backbone_checkpoint)
    record = {**cfg["backbone"], "file": info.checkpoint, "checkpoint_sha256": info.checkpoint_sha256}
    if backbone_checkpoint is not None:
        record["checkpoint"] = str(backbone_checkpoint)
    ds = cfg.get("dataset") or {}
    try:
        model = build_model(config, backbone, info, record=record, class_names=cfg["classes"], model_cls=model_cls,
                            adapter_info={"method": cfg.get("method"), "dataset": ds.get("name"),
                                          "task": ds.get("task"), "metrics": cfg.get("metrics") or _summary_metrics(p),
                                          "recipe": cfg.get("recipe")})
    except ValueError as exc:
        raise UserError(f"{cfg_path}: model: {exc}") from None
    model.load_adapter(str(p / WEIGHTS_NAME))
    model.set_data_config(cfg["data_config"], cfg.get("eval_transform", "vtab"))
    model.loaded_from = p  # save_pretrained never writes over it (input_reads)
    model.to(dev).eval()
    return model, info, cfg


def _summary_metrics(run: Path) -> dict | None:
    """``best_epoch``, ``val_acc``, ``test_top1``, ``test_top5`` from a run's ``summary.json``, if any."""
    path = run / "summary.json"
    if not path.is_file():
        return None
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {k: s.get(k) for k in ("best_epoch", "val_acc", "test_top1", "test_top5")}


def load(path: str | Path, device=None, backbone_checkpoint: str | Path | None = None, model_cls=None):
    """A trained ``PromptedViT`` from a run directory or an adapter folder, in eval mode, without the dataset.

    The model is rebuilt from ``adapter_config.json`` + ``adapter.safetensors`` + the backbone checkpoint,
    whose sha256 must be the one recorded. It knows its class names (``model.class_names``), preprocessing
    (``model.data_config``, also through timm's ``resolve_model_data_config(model)``) and evaluation transform,
    so ``model.predict(images)`` works at once.

    Args:
        path: ``runs/NAME`` (``vptool train``) or a folder from ``save_pretrained`` / ``vptool export
            --format adapter``.
        device: ``None`` or ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        backbone_checkpoint: the backbone checkpoint's path when it has moved since training.
        model_cls: the class to build (``vptool.load`` passes ``vptool.PromptedViT``; default the model layer's
            ``PromptedCore``, which has the forward but not ``predict``/``save_pretrained``).

    Returns:
        the model; ``model(x)`` maps (B, 3, H, W) normalised images to (B, K) logits.

    Raises:
        UserError: not a run directory or adapter folder; the backbone checkpoint is missing (the message
            names its sha256 and ``--backbone-checkpoint``) or has another sha256; tensors that do not match.

    The model remembers ``path`` (``model.loaded_from``): its ``save_pretrained`` refuses to write over that folder
    or the backbone checkpoint (``UserError``, as ``vptool export`` does).
    """
    return load_with_info(path, device, backbone_checkpoint, model_cls)[0]


# ------------------------------------------------------------------------------------------------ presets
def from_preset(name: str, backbone, num_classes: int, *, class_names: list[str] | None = None,
                pretrained: bool = True, checkpoint: str | None = None, backbone_kwargs: dict | None = None,
                backbone_format: str = "auto", eval_transform: str = "vtab", seed: int = 0, model_cls=None,
                **overrides):
    """A fresh ``PromptedViT`` for a method preset, without a YAML recipe.

    ``from_preset("vpt-deep", "vit_base_patch16_224.mae", 200, checkpoint="mae_pretrain_vit_base.pth",
    prompt_length=50)`` is VPT-deep (Jia et al. 2022, eq. 7) with the preset's settings, any of them overridden
    by a ``PromptedViT`` keyword (``prompt_length``, ``readout_pool``, ``temperature``, ...). The readout
    defaults to the preset's official one on this backbone (``vptool.conventions``). Training settings
    (optimizer, lr) are the recipe's business, not the model's. The SPT presets start from k-means prototypes:
    pass ``prompt_values=`` (an ``init-prompts`` tensor) or ``prompt_init="xavier"``.

    Args:
        name: a preset (``vptool train --help`` lists them: linear, full, vpt-shallow, vpt-deep, spt-shallow,
            spt-deep, gatevpt, vptm).
        backbone: a timm or embedded model name (built with ``pretrained``/``checkpoint``/``backbone_kwargs``/
            ``backbone_format``, frozen), or a timm ViT/BEiT module you built (then ``save_pretrained`` cannot
            name it).
        num_classes: K.
        class_names: K names for ``predict`` (default ``"0"``..``"K-1"``).
        eval_transform: ``vtab`` (square resize) or ``fgvc`` (resize 256/224, centre crop) for ``predict``.
        seed: RNG seed of the prompt/head init (and of a random-init backbone).
        model_cls: the class to build (``vptool.from_preset`` passes ``vptool.PromptedViT``).

    Raises:
        ValueError: an unknown preset or option, or an option value outside its allowed values.
        UserError: a backbone that cannot be built or loaded.
    """
    from vptool.backbones.build import build_backbone
    from vptool.builder import build_model, resolve_readout_auto
    from vptool.recipe import PRESETS

    config, given = _preset_config(name, num_classes, overrides)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"class_names: {len(class_names)} names for num_classes={num_classes}")
    record, info = None, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(backbone, str):
            backbone_name = backbone
            backbone, info = build_backbone(backbone_name, pretrained, checkpoint, dict(backbone_kwargs or {}),
                                            format=backbone_format)
            record = backbone_record(backbone_name, pretrained, checkpoint, backbone_format, backbone_kwargs, seed,
                                     info)
            fmt = info.format or backbone_format
        else:
            cfg = getattr(backbone, "pretrained_cfg", None) or {}
            backbone_name = ".".join(v for v in (cfg.get("architecture"), cfg.get("tag")) if v) or "module"
            fmt = backbone_format
        # the preset's official readout on this backbone
        config, _ = resolve_readout_auto(config, PRESETS[name].convention, backbone_name, fmt, backbone)
        return build_model(config, backbone, info, record=record, generator=torch.Generator().manual_seed(seed),
                           class_names=class_names if class_names is not None else
                           [str(k) for k in range(num_classes)], eval_transform=eval_transform,
                           adapter_info={"method": name}, model_cls=model_cls, **given)


def _preset_config(name: str, num_classes: int, overrides: dict) -> tuple[ModelConfig, dict]:
    """``(config, given)``: the preset's ``ModelConfig`` with ``overrides`` (``PromptedViT`` keywords) applied,
    and the tensors given (``prompt_values``, ``pretrained_mask_token``), popped from ``overrides``.

    Raises:
        ValueError: an unknown preset or option, or an option value outside its allowed values.
    """
    from vptool.recipe import PRESETS, Recipe, deep_merge

    if name not in PRESETS:
        raise ValueError(f"preset {name!r} is not one of {', '.join(repr(p) for p in PRESETS)}")
    given = {k: overrides.pop(k) for k in ("prompt_values", "pretrained_mask_token") if k in overrides}
    accepted = (set(field_names()) - {"num_classes"}) | {"prompt_values", "pretrained_mask_token"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"from_preset: unknown option {unknown[0]!r}; options: {', '.join(sorted(accepted))}")
    if "temperature_range" in overrides:
        overrides["temperature_range"] = tuple(overrides["temperature_range"])
    config = ModelConfig.from_recipe(deep_merge(Recipe().to_dict(), PRESETS[name].defaults),
                                     num_classes=num_classes).replace(**overrides)
    return config, given
