"""SPT prompt construction (Wang et al. 2024, §3.3-3.4): strategies, token levels, streaming k-means, the
init-prompts command and training from its file.

Every expected value is computed here from the paper's definitions (plain loops, timm's own block forward with
hooks, scikit-learn's KMeans), not by calling the code under test a second time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from beit_layout import NAME as BEIT_NAME
from beit_layout import TINY as BEIT_TINY
from beit_layout import random_beitv2_sd, write_beitv2
from conftest import TINY_KWARGS, TINY_NAME, assert_one_line_naming, invoke_cli, tiny_recipe, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vptool.backbones.build import build_backbone
from vptool.engine.init_prompts import InitSpec, build_prompt_init, level_tokens
from vptool.errors import UserError
from vptool.prompting.kmeans import StreamingKMeans
from vptool.prompting.model import PromptedViT
from vptool.prompting.spt import pool_prompts, sample_prompts, source_levels
from vptool.recipe import resolve


def _tokens(B=3, Ne=10, D=4, seed=0):
    return torch.randn(B, Ne, D, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("how", ["mean", "max"])
@pytest.mark.parametrize("Np", [1, 4, 7, 30])
def test_pooling_windows_over_the_flattened_batch(how, Np):
    tok = _tokens()
    B, Ne, D = tok.shape
    flat = [tok[b, j].tolist() for b in range(B) for j in range(Ne)]  # image-major, raster order in each image
    w = (B * Ne) // Np
    expect = []
    for p in range(Np):
        window = flat[p * w:(p + 1) * w]
        expect.append([(sum(v[c] for v in window) / w) if how == "mean" else max(v[c] for v in window)
                       for c in range(D)])
    got = pool_prompts(tok, Np, how)
    assert got.shape == (Np, D)
    torch.testing.assert_close(got, torch.tensor(expect), rtol=0, atol=1e-6)


def test_pooling_with_more_prompts_than_tokens_is_refused():
    with pytest.raises(UserError) as exc:
        pool_prompts(_tokens(B=1, Ne=4), 5, "mean")
    assert_one_line_naming(exc, "prompt.length", "data.batch_size")


@pytest.mark.parametrize("Np,Ne", [(4, 10), (5, 12)])  # Ne mod w != 0 and == 0 (the code's x[:, -0:] case)
def test_official_pooling_windows_per_image(Np, Ne):
    tok = _tokens(B=2, Ne=Ne, D=3)
    w = Ne // (Np - 1)
    rem = Ne % w
    candidates = []
    for b in range(2):
        img = tok[b]
        for p in range(Np - 1):
            candidates.append(img[p * w:(p + 1) * w].mean(0))
        candidates.append(img[Ne - rem:].mean(0) if rem else img.mean(0))
    got = pool_prompts(tok, Np, "mean", form="official", generator=torch.Generator().manual_seed(0))
    assert got.shape == (Np, 3)
    picked = [min(range(len(candidates)), key=lambda i: float((candidates[i] - row).abs().max())) for row in got]
    for row, i in zip(got, picked):
        torch.testing.assert_close(row, candidates[i], rtol=0, atol=1e-6)
    assert len(set(picked)) == Np  # drawn without replacement


def test_random_sample_is_uniform_without_replacement():
    tok = torch.arange(2 * 5, dtype=torch.float32).reshape(2, 5, 1)  # token value = its flat index
    counts = np.zeros(10)
    trials = 4000
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        got = sample_prompts(tok, 3, g).flatten().long().tolist()
        assert len(set(got)) == 3  # no token twice
        counts[got] += 1
    freq = counts / trials  # each token is chosen with probability Np / (B Ne) = 0.3
    assert np.abs(freq - 0.3).max() < 0.04, freq


def test_source_levels_follow_table_s2():
    assert source_levels(4, 4, "same") == [0, 1, 2, 3]
    assert source_levels(1, 4, "same") == [0]
    assert source_levels(4, 4, "first") == [0, 0, 0, 0]
    assert source_levels(4, 4, "last") == [4, 4, 4, 4]


# ----------------------------------------------------------------------------------------------- token levels
def _hooked_levels(backbone, x):
    """Patch tokens entering each block and leaving the last, captured from timm's own forward."""
    n = backbone.num_prefix_tokens
    seen = []
    hooks = [blk.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, n:].clone()))
             for blk in backbone.blocks]
    hooks.append(backbone.blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out[:, n:].clone())))
    with torch.no_grad():
        backbone.forward_features(x)
    for h in hooks:
        h.remove()
    return seen  # L + 1 tensors (B, Ne, D)


@pytest.mark.parametrize("kind", ["vit", "beit"])
def test_level_i_is_the_patch_tokens_entering_block_i_plus_1(kind, tmp_path):
    torch.manual_seed(0)
    if kind == "vit":
        bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs={**TINY_KWARGS, "depth": 3})
        x = torch.randn(2, 3, 16, 16)
    else:
        path = write_beitv2(random_beitv2_sd(seed=3), tmp_path / "beit.pth")
        bb, _ = build_backbone(BEIT_NAME, pretrained=False, checkpoint=str(path), kwargs=dict(BEIT_TINY))
        x = torch.randn(2, 3, 32, 32)
    ref = _hooked_levels(bb, x)
    plain = PromptedViT(bb, 2, prompt_mode="none", readout_pool="avg").eval()
    with torch.no_grad():
        got = dict(level_tokens(plain, x, len(bb.blocks)))
    assert sorted(got) == list(range(len(bb.blocks) + 1))
    for t, r in enumerate(ref):
        torch.testing.assert_close(got[t], r, rtol=1e-5, atol=1e-5)


def test_official_form_level_0_has_no_position_embedding(tiny_backbone):
    x = torch.randn(2, 3, 16, 16)
    plain = PromptedViT(tiny_backbone, 2, prompt_mode="none", readout_pool="avg").eval()
    with torch.no_grad():
        (t, tok), = list(level_tokens(plain, x, 0, form="official"))
        raw = torch.nn.functional.conv2d(x, tiny_backbone.patch_embed.proj.weight,
                                         tiny_backbone.patch_embed.proj.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tok, raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("source", ["same", "first", "last"])
def test_random_strategy_with_all_tokens_returns_each_level_s_tokens(tmp_path, source):
    """Np = B * Ne: the random draw is a permutation of the batch's tokens, so each set must hold exactly the
    tokens of its level (timm hooks) for the images of that batch."""
    raw = tiny_recipe(tmp_path, prompt={"length": 4 * 16, "init": "random", "init_source": source},
                      data={"batch_size": 4}, backbone={"kwargs": {**TINY_KWARGS, "depth": 3}})
    recipe = resolve(raw)
    name, tensor, meta = build_prompt_init(recipe, InitSpec.from_recipe(recipe))
    assert name == "prompts.deep" and tensor.shape == (3, 64, 32)
    from vptool.data import build_splits
    from vptool.engine.setup import seed_everything

    seed_everything(0)
    bb, info = build_backbone(TINY_NAME, pretrained=False, kwargs={**TINY_KWARGS, "depth": 3})
    train = build_splits(recipe.data, info.data_config, train_eval_transform=True).train
    x = torch.stack([train[i][0] for i in meta["batch_images"]])
    ref = _hooked_levels(bb, x)
    for i, level in enumerate(source_levels(3, 3, source)):
        want = ref[level].reshape(-1, 32)
        got = tensor[i]
        order_w = torch.argsort(want[:, 0])
        order_g = torch.argsort(got[:, 0])
        torch.testing.assert_close(got[order_g], want[order_w], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- k-means
def _mixture(k=6, D=8, per=3000, seed=0, spread=10.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, D, generator=g) * spread
    x = torch.cat([c + torch.randn(per, D, generator=g) for c in centres])
    return centres, x[torch.randperm(x.shape[0], generator=g)]


def test_streaming_kmeans_recovers_gaussian_mixture_centres():
    from scipy.optimize import linear_sum_assignment

    centres, x = _mixture()
    km = StreamingKMeans(6, 1, summary_size=128, seed=0)  # 18,000 tokens through a 128-point summary
    for start in range(0, x.shape[0], 500):
        km.add(0, x[start:start + 500])
    assert km.centres[0] is not None  # the streaming path ran (not the small-data exact path)
    (got,), (bound,) = km.result()
    cost = torch.cdist(centres, got).numpy()
    rows, cols = linear_sum_assignment(cost)
    # each true centre is found within 0.1 sigma (the sample mean of 3,000 unit-variance points is ~0.05 off)
    assert cost[rows, cols].max() < 0.15
    true = float(torch.cdist(x.double(), got.double()).min(1).values.pow(2).sum())
    assert true <= bound * (1 + 1e-9)  # the reported inertia bounds eq. 9's
    assert bound <= true * 1.02


def test_streaming_kmeans_inertia_matches_scikit_learn_on_clustered_tokens():
    from sklearn.cluster import KMeans

    _, x = _mixture(k=12, D=16, per=1500, seed=1, spread=3.0)  # overlapping clusters
    km = StreamingKMeans(12, 1, summary_size=512, seed=0)
    for start in range(0, x.shape[0], 1000):
        km.add(0, x[start:start + 1000])
    (got,), _ = km.result()
    ours = float(torch.cdist(x.double(), got.double()).min(1).values.pow(2).sum())
    ref = KMeans(12, random_state=0, n_init=1).fit(x.numpy()).inertia_
    assert ours <= ref * 1.01


def test_streaming_kmeans_refuses_fewer_tokens_than_prototypes():
    km = StreamingKMeans(5, 1)
    km.add(0, torch.randn(3, 4))
    with pytest.raises(ValueError, match="only 3 tokens for 5 prototypes"):
        km.result()


# ----------------------------------------------------------------------------------------------- command + training
def _spt_recipe(tmp_path, **sections):
    raw = tiny_recipe(tmp_path, method="spt-deep", prompt={"length": 4, "init": "kmeans"},
                      data={"batch_size": 64},
                      train={"epochs": 2, "lr": 0.01, "warmup_epochs": 1, "optimizer": "adamw"})
    from vptool.recipe import deep_merge

    return deep_merge(raw, sections)


def test_init_prompts_cli_writes_prototypes_with_metadata_then_frozen_prompts_train_head_only(tmp_path):
    path = write_recipe(tmp_path, _spt_recipe(tmp_path))
    out = tmp_path / "p.safetensors"
    r = invoke_cli("init-prompts", str(path), "--strategy", "kmeans", "--fraction", "1.0", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["tensor"] == "prompts.deep" and result["shape"] == [2, 4, 32]
    with safe_open(str(out), framework="pt") as fh:
        md = {k: json.loads(v) for k, v in fh.metadata().items() if k != "format"}
    assert md["strategy"] == "kmeans" and md["fraction"] == 1.0 and md["source"] == "same" and md["seed"] == 0
    assert len(md["inertia"]) == 2 and md["images"] == 1257 and md["tokens_per_set"] == 1257 * 16
    assert md["backbone"]["name"] == TINY_NAME and md["backbone"]["depth"] == 2
    assert md["dataset"]["dataset"] == "digits" and md["dataset"]["classes"] == 10
    assert md["seconds"] > 0 and md["kmeans_seconds"] is not None

    # the file is a k-means solution: every prototype is the mean of the tokens nearest to it (eq. 10), to
    # within the streaming summary's resolution, checked on the level-0 tokens computed independently
    from vptool.data import build_splits
    from vptool.engine.setup import seed_everything

    seed_everything(0)
    bb, info = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    train = build_splits(resolve(_spt_recipe(tmp_path)).data, info.data_config, train_eval_transform=True).train
    x = torch.stack([train[i][0] for i in range(len(train))])
    level0 = _hooked_levels(bb, x)[0].reshape(-1, 32).double()
    protos = load_file(str(out))["prompts.deep"][0].double()
    labels = torch.cdist(level0, protos).argmin(1)
    means = torch.stack([level0[labels == j].mean(0) for j in range(4)])
    spread = level0.std(0).mean()
    assert float((means - protos).norm(dim=1).max()) < 0.05 * float(spread) * 32 ** 0.5

    frozen = write_recipe(tmp_path, _spt_recipe(tmp_path, prompt={"init": "file", "init_file": str(out),
                                                                   "trainable": False}), "frozen.yaml")
    r = invoke_cli("train", str(frozen), "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    adapter = load_file(str(tmp_path / "runs" / "frozen" / "adapter.safetensors"))
    assert torch.equal(adapter["prompts.deep"], load_file(str(out))["prompts.deep"])  # bitwise unchanged
    assert summary["trainable_params"] == 10 * 32 + 10  # the head only
    assert float(adapter["head.weight"].std()) > 0.021  # trained away from its trunc-normal(0.02) init


def test_train_builds_the_init_on_the_fly_and_keeps_it_in_the_run(tmp_path):
    path = write_recipe(tmp_path, _spt_recipe(tmp_path, prompt={"init": "max-pool"}, train={"epochs": 1,
                                                                                          "warmup_epochs": 0}))
    r = invoke_cli("train", str(path), "--json")
    assert r.exit_code == 0, r.output
    run = tmp_path / "runs" / "tiny"
    init = load_file(str(run / "prompt_init.safetensors"))["prompts.deep"]
    with safe_open(str(run / "prompt_init.safetensors"), framework="pt") as fh:
        md = {k: json.loads(v) for k, v in fh.metadata().items() if k != "format"}
    assert md["strategy"] == "max-pool" and md["images"] == 64
    assert init.shape == (2, 4, 32)
    # eval rebuilds from the adapter alone: no k-means, no init file needed
    (run / "prompt_init.safetensors").unlink()
    r = invoke_cli("eval", str(run), "--json")
    assert r.exit_code == 0, r.output


def test_prompt_file_with_wrong_shape_or_backbone_is_refused(tmp_path):
    bad_shape = tmp_path / "short.safetensors"
    save_file({"prompts.deep": torch.zeros(2, 3, 32)}, str(bad_shape))
    path = write_recipe(tmp_path, _spt_recipe(tmp_path, prompt={"init": "file", "init_file": str(bad_shape)}))
    r = invoke_cli("train", str(path))
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "prompt.init_file" in r.stderr and "(2, 3, 32)" in r.stderr and "(2, 4, 32)" in r.stderr

    other = tmp_path / "other.safetensors"
    save_file({"prompts.deep": torch.zeros(2, 4, 32)}, str(other),
              metadata={"backbone": json.dumps({"name": "vit_base_patch16_224", "depth": 12, "embed_dim": 768})})
    path = write_recipe(tmp_path, _spt_recipe(tmp_path, prompt={"init": "file", "init_file": str(other)}), "o.yaml")
    r = invoke_cli("train", str(path))
    assert r.exit_code == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert "prompt.init_file" in r.stderr and "vit_base_patch16_224" in r.stderr and "init-prompts" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_init_prompts_refuses_bad_input_without_touching_existing_files(tmp_path):
    path = write_recipe(tmp_path, _spt_recipe(tmp_path))
    out = tmp_path / "p.safetensors"
    out.write_bytes(b"precious")
    r = invoke_cli("init-prompts", str(path), "-o", str(out))
    assert r.exit_code == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert out.read_bytes() == b"precious"
    for args, needle in ((["--strategy", "kmean"], "--strategy"), (["--fraction", "0"], "--fraction"),
                         (["--source", "middle"], "--source")):
        r = invoke_cli("init-prompts", str(path), "-o", str(tmp_path / "new.safetensors"), *args)
        assert r.exit_code == 2 and needle in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = invoke_cli("init-prompts", str(path), "-o", str(tmp_path / "new.safetensors"), "--set", "prompt.mode=none",
                "--set", "prompt.init=xavier", "--set", "train.tune=head")
    assert r.exit_code == 2 and "prompt.mode" in r.stderr
    assert not (tmp_path / "new.safetensors").exists()


def test_spt_presets_follow_the_paper():
    deep = resolve({"method": "spt-deep", "backbone": {"name": "x"}, "data": {"dataset": "digits"}})
    shallow = resolve({"method": "spt-shallow", "backbone": {"name": "x"}, "data": {"dataset": "digits"}})
    assert (deep.prompt.mode, deep.prompt.length, deep.prompt.init) == ("deep", 20, "kmeans")
    assert (shallow.prompt.mode, shallow.prompt.length, shallow.prompt.init) == ("shallow", 100, "kmeans")
    for r in (deep, shallow):  # SPT §4.1: AdamW, batch 32, 100 epochs, 10 warm-up epochs, cosine
        assert (r.train.optimizer, r.data.batch_size, r.train.epochs, r.train.warmup_epochs) == ("adamw", 32, 100, 10)


@pytest.mark.parametrize("form,transform,want", [("official", "auto", "train"), ("paper", "auto", "eval"),
                                                  ("paper", "train", "train")])
def test_init_images_go_through_the_training_augmentation_when_asked(tmp_path, form, transform, want):
    """``prompt.init_transform: train`` (implied by ``init_form: official``, as the official SPT code draws its init
    images through random resized crop + flip): the batch is the training split's augmented images, drawn with
    torch's RNG seeded by the init seed; ``eval`` is the deterministic transform."""
    raw = tiny_recipe(tmp_path, method="vpt-shallow",
                      prompt={"length": 4 * 16, "init": "random", "init_form": form, "init_transform": transform},
                      data={"batch_size": 4, "train_transform": "fgvc"})
    recipe = resolve(raw)
    name, tensor, meta = build_prompt_init(recipe, InitSpec.from_recipe(recipe))
    assert meta["transform"] == want and name == "prompts.shallow"
    from vptool.data import build_splits
    from vptool.engine.setup import seed_everything

    seed_everything(0)
    bb, info = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    for augmented in (True, False):
        train = build_splits(recipe.data, info.data_config, train_eval_transform=not augmented).train
        torch.manual_seed(recipe.seed)  # the init seed
        x = torch.stack([train[i][0] for i in meta["batch_images"]])
        level0 = bb.patch_embed(x) if form == "official" else _hooked_levels(bb, x)[0]
        ref = level0.reshape(-1, 32)
        same = torch.allclose(tensor[torch.argsort(tensor[:, 0])], ref[torch.argsort(ref[:, 0])], atol=1e-5)
        assert same == (augmented == (want == "train")), (augmented, want)
