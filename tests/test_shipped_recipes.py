"""Every shipped recipe through the CLI (in this process, ``invoke_cli``): `--dry-run` validates each one, the digits
variants train end to end (slow lane).

The paper recipes point at data and checkpoints users bring. `--dry-run` must still check them: exit 0, `ready:
false`, the missing inputs named, and the model sized from `data.num_classes`. Against a tiny stand-in of the
recipe's data layout (built here, with the benchmark's full class count), the data is read and counted. Trainable
parameter counts are checked against counts written here from the papers' settings, not taken from the code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import invoke_cli

from vptool.recipe import Recipe, _all_paths

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DIGITS = [p for p in RECIPES if "dataset: digits" in p.read_text()]
PAPER = [p for p in RECIPES if p not in DIGITS]

D_BASE, L_BASE = 768, 12
#: width D and blocks L of the larger backbones the scale recipes name (VPT Fig. 4, SPT §4.3; ViT paper Table 1)
WIDTH_DEPTH = {"vit_large_patch16": (1024, 24), "vit_huge_patch14": (1280, 32)}
SWIN_B_D = 1024
#: ConvNet recipes (VPT Table 5): feature dim d (VPT Table 8) and the crop size the pad prompts surround
CONVNET_D, CROP = {"convnext_base": 1024, "resnet50": 2048}, 224


def expected_trainable(r: dict) -> int:
    """Trainable tensors of a paper recipe (ViT-B/16: D = 768, L = 12; ViT-L/H: ``WIDTH_DEPTH``), from the
    papers' definitions.

    VPT-shallow: Np prompts (eq. 4-5); VPT-deep: L sets of Np (eq. 7); GateVPT: Np prompts, L-1 gate priors and
    L temperatures (eq. 6-9); SPT: as VPT (§3.4 "Parameters"); all with a linear head D x K + K. VPTM: Np prompts
    and the verbalizer, Linear(D, t) plus K prototypes of width t (eq. 7-9); the [MASK] embedding is pretrained.
    """
    np_, k = r["prompt"]["length"], r["data"]["num_classes"]
    if r["prompt"].get("location") == "pad":  # VPT §4.4: p pixels per side, (1, 3, 2p, W + 2p) + (1, 3, H, 2p)
        p, d = np_, CONVNET_D[r["backbone"]["name"].split(".")[0]]
        return 3 * 2 * p * (CROP + 2 * p) + 3 * CROP * 2 * p + d * k + k
    D, L = next((dl for pre, dl in WIDTH_DEPTH.items() if r["backbone"]["name"].startswith(pre)),
                (D_BASE, L_BASE))
    head = D * k + k
    method = r["method"]
    if r["backbone"]["name"].startswith("swin_base"):  # Swin-B (Liu et al. 2021): C = 128, depths 2, 2, 18, 2
        widths = [128] * 2 + [256] * 2 + [512] * 18 + [1024] * 2  # VPT §4.2: deep sets of each block's width
        assert method == "vpt-deep", method
        return np_ * sum(widths) + SWIN_B_D * k + k  # a linear head on the pooled last stage (width 8C)
    if method in ("vpt-shallow", "spt-shallow"):
        return np_ * D + head
    if method in ("vpt-deep", "spt-deep"):
        return L * np_ * D + head
    if method == "gatevpt":
        return np_ * D + (L - 1) + L + head
    if method == "vptm":
        t = r["head"]["dim"]
        return np_ * D + (D * t + t) + k * t
    raise AssertionError(f"no expectation written for method {method}")


def test_paper_recipes_cover_the_issue_tables():
    names = {p.stem for p in PAPER}
    for bb in ("mae", "moco"):
        for m in ("vpt_shallow", "vpt_deep", "gatevpt", "spt_shallow", "spt_deep"):
            for task in ("cub", "nabirds", "flowers", "dogs", "cars"):
                assert f"{m}_{bb}_{task}" in names
    assert {"vpt_deep_in21k_cub", "vpt_shallow_in21k_cub"} <= names
    assert len([n for n in names if n.startswith("vptm_beitv2_")]) == 10
    for p in PAPER:  # header: the exact command, the table and the number to reproduce
        head = p.read_text().splitlines()
        assert head[0] == f"# vptool train recipes/{p.name}"
        text = " ".join(line.lstrip("#").strip() for line in head[:8])
        assert "Table" in text and ("% top-1" in text or "no per-task number" in text), p.name
        # the grid the paper searched, as the exact sweep command (valid keys; VPT Table 6's values for VPT)
        sweep = [ln.lstrip("#").split() for ln in head if ln.lstrip("# ").startswith("vptool sweep")]
        assert len(sweep) == 1 and sweep[0][2] == f"recipes/{p.name}", p.name
        grid = {b.split("=")[0]: b.split("=", 1)[1].split(",") for a, b in zip(sweep[0], sweep[0][1:]) if a == "--grid"}
        assert grid and set(grid) <= set(_all_paths(Recipe)), (p.name, grid)
        if p.name.startswith("vpt_"):
            assert [float(v) for v in grid["train.lr"]] == [50, 25, 10, 5, 2.5, 1, 0.5, 0.25, 0.1, 0.05]
            assert [float(v) for v in grid["train.weight_decay"]] == [0.01, 0.001, 0.0001, 0]
            assert "lr_scaling=linear" in " ".join(sweep[0]) or yaml.safe_load(p.read_text())["train"].get(
                "lr_scaling") == "linear"
        # head init: the VPT/GateVPT code's where the numbers come from it, said in the header; SPT keeps timm's
        body = yaml.safe_load(p.read_text())
        init = body.get("head", {}).get("init", "trunc_normal")
        assert init == ("official" if p.name.startswith(("vpt_", "gatevpt_")) else "trunc_normal"), p.name
        if p.name.startswith(("vpt_", "gatevpt_", "spt_")):
            assert f"head.init {init}" in " ".join(line.lstrip("#").strip() for line in head), p.name
        assert "readout" in body and "auto" not in body["readout"].values(), p.name  # explicit, as headers say


@pytest.mark.parametrize("path", DIGITS, ids=[p.name for p in DIGITS])
def test_digits_recipes_pass_dry_run(path, tmp_path):
    res = invoke_cli("train", str(path), "--dry-run", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    assert plan["ready"] and plan["inputs"] == []
    assert plan["trainable_params"] > 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Stand-ins of each data layout the paper recipes read, built once per (dataset, task) with the full K."""
    import standins

    base = tmp_path_factory.mktemp("stand_ins")
    made: dict[tuple, Path] = {}

    def get(data: dict) -> Path:
        key = (data["dataset"], data.get("task"))
        if key not in made:
            made[key] = standins.full_class_stand_in(base / f"{len(made)}", data["dataset"], data.get("task"),
                                                    data["num_classes"])
        return made[key]

    return get


@pytest.mark.parametrize("path", PAPER, ids=[p.name for p in PAPER])
def test_paper_recipe_dry_run_without_and_with_its_data_layout(path, tmp_path, stand_ins):
    raw = yaml.safe_load(path.read_text())
    # 1. nothing on disk: exit 0, not ready, both inputs named, the model sized from data.num_classes
    res = invoke_cli("train", str(path), "--dry-run", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    missing = {i["key"] for i in plan["inputs"] if not i["exists"]}
    assert missing == {"backbone.checkpoint", "data.root"} and not plan["ready"]
    for item in plan["inputs"]:
        assert f"warning: {item['key']}: {item['path']} not found" in res.stderr
    assert plan["trainable_params"] == expected_trainable(raw)
    assert plan["num_classes"] == raw["data"]["num_classes"]
    # 2. a stand-in of the data layout: the data is read (layout, splits) and its K matches the recipe
    root = stand_ins(raw["data"])
    res = invoke_cli("train", str(path), "--dry-run", "--json", "--set", f"data.root={root}", cwd=tmp_path)
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    have = {i["key"]: i["exists"] for i in plan["inputs"]}
    assert have == {"backbone.checkpoint": False, "data.root": True}
    assert plan["num_classes"] == raw["data"]["num_classes"]
    assert plan["trainable_params"] == expected_trainable(raw)
    assert not (tmp_path / "runs").exists()


def test_dry_run_refuses_a_stand_in_with_another_class_count(tmp_path):
    """The stand-in check can fail: the same layout with one class fewer than the recipe says -> exit 2."""
    import standins

    path = ROOT / "recipes" / "gatevpt_mae_flowers.yaml"
    root = standins.full_class_stand_in(tmp_path / "d", "fgvc-json", "flowers", 101)
    res = invoke_cli("train", str(path), "--dry-run", "--set", f"data.root={root}", cwd=tmp_path)
    assert res.exit_code == 2
    assert "data.num_classes" in res.stderr and "101" in res.stderr and len(res.stderr.strip().splitlines()) == 1


#: the variants train for 10 of their shipped 20 epochs here (CI time): measured 98.1 % (GateVPT, 8 epochs) and
#: 96.9 % (VPTM, 10 epochs) test top-1 on this CPU, so 95 % still fails a variant that does not learn
VARIANT_EPOCHS = 10


@pytest.mark.slow
@pytest.mark.parametrize("name,min_top1", [("quickstart_gatevpt.yaml", 95.0), ("quickstart_vptm.yaml", 95.0),
                                                    ("vptm_verbalizer_only_digits.yaml", 90.0),
                                                    ("vpt_blocks_top_digits.yaml", 90.0),
                                                    ("vpt_prompt_pool_digits.yaml", 90.0)])
def test_digits_variants_train_end_to_end(name, min_top1, tmp_path):
    res = invoke_cli("train", str(ROOT / "recipes" / name), "--json", "--set", f"output.dir={tmp_path}", "--set",
                     f"train.epochs={VARIANT_EPOCHS}")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    run = tmp_path / Path(name).stem
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["test_top1"] >= min_top1, summary
    ev = invoke_cli("eval", str(run), "--json")
    assert ev.exit_code == 0, ev.output
    result = json.loads(ev.stdout)
    assert result["top1"] == summary["test_top1"]
    if "gatevpt" in name:
        # selection ratio (GateVPT eq. 11) from the trained gates, the same in summary.json and eval
        assert len(summary["gates"]) == 5 and len(summary["temperature"]) == 6
        assert sum(summary["selection_ratio"]) == pytest.approx(1.0, abs=1e-5)
        assert result["selection_ratio"] == summary["selection_ratio"]
        text = invoke_cli("eval", str(run))
        assert "selection ratio" in text.stdout and text.exit_code == 0
    elif "vptm" in name:
        assert summary["mask_token"] == "learned" == result["mask_token"]  # MAE backbone: no pretrained [MASK]
    else:  # vit_digits_mae: D = 128, K = 10; sets of Np = 10 in blocks 4-6 only (Fig. 7), or one shallow set
        sets = 3 if "blocks" in name else 1
        assert summary["trainable_params"] == sets * 10 * 128 + 128 * 10 + 10


@pytest.mark.slow
def test_init_prompts_on_the_digits_spt_recipe_then_training_from_the_file(tmp_path):
    """The issue's pipeline: k-means prototypes from 100 % of the digits training split, then train from them
    (for ``VARIANT_EPOCHS`` of the shipped 20 epochs, CI time)."""
    recipe = ROOT / "recipes" / "quickstart_spt.yaml"
    out = tmp_path / "p.safetensors"
    res = invoke_cli("init-prompts", str(recipe), "--strategy", "kmeans", "--fraction", "1.0", "-o", str(out),
                     "--json")
    assert res.exit_code == 0, res.output
    made = json.loads(res.stdout)
    assert made["shape"] == [6, 10, 128] and made["images"] == 1257 and len(made["inertia"]) == 6
    res = invoke_cli("train", str(recipe), "--json", "--set", f"output.dir={tmp_path}", "--set", "prompt.init=file",
                     "--set", f"prompt.init_file={out}", "--set", f"train.epochs={VARIANT_EPOCHS}")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["test_top1"] >= 95.0, summary
