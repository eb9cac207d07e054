"""``vptool init-prompts``: SPT prompts from the training split's patch tokens (frozen backbone, no prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from vptool.commands.common import DebugOpt, JsonOpt, RichProgress, SetOpt, cli_errors, is_main
from vptool.paths import check_new_file

EPILOG = ("Examples:\n\n"
          "  vptool init-prompts recipes/quickstart_spt.yaml --strategy kmeans -o prompts.safetensors\n\n"
          "  vptool init-prompts recipes/spt_deep_mae_cub.yaml --strategy kmeans --fraction 0.3 -o p.safetensors"
          "\n\n  vptool init-prompts RECIPE --strategy random --source last --seed 1 -o p.safetensors --json")


def init_prompts(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe (prompt mode and length, backbone, data).",
                                           show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Output .safetensors file (prompts.shallow or "
                                         "prompts.deep + metadata).", show_default=False)],
    strategy: Annotated[Optional[str], typer.Option(
        help="kmeans | mean-pool | max-pool | random (SPT §3.3-3.4); default: the recipe's prompt.init when it "
             "names one, else kmeans.")] = None,
    fraction: Annotated[Optional[float], typer.Option(
        help="kmeans: fraction of the training split to cluster, in (0, 1]; default prompt.init_fraction.")] = None,
    source: Annotated[Optional[str], typer.Option(
        help="same | first | last (SPT Table S2); default prompt.init_source.")] = None,
    form: Annotated[Optional[str], typer.Option(
        help="paper | official (the official code's level 0 and pooling); default prompt.init_form.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the image choice and k-means; default the "
                                                     "recipe's seed.")] = None,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file.")] = False,
    json_out: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Build SPT prompts from the training split's patch tokens (frozen backbone, no prompts).

    kmeans clusters every token of the chosen fraction in one streaming pass (all layers at once, memory
    independent of the dataset size); the pooling and random strategies use one seeded batch. Train from the
    file with prompt.init: file and prompt.init_file: FILE.
    """
    from vptool.recipe import load_recipe
    from vptool.shipped import resolve_recipe

    recipe = resolve_recipe(recipe)  # a path, or a shipped recipe's name
    r = load_recipe(recipe, set_ or [])
    spec = resolve_spec(r, strategy, fraction, source, form, seed)
    check_output(recipe, r, output, overwrite)  # refuse a bad or existing -o before any slow work
    name, tensor, meta = build(r, spec, quiet=json_out or not is_main())
    if not is_main():  # under torchrun every rank has the same prompts; rank 0 writes them
        return
    from vptool.engine.init_prompts import write_prompt_file

    write_prompt_file(output, name, tensor, meta, overwrite=overwrite)
    result = {"output": str(output), "tensor": name, "shape": list(tensor.shape), **meta}
    result.pop("batch_images", None)
    if json_out:
        print(json.dumps(result))
        return
    print_result(spec, name, tensor, meta, output)


def resolve_spec(r, strategy, fraction, source, form, seed):
    """The ``InitSpec``: the options, falling back to the recipe (kmeans when neither names a strategy)."""
    from vptool.engine.init_prompts import InitSpec
    from vptool.prompting.spt import STRATEGIES

    if strategy is None and r.prompt.init not in STRATEGIES:
        strategy = "kmeans"
    return InitSpec.from_recipe(r, strategy, fraction, source, form, seed)


def check_output(recipe: Path, r, output: Path, overwrite: bool) -> None:
    """-o may not be an input, must be a .safetensors file, and may exist only with --overwrite."""
    from vptool.paths import Read, recipe_reads, refuse_inputs

    refuse_inputs("-o", output, [Read("recipe", recipe), *recipe_reads(r)])
    check_new_file(output, "-o", ".safetensors", overwrite)


def build(r, spec, quiet: bool):
    """Build the prompts with progress bars (and the slow-precision note); returns (tensor name, tensor, meta)."""
    from vptool.engine.init_prompts import build_prompt_init
    from vptool.engine.runtime import precision_warning, resolve_device

    obs = RichProgress(quiet=quiet)
    slow = precision_warning(r.train.precision, resolve_device(r.train.device))
    if slow and is_main():
        obs.note(slow)
    try:
        return build_prompt_init(r, spec, observer=obs)
    finally:
        obs.stop()


def print_result(spec, name: str, tensor, meta: dict, output: Path) -> None:
    """The plain-text result: the tensor, how it was built, and (k-means) inertia and timings."""
    print(f"{name} {tuple(tensor.shape)} by {spec.strategy} (source {spec.source}, form {spec.form}, seed "
          f"{spec.seed}) from {meta['images']} images -> {output}")
    if meta.get("inertia") is not None:
        print(f"k-means: {meta['tokens_per_set']:,d} tokens per set, inertia per set: "
              + " ".join(f"{v:.4g}" for v in meta["inertia"]))
        print(f"seconds: extraction {meta['extract_seconds']:.2f}, k-means {meta['kmeans_seconds']:.2f}, "
              f"total {meta['seconds']:.2f}")
    else:
        print(f"seconds: {meta['seconds']:.2f}")


def register(app: typer.Typer) -> None:
    app.command("init-prompts", epilog=EPILOG)(cli_errors(init_prompts))
