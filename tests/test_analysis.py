"""NMI probe (SPT eq. 7-8), prompt history, GateVPT selection-ratio files, eval's per-class report, and the plots.

Every expected value is computed here from the equations: NMI with plain probabilities in NumPy (no log space),
block inputs by running the timm blocks by hand, selection ratios by explicit products, the confusion matrix by
counting argmax predictions.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, tiny_recipe, write_recipe
from safetensors.torch import load_file, save_file

from vptool.analysis.nmi import NMIRecorder, block_inputs, nmi
from vptool.errors import UserError
from vptool.recipe import resolve


# ----------------------------------------------------------------------------------------------- references
def ref_nmi(P: np.ndarray, E: np.ndarray) -> float:
    """SPT eq. 7-8 for one image, straight from the definitions (float64 probabilities)."""
    S = 1.0 / (1.0 + np.exp(-(P @ E.T)))  # sigmoid(p^k . e^j), (Np, Ne)
    pi = S / S.sum()  # eq. 7
    pp, pe = pi.sum(axis=1), pi.sum(axis=0)
    mi = sum(pi[k, j] * np.log(pi[k, j] / (pp[k] * pe[j])) for k in range(pi.shape[0]) for j in range(pi.shape[1]))
    hp = -sum(v * np.log(v) for v in pp)
    he = -sum(v * np.log(v) for v in pe)
    return 2 * mi / (hp + he)  # eq. 8


def ref_block_inputs(backbone, x, mode, prompts, gates=None):
    """[(P, E)] per block, by running timm's own blocks on hand-assembled sequences [CLS, P, X].

    deep: P_i = prompt set i, block i runs on [CLS, P_i, X] and its prompt outputs are dropped (VPT eq. 7).
    shallow/gated: the prompt rows are carried; gated rows become g h_out + (1 - g) h_in after block l < L
    (GateVPT eq. 7).
    """
    h = backbone._pos_embed(backbone.patch_embed(x))  # (B, 1 + N, D), timm's embedding
    B, Np = x.shape[0], prompts.shape[-2]
    out = []
    if mode == "deep":
        for i, blk in enumerate(backbone.blocks):
            p = prompts[i].unsqueeze(0).expand(B, -1, -1)
            out.append((prompts[i], h[:, 1:]))
            y = blk(torch.cat([h[:, :1], p, h[:, 1:]], dim=1))
            h = torch.cat([y[:, :1], y[:, 1 + Np:]], dim=1)
        return out
    h = torch.cat([h[:, :1], prompts.unsqueeze(0).expand(B, -1, -1), h[:, 1:]], dim=1)
    L = len(backbone.blocks)
    for i, blk in enumerate(backbone.blocks):
        out.append((h[:, 1:1 + Np], h[:, 1 + Np:]))
        y = blk(h)
        if gates is not None and i < L - 1:
            g = gates[i]
            y = torch.cat([y[:, :1], g * y[:, 1:1 + Np] + (1 - g) * h[:, 1:1 + Np], y[:, 1 + Np:]], dim=1)
        h = y
    return out


def ref_nmi_table(backbone, x, mode, prompts, gates=None) -> np.ndarray:
    """(B, L) NMI per image and block from ``ref_block_inputs``."""
    with torch.no_grad():
        blocks = ref_block_inputs(backbone, x, mode, prompts, gates)
    B = x.shape[0]
    table = np.zeros((B, len(blocks)))
    for i, (P, E) in enumerate(blocks):
        for b in range(B):
            Pb = P if P.dim() == 2 else P[b]
            table[b, i] = ref_nmi(Pb.double().numpy(), E[b].double().numpy())
    return table


# ----------------------------------------------------------------------------------------------- eq. 7-8
def test_nmi_matches_equations_per_image():
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 5, 8, generator=g)
    E = torch.randn(3, 7, 8, generator=g) * 0.7
    got = nmi(P, E)
    want = [ref_nmi(P[b].double().numpy(), E[b].double().numpy()) for b in range(3)]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-12)
    # one prompt set shared by every image (deep prompts) broadcasts over the batch
    shared = nmi(P[:1], E)
    np.testing.assert_allclose(shared.numpy(), [ref_nmi(P[0].double().numpy(), E[b].double().numpy())
                                                for b in range(3)], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-3, 0.3, 3.0, 30.0, 300.0])
def test_nmi_bounds_on_random_inputs(scale):
    g = torch.Generator().manual_seed(int(scale * 1000) % 997)
    for Np, Ne, D in ((1, 9, 4), (4, 16, 8), (20, 49, 32)):
        v = nmi(torch.randn(6, Np, D, generator=g) * scale, torch.randn(6, Ne, D, generator=g))
        assert torch.isfinite(v).all()
        assert (v >= -1e-12).all() and (v <= 1 + 1e-12).all(), v
        if Np == 1:  # H(P) = 0 and I = 0
            assert v.abs().max() < 1e-12


def test_nmi_known_extremes():
    # all P.E equal -> pi uniform, independent marginals -> I = 0
    assert nmi(torch.zeros(4, 8), torch.randn(10, 8)).abs().item() < 1e-12
    # P_k . E_j = c (2 delta_kj - 1): pi is (nearly) diagonal -> I = H(P) = H(E) = log n -> NMI -> 1
    n, c = 6, 40.0
    P = torch.eye(n) * c
    E = 2 * torch.eye(n) - 1
    assert nmi(P, E).item() > 0.999
    # |P.E| in the hundreds: float32 sigmoid is exactly 0 or 1 there; the log-space computation matches the
    # float64 definition (still finite at this scale)
    g = torch.Generator().manual_seed(3)
    P = torch.randn(3, 16, generator=g) * 6
    E = torch.randn(12, 16, generator=g) * 5
    assert (P @ E.T).abs().max() > 100
    want = ref_nmi(P.double().numpy(), E.double().numpy())
    assert np.isfinite(want) and abs(nmi(P, E).item() - want) < 1e-8


# ----------------------------------------------------------------------------------------------- which P and E
def _tiny_model(mode, **kw):
    from vptool.backbones.build import build_backbone
    from vptool.prompting.model import PromptedViT

    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    for blk in bb.blocks:  # sharper attention than the random init, so the prompts matter
        blk.attn.qkv.weight.data.normal_(0, 0.3)
    g = torch.Generator().manual_seed(1)
    m = PromptedViT(bb, num_classes=3, prompt_mode=mode, prompt_length=3, readout_pool="avg", generator=g, **kw)
    with torch.no_grad():  # prompts of the tokens' scale
        getattr(m.prompts, m.prompts.mode).normal_(0, 1.0, generator=g)
    return m.eval()


@pytest.mark.parametrize("mode", ["deep", "shallow", "gated"])
def test_probe_uses_the_right_prompts_per_block(mode):
    m = _tiny_model(mode)
    gates = None
    if mode == "gated":
        with torch.no_grad():
            m.gates.logit.copy_(torch.tensor([0.7]))  # L = 2: one gate, g = sigmoid(0.7)
        gates = torch.sigmoid(torch.tensor([0.7]))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    rec = NMIRecorder(2)
    with torch.no_grad():
        rec.start_batch()
        for i, prompts, patches in block_inputs(m, x):
            rec(i, prompts, patches)
    got = rec.values()
    prompts = getattr(m.prompts, m.prompts.mode).detach()
    want = ref_nmi_table(m.backbone, x, mode, prompts, gates)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    with torch.no_grad():  # the saturation diagnostic: share of pairs with |p . e| > 10
        sat = np.array([[float(((P if P.dim() == 2 else P[b]) @ E[b].T).abs().gt(10).double().mean())
                         for P, E in ref_block_inputs(m.backbone, x, mode, prompts, gates)] for b in range(4)])
    np.testing.assert_allclose(rec.saturation(), sat, atol=1e-12)
    # the probe is not the same number for every block: block 2 sees propagated tokens
    assert abs(got[:, 0].mean() - got[:, 1].mean()) > 1e-4


def test_probe_without_prompts_refuses():
    rec = NMIRecorder(2)
    with pytest.raises(ValueError, match="no prompts"):
        rec(0, None, torch.zeros(1, 4, 32))


# ----------------------------------------------------------------------------------------------- runs on disk
@pytest.fixture(scope="module")
def history_run(tmp_path_factory):
    """A tiny VPT-deep run on digits with output.save_prompt_history (3 epochs), trained in-process."""
    from vptool.engine.train import train

    tmp = tmp_path_factory.mktemp("hist")
    r = tiny_recipe(tmp, train={"epochs": 3, "lr": 2.0, "warmup_epochs": 1},
                    output={"name": "hist", "save_prompt_history": True})
    recipe = resolve(r, source="test")
    train(recipe)
    return tmp / "runs" / "hist", recipe, tmp


def _val_images(recipe):
    from vptool.backbones.build import build_backbone
    from vptool.data import build_splits

    torch.manual_seed(recipe.seed)
    bb, info = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    splits = build_splits(recipe.data, info.data_config)
    xs = torch.stack([splits.val[i][0] for i in range(len(splits.val))])
    return bb.eval(), xs


def test_history_snapshots_are_written_each_epoch(history_run):
    run, recipe, _ = history_run
    names = sorted(p.name for p in (run / "prompt_history").iterdir())
    assert names == [f"epoch_{e:04d}.safetensors" for e in range(4)]
    snaps = [load_file(str(run / "prompt_history" / n)) for n in names]
    assert all(set(s) == {"prompts.deep"} for s in snaps)  # prompts only: no head in a snapshot
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["adapter"]["prompts.deep"]
    assert torch.equal(snaps[3]["prompts.deep"], last)  # after the last epoch
    assert not torch.equal(snaps[0]["prompts.deep"], snaps[3]["prompts.deep"])  # training moved them


def test_history_nmi_per_epoch_in_numeric_order(history_run, tmp_path):
    from vptool.engine.probe import open_target, run_probe

    run, recipe, _ = history_run
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    hist = copy / "prompt_history"
    # names whose string order differs from their numeric order: 10 < 2 < 9 as strings
    for src, dst in (("epoch_0000", "epoch_10"), ("epoch_0001", "epoch_2"), ("epoch_0002", "epoch_9")):
        (hist / f"{src}.safetensors").rename(hist / f"{dst}.safetensors")
    (hist / "epoch_0003.safetensors").unlink()
    target = open_target(copy)
    res = run_probe(target, split="val", history=True, out_dir=tmp_path / "out")
    assert res["epochs"] == [2, 9, 10]
    bb, xs = _val_images(recipe)
    for row, src in zip(res["nmi_mean"], ("epoch_0001", "epoch_0002", "epoch_0000")):
        prompts = load_file(str(run / "prompt_history" / f"{src}.safetensors"))["prompts.deep"]
        want = ref_nmi_table(bb, xs, "deep", prompts).mean(axis=0)
        np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-8)
    lines = (tmp_path / "out" / "nmi_history.csv").read_text().splitlines()
    assert lines[0] == "epoch,block,nmi_mean,nmi_std,saturated_fraction,images"
    assert [ln.split(",")[:2] for ln in lines[1:]] == [[str(e), str(b)] for e in (2, 9, 10) for b in (1, 2)]
    assert (tmp_path / "out" / "nmi_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_probe_trained_run_and_prompts_file(history_run, tmp_path):
    from vptool.engine.probe import open_target, run_probe

    run, recipe, tmp = history_run
    bb, xs = _val_images(recipe)
    res = run_probe(open_target(run), split="val", out_dir=tmp_path / "a")
    trained = load_file(str(run / "adapter.safetensors"))["prompts.deep"]
    table = ref_nmi_table(bb, xs, "deep", trained)
    np.testing.assert_allclose(res["nmi_mean"], table.mean(axis=0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(res["nmi_std"], table.std(axis=0), rtol=1e-4, atol=1e-8)
    assert res["images"] == len(xs) and res["blocks"] == [1, 2]
    saved = json.loads((tmp_path / "a" / "nmi.json").read_text())
    assert saved["nmi_mean"] == res["nmi_mean"]
    # a prompts file (here the epoch-0 snapshot, init-prompts layout) probed on the recipe
    path = write_recipe(tmp_path, tiny_recipe(tmp, output={"name": "hist"}))
    first = run / "prompt_history" / "epoch_0000.safetensors"
    res0 = run_probe(open_target(path, first), split="val", out_dir=tmp_path / "b")
    want0 = ref_nmi_table(bb, xs, "deep", load_file(str(first))["prompts.deep"]).mean(axis=0)
    np.testing.assert_allclose(res0["nmi_mean"], want0, rtol=1e-5, atol=1e-8)


def test_max_images_is_a_seeded_subset(history_run, tmp_path):
    from vptool.engine.probe import open_target, probe_images

    run, recipe, _ = history_run
    t = open_target(run)
    a, b = probe_images(t, "train", 50), probe_images(t, "train", 50)
    assert len(a) == 50 and a.indices == b.indices
    assert max(a.indices) > 50  # not just the first images
    assert len(probe_images(t, "train", 10**6)) == len(t.setup.splits.train)


# ----------------------------------------------------------------------------------------------- CLI contract
def test_probe_cli_end_to_end_and_refusals(history_run, tmp_path):
    run, recipe, tmp = history_run
    out = tmp_path / "o"
    r = invoke_cli("probe-nmi", str(run), "--split", "val", "--max-images", "40", "-o", str(out), "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["images"] == 40 and len(res["nmi_mean"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["nmi.csv", "nmi.json", "nmi.png"]
    before = (out / "nmi.json").read_bytes()
    # an existing output is refused before any work, and kept
    r = invoke_cli("probe-nmi", str(run), "-o", str(out))
    assert r.exit_code == 2 and "already exists" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (out / "nmi.json").read_bytes() == before
    # --history on a recipe; a method without prompts; a prompts file of the wrong shape
    rpath = write_recipe(tmp_path, tiny_recipe(tmp))
    r = invoke_cli("probe-nmi", str(rpath), "--history")
    assert r.exit_code == 2 and "--history" in r.stderr
    r = invoke_cli("probe-nmi", str(run), "--compare", str(run), "-o", str(tmp_path / "c"))
    assert r.exit_code == 2 and "--compare" in r.stderr and "--history" in r.stderr
    lin = write_recipe(tmp_path, tiny_recipe(tmp, method="linear"), "lin.yaml")
    r = invoke_cli("probe-nmi", str(lin), "-o", str(tmp_path / "lin"))
    assert r.exit_code == 2 and "prompt.mode" in r.stderr and len(r.stderr.splitlines()) == 1
    bad = tmp_path / "bad.safetensors"
    save_file({"prompts.deep": torch.zeros(2, 7, 32)}, str(bad))
    r = invoke_cli("probe-nmi", str(rpath), "--prompts", str(bad), "-o", str(tmp_path / "bad"))
    assert r.exit_code == 2 and "--prompts" in r.stderr and "(2, 7, 32)" in r.stderr


def test_history_without_snapshots_names_the_setting(tmp_path):
    from vptool.engine.probe import list_snapshots

    (tmp_path / "prompt_history").mkdir()
    with pytest.raises(UserError, match="save_prompt_history"):
        list_snapshots(tmp_path)


def test_save_prompt_history_needs_prompts(tmp_path):
    from vptool.errors import RecipeError

    with pytest.raises(RecipeError, match="output.save_prompt_history"):
        resolve(tiny_recipe(tmp_path, method="linear", output={"save_prompt_history": True}), source="t")


# ----------------------------------------------------------------------------------------------- eval report
def test_eval_per_class_accuracy_and_confusion_matrix(history_run, tmp_path):
    run, recipe, _ = history_run
    logits_path = tmp_path / "logits.npy"
    out = invoke_cli("eval", str(run), "--save-logits", str(logits_path), "--plots", "--json")
    assert out.exit_code == 0, out.output
    res = json.loads(out.stdout)
    report = json.loads((run / "eval" / "test.json").read_text())
    logits = np.load(logits_path)
    from vptool.data import build_splits

    labels = np.array(build_splits(recipe.data, {"input_size": (3, 16, 16), "mean": (0.5,) * 3,
                                                 "std": (0.5,) * 3}).test.targets)
    pred = logits.argmax(axis=1)
    K = 10
    cm = np.zeros((K, K), int)
    for t, p in zip(labels, pred):
        cm[t, p] += 1
    assert report["confusion_matrix"] == cm.tolist()
    for k in range(K):
        assert report["per_class_accuracy"][str(k)] == pytest.approx(100 * np.mean(pred[labels == k] == k))
    assert res["mean_per_class_accuracy"] == pytest.approx(
        np.mean([100 * np.mean(pred[labels == k] == k) for k in range(K)]))
    assert report["top1"] == pytest.approx(100 * np.mean(pred == labels))
    assert (run / "eval" / "test_confusion.png").read_bytes()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------------------------- gates
def test_gate_files_follow_eq_10_11(tmp_path):
    from vptool.analysis.gates import gate_report, write_gate_files

    m = _tiny_model("gated")
    L = 5
    logits = torch.tensor([-1.0, 0.5, 2.0, -0.3])
    from vptool.prompting.model import PromptGates

    m.gates = PromptGates(L - 1)
    with torch.no_grad():
        m.gates.logit.copy_(logits)
    rep = gate_report(m)
    files = write_gate_files(rep, tmp_path, plot=True, title="t")
    g = torch.sigmoid(logits).double().tolist()
    tilde = []
    for blk in range(L - 1):  # eq. 10
        w = g[blk]
        for mm in range(blk + 1, L - 1):
            w *= 1 - g[mm]
        tilde.append(w)
    r = [w / sum(tilde) for w in tilde]  # eq. 11
    rows = (tmp_path / "gates.csv").read_text().splitlines()
    assert rows[0] == "block,gate,selection_ratio"
    got = np.array([[float(v) for v in row.split(",")] for row in rows[1:]])
    np.testing.assert_allclose(got[:, 0], [1, 2, 3, 4])
    np.testing.assert_allclose(got[:, 1], g, atol=1e-6)
    np.testing.assert_allclose(got[:, 2], r, atol=1e-6)
    doc = json.loads((tmp_path / "gates.json").read_text())
    np.testing.assert_allclose(doc["selection_ratio"], r, atol=1e-6)
    assert files["gates_png"].endswith("gates.png")


# ----------------------------------------------------------------------------------------------- figures
def test_figures_show_the_data():
    from vptool.analysis import plots

    fig = plots.nmi_blocks_figure([0.1, 0.3, 0.2], [0.01, 0.02, 0.03], "NMI")
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1, 2, 3])  # blocks 1..L as in the papers
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.1, 0.3, 0.2])
    assert ax.get_xlabel() == "block" and "NMI" in ax.get_ylabel() and ax.get_title() == "NMI"

    fig = plots.nmi_history_figure([0, 1, 5], [[0.1, 0.2], [0.15, 0.25], [0.3, 0.4]], "hist")
    ax = fig.axes[0]
    assert [ln.get_label() for ln in ax.lines] == ["block 1", "block 2"]
    np.testing.assert_allclose(ax.lines[1].get_xdata(), [0, 1, 5])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [0.2, 0.25, 0.4])
    assert "epoch" in ax.get_xlabel()

    fig = plots.selection_ratio_figure([0.1, 0.6, 0.3], "gates")
    ax = fig.axes[0]
    assert [round(b.get_height(), 6) for b in ax.patches] == [0.1, 0.6, 0.3]
    assert [b.get_x() + b.get_width() / 2 for b in ax.patches] == [1, 2, 3]

    fig = plots.confusion_figure([[3, 1], [0, 4]], ["a", "b"], "cm")
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])


def test_compare_runs_puts_each_run_on_its_own_line(history_run, tmp_path):
    from vptool.analysis import plots
    from vptool.engine.probe import run_compare

    run, recipe, _ = history_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    for e in (1, 2):  # the second run keeps epochs 0 and 3 only
        (other / "prompt_history" / f"epoch_{e:04d}.safetensors").unlink()
    res = run_compare([run, other], split="val", out_dir=tmp_path / "cmp")
    a, b = res["runs"]
    assert a["epochs"] == [0, 1, 2, 3] and b["epochs"] == [0, 3]
    bb, xs = _val_images(recipe)
    for e, row in zip(b["epochs"], b["nmi_mean"]):
        prompts = load_file(str(run / "prompt_history" / f"epoch_{e:04d}.safetensors"))["prompts.deep"]
        np.testing.assert_allclose(row, ref_nmi_table(bb, xs, "deep", prompts).mean(axis=0), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(a["nmi_mean"][3], b["nmi_mean"][1])
    rows = (tmp_path / "cmp" / "nmi_compare.csv").read_text().splitlines()
    assert rows[0] == "run,epoch,block,nmi_mean,nmi_std,saturated_fraction,images"
    assert len(rows) == 1 + (4 + 2) * 2
    fig = plots.nmi_compare_figure({"a": ([0, 1], [[0.1, 0.2], [0.3, 0.4]]), "b": ([0, 5], [[0.5, 0.6], [0.7, 0.8]])},
                                   "t")
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["block 1", "block 2"]
    np.testing.assert_allclose(visible[1].lines[1].get_ydata(), [0.6, 0.8])  # block 2, run b
    np.testing.assert_allclose(visible[1].lines[1].get_xdata(), [0, 5])


def test_compare_refuses_runs_on_other_data(history_run, tmp_path):
    import yaml

    from vptool.engine.probe import run_compare

    run, _, _ = history_run
    other = tmp_path / "other"
    shutil.copytree(run, other)
    rec = yaml.safe_load((other / "recipe.yaml").read_text())
    rec["data"]["split_seed"] = 7
    (other / "recipe.yaml").write_text(yaml.safe_dump(rec))
    with pytest.raises(UserError, match="split_seed"):
        run_compare([run, other], split="val", max_images=8, out_dir=tmp_path / "cmp")
    assert not (tmp_path / "cmp").exists()
