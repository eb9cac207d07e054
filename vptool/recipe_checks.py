"""Checks across a recipe's fields (no torch): combinations of options and value ranges.

``vptool.recipe.validate`` runs them once the schema (keys and types) is clean and the method preset is known;
each problem is one line that names the keys and the fix, and every problem is returned at once.
"""

from __future__ import annotations

from vptool.backbones.kwargs import backbone_kwargs_problems, short_repr
from vptool.data.catalog import dataset_problem, expected_classes
from vptool.prompting.layout import order_problem


def cross_field_problems(r) -> list[str]:
    """Every problem across the fields of the ``vptool.recipe.Recipe`` ``r`` (data, options, ranges, in order)."""
    return [*_data_problems(r), *_option_problems(r), *_range_problems(r)]


def _data_problems(r) -> list[str]:
    e = []
    problem = dataset_problem(r.data.dataset, r.data.task, r.data.num_classes)
    if problem:
        e.append(problem)
    elif r.data.dataset != "digits" and not r.data.root:
        e.append(f"data.root: missing; dataset {r.data.dataset} reads its files from data.root (set data.root)")
    known = expected_classes(r.data.dataset, r.data.task) if not problem else None
    if known is not None and r.data.num_classes is not None and r.data.num_classes != known:
        what = f"{r.data.dataset} task {r.data.task}" if r.data.task else r.data.dataset
        e.append(f"data.num_classes: {r.data.num_classes} but {what} has {known} classes; set data.num_classes: "
                 f"{known} or remove it")
    if r.data.task is not None and r.data.dataset not in ("fgvc-json", "vtab-1k"):
        e.append(f"data.task: set but data.dataset is {r.data.dataset!r}; only fgvc-json and vtab-1k have tasks")
    if r.data.image_dir is not None and r.data.dataset != "fgvc-json":
        e.append(f"data.image_dir: set but data.dataset is {r.data.dataset!r}; only fgvc-json reads it")
    return e


def has_prompts(r) -> bool:
    """Whether recipe ``r`` builds prompt tokens: a prompt mode other than none and ``prompt.length`` >= 1
    (``prompt.length: 0`` is VPTM Fig. 7's verbalizer-only point: no prompt tokens)."""
    return r.prompt.mode != "none" and r.prompt.length > 0


def _option_problems(r) -> list[str]:
    e = []
    if r.prompt.init == "file" and not r.prompt.init_file:
        e.append("prompt.init_file: missing; prompt.init 'file' needs the path of an init-prompts output")
    if r.prompt.init_file and r.prompt.init != "file":
        e.append(f"prompt.init_file: set but prompt.init is {r.prompt.init!r}; set prompt.init: file to use it")
    if not 0.0 < r.prompt.init_fraction <= 1.0:
        e.append(f"prompt.init_fraction: {r.prompt.init_fraction} must be in (0, 1]")
    none = "prompt.mode is none" if r.prompt.mode == "none" else "prompt.length is 0"
    if not has_prompts(r) and r.prompt.init in ("file", "kmeans", "mean-pool", "max-pool", "random"):
        e.append(f"prompt.init: {r.prompt.init!r} but {none} (no prompts); set prompt.mode and prompt.length, or "
                 "use prompt.init: zeros")
    least = 0
    if r.prompt.length == 0 and r.prompt.mode != "none":  # asks the mode's unit (imports torch: length 0 only)
        from vptool.prompting.modes import mode_for

        least = mode_for(r.prompt.mode).min_length
    if 0 <= r.prompt.length < least:
        e.append(f"prompt.length: {r.prompt.length} but prompt.mode {r.prompt.mode} needs at least {least} prompt "
                 f"token(s); set prompt.length >= {least}")
    if (r.train.tune == "prompts" and r.prompt.mode == "none" and r.attention.temperature == "fixed"
            and r.tokens.mask in ("none", "pretrained")):
        e.append("train.tune: 'prompts' but nothing but the head would train (prompt.mode none); "
                 "set prompt.mode, or use tune: head for a linear probe")
    elif (r.train.tune == "prompts" and r.prompt.mode != "none" and r.prompt.length == 0
          and r.attention.temperature == "fixed" and r.tokens.mask == "none"):
        e.append("prompt.length: 0 leaves nothing but the head to train (no prompt tokens and no [MASK] token, VPTM "
                 "Fig. 7's only prompt-free point); set prompt.length >= 1, or use train.tune: head for a linear probe")
    if r.backbone.dtype in ("bf16", "fp16") and r.train.tune == "all":
        e.append(f"backbone.dtype: {r.backbone.dtype} stores the frozen backbone in low precision but train.tune all "
                 "trains it; use backbone.dtype fp32 or auto")
    if r.output.save_prompt_history and not has_prompts(r):
        e.append(f"output.save_prompt_history: true but {none} (no prompts to record); set prompt.mode and "
                 "prompt.length or drop save_prompt_history")
    if r.head.init == "official" and r.head.type == "verbalizer":
        e.append("head.init: 'official' is the VPT/GateVPT linear head's (logit bias -log(99)); the verbalizer has "
                 "no logit bias: use trunc_normal")
    if (r.prompt.location, r.prompt.location_form, r.prompt.init) == ("concat-channel", "paper", "zeros"):
        e.append("prompt.init: 'zeros' with prompt.location concat-channel starts the channel and its zero new "
                 "weights at 0, so neither gets a gradient; use xavier or prompt.location_form official")
    if r.readout.pool == "mask" and r.tokens.mask == "none":
        e.append("readout.pool: 'mask' reads the [MASK] token; set tokens.mask: auto (or pretrained/learnable)")
    if r.tokens.order is not None:
        order = r.tokens.order if r.prompt.length else r.tokens.order.replace("P", "")  # length 0: no P rows
        problem = order_problem(order, has_prompts(r), r.tokens.mask != "none")
        if problem:
            e.append(problem)
    if not 0 < r.attention.temperature_min < r.attention.temperature_max:
        e.append(f"attention.temperature_min: need 0 < temperature_min ({r.attention.temperature_min}) "
                 f"< temperature_max ({r.attention.temperature_max})")
    return e


def _range_problems(r) -> list[str]:
    e = []
    if r.data.num_classes is not None and r.data.num_classes < 2:
        e.append(f"data.num_classes: {r.data.num_classes} is below the minimum 2")
    for key, value, lo in (("prompt.length", r.prompt.length, 0), ("train.epochs", r.train.epochs, 1),
                           ("data.batch_size", r.data.batch_size, 1),
                           ("data.eval_batch_size", r.data.eval_batch_size, 1),
                           ("data.num_workers", r.data.num_workers, 0),
                           ("train.warmup_epochs", r.train.warmup_epochs, 0), ("head.dim", r.head.dim, 1)):
        if not isinstance(value, str) and value < lo:  # data.num_workers may be 'auto'
            e.append(f"{key}: {value} is below the minimum {lo}")
    if r.train.warmup_epochs >= r.train.epochs and r.train.epochs >= 1:
        e.append(f"train.warmup_epochs: {r.train.warmup_epochs} must be below train.epochs ({r.train.epochs})")
    if not r.train.lr > 0:
        e.append(f"train.lr: {r.train.lr} must be > 0")
    if not 0.0 <= r.train.momentum <= 1.0:
        e.append(f"train.momentum: {r.train.momentum} must be in [0, 1]")
    if r.train.weight_decay < 0:
        e.append(f"train.weight_decay: {r.train.weight_decay} must be >= 0")
    for key, value in (("seed", r.seed), ("data.split_seed", r.data.split_seed)):
        if not 0 <= value < 2**32:
            e.append(f"{key}: {short_repr(value)} must be in [0, 2**32 - 1] (NumPy and DataLoader seeds are 32-bit)")
    if r.output.save_every_steps < 0:
        e.append(f"output.save_every_steps: {r.output.save_every_steps} must be >= 0 (0: at each epoch's end only)")
    name = r.output.name
    if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name):
        e.append(f"output.name: {short_repr(name)} must be a plain folder name (no '/', not '.' or '..')")
    e.extend(backbone_kwargs_problems(r.backbone.kwargs))
    if not 0.0 <= r.prompt.dropout < 1.0:
        e.append(f"prompt.dropout: {r.prompt.dropout} must be in [0, 1)")
    if not 0.0 < r.data.val_fraction < 1.0:
        e.append(f"data.val_fraction: {r.data.val_fraction} must be in (0, 1)")
    dev = r.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        e.append(f"train.device: {dev!r} is not auto, cpu, cuda or cuda:N")
    return e
