"""Every shipped recipe through the real CLI: `--dry-run` validates each one, the digits variants train end to end.

The paper recipes point at data and checkpoints users bring; `--dry-run` must still check them (exit 0,
`ready: false`, the missing inputs named) and size the model from `data.num_classes`. Their trainable-parameter
counts are checked against counts written here from the papers' settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_cli

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DIGITS = [p for p in RECIPES if "dataset: digits" in p.read_text()]

D_BASE, L_BASE = 768, 12
#: trainable tensors of each paper recipe, from the papers' settings (ViT-B/16: D = 768, L = 12)
EXPECTED_TRAINABLE = {
    # GateVPT: 100 shallow prompts, L-1 gate priors, L temperatures, linear head on 200 CUB classes
    "gatevpt_mae_cub.yaml": 100 * D_BASE + (L_BASE - 1) + L_BASE + 200 * D_BASE + 200,
    "gatevpt_moco_cub.yaml": 100 * D_BASE + (L_BASE - 1) + L_BASE + 200 * D_BASE + 200,
    # VPTM: 20 zero-init prompts, verbalizer Linear(768, 128) + 100 prototypes of width 128 (pretrained [MASK])
    "vptm_beitv2_cifar100.yaml": 20 * D_BASE + (D_BASE * 128 + 128) + 100 * 128,
    # SPT (Wang et al. 2024 §3.4 "Parameters"): L x 20 deep prompts / 100 shallow prompts, linear head
    "spt_deep_mae_cub.yaml": L_BASE * 20 * D_BASE + 200 * D_BASE + 200,
    "spt_shallow_mae_cub.yaml": 100 * D_BASE + 200 * D_BASE + 200,
}


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_passes_dry_run(path, tmp_path):
    proc = run_cli("train", str(path), "--dry-run", "--json", cwd=tmp_path)  # cwd without data or checkpoints
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    missing = [i for i in plan["inputs"] if not i["exists"]]
    assert plan["ready"] == (not missing)
    for item in missing:  # each missing input is named on stderr, with its key
        assert f"warning: {item['key']}: {item['path']} not found" in proc.stderr
    if path in DIGITS:
        assert plan["ready"] and plan["inputs"] == []
    else:
        assert {i["key"] for i in missing} == {"backbone.checkpoint", "data.root"}
        assert plan["trainable_params"] == EXPECTED_TRAINABLE[path.name]
    assert plan["trainable_params"] > 0
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


@pytest.mark.parametrize("name,min_top1", [("quickstart_gatevpt.yaml", 95.0), ("quickstart_vptm.yaml", 95.0)])
def test_digits_variants_train_end_to_end(name, min_top1, tmp_path):
    proc = run_cli("train", str(ROOT / "recipes" / name), "--json", "--set", f"output.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    run = tmp_path / Path(name).stem
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["test_top1"] >= min_top1, summary
    ev = run_cli("eval", str(run), "--json")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["top1"] == summary["test_top1"]
    if "gatevpt" in name:
        # selection ratio (GateVPT eq. 11) from the trained gates, the same in summary.json and eval
        assert len(summary["gates"]) == 5 and len(summary["temperature"]) == 6
        assert sum(summary["selection_ratio"]) == pytest.approx(1.0, abs=1e-5)
        assert result["selection_ratio"] == summary["selection_ratio"]
        text = run_cli("eval", str(run))
        assert "selection ratio" in text.stdout and text.returncode == 0
    else:
        assert summary["mask_token"] == "learned" == result["mask_token"]  # MAE backbone: no pretrained [MASK]


def test_init_prompts_on_the_digits_spt_recipe_then_training_from_the_file(tmp_path):
    """The issue's pipeline: k-means prototypes from 100 % of the digits training split, then train from them."""
    recipe = ROOT / "recipes" / "quickstart_spt.yaml"
    out = tmp_path / "p.safetensors"
    proc = run_cli("init-prompts", str(recipe), "--strategy", "kmeans", "--fraction", "1.0", "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    made = json.loads(proc.stdout)
    assert made["shape"] == [6, 10, 128] and made["images"] == 1257 and len(made["inertia"]) == 6
    proc = run_cli("train", str(recipe), "--json", "--set", f"output.dir={tmp_path}", "--set", "prompt.init=file",
                   "--set", f"prompt.init_file={out}")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["test_top1"] >= 95.0, summary
