"""Head-only training on cached features (``train.feature_cache``, ``vptool.engine.features``): the same
metrics.jsonl (within 1e-5) and test top-1 as the uncached run, with the backbone run once per split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, tiny_recipe, write_recipe

from vptool.engine import features
from vptool.engine.train import Observer, train
from vptool.prompting.model import PromptedViT
from vptool.recipe import resolve


class Notes(Observer):
    def __init__(self):
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)


class CountForward:
    """Counts images through ``PromptedViT.forward_features`` (the frozen backbone's work)."""

    def __init__(self, monkeypatch):
        self.images = 0
        real = PromptedViT.forward_features

        def counted(model, x, *a, **k):
            self.images += x.shape[0]
            return real(model, x, *a, **k)

        monkeypatch.setattr(PromptedViT, "forward_features", counted)


#: a few optimizer steps: 2 epochs of ceil(1257 / 256) = 5 steps on the tiny ViT (the fast lane)
EPOCHS, BATCH = 2, 256
DIGITS = {"dataset": "digits", "batch_size": BATCH}


def linear_recipe(tmp_path: Path, name: str, **sections) -> dict:
    return tiny_recipe(tmp_path, method="linear", readout={"pool": "avg", "norm": "fresh"}, data=dict(DIGITS),
                       train={"epochs": EPOCHS, "lr": 0.5, "warmup_epochs": 1},
                       output={"dir": str(tmp_path / "runs"), "name": name}, **sections)


def spt_frozen_recipe(tmp_path: Path, name: str) -> dict:
    """SPT Table 4a: k-means prompts, frozen; only the head trains."""
    return tiny_recipe(tmp_path, method="spt-deep", prompt={"length": 4, "init": "kmeans", "trainable": False,
                                                            "dropout": 0.0, "init_fraction": 0.2},
                       data=dict(DIGITS), train={"epochs": EPOCHS, "lr": 0.5, "warmup_epochs": 1},
                       output={"dir": str(tmp_path / "runs"), "name": name})


def run(raw: dict, cache: str, monkeypatch=None) -> tuple[dict, list[dict], list[str], int]:
    raw = {**raw, "train": {**raw["train"], "feature_cache": cache}}
    obs = Notes()
    counter = CountForward(monkeypatch) if monkeypatch is not None else None
    summary = train(resolve(raw), observer=obs)
    run_dir = Path(summary["run_dir"])
    metrics = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics, obs.notes, counter.images if counter else -1


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and len(a) > 0
    for ra, rb in zip(a, b):
        assert ra["epoch"] == rb["epoch"]
        for k in ("lr", "train_loss", "train_acc", "val_acc"):
            assert abs(ra[k] - rb[k]) <= 1e-5, (k, ra, rb)


@pytest.mark.parametrize("make", [linear_recipe, spt_frozen_recipe], ids=["linear", "spt-frozen-prompts"])
def test_cached_training_equals_uncached(tmp_path, monkeypatch, make):
    off, m_off, notes_off, images_off = run(make(tmp_path, "off"), "off", monkeypatch)
    on, m_on, notes_on, images_on = run(make(tmp_path, "on"), "auto", monkeypatch)
    assert_same_metrics(m_off, m_on)
    assert on["test_top1"] == off["test_top1"] and on["val_acc"] == off["val_acc"]
    assert not any("feature cache" in n for n in notes_off)
    assert sum("feature cache: only the head trains" in n for n in notes_on) == 1
    # the backbone's work: every epoch's train + val (plus SPT's k-means pass and the test split) uncached; once
    # per split cached
    n_train, n_val, n_test = 1257, 180, 360
    extra = images_off - EPOCHS * (n_train + n_val) - n_test  # the SPT init pass (0 for linear), the same in both
    assert extra >= 0
    assert images_on == n_train + n_val + n_test + extra
    saved = yaml.safe_load((tmp_path / "runs" / "on" / "recipe.yaml").read_text())
    assert saved["train"]["feature_cache"] == "auto"
    assert not (tmp_path / "runs" / "on" / features.CACHE_DIR).exists()


def test_a_cache_too_big_for_memory_goes_to_a_file_that_is_deleted(tmp_path, monkeypatch):
    _, m_mem, _, _ = run(linear_recipe(tmp_path, "mem"), "auto")
    seen = []
    real_build = features.build

    def build(*a, **k):
        cache = real_build(*a, **k)
        seen.append((cache.storage, cache.folder, sorted(p.name for p in cache.folder.iterdir())))
        return cache

    monkeypatch.setattr(features, "memory_budget", lambda device: 0)
    monkeypatch.setattr(features, "build", build)
    summary, m_file, notes, _ = run(linear_recipe(tmp_path, "file"), "auto")
    run_dir = tmp_path / "runs" / "file"
    assert seen == [("file", run_dir / features.CACHE_DIR, ["train.npy", "val.npy"])]
    assert any("memory-mapped, deleted when training ends" in n for n in notes)
    assert not (run_dir / features.CACHE_DIR).exists()
    assert_same_metrics(m_mem, m_file)


@pytest.mark.parametrize("change, why", [
    ({"data": {**DIGITS, "train_transform": "fgvc"}}, "data.train_transform fgvc"),
    ({"prompt": {"length": 4, "trainable": False, "dropout": 0.1}, "method": "vpt-deep"}, "prompt.dropout 0.1"),
])
def test_cache_off_says_why_in_one_line(tmp_path, change, why):
    raw = linear_recipe(tmp_path, "r")
    raw.update(change)
    if raw["method"] == "vpt-deep":
        raw["readout"] = {"pool": "cls", "norm": "pretrained"}
    _, _, notes, _ = run(raw, "auto")
    off = [n for n in notes if "feature cache" in n]
    assert len(off) == 1 and off[0].startswith("feature cache off: ") and why in off[0] and "\n" not in off[0]


def test_prompt_tuning_never_caches(tmp_path):
    model = PromptedViT(__import__("vptool.backbones.build", fromlist=["x"]).build_backbone(
        TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))[0], 10, prompt_mode="deep", prompt_length=2,
        prompt_dropout=0.0)
    assert features.decide(resolve(tiny_recipe(tmp_path)), model) == (False, None)


def test_pre_norm_cache_with_a_trainable_fresh_norm_gives_the_model_logits(tiny_backbone):
    """When a fresh readout norm trains, the cache holds the pooled features before it and ``FeatureHead`` applies
    the norm: head(norm(pool(tokens))) equals the model's forward."""
    model = PromptedViT(tiny_backbone, 5, readout_pool="avg", readout_norm="fresh", tune="head").eval()
    with torch.no_grad():
        model.fc_norm.weight.uniform_(0.5, 1.5)
        model.fc_norm.bias.uniform_(-0.5, 0.5)
    model.fc_norm.requires_grad_(True)
    head = features.FeatureHead(model)
    assert head.pre_norm
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        z = features.feature_fn(model, True)(x)
        tokens = model.forward_features(x)
        patches = tokens[:, model.num_prefix_tokens:]
        ln = torch.nn.functional.layer_norm(patches.mean(dim=1), (tokens.shape[-1],), model.fc_norm.weight,
                                            model.fc_norm.bias, 1e-6)
        want = ln @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(head(z), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_yaml_off_and_resume_of_a_stopped_cached_run(tmp_path, monkeypatch):
    """``feature_cache: off`` (a YAML 1.1 boolean) is accepted; a cached run stopped mid-epoch resumes to the
    uninterrupted run's metrics (stopped at global step 7: epoch 2, step 2 of 5)."""
    ref_raw = linear_recipe(tmp_path, "ref")
    ref_raw["train"]["feature_cache"] = "auto"
    path = tmp_path / "off.yaml"
    text = yaml.safe_dump(linear_recipe(tmp_path, "plain"))
    path.write_text(text.replace("  epochs: 2\n", "  epochs: 2\n  feature_cache: off\n"))
    from vptool.recipe import load_recipe

    assert load_recipe(path, []).train.feature_cache == "off"
    _, m_ref, _, _ = run(ref_raw, "auto")
    path = write_recipe(tmp_path, linear_recipe(tmp_path, "stopped"), "stopped.yaml")
    monkeypatch.setenv("VPTOOL_FAULT", "step:7:TERM")
    res = invoke_cli("train", str(path))
    assert res.exit_code == 143, res.output
    monkeypatch.delenv("VPTOOL_FAULT")
    res = invoke_cli("train", str(path), "--resume")
    assert res.exit_code == 0, res.output
    m = [json.loads(ln) for ln in (tmp_path / "runs" / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert_same_metrics(m_ref, m)


@pytest.mark.slow
def test_two_processes_train_on_cached_features_as_one_uncached_process(tmp_path):
    """Under torchrun each rank extracts its shard and the shards are gathered batch by batch: the 2-process
    cached run matches the 1-process uncached run (the odd 1,257 training images include a padded one)."""
    from test_distributed import assert_same_run, recipe, torchrun

    path = recipe(tmp_path, method="linear", readout={"pool": "avg", "norm": "fresh"}, prompt={"length": 4},
                  data={"dataset": "digits", "batch_size": 128})
    res = invoke_cli("train", str(path), "--set", f"output.dir={tmp_path / 'one'}", "--set",
                     "train.feature_cache=off", "--json")
    assert res.exit_code == 0, res.output
    res = torchrun("train", str(path), "--json")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stderr.count("note: feature cache: only the head trains") == 1  # rank 0 says it, once
    # the reference's recipe.yaml says feature_cache: off; compare everything else
    assert_same_run(tmp_path / "runs" / "r", tmp_path / "one" / "r")
