"""``vptool probe-nmi``: per-block NMI between prompt tokens and patch tokens (SPT eq. 7-8) for a trained run,
an ``init-prompts`` file or a recipe's fresh prompts, and per epoch from a run's prompt history (SPT Fig. 2).

What is probed:

- RUN_DIR: the run's best-validation adapter (``adapter.safetensors``); with ``--history`` every snapshot in
  ``RUN_DIR/prompt_history/`` (``output.save_prompt_history: true``), epoch 0 being the initial prompts.
- RECIPE: the prompts a run of the recipe starts from (``prompt.init``: xavier with the recipe's seed, zeros,
  a file, or an SPT strategy, built as ``train`` builds it).
- ``--prompts FILE`` (either form): the ``prompts.shallow``/``prompts.deep`` tensor of an init-prompts file (or a
  snapshot) replaces the prompts; everything else (gates, temperature, [MASK]) stays as the run or recipe has it.

Images: a split (default ``train``, with the deterministic eval transform), all of it or a seeded random subset of
``--max-images`` (seed = the recipe's ``seed``); the same images for every snapshot. The probe runs in float32
even on CUDA: sigmoid(P.E) of raw tokens is sensitive to bf16 rounding.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

import vptool
from vptool.analysis.nmi import NMIRecorder, block_inputs, summarize
from vptool.engine.runtime import resolve_device
from vptool.engine.setup import Setup, prepare
from vptool.errors import UserError
from vptool.paths import write_csv_atomically, write_text_atomically
from vptool.prompting.locations import location_for
from vptool.recipe import Recipe

HISTORY_DIR = "prompt_history"
HISTORY_PREFIXES = ("prompts", "gates", "temperature", "mask_token")  # what shapes the prompt rows' path
_SNAPSHOT = re.compile(r"^epoch_(\d+)\.safetensors$")


@dataclass
class ProbeTarget:
    """The model to probe and where it came from."""

    recipe: Recipe
    setup: Setup
    kind: str  # "run" or "recipe"
    prompts: str  # what the prompts are: "trained", "init: xavier", "file: PATH", ...
    path: Path  # the run directory or the recipe file


def history_tensors(model) -> dict[str, torch.Tensor]:
    """The adapter tensors that shape the prompt representations (prompts, gates, temperature, learned [MASK]);
    a snapshot holds these and not the head."""
    return {k: v for k, v in model.adapter_state_dict().items() if k.split(".")[0] in HISTORY_PREFIXES}


def save_snapshot(model, run: Path, epoch: int) -> Path:
    """Write ``run/prompt_history/epoch_{epoch:04d}.safetensors`` (``history_tensors``; metadata ``epoch``)."""
    from vptool.paths import write_safetensors

    folder = run / HISTORY_DIR
    folder.mkdir(exist_ok=True)
    path = folder / f"epoch_{epoch:04d}.safetensors"
    write_safetensors(path, history_tensors(model), {
        "format": "pt", "epoch": str(epoch), "vptool_version": vptool.__version__})
    return path


def list_snapshots(run: Path) -> list[tuple[int, Path]]:
    """``[(epoch, path)]`` of a run's prompt history, in increasing epoch order (numeric, not by name).

    Raises:
        UserError: the run has no prompt history.
    """
    folder = Path(run) / HISTORY_DIR
    found = []
    if folder.is_dir():
        for p in folder.iterdir():
            m = _SNAPSHOT.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    if not found:
        raise UserError(f"--history: {folder} has no epoch_*.safetensors; train with "
                        "--set output.save_prompt_history=true to record the prompts after each epoch")
    return sorted(found)


def load_tensors(model, sd: dict[str, torch.Tensor], source: str) -> None:
    """Set the adapter tensors named in ``sd`` (a subset of the adapter) and keep the others.

    Raises:
        UserError: a name the model does not have, or a shape that differs (one line naming ``source``).
    """
    own = model.adapter_state_dict()
    unknown = sorted(set(sd) - set(own))
    shapes = [k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)]
    if unknown or shapes:
        raise UserError(f"{source}: does not match the model (unexpected {unknown[:3]}, shape mismatch "
                        f"{[(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in shapes[:2]]})")
    model.load_adapter_state_dict({**own, **{k: v.float() for k, v in sd.items()}}, source=source)


def _use_prompt_file(setup: Setup, path: Path) -> None:
    """Replace the model's prompts by an init-prompts file's tensor (backbone and shape checked)."""
    from vptool.engine.init_prompts import check_prompt_file_backbone
    from vptool.prompting.init import load_prompt_file

    model = setup.model
    bb = model.backbone
    check_prompt_file_backbone(path, setup.backbone, bb.embed_dim, len(bb.blocks), key="--prompts")
    name = model.mode.tensor_name
    shape = model.mode.shape(len(bb.blocks), model.prompts.length, bb.embed_dim, model.config.prompt_blocks)
    t = load_prompt_file(str(path), name, shape, key="--prompts")
    load_tensors(model, {name: t}, f"--prompts: {path}")


def open_target(path: str | Path, prompts_file: str | Path | None = None, sets: list[str] | None = None,
                device: str | None = None) -> ProbeTarget:
    """The model to probe: a run directory's adapter or a recipe's initial prompts, optionally with the prompts
    replaced by ``prompts_file``. The training split gets the eval transform.

    Raises:
        UserError: not a run directory or recipe, a model without prompts, or a prompts file that does not fit.
    """
    from vptool.engine.evaluate import load_run
    from vptool.recipe import load_recipe

    p = Path(path)
    if prompts_file is not None and not Path(prompts_file).is_file():
        raise UserError(f"--prompts: {prompts_file} not found; pass an init-prompts .safetensors file")
    if p.is_dir():
        if sets:
            raise UserError("--set: only with a RECIPE; a run directory is probed as it was trained")
        recipe, setup = load_run(p, device, train_eval_transform=True)
        _require_prompts(recipe)
        kind, what = "run", "trained (adapter.safetensors)"
    elif p.is_file() and p.suffix in (".yaml", ".yml"):
        recipe = load_recipe(p, sets or [])
        _require_prompts(recipe)  # before the model is built (an SPT init would run k-means)
        dev = resolve_device(device or recipe.train.device, key="--device" if device else "train.device")
        setup = prepare(recipe, dev, for_adapter=prompts_file is not None, train_eval_transform=True, check_mem=False)
        kind = "recipe"
        what = f"init: {recipe.prompt.init}" + (f" ({recipe.prompt.init_file})" if recipe.prompt.init == "file"
                                                 else f" (seed {recipe.seed})")
    else:
        raise UserError(f"{p}: not found, or neither a run directory nor a .yaml recipe; pass runs/NAME or "
                        "recipes/NAME.yaml")
    if setup.model.family.owns_forward:  # Swin: no token sequence per block for the NMI of SPT eq. 7-8
        raise UserError(f"backbone.name: {recipe.backbone.name!r} is a {setup.model.family.name} model; probe-nmi "
                        "reads the prompts and patch tokens entering each block of a ViT/BEiT sequence")
    if prompts_file is not None:
        _use_prompt_file(setup, Path(prompts_file))
        what = f"file: {prompts_file}"
    return ProbeTarget(recipe, setup, kind, what, p)


def _require_prompts(recipe: Recipe) -> None:
    if recipe.prompt.mode == "none":
        raise UserError(f"prompt.mode: 'none' ({recipe.method}) has no prompt tokens to probe; probe-nmi needs a "
                        "prompted method (vpt-shallow, vpt-deep, gatevpt, spt-*, vptm)")
    if recipe.prompt.length == 0:
        raise UserError("prompt.length: 0 has no prompt tokens to probe; probe-nmi needs prompt.length >= 1")
    if not location_for(recipe.prompt.location).rows:
        raise UserError(f"prompt.location: {recipe.prompt.location!r} adds no prompt tokens to the sequence, and the "
                        "NMI probe (SPT eq. 7-8) compares prompt tokens with patches; probe a prepend or "
                        "prepend-pixel run")


def probe_images(target: ProbeTarget, split: str, max_images: int | None, seed: int | None = None):
    """The split's dataset, or a random subset of ``max_images`` images (seed: ``seed``, else the recipe's)."""
    ds = target.setup.splits[split]
    if max_images is not None:
        if max_images < 1:
            raise UserError(f"--max-images: {max_images} must be at least 1")
        if max_images < len(ds):
            g = torch.Generator().manual_seed(target.recipe.seed if seed is None else seed)
            idx = torch.randperm(len(ds), generator=g)[:max_images].sort().values.tolist()
            ds = Subset(ds, idx)
    return ds


@torch.no_grad()
def nmi_per_image(model, loader, device: torch.device, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Per-image NMI for every block (SPT eq. 7-8) and the saturated fraction of P.E pairs.

    Runs the model in eval mode and float32; the recorder sees each block's input (``nmi.block_inputs``).

    Returns:
        ``(nmi, saturation)``, each (images, L) float64, column i = block i + 1.
    """
    was_training = model.training
    model.eval()
    first = min(model.prompt_set_at, default=0)  # blocks before the first prompt set have no prompts to probe
    rec = NMIRecorder(len(model.backbone.blocks), unprompted=tuple(range(first)))
    try:
        for x, _ in loader:
            rec.start_batch()
            for i, prompts, patches in block_inputs(model, x.to(device, non_blocking=True).float()):
                rec(i, prompts, patches)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    return rec.values(), rec.saturation()


def output_paths(out_dir: Path, history: bool, compare: bool = False) -> dict[str, Path]:
    """``{csv, json, png}`` paths: ``nmi.*``, ``nmi_history.*`` or ``nmi_compare.*`` in ``out_dir``."""
    stem = "nmi_compare" if compare else "nmi_history" if history else "nmi"
    return {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "png")}


def default_out_dir(target_path: Path, recipe: Recipe | None, prompts_file: str | Path | None) -> Path:
    """RUN_DIR -> RUN_DIR/analysis; RECIPE -> <output.dir>/probe-nmi/<output.name, or the prompts file's stem>
    (not the run directory itself, which ``train`` refuses to reuse)."""
    if recipe is None:
        return Path(target_path) / "analysis"
    name = Path(prompts_file).stem if prompts_file else (recipe.output.name or Path(target_path).stem)
    return Path(recipe.output.dir) / "probe-nmi" / name


def check_outputs(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse existing output files unless ``overwrite`` (checked before any slow work).

    Raises:
        UserError: one line naming the first existing file.
    """
    for p in paths.values():
        if p.exists() and not overwrite:
            raise UserError(f"-o: {p} already exists; choose another -o DIR or pass --overwrite")
        if p.parent.exists() and not p.parent.is_dir():
            raise UserError(f"-o: {p.parent} is a file, not a folder")


def _title(target: ProbeTarget) -> str:
    r = target.recipe
    return (f"{r.output.name or target.path.stem}: {r.method}, {r.prompt.mode} prompts (Np={r.prompt.length}), "
            f"{target.prompts}")


def run_probe(target: ProbeTarget, split: str = "train", max_images: int | None = None,
              history: bool = False, out_dir: Path | None = None, observer=None) -> dict:
    """Compute the NMI table (or the per-epoch history), write CSV, JSON and PNG to ``out_dir``; return the JSON.

    Raises:
        UserError: bad split (from ``Splits``), no prompt history.
    """
    from vptool.analysis import plots
    from vptool.data import make_loader
    from vptool.data.loading import num_workers

    t0 = time.time()
    setup, recipe = target.setup, target.recipe
    if history and target.kind != "run":
        raise UserError("--history: needs a run directory (runs/NAME), not a recipe")
    snapshots = list_snapshots(target.path) if history else None
    ds = probe_images(target, split, max_images)
    loader = make_loader(ds, recipe.data.eval_batch_size, shuffle=False, num_workers=num_workers(recipe.data, len(ds)),
                         seed=recipe.seed, pin_memory=setup.device.type == "cuda")
    model = setup.model
    L = len(model.backbone.blocks)
    base = {"run_dir" if target.kind == "run" else "recipe": str(target.path), "method": recipe.method,
            "prompt_mode": recipe.prompt.mode, "prompt_length": recipe.prompt.length, "split": split,
            "images": len(ds), "max_images": max_images, "seed": recipe.seed, "device": str(setup.device),
            "backbone": {"name": setup.backbone.name, "checkpoint_sha256": setup.backbone.checkpoint_sha256},
            "definition": "SPT (Wang et al. 2024) eq. 7-8 per image: pi = sigmoid(P E^T) / sum, NMI = 2 I / "
                          "(H_p + H_e); P = prompts entering block i (deep: set i; shallow/gated: the "
                          "propagated prompt rows), E = patch tokens entering block i; mean and std over images. "
                          "saturated_fraction: mean share of pairs with |p.e| > 10, where sigmoid is flat",
            "vptool_version": vptool.__version__}
    paths = output_paths(out_dir, history)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not history:
        _obs_start(observer, "NMI per block", len(loader))
        values, sat = nmi_per_image(model, loader, setup.device, on_batch=lambda: _obs_step(observer))
        result = {**base, "prompts": target.prompts, **summarize(values, sat)}
        write_csv_atomically(paths["csv"], ["block", "nmi_mean", "nmi_std", "saturated_fraction", "images"],
                             ([b, _cell(m, ".8g"), _cell(s, ".8g"), _cell(f, ".6g"), result["images"]] for b, m, s, f in
                              zip(result["blocks"], result["nmi_mean"], result["nmi_std"],
                                  result["saturated_fraction"])))
        fig = plots.nmi_blocks_figure(result["nmi_mean"], result["nmi_std"],
                                      f"NMI per block ({split}, {result['images']} images)\n{_title(target)}")
    else:
        target.prompts = "prompt history (epoch 0 = initial)"
        _obs_start(observer, "NMI per epoch", len(loader) * len(snapshots))
        epochs, means, stds, sats = history_values(model, loader, setup.device, snapshots, observer)
        result = {**base, "prompts": target.prompts, "blocks": list(range(1, L + 1)), "epochs": epochs,
                  "nmi_mean": means, "nmi_std": stds, "saturated_fraction": sats,
                  "snapshots": [str(p) for _, p in snapshots]}
        write_csv_atomically(paths["csv"], ["epoch", "block", "nmi_mean", "nmi_std", "saturated_fraction", "images"],
                             ([e, b + 1, _cell(m_row[b], ".8g"), _cell(s_row[b], ".8g"), _cell(f_row[b], ".6g"),
                               len(ds)]
                              for e, m_row, s_row, f_row in zip(epochs, means, stds, sats) for b in range(L)))
        fig = plots.nmi_history_figure(epochs, means, f"NMI per epoch ({split}, {len(ds)} images)\n"
                                                      f"{_title(target)}")
    plots.save(fig, paths["png"])
    result["seconds"] = round(time.time() - t0, 3)
    result["outputs"] = {k: str(v) for k, v in paths.items()}
    write_text_atomically(paths["json"], json.dumps(result, indent=2) + "\n")
    return result


def _cell(v: float | None, spec: str) -> str:
    """A CSV number, empty for a block no prompt enters (None)."""
    return "" if v is None else format(v, spec)


def history_values(model, loader, device: torch.device, snapshots: list[tuple[int, Path]], observer=None
                   ) -> tuple[list[int], list[list[float]], list[list[float]], list[list[float]]]:
    """NMI per epoch: each snapshot's tensors loaded into ``model`` in turn, then probed on ``loader``.

    Returns:
        ``(epochs, nmi_mean, nmi_std, saturated_fraction)``, the last three (E, L) nested lists.

    Raises:
        UserError: an unreadable snapshot, or one that does not fit the model.
    """
    from safetensors.torch import load_file

    epochs, means, stds, sats = [], [], [], []
    for epoch, snap in snapshots:
        try:
            sd = load_file(str(snap))
        except Exception as exc:
            raise UserError(f"--history: {snap}: cannot read safetensors ({exc})") from None
        load_tensors(model, sd, str(snap))
        s = summarize(*nmi_per_image(model, loader, device, on_batch=lambda: _obs_step(observer)))
        epochs.append(epoch)
        means.append(s["nmi_mean"])
        stds.append(s["nmi_std"])
        sats.append(s["saturated_fraction"])
    return epochs, means, stds, sats


def run_compare(run_dirs: list[Path], split: str = "train", max_images: int | None = None,
                out_dir: Path | None = None, device: str | None = None, observer=None) -> dict:
    """NMI per epoch of several runs on the same images, one panel per block and one line per run (SPT Fig. 2:
    VPT from random prompts against SPT from prototypes). Writes ``nmi_compare.{csv,json,png}``.

    The runs must share the backbone (name, checkpoint sha256) and data (dataset, root, split seed); the image
    subset is seeded by the first run's seed. Runs are opened one at a time.

    Raises:
        UserError: a run without prompt history, or runs on different backbones or data.
    """
    from vptool.analysis import plots
    from vptool.data import make_loader
    from vptool.data.loading import num_workers

    t0 = time.time()
    runs, ref, n_images, L = [], None, 0, 0
    for run in run_dirs:
        snapshots = list_snapshots(run)
        target = open_target(run, device=device)
        r, info = target.recipe, target.setup.backbone
        key = {"backbone": info.name, "checkpoint_sha256": info.checkpoint_sha256,
               "depth": len(target.setup.model.backbone.blocks), "dataset": r.data.dataset, "root": r.data.root,
               "split_seed": r.data.split_seed}
        if ref is None:
            ref, seed = (run, key), r.seed
        elif key != ref[1]:
            diff = [k for k in key if key[k] != ref[1][k]]
            raise UserError(f"--compare: {run} differs from {ref[0]} in {', '.join(diff)}; compare runs on the "
                            "same backbone and data")
        ds = probe_images(target, split, max_images, seed=seed)
        loader = make_loader(ds, r.data.eval_batch_size, shuffle=False, num_workers=num_workers(r.data, len(ds)),
                             seed=seed, pin_memory=target.setup.device.type == "cuda")
        _obs_start(observer, f"NMI per epoch: {Path(run).name}", len(loader) * len(snapshots))
        epochs, means, stds, sats = history_values(target.setup.model, loader, target.setup.device, snapshots,
                                                   observer)
        L, n_images = len(means[0]), len(ds)
        runs.append({"run_dir": str(run), "label": Path(run).name, "method": r.method,
                     "prompt_init": r.prompt.init, "epochs": epochs, "nmi_mean": means, "nmi_std": stds,
                     "saturated_fraction": sats})
        del target
    paths = output_paths(out_dir, history=True, compare=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv_atomically(paths["csv"], ["run", "epoch", "block", "nmi_mean", "nmi_std", "saturated_fraction",
                                        "images"],
                         ([x["label"], e, b + 1, f"{m_row[b]:.8g}", f"{s_row[b]:.8g}", f"{f_row[b]:.6g}", n_images]
                          for x in runs
                          for e, m_row, s_row, f_row in zip(x["epochs"], x["nmi_mean"], x["nmi_std"],
                                                            x["saturated_fraction"])
                          for b in range(L)))
    fig = plots.nmi_compare_figure({f"{x['label']} ({x['method']}, init {x['prompt_init']})":
                                    (x["epochs"], x["nmi_mean"]) for x in runs},
                                   f"NMI per epoch and block ({split}, {n_images} images)")
    plots.save(fig, paths["png"])
    result = {"split": split, "images": n_images, "max_images": max_images, "blocks": list(range(1, L + 1)),
              "runs": runs, "seconds": round(time.time() - t0, 3), "outputs": {k: str(v) for k, v in paths.items()},
              "vptool_version": vptool.__version__}
    write_text_atomically(paths["json"], json.dumps(result, indent=2) + "\n")
    return result


def _obs_start(observer, label: str, steps: int) -> None:
    if observer is not None:
        observer.eval_start(label, steps)


def _obs_step(observer) -> None:
    if observer is not None:
        observer.eval_step()
