"""``vptool predict`` and ``vptool.load`` on image files: the digits test split written as PNG files in
several modes must get, image by image, the class ``vptool eval --save-logits`` gives; through a run, through
stdin and through an exported ``.onnx``. Also: a run that outlives its dataset and its folder, and bad input.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import invoke_cli, run_cli, tiny_recipe, write_recipe
from PIL import Image

import vptool

ROOT = Path(__file__).resolve().parent.parent


def write_digit_pngs(folder: Path) -> list[Path]:
    """The 360 digits test images as PNG files, cycling through grayscale, RGB, RGBA, palette and 16-bit."""
    from vptool.data.digits import digits_split

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(digits_split(0)["test"][0]):
        u8 = np.rint(a * 255).astype(np.uint8)
        kind = ("gray", "rgb", "rgba", "palette", "g16")[i % 5]
        if kind == "g16":
            img = Image.fromarray(np.rint(a * 65535).astype(np.uint16))
        elif kind == "rgba":
            img = Image.fromarray(np.dstack([u8, u8, u8, np.full_like(u8, 200)]))
        else:
            img = Image.fromarray(u8).convert({"gray": "L", "rgb": "RGB", "palette": "P"}[kind])
        paths.append(folder / f"{i:03d}_{kind}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_digit_pngs(tmp_path_factory.mktemp("pngs") / "digits")


@pytest.fixture(scope="module")
def want(quickstart_run, tmp_path_factory):
    """Top-1 class per test image from ``vptool eval --save-logits`` (dataset order = file order)."""
    out = tmp_path_factory.mktemp("eval") / "logits.npy"
    res = invoke_cli("eval", str(quickstart_run("quickstart")), "--save-logits", str(out))
    assert res.exit_code == 0, res.output
    return [str(k) for k in np.load(out).argmax(1)]


def rows(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_predict_run_files_stdin_and_onnx_agree_with_eval(quickstart_run, pngs, want, tmp_path):
    run = quickstart_run("quickstart")
    proc = run_cli("predict", str(run), *map(str, pngs), "--top-k", "3")  # the real entry point
    assert proc.returncode == 0, proc.stderr
    by_files = rows(proc.stdout)
    assert [r["path"] for r in by_files] == [str(p) for p in pngs]
    assert [r["classes"][0] for r in by_files] == want
    assert all(len(r["classes"]) == 3 and r["probs"] == sorted(r["probs"], reverse=True) for r in by_files)
    proc = run_cli("predict", str(run), "-", "--json", input="\n".join(map(str, pngs)) + "\n")
    assert proc.returncode == 0, proc.stderr
    assert [r["classes"][0] for r in rows(proc.stdout)] == want
    onnx = tmp_path / "q.onnx"
    assert invoke_cli("export", str(run), "--format", "onnx", "-o", str(onnx)).exit_code == 0
    res = invoke_cli("predict", str(onnx), str(pngs[0].parent), "--csv")  # a folder, searched for images
    assert res.exit_code == 0, res.output
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [Path(r["path"]).name for r in table] == [p.name for p in pngs]
    assert [r["class_1"] for r in table] == want and all(r["error"] == "" for r in table)
    # the probabilities are the run's: onnxruntime and PyTorch agree to float precision
    for a, b in zip(table, by_files):
        assert float(a["prob_1"]) == pytest.approx(b["probs"][0], abs=1e-5)


@pytest.mark.slow
def test_predict_onnx_builds_no_pytorch_model(quickstart_run, pngs, tmp_path, monkeypatch):
    import vptool.adapter
    import vptool.prompting.model

    onnx = tmp_path / "q.onnx"
    assert invoke_cli("export", str(quickstart_run("quickstart")), "--format", "onnx", "-o", str(onnx)).exit_code == 0

    def refuse(*a, **k):
        raise AssertionError("a PyTorch model was built")

    monkeypatch.setattr(vptool.adapter, "load", refuse)
    monkeypatch.setattr(vptool.prompting.model.PromptedViT, "__init__", refuse)
    res = invoke_cli("predict", str(onnx), *map(str, pngs[:7]))
    assert res.exit_code == 0, res.output
    assert len(rows(res.stdout)) == 7


@pytest.mark.slow
def test_predict_output_file_and_skip_bad(quickstart_run, pngs, want, tmp_path):
    run = quickstart_run("quickstart")
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not an image")
    out = tmp_path / "pred.jsonl"
    files = [str(pngs[0]), str(bad), str(pngs[1])]
    res = invoke_cli("predict", str(run), *files, "-o", str(out), "--skip-bad")
    assert res.exit_code == 0, res.output
    assert res.stdout == ""
    got = rows(out.read_text())
    assert [r["path"] for r in got] == files
    assert "error" in got[1] and "notes.png" in got[1]["error"] and "classes" not in got[1]
    assert [got[0]["classes"][0], got[2]["classes"][0]] == want[:2]
    assert re.search(r"1 of 3 images could not be read", res.stderr)
    before = out.read_bytes()
    res = invoke_cli("predict", str(run), str(pngs[0]), "-o", str(out))  # existing -o: refused, untouched
    assert res.exit_code == 2 and "--overwrite" in res.stderr and out.read_bytes() == before


@pytest.mark.parametrize("case", ["truncated", "text", "empty-folder", "not-a-run", "missing"])
def test_bad_predict_input_is_one_line_before_any_output(case, tiny_adapter, pngs, tmp_path):
    run = tiny_adapter
    source, inputs, needle = str(run), [str(pngs[0])], None
    if case == "truncated":
        p = tmp_path / "cut.png"
        p.write_bytes(pngs[1].read_bytes()[:60])
        inputs, needle = [str(pngs[0]), str(p)], "cut.png"
    elif case == "text":
        p = tmp_path / "readme.png"
        p.write_text("hello")
        inputs, needle = [str(pngs[0]), str(p)], "readme.png"
    elif case == "empty-folder":
        (tmp_path / "nothing").mkdir()
        inputs, needle = [str(tmp_path / "nothing")], "no image file"
    elif case == "not-a-run":
        (tmp_path / "somefolder").mkdir()
        source, needle = str(tmp_path / "somefolder"), "adapter_config.json"
    else:
        inputs, needle = [str(tmp_path / "ghost.png")], "ghost.png"
    res = invoke_cli("predict", source, *inputs)
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr


@pytest.mark.slow
def test_load_survives_a_deleted_dataset_and_a_moved_run(tmp_path):
    from layouts import _Images

    data = tmp_path / "data"
    imgs = _Images()
    for split, n in (("train", 12), ("test", 4)):
        for c in ("ant", "bee"):
            for i in range(n):
                imgs.write(data / split / c / f"{i}.png")
    recipe = tiny_recipe(tmp_path, data={"dataset": "imagefolder", "root": str(data), "batch_size": 8},
                         train={"epochs": 1, "warmup_epochs": 0})
    res = invoke_cli("train", str(write_recipe(tmp_path, recipe)), "--json")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "tiny"
    probe = [data / "test" / "bee" / "0.png", data / "train" / "ant" / "3.png"]
    before = vptool.load(run).predict(probe)
    kept = [shutil.copy(p, tmp_path / f"probe{i}.png") for i, p in enumerate(probe)]
    shutil.rmtree(data)
    moved = tmp_path / "archive" / "tiny-run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    model = vptool.load(moved)
    assert model.class_names == ["ant", "bee"]
    after = model.predict(kept)
    assert [r["classes"] for r in after] == [r["classes"] for r in before]
    assert [r["probs"] for r in after] == [r["probs"] for r in before]


@pytest.mark.slow
def test_readme_python_example_runs(quickstart_run, pngs, tmp_path, monkeypatch):
    """The "Use the trained model" section's Python block, run as written next to runs/quickstart."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use the trained model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "runs").mkdir()
    shutil.copytree(quickstart_run("quickstart"), tmp_path / "runs" / "quickstart")
    shutil.copy(pngs[0], tmp_path / "digit.png")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "adapters" / "quickstart" / "adapter_config.json").is_file()
    assert isinstance(scope["model"], vptool.PromptedViT)

