"""End to end: `vptool train` / `vptool eval` on digits with a tiny ViT loaded from a timm-layout checkpoint.

The CLI runs in this process (``invoke_cli``: exit code, stdout and stderr apart); one slow test runs the real
entry point, ``python -m vptool``, for its exit codes and streams."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, run_cli, tiny_recipe, write_recipe
from safetensors.torch import load_file, save_file

from vptool.recipe import resolve


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny ViT's random weights written as a timm-layout .safetensors file (the backbone of every run)."""
    import timm

    torch.manual_seed(123)
    model = timm.create_model(TINY_NAME, pretrained=False, num_classes=0, **TINY_KWARGS)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    # pretrained-like attention (random init attends almost uniformly): widen the q/k weights
    for k in sd:
        if k.endswith("attn.qkv.weight"):
            sd[k] = torch.randn_like(sd[k]) * 0.3
    path = tmp_path_factory.mktemp("ckpt") / "tiny_vit.safetensors"
    save_file(sd, str(path))
    return path


def recipe_with_ckpt(tmp_path, ckpt, **sections):
    r = tiny_recipe(tmp_path, backbone={"checkpoint": str(ckpt)}, **sections)
    return r


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ckpt):
    """One CLI training run shared by several tests."""
    tmp = tmp_path_factory.mktemp("run")
    path = write_recipe(tmp, recipe_with_ckpt(tmp, ckpt))
    res = invoke_cli("train", str(path), "--json")
    assert res.exit_code == 0, res.output
    return tmp / "runs" / "tiny", json.loads(res.stdout), path


def test_run_directory_contract(trained):
    run, summary, _ = trained
    assert {p.name for p in run.iterdir()} == {"recipe.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors",
                                               "adapter_config.json", "checkpoints"}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert all(set(r) == {"epoch", "lr", "train_loss", "train_acc", "val_acc", "seconds"} for r in lines)
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    for key in ("best_epoch", "val_acc", "test_top1", "test_top5", "trainable_params", "total_params", "seconds",
                "vptool_version"):
        assert key in summary
    assert summary["val_acc"] == max(r["val_acc"] for r in lines)
    assert summary["best_epoch"] == 1 + [r["val_acc"] for r in lines].index(summary["val_acc"])
    # trainable = deep prompts (L, Np, D) + head (K x D + K)
    assert summary["trainable_params"] == 2 * 4 * 32 + 10 * 32 + 10
    adapter = load_file(str(run / "adapter.safetensors"))
    assert set(adapter) == {"prompts.deep", "head.weight", "head.bias"}
    assert adapter["prompts.deep"].shape == (2, 4, 32)
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["tensors"]["prompts.deep"] == [2, 4, 32] and cfg["method"] == "vpt-deep"
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and {"optimizer", "scheduler", "rng", "adapter"} <= set(ck)
    # the resolved recipe round-trips through the schema with every default filled in
    import yaml

    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["momentum"] == 0.9 and resolved["prompt"]["mode"] == "deep"
    assert resolve(resolved).to_dict() == resolved


def test_eval_reproduces_summary_exactly(trained, tmp_path):
    run, summary, _ = trained
    out = tmp_path / "logits.npy"
    res = invoke_cli("eval", str(run), "--json", "--save-logits", str(out))
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["top1"] == summary["test_top1"] and result["top5"] == summary["test_top5"]
    logits = np.load(out)
    assert logits.dtype == np.float32 and logits.shape == (360, 10)
    from vptool.data.digits import digits_split

    labels = digits_split(0)["test"][1]
    assert 100.0 * np.mean(logits.argmax(1) == labels) == pytest.approx(summary["test_top1"], abs=1e-9)
    again = invoke_cli("eval", str(run), "--save-logits", str(out))  # never overwrites without --overwrite
    assert again.exit_code == 2 and "already exists" in again.stderr


def test_same_seed_same_metrics(trained, tmp_path, ckpt):
    run, _, _ = trained
    path = write_recipe(tmp_path, recipe_with_ckpt(tmp_path, ckpt))
    res = invoke_cli("train", str(path), "--json")
    assert res.exit_code == 0, res.output

    def strip(p):  # wall-clock seconds are the one field that cannot repeat
        return [{k: v for k, v in json.loads(x).items() if k != "seconds"} for x in p.read_text().splitlines()]

    assert strip(tmp_path / "runs" / "tiny" / "metrics.jsonl") == strip(run / "metrics.jsonl")
    assert load_file(str(tmp_path / "runs" / "tiny" / "adapter.safetensors"))["prompts.deep"].equal(
        load_file(str(run / "adapter.safetensors"))["prompts.deep"])


def test_training_touches_only_prompts_and_head(tmp_path, ckpt):
    from vptool.engine.setup import prepare
    from vptool.engine.train import train

    recipe = resolve(recipe_with_ckpt(tmp_path, ckpt, train={"epochs": 1, "warmup_epochs": 0},
                                      output={"name": "lib"}))
    setup = prepare(recipe)
    model = setup.model
    init_prompts = model.prompts.deep.detach().clone()
    init_head = model.head.weight.detach().clone()
    train(recipe, setup=setup)
    on_disk = load_file(str(ckpt))
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, on_disk[k]), k  # bitwise unchanged
    for n, p in model.backbone.named_parameters():
        assert p.grad is None and not p.requires_grad, n
    assert model.prompts.deep.grad is not None and model.head.weight.grad is not None
    assert not torch.equal(model.prompts.deep, init_prompts) and not torch.equal(model.head.weight, init_head)


def test_existing_run_is_never_overwritten(trained, tmp_path):
    run, _, recipe_path = trained
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    res = invoke_cli("train", str(recipe_path))
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_dry_run_prints_recipe_and_parameters(tmp_path, ckpt):
    path = write_recipe(tmp_path, recipe_with_ckpt(tmp_path, ckpt))
    res = invoke_cli("train", str(path), "--dry-run", "--set", "prompt.length=6")
    assert res.exit_code == 0, res.output
    trainable = 2 * 6 * 32 + 10 * 32 + 10
    assert f"trainable params: {trainable:,d} || all params: " in res.stdout
    assert "length: 6" in res.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("change,needle", [
    ({"prompt": {"lenght": 4}}, "prompt.lenght: unknown key; did you mean prompt.length?"),
    ({"train": {"epochs": "two"}}, "train.epochs: expected int"),
    ({"data": {"dataset": "imagefolder", "root": "/nonexistent/images"}}, "data.root: /nonexistent/images not found"),
    ({"backbone": {"checkpoint": "/nonexistent/vit.safetensors"}}, "backbone.checkpoint: /nonexistent/vit.safetensors"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, change, needle):
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, **change))
    res = invoke_cli("train", str(path))
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_names_the_file(tmp_path, workers):
    from PIL import Image

    from vptool.data.digits import digits_split

    images, labels = digits_split(0)["train"]
    root = tmp_path / "images"
    for split in ("train", "test"):
        for i in range(12):
            d = root / split / f"c{labels[i] % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((images[i] * 255).astype(np.uint8)).convert("RGB").save(d / f"{i}.png")
    bad = root / "train" / "c0" / "broken.png"
    bad.write_bytes(b"\x89PNG not really an image")
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(root),
                                                              "num_workers": workers, "val_fraction": 0.25},
                                              train={"epochs": 1, "warmup_epochs": 0}))
    res = invoke_cli("train", str(path))
    assert res.exit_code == 2, res.output
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0], res.stderr
    # the failed start finished nothing: the same command, rerun, is not blocked by it (it meets the image again)
    run = tmp_path / "runs" / "tiny"
    assert (run / "recipe.yaml").is_file() and not (run / "summary.json").exists()
    assert not (run / "checkpoints" / "last.pt").exists()
    again = invoke_cli("train", str(path))
    errors = [ln for ln in again.stderr.splitlines() if ln.startswith("error:")]
    assert again.exit_code == 2 and len(errors) == 1 and str(bad) in errors[0], again.stderr
    # the user replaces the image: the same command, no flag, trains to the end
    Image.fromarray((images[0] * 255).astype(np.uint8)).convert("RGB").save(bad, format="PNG")
    fixed = invoke_cli("train", str(path), "--json")
    assert fixed.exit_code == 0, fixed.output
    summary = json.loads(fixed.stdout)
    assert (run / "summary.json").is_file() and summary["best_epoch"] == 1
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_the_real_entry_point_exit_codes_and_streams(tmp_path, ckpt):
    """``python -m vptool`` in a fresh interpreter: a run exits 0 with its JSON object alone on stdout (messages
    on stderr); rerun, it exits 2 with one ``error:`` line on stderr, nothing on stdout and nothing written."""
    path = write_recipe(tmp_path, recipe_with_ckpt(tmp_path, ckpt, train={"epochs": 1, "warmup_epochs": 0}))
    proc = run_cli("train", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "tiny"
    assert json.loads(proc.stdout) == json.loads((run / "summary.json").read_text())  # one object, nothing else
    assert "Traceback" not in proc.stderr and '"test_top1"' not in proc.stderr
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = run_cli("train", str(path), "--json")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "already exists" in lines[0] and "--overwrite" in lines[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
