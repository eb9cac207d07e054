"""``vptool init-prompts``: SPT prompts from the downstream training split (Wang et al. 2024, §3.3-3.4).

One pass over the data: the frozen backbone runs *without* prompts on the training split, through the
deterministic eval transform (``prompt.init_transform: eval``, the default for ``init_form: paper``) or the
training augmentation (``train``, the default for ``init_form: official``: the official SPT code draws its init
images through random resized crop + flip; seeded by the init seed), and the patch tokens of every needed level
feed the strategy as they are produced (level 0 = ``PatchEmbed(x) + E_pos``, level t = output of block t;
``vptool.prompting.spt``). ``kmeans`` streams every token
of a seeded ``fraction`` of the split into ``StreamingKMeans`` (``vptool.prompting.kmeans``), which never holds the
tokens; ``mean-pool``, ``max-pool`` and ``random`` use one seeded batch of ``data.batch_size`` images.

Output file (safetensors, DESIGN.md §4): ``prompts.shallow`` (Np, D) for shallow/gated prompts or ``prompts.deep``
(L, Np, D), with metadata (every value JSON-encoded): strategy, fraction, seed, source, form, transform, images,
tokens per set, inertia per set (kmeans), seconds, backbone identity (name, checkpoint, sha256, width, depth) and
dataset identity (dataset, root, split seed, classes, training images).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Subset

import vptool
from vptool.backbones.build import BackboneInfo, build_backbone
from vptool.data import build_splits, make_loader
from vptool.data.loading import num_workers
from vptool.engine.runtime import autocast, autocast_dtype, resolve_device, seed_everything
from vptool.errors import UserError
from vptool.paths import check_new_file
from vptool.progress import Progress
from vptool.prompting.families import family_for
from vptool.prompting.kmeans import StreamingKMeans
from vptool.prompting.locations import location_for
from vptool.prompting.model import PromptedViT
from vptool.prompting.modes import mode_for
from vptool.prompting.spt import FORMS, SOURCES, STRATEGIES, pool_prompts, sample_prompts
from vptool.recipe import Recipe

#: the progress hooks prompt construction reports to (the former name of ``vptool.progress.Progress``)
InitObserver = Progress


@dataclass
class InitSpec:
    """How to build the prompts; ``None`` fields fall back to the recipe (``prompt.init_*``, ``seed``)."""

    strategy: str
    fraction: float = 1.0
    source: str = "same"
    form: str = "paper"
    seed: int = 0

    @classmethod
    def from_recipe(cls, recipe: Recipe, strategy: str | None = None, fraction: float | None = None,
                    source: str | None = None, form: str | None = None, seed: int | None = None) -> InitSpec:
        """The recipe's ``prompt.init_*`` keys, overridden by the arguments that are not None.

        Raises:
            UserError: an unknown strategy/source/form or a fraction outside (0, 1].
        """
        p = recipe.prompt
        if strategy is None:
            if p.init not in STRATEGIES:
                raise UserError(f"--strategy: missing; the recipe's prompt.init is {p.init!r}, pass one of "
                                f"{', '.join(STRATEGIES)}")
            strategy = p.init
        spec = cls(strategy=strategy, fraction=p.init_fraction if fraction is None else fraction,
                   source=p.init_source if source is None else source, form=p.init_form if form is None else form,
                   seed=recipe.seed if seed is None else seed)
        for key, value, choices in (("--strategy", spec.strategy, STRATEGIES), ("--source", spec.source, SOURCES),
                                    ("--form", spec.form, FORMS)):
            if value not in choices:
                raise UserError(f"{key}: {value!r} is not one of {', '.join(choices)}")
        if not 0.0 < spec.fraction <= 1.0:
            raise UserError(f"--fraction: {spec.fraction} must be in (0, 1]")
        return spec


def init_transform(recipe: Recipe, spec: InitSpec) -> str:
    """``eval`` or ``train``: the transform the init images go through (``prompt.init_transform``; ``auto`` is
    ``train`` for ``form: official``, whose code draws them through the training augmentation, else ``eval``)."""
    t = recipe.prompt.init_transform
    return t if t != "auto" else ("train" if spec.form == "official" else "eval")


def prompt_tensor_name(recipe: Recipe) -> str:
    """``prompts.deep`` for deep prompts, ``prompts.shallow`` for shallow and gated ones.

    Raises:
        UserError: ``prompt.mode: none`` (no prompts to initialise), or a ``prompt.location`` whose prompts are
            not prompt tokens (``vptool.prompting.locations``).
    """
    mode = mode_for(recipe.prompt.mode)
    if not mode.has_prompts:
        raise UserError(f"prompt.mode: {mode.name!r} has no prompts to initialise; use a prompted method "
                        "(e.g. method: spt-deep) or --set prompt.mode=deep")
    if recipe.prompt.length == 0:
        raise UserError("prompt.length: 0 has no prompts to initialise; set prompt.length >= 1")
    if not location_for(recipe.prompt.location).tokens:
        raise UserError(f"prompt.location: {recipe.prompt.location!r} trains no prompt tokens; init-prompts builds "
                        "them for prompt.location prepend; set prompt.location prepend or prompt.init xavier")
    return mode.tensor_name


def level_tokens(model: PromptedViT, x: torch.Tensor, levels: int | list[int], form: str = "paper"):
    """Yield ``(t, patch tokens (B, Ne, D))`` for each level t in ``levels`` (ascending) from the backbone without
    prompts; an int ``levels`` means every level 0..levels.

    t = 0: ``PatchEmbed(x) + E_pos`` (``form: official``: ``PatchEmbed(x)``, the official SPT code), t >= 1: the
    output of block t (``PromptedViT.forward_intermediates``, block index t - 1). Prefix tokens are dropped.
    Blocks past the last level are not run. The block levels of one batch are held together,
    (levels, B, Ne, D).
    """
    wanted = list(range(levels + 1)) if isinstance(levels, int) else sorted(set(levels))
    if 0 in wanted:
        yield 0, (model.backbone.patch_embed(x) if form == "official" else model.embed(x)[:, model.num_prefix_tokens:])
    blocks = [t for t in wanted if t > 0]
    if blocks:
        got = model.forward_intermediates(x, indices=[t - 1 for t in blocks], stop_early=True, output_fmt="NLC",
                                          intermediates_only=True)
        yield from zip(blocks, got)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gathered_kmeans(km: StreamingKMeans, n_sets: int, k: int, seed: int, device: torch.device, obs: Progress):
    """``(centres, inertia)`` of the final k-means on the union of every rank's summaries (under torchrun).

    Raises:
        ValueError: fewer summary points than k (the caller turns it into a ``UserError``).
    """
    from vptool.engine import dist
    from vptool.prompting.kmeans import final_kmeans, merge_summaries

    mine = []
    for i in range(n_sets):
        try:
            pts, w, within = km.summary(i)
        except ValueError:  # this rank's shard had no images
            pts, w, within = torch.zeros(0, 0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64), 0.0
        mine.append((pts.cpu(), w.cpu(), within))
    every = dist.gather_objects((mine, km.seen), "gathering the k-means summaries")
    km.seen = [sum(s[j] for _, s in every) for j in range(n_sets)]
    merged = [merge_summaries([parts[i] for parts, _ in every if parts[i][0].numel()]) for i in range(n_sets)]
    merged = [(p.to(device), w.to(device), v) for p, w, v in merged]
    g = torch.Generator().manual_seed(seed)  # the same on every rank: every rank gets the same prototypes
    return final_kmeans(merged, k, g, km.n_init, km.max_iter, km.tol, obs.kmeans_step)


def stream_kmeans(plain: PromptedViT, loader, levels: list[int], k: int, seed: int, device: torch.device,
                  amp: torch.dtype | None = None, form: str = "paper", observer: Progress | None = None,
                  summary_size: int | None = None):
    """One pass over ``loader``: every patch token of each level in ``levels`` into a ``StreamingKMeans``.

    Args:
        plain: the backbone wrapped without prompts (``PromptedViT(prompt_mode="none")``), on ``device``.
        loader: yields ``(images (B, 3, H, W), labels)``.
        levels: sorted distinct token levels (0 = embedding output, t = output of block t).
        k: prototypes per level (Np).

    Returns:
        ``(centres (len(levels), k, D), inertia per level, the StreamingKMeans, extraction seconds, k-means
        seconds)``; the two timings split the pass (device-synchronised on CUDA).

    Raises:
        UserError: fewer tokens than k.
    """
    obs = observer or Progress()
    from vptool.engine import dist

    km = StreamingKMeans(k, len(levels), summary_size=summary_size, seed=seed + dist.context().rank)
    extract_s = kmeans_s = 0.0
    obs.extract_start(len(loader))
    with torch.no_grad():
        for x, _ in loader:
            t0 = time.perf_counter()
            x = x.to(device, non_blocking=True)
            with autocast(device, amp):
                for t, tok in level_tokens(plain, x, levels, form):
                    if t in levels:
                        _sync(device)
                        t1 = time.perf_counter()
                        extract_s += t1 - t0
                        km.add(levels.index(t), tok)
                        _sync(device)
                        t0 = time.perf_counter()
                        kmeans_s += t0 - t1
            _sync(device)
            extract_s += time.perf_counter() - t0
            obs.extract_step()
    obs.kmeans_start(len(levels))
    t1 = time.perf_counter()
    job = dist.context()
    try:
        if job.active:  # gather every rank's summaries, merge them, and run the final k-means on the union
            centres, inertia = _gathered_kmeans(km, len(levels), k, seed, device, obs)
        else:
            centres, inertia = km.result(on_set=obs.kmeans_step)
    except ValueError as exc:
        raise UserError(f"prompt.length: {exc}; lower prompt.length or raise --fraction") from None
    _sync(device)
    kmeans_s += time.perf_counter() - t1
    return centres, inertia, km, extract_s, kmeans_s


def _init_inputs(recipe: Recipe, spec: InitSpec, backbone: torch.nn.Module | None, info: BackboneInfo | None,
                 device: torch.device):
    """``(backbone, info, transform, splits, plain)``: the backbone (built from the recipe when None), the init
    transform, the data splits through it and the backbone wrapped without prompts, in eval mode on ``device``."""
    if backbone is None:
        b = recipe.backbone
        seed_everything(recipe.seed)  # a random-weight backbone is rebuilt exactly as train builds it
        backbone, info = build_backbone(b.name, b.pretrained, b.checkpoint, b.kwargs, format=b.format)
    family = family_for(backbone, recipe.backbone.name)
    if family.owns_forward:  # Swin: stages of different widths, no token sequence entering each block
        raise UserError(f"backbone.name: {recipe.backbone.name!r} is a {family.name} model; SPT prompt init reads the "
                        "tokens entering each block of a ViT/BEiT sequence; use prompt.init xavier or zeros")
    transform = init_transform(recipe, spec)
    # eval: the deterministic eval transform on the training split; train: the training augmentation (official SPT)
    splits = build_splits(recipe.data, info.data_config, train_eval_transform=transform == "eval")
    plain = PromptedViT(backbone, num_classes=2, prompt_mode="none", readout_pool="avg", readout_norm="none",
                        tune="head").to(device).eval()
    return backbone, info, transform, splits, plain


def _kmeans_prompts(recipe: Recipe, spec: InitSpec, plain: PromptedViT, train, order: torch.Tensor,
                    levels: list[int], device: torch.device, amp: torch.dtype | None, job, obs: Progress):
    """``kmeans``: ``(prompt sets, metadata, extraction seconds, k-means seconds)`` from a seeded ``fraction`` of
    ``train`` streamed in ``order``; under torchrun (``job``) rank r streams every W-th image of it."""
    unique = sorted(set(levels))
    Np = recipe.prompt.length
    count = max(1, round(spec.fraction * len(train)))
    subset = Subset(train, order[:count][job.rank::job.world].tolist())
    loader = make_loader(subset, recipe.data.eval_batch_size, shuffle=False,
                         num_workers=num_workers(recipe.data, len(subset)), seed=spec.seed,
                         pin_memory=device.type == "cuda")
    centres, inertia, km, extract_s, kmeans_s = stream_kmeans(plain, loader, unique, Np, spec.seed, device, amp,
                                                               spec.form, obs)
    per_level = {t: centres[j].cpu() for j, t in enumerate(unique)}
    meta = dict(fraction=spec.fraction, images=count, tokens_per_set=km.seen[0],
                inertia=[inertia[unique.index(t)] for t in levels], summary_size=km.m,
                n_init=km.n_init, algorithm="streaming k-means: mini-batch micro-clusters (Sculley 2010) + "
                                          "weighted k-means++/Lloyd on the summary")
    return [per_level[t] for t in levels], meta, extract_s, kmeans_s


def _batch_prompts(recipe: Recipe, spec: InitSpec, plain: PromptedViT, train, order: torch.Tensor,
                   levels: list[int], device: torch.device, amp: torch.dtype | None, g: torch.Generator):
    """``mean-pool``, ``max-pool``, ``random``: ``(prompt sets, metadata, extraction seconds)`` from one batch of
    ``data.batch_size`` images of ``train``, the first in ``order``; ``g`` draws the samples."""
    Np = recipe.prompt.length
    B = min(recipe.data.batch_size, len(train))
    batch = torch.stack([train[i][0] for i in order[:B].tolist()]).to(device)
    t0 = time.perf_counter()
    with torch.no_grad(), autocast(device, amp):
        got = {t: tok.float() for t, tok in level_tokens(plain, batch, sorted(set(levels)), spec.form)}
    _sync(device)
    extract_s = time.perf_counter() - t0
    prompts = []
    for t in levels:
        tok = got[t]
        if spec.strategy == "random":
            prompts.append(sample_prompts(tok, Np, g).cpu())
        else:
            prompts.append(pool_prompts(tok, Np, spec.strategy.split("-")[0], spec.form, g).cpu())
    meta = dict(fraction=None, images=B, tokens_per_set=B * got[levels[0]].shape[1], batch_images=order[:B].tolist())
    return prompts, meta, extract_s


def _identity_meta(recipe: Recipe, info: BackboneInfo, backbone: torch.nn.Module, splits) -> dict:
    """The ``backbone`` and ``dataset`` identity entries of an init-prompts file's metadata."""
    d = recipe.data
    return {"backbone": {"name": info.name, "checkpoint": info.checkpoint,
                         "checkpoint_sha256": info.checkpoint_sha256, "embed_dim": int(backbone.embed_dim),
                         "depth": len(backbone.blocks)},
            "dataset": {"dataset": d.dataset, "root": d.root, "split_seed": d.split_seed,
                        "classes": len(splits.classes), "train_images": len(splits.train)}}


def build_prompt_init(recipe: Recipe, spec: InitSpec, backbone: torch.nn.Module | None = None,
                      info: BackboneInfo | None = None, device: torch.device | None = None,
                      observer: Progress | None = None) -> tuple[str, torch.Tensor, dict]:
    """Build SPT prompts for ``recipe`` (its prompt mode, length, backbone and training split).

    Args:
        recipe: a validated recipe with prompts.
        spec: strategy, fraction, source, form, seed.
        backbone, info: an already built backbone (train builds the init on the fly with its own); built from
            the recipe otherwise. It is used frozen, in eval mode, without prompts.
        device: default ``train.device`` of the recipe (CUDA when present with ``auto``).

    Returns:
        ``(name, prompts, metadata)``: ``prompts.shallow`` (Np, D) or ``prompts.deep`` (L, Np, D), float32 on CPU.

    Raises:
        UserError: bad recipe input (data, checkpoint), no prompts, too few tokens for Np prompts.
    """
    t_start = time.time()
    obs = observer or Progress()
    name = prompt_tensor_name(recipe)
    from vptool.engine import dist

    device = device or dist.device_for(resolve_device(recipe.train.device))
    job = dist.init(device)
    backbone, info, transform, splits, plain = _init_inputs(recipe, spec, backbone, info, device)
    mode = mode_for(recipe.prompt.mode)
    levels = mode.init_levels(len(backbone.blocks), spec.source, recipe.prompt.blocks)
    amp = autocast_dtype(recipe.train.precision, device)
    g = torch.Generator().manual_seed(spec.seed)
    order = torch.randperm(len(splits.train), generator=g)
    meta: dict = {"strategy": spec.strategy, "source": spec.source, "form": spec.form, "seed": spec.seed,
                  "transform": transform,
                  "mode": recipe.prompt.mode, "length": recipe.prompt.length, "levels": levels}

    # the training augmentation draws from torch's RNG: a fork seeded by the init seed keeps the caller's stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + job.rank)
        if spec.strategy == "kmeans":
            prompts, found, extract_s, kmeans_s = _kmeans_prompts(recipe, spec, plain, splits.train, order, levels,
                                                                  device, amp, job, obs)
        else:
            prompts, found, extract_s = _batch_prompts(recipe, spec, plain, splits.train, order, levels, device,
                                                       amp, g)
            kmeans_s = None
        meta.update(found)
    if job.active:
        meta["world_size"] = job.world
    tensor = mode.from_sets(prompts)
    meta.update(
        seconds=round(time.time() - t_start, 3), extract_seconds=round(extract_s, 3),
        kmeans_seconds=round(kmeans_s, 3) if spec.strategy == "kmeans" else None, device=str(device),
        **_identity_meta(recipe, info, backbone, splits),
        vptool_version=vptool.__version__, tensor=name, shape=list(tensor.shape))
    return name, tensor.float().contiguous(), meta


def write_prompt_file(path: str | Path, name: str, tensor: torch.Tensor, meta: dict, overwrite: bool = False) -> None:
    """Write an init-prompts file atomically (a temporary file renamed into place).

    Raises:
        UserError: the file exists (without ``overwrite``), its folder does not, or it is not ``.safetensors``.
    """
    from vptool.paths import write_safetensors

    p = check_new_file(path, "-o", ".safetensors", overwrite)
    md = {"format": "pt", **{k: json.dumps(v) for k, v in meta.items()}}
    write_safetensors(p, {name: tensor.detach().float().cpu().contiguous()}, md)


def read_prompt_metadata(path: str | Path, key: str = "prompt.init_file") -> dict:
    """The JSON-decoded metadata of an init-prompts file ({} for a file without any).

    Raises:
        UserError: the file cannot be read as safetensors.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
    except Exception as exc:
        raise UserError(f"{key}: {path}: cannot read safetensors ({exc})") from None
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def check_prompt_file_backbone(path: str | Path, info: BackboneInfo, embed_dim: int, depth: int,
                               key: str = "prompt.init_file") -> None:
    """Refuse an init-prompts file made on another backbone (name, checkpoint sha256, width or depth).

    Files without vptool metadata (prompts written by other tools) are only shape-checked when loaded.

    Raises:
        UserError: one line naming the file, what it was made for and what the recipe uses.
    """
    meta = read_prompt_metadata(path, key).get("backbone")
    if not isinstance(meta, dict):
        return
    made, want = [], []
    if meta.get("name") and meta["name"] != info.name:
        made.append(f"backbone {meta['name']}")
        want.append(f"backbone {info.name}")
    sha = meta.get("checkpoint_sha256")
    if sha and info.checkpoint_sha256 and sha != info.checkpoint_sha256:
        made.append(f"checkpoint sha256 {sha[:12]}")
        want.append(f"checkpoint sha256 {info.checkpoint_sha256[:12]}")
    for field, have in (("embed_dim", embed_dim), ("depth", depth)):
        if meta.get(field) is not None and int(meta[field]) != have:
            made.append(f"{field} {meta[field]}")
            want.append(f"{field} {have}")
    if made:
        raise UserError(f"{key}: {path} was made for {', '.join(made)}; this recipe uses "
                        f"{', '.join(want)}; regenerate it with `vptool init-prompts RECIPE -o FILE`")
