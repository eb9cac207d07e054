"""``vptool export``: adapter folders, ONNX, torch.export and TorchScript graphs of the whole prompted model.

The tests run the exported graphs themselves (onnxruntime, ``torch.export.load``) on images they prepare from
the definition of the evaluation transform, and compare with what PyTorch gives (``vptool eval --save-logits``
for the quickstart runs): the exporter's own check is not taken on trust.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from beit_layout import NAME as BEIT_NAME
from beit_layout import TINY as BEIT_TINY
from beit_layout import random_beitv2_sd, write_beitv2
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli
from test_methods import CASES, randomise

from vptool.backbones.build import build_backbone
from vptool.engine.setup import build_model, seed_everything
from vptool.recipe import deep_merge, resolve

QUICKSTARTS = ["quickstart", "quickstart_gatevpt", "quickstart_vptm", "quickstart_spt", "linear_digits"]


def digits_test_inputs() -> np.ndarray:
    """The digits test split as the embedded backbone sees it, from the transform's definition: the 8x8 image in
    [0, 1] repeated to RGB, bilinear (antialiased) resize to 24 px, (x - 0.5) / 0.5. (N, 3, 24, 24) float32."""
    from vptool.data.digits import digits_split

    imgs = torch.from_numpy(digits_split(0)["test"][0]).unsqueeze(1).expand(-1, 3, -1, -1)
    x = F.interpolate(imgs, size=(24, 24), mode="bilinear", antialias=True, align_corners=False)
    return ((x - 0.5) / 0.5).numpy().astype(np.float32)


def eval_logits(run, tmp_path) -> np.ndarray:
    out = tmp_path / f"{run.name}_logits.npy"
    res = invoke_cli("eval", str(run), "--save-logits", str(out), "--overwrite")
    assert res.exit_code == 0, res.output
    return np.load(out)


def one_error_line(res, *needles) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("stem", QUICKSTARTS)
def test_each_quickstart_exports_to_onnx_and_pt2_matching_eval(stem, quickstart_run, tmp_path):
    run = quickstart_run(stem)
    want = eval_logits(run, tmp_path)
    x = digits_test_inputs()
    onnx_path, pt2_path = tmp_path / f"{stem}.onnx", tmp_path / f"{stem}.pt2"
    for fmt, path in (("onnx", onnx_path), ("pt2", pt2_path)):
        res = invoke_cli("export", str(run), "--format", fmt, "-o", str(path), "--json")
        assert res.exit_code == 0, res.output
        report = json.loads(res.stdout)
        assert report["max_abs_diff"] <= 1e-4 and report["argmax_equal"]
        assert "digits test split" in report["check_images"]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    got_onnx = np.concatenate([session.run(None, {"pixel_values": x[s:s + 97]})[0] for s in range(0, len(x), 97)])
    program = torch.export.load(str(pt2_path)).module()
    with torch.no_grad():
        got_pt2 = program(torch.from_numpy(x)).numpy()
    for got in (got_onnx, got_pt2):
        assert got.shape == want.shape == (360, 10)
        assert np.abs(got - want).max() <= 1e-4
        assert np.array_equal(got.argmax(1), want.argmax(1))
    meta = session.get_modelmeta().custom_metadata_map
    info = json.loads(meta["vptool"])
    assert info["classes"] == [str(k) for k in range(10)] and json.loads(meta["class_names"]) == info["classes"]
    assert info["data_config"]["input_size"] == [3, 24, 24] and json.loads(meta["mean"]) == [0.5, 0.5, 0.5]


@pytest.fixture(scope="module")
def beit_checkpoint(tmp_path_factory):
    return write_beitv2(random_beitv2_sd(seed=3), tmp_path_factory.mktemp("beit") / "beitv2_pt.pth")


#: test_methods' CASES plus the two SPT presets (whose k-means prototypes are stood in for by random values here).
EXPORT_CASES = CASES + [("spt-shallow", "spt-shallow", {"prompt": {"length": 5}}),
                        ("spt-deep", "spt-deep", {"prompt": {"length": 3}})]


def adapter_folder(case_sections: dict, method: str, kind: str, beit_checkpoint, out):
    """A CASES row on a tiny ViT or tiny BEiT v2, with random adapter tensors, saved as an adapter folder."""
    from vptool.prompting.spt import STRATEGIES

    if kind == "vit":
        backbone = {"name": TINY_NAME, "pretrained": False, "kwargs": dict(TINY_KWARGS)}
    else:
        backbone = {"name": BEIT_NAME, "pretrained": False, "checkpoint": str(beit_checkpoint),
                    "kwargs": dict(BEIT_TINY)}
    recipe = resolve(deep_merge({"method": method, "backbone": backbone, "data": {"dataset": "digits"}},
                                case_sections))
    seed_everything(recipe.seed)  # as a run builds it: a random-init backbone is rebuilt from the seed
    b = recipe.backbone
    bb, info = build_backbone(b.name, b.pretrained, b.checkpoint, b.kwargs)
    spt = recipe.prompt.init in STRATEGIES  # randomise() below gives the prompts their values
    model = build_model(recipe, bb, info, 5, **({"prompt_init": "zeros"} if spt else {}))
    randomise(model)
    model.class_names = list("abcde")
    model.save_pretrained(out)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vit", "beitv2"])
@pytest.mark.parametrize("case,method,sections", EXPORT_CASES, ids=[c[0] for c in EXPORT_CASES])
def test_every_preset_and_combination_exports_to_onnx(case, method, sections, kind, beit_checkpoint, tmp_path):
    model = adapter_folder(sections, method, kind, beit_checkpoint, tmp_path / "ad")
    out = tmp_path / "m.onnx"
    res = invoke_cli("export", str(tmp_path / "ad"), "--format", "onnx", "-o", str(out), "--json")
    assert res.exit_code == 0, res.output
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for n in (3, 1):  # the batch is dynamic
        x = torch.randn(n, *model.data_config["input_size"], generator=torch.Generator().manual_seed(n))
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])
        assert got.shape == (n, 5)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.slow
def test_torchscript_where_torch_can_trace_it_else_one_line(beit_checkpoint, tmp_path):
    deep = adapter_folder({}, "vpt-deep", "vit", beit_checkpoint, tmp_path / "deep")
    res = invoke_cli("export", str(tmp_path / "deep"), "--format", "torchscript", "-o", str(tmp_path / "d.pt"))
    assert res.exit_code == 0, res.output
    traced = torch.jit.load(str(tmp_path / "d.pt"))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), deep(x), atol=1e-4, rtol=0)
    # a [MASK] readout indexes rows by a traced size: TorchScript cannot trace it faithfully
    adapter_folder({"head": {"dim": 8}}, "vptm", "vit", beit_checkpoint, tmp_path / "vptm")
    res = invoke_cli("export", str(tmp_path / "vptm"), "--format", "torchscript", "-o", str(tmp_path / "v.pt"))
    one_error_line(res, "--format torchscript", "pt2", "onnx")
    assert not (tmp_path / "v.pt").exists()


@pytest.mark.slow
def test_adapter_format_writes_the_folder(quickstart_run, tmp_path):
    run = quickstart_run("quickstart")
    res = invoke_cli("export", str(run), "--format", "adapter", "-o", str(tmp_path / "ad"), "--json")
    assert res.exit_code == 0, res.output
    assert sorted(json.loads(res.stdout)["files"]) == ["README.md", "adapter.safetensors", "adapter_config.json"]
    card = (tmp_path / "ad" / "README.md").read_text()
    summary = json.loads((run / "summary.json").read_text())
    for needle in ("vpt-deep", "Jia et al.", "vit_digits_mae", summary["backbone"]["checkpoint_sha256"],
                   "digits", f"{summary['test_top1']:.2f} %", f"{summary['val_acc']:.2f} %",
                   f"{summary['trainable_params']:,d}", "vptool.load(", "## Resolved recipe", "lr_scaling: linear"):
        assert needle in card, needle


def test_bad_export_input_is_one_line_and_keeps_what_exists(tiny_adapter, tmp_path):
    run = tiny_adapter
    existing = tmp_path / "m.onnx"
    existing.write_bytes(b"precious")
    res = invoke_cli("export", str(run), "--format", "onnx", "-o", str(existing))
    one_error_line(res, str(existing), "--overwrite")
    assert existing.read_bytes() == b"precious"
    one_error_line(invoke_cli("export", str(run), "--format", "tflite", "-o", str(tmp_path / "m.tflite")),
                   "--format", "tflite", "onnx")
    one_error_line(invoke_cli("export", str(run), "--format", "onnx", "-o", str(tmp_path / "m.pt2")), ".onnx")
    one_error_line(invoke_cli("export", str(tmp_path), "--format", "onnx", "-o", str(tmp_path / "x.onnx")),
                   "adapter_config.json")
    for opset in ("7", "99"):  # would silently become 18 / cannot exist
        one_error_line(invoke_cli("export", str(run), "--format", "onnx", "-o", str(tmp_path / "o.onnx"),
                                  "--opset", opset), "--opset", opset)
    assert not (tmp_path / "o.onnx").exists()


def test_a_graph_that_does_not_match_is_removed_and_exits_1(tiny_adapter, tmp_path, monkeypatch):
    import vptool.export

    run = tiny_adapter
    old = tmp_path / "m.pt2"
    old.write_bytes(b"the previous export")
    monkeypatch.setattr(vptool.export, "TOLERANCE", -1.0)  # nothing can pass
    res = invoke_cli("export", str(run), "--format", "pt2", "-o", str(old), "--overwrite")
    assert res.exit_code == 1, res.output
    assert "max |Δ logits|" in res.stderr
    assert old.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt2"]  # no temporary file left


def test_missing_export_extra_is_one_line(tiny_adapter, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails as if not installed
    res = invoke_cli("export", str(tiny_adapter), "--format", "onnx", "-o", str(tmp_path / "m.onnx"))
    one_error_line(res, "onnxscript", 'pip install "vptool[export]"')


def test_moved_or_replaced_backbone_checkpoint(tmp_path):
    """A run whose backbone checkpoint moved: export names its sha256 and --backbone-checkpoint; the moved file
    works when named; a file with another sha256 is refused."""
    from conftest import tiny_recipe, write_recipe
    from safetensors.torch import save_file

    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    ckpt = tmp_path / "vit.safetensors"
    save_file(bb.state_dict(), str(ckpt))
    recipe = tiny_recipe(tmp_path, backbone={"pretrained": True, "checkpoint": str(ckpt)},
                         train={"epochs": 1, "warmup_epochs": 0})
    res = invoke_cli("train", str(write_recipe(tmp_path, recipe)), "--json")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    sha = json.loads((run / "summary.json").read_text())["backbone"]["checkpoint_sha256"]
    moved = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt, moved)
    out = tmp_path / "ad"
    one_error_line(invoke_cli("export", str(run), "--format", "adapter", "-o", str(out)), sha,
                   "--backbone-checkpoint", str(ckpt))
    assert not out.exists()
    res = invoke_cli("export", str(run), "--format", "adapter", "-o", str(out), "--backbone-checkpoint", str(moved))
    assert res.exit_code == 0, res.output
    other = tmp_path / "other.safetensors"
    save_file({k: v * 1.01 for k, v in bb.state_dict().items()}, str(other))
    one_error_line(invoke_cli("export", str(run), "--format", "adapter", "-o", str(tmp_path / "ad2"),
                              "--backbone-checkpoint", str(other)), "sha256", sha)
