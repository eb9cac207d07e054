"""No command writes over what it reads (``vptool.paths.refuse_inputs``).

Every command that writes × every kind of input it reads × every way an output can name that input: the output
path *is* the input, lies *inside* it (a folder), *contains* it (an output folder the command replaces), is a
*symlink* to it, or is a *hard link* to it (a file). Each call must exit 2 with one ``error:`` line naming the
output and the input, with ``--overwrite`` where the command has it, and every input's bytes and mtime must be as
they were, with nothing new written anywhere.

The inputs are real: a finished run trained (once per module) from a backbone checkpoint file on an image folder,
a prompt file, an image, an ``.onnx`` file, a recipe; each input kind sits in a folder of its own (named ``*-sweep``
so that a sweep's folder, ``<output.dir>/<output.name>-sweep``, can be made to equal or contain it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, tiny_recipe
from PIL import Image


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under ``roots`` -> (kind, sha256 or link target, mtime_ns); symlinks are not followed."""
    out: dict[str, tuple] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                st = p.lstat()
                if p.is_symlink():
                    out[str(p)] = ("link", os.readlink(p), st.st_mtime_ns)
                elif p.is_dir():
                    out[str(p)] = ("dir", None, None)
                else:
                    out[str(p)] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> dict[str, Path]:
    """The inputs, each in a folder of its own, and a finished 1-epoch run that records the checkpoint and the
    image folder."""
    root = tmp_path_factory.mktemp("inputs")
    from vptool.backbones.build import build_backbone

    torch.manual_seed(0)
    model, _ = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
    from safetensors.torch import save_file

    ckpt = root / "ckpt-sweep" / "vit.safetensors"
    ckpt.parent.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    data = root / "box-sweep" / "data-sweep"
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            d = data / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(d / f"{i}.png")
    prompts = root / "prompts-sweep" / "prompts.safetensors"
    prompts.parent.mkdir()
    save_file({"prompts.deep": torch.zeros(2, 4, 32)}, str(prompts))
    image = root / "img-sweep" / "img.png"
    image.parent.mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(image)
    onnx = root / "onnx-sweep" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"an .onnx file predict would read")
    recipe = tiny_recipe(root, backbone={"checkpoint": str(ckpt)}, data={"dataset": "imagefolder", "root": str(data)},
                         train={"epochs": 1, "warmup_epochs": 0}, output={"dir": str(root), "name": "run"})
    (root / "run.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = invoke_cli("train", str(root / "run.yaml"))
    assert res.exit_code == 0, res.output
    return {"root": root, "run": root / "run", "ckpt": ckpt, "data": data, "prompts": prompts, "image": image,
            "images": data / "test", "onnx": onnx}


def write_case_recipe(tmp: Path, tree: dict[str, Path], prompts: bool) -> Path:
    """tmp/rec-sweep/r.yaml: the tiny recipe on the tree's checkpoint and image folder (and its prompt file)."""
    sections = {"backbone": {"checkpoint": str(tree["ckpt"])},
                "data": {"dataset": "imagefolder", "root": str(tree["data"])},
                "train": {"epochs": 1, "warmup_epochs": 0}, "output": {"dir": str(tmp / "runs")}}
    if prompts:
        sections["prompt"] = {"init": "file", "init_file": str(tree["prompts"])}
    path = tmp / "rec-sweep" / "r.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(tiny_recipe(tmp, **sections), sort_keys=False))
    return path


#: command -> the input kinds it reads
READS = {
    "train": ("recipe", "ckpt", "prompts", "data"),
    "sweep": ("recipe", "ckpt", "prompts", "data", "storage"),
    "init-prompts": ("recipe", "ckpt", "prompts", "data"),
    "eval": ("run", "ckpt", "data"),
    "probe-nmi": ("run", "ckpt", "data", "prompts"),
    "export-adapter": ("run", "ckpt", "data"),
    "export-onnx": ("run", "ckpt", "data"),
    "predict": ("run", "ckpt", "image", "images", "onnx"),
}
#: commands whose output is a folder they create or replace as a whole ("contains" applies)
FOLDER_OUTPUT = {"train", "sweep", "export-adapter"}
#: a suffix the output of each command takes (so a symlink or hard link looks like a plausible output)
SUFFIX = {"eval": ".npy", "init-prompts": ".safetensors", "export-onnx": ".onnx", "predict": ".jsonl"}
FOLDER_INPUTS = {"run", "data", "images"}
RELATIONS = ("is", "inside", "contains", "symlink", "hardlink")


def applies(command: str, kind: str, relation: str) -> bool:
    if kind == "storage":  # the sweep's --storage file may not be one of the sweep's outputs
        return relation in ("is", "inside")
    if relation == "inside":
        return kind in FOLDER_INPUTS
    if relation == "contains":
        return command in FOLDER_OUTPUT
    if relation == "hardlink":
        return kind not in FOLDER_INPUTS and command not in ("probe-nmi", "sweep")  # a folder output is no link
    if relation == "is" and command == "sweep":  # <name>-sweep equals only an input whose name ends in -sweep
        return kind == "data"
    return True


CASES = [(c, k, r) for c, kinds in READS.items() for k in kinds for r in RELATIONS if applies(c, k, r)]


def target(command: str, kind: str, relation: str, tmp: Path, inp: Path) -> Path:
    """The output path that stands in ``relation`` to the input ``inp`` (links are made in ``tmp``)."""
    suffix = SUFFIX.get(command, "")
    if command == "sweep":
        suffix = "-sweep"
    if relation == "is":
        return inp
    if relation == "inside":
        return inp / f"out{suffix}"
    if relation == "contains":
        return inp.parent
    if relation == "symlink":
        link = tmp / f"link{suffix}"
        link.symlink_to(inp, target_is_directory=inp.is_dir())
        return link
    link = tmp / f"hard{suffix}"
    os.link(inp, link)
    return link


def command_args(command: str, kind: str, tree: dict[str, Path], recipe: Path, out: Path, tmp: Path) -> list[str]:
    run, img = str(tree["run"]), str(tree["image"])
    if command == "train":
        return ["train", str(recipe), "--set", f"output.dir={out.parent}", "--set", f"output.name={out.name}",
                "--overwrite"]
    if command == "sweep":
        if kind == "storage":  # the study file (the input) named where the sweep writes (out: its report, a trial)
            storage = out if out.suffix == ".json" else out / "study.db"
            return ["sweep", str(recipe), "--grid", "train.lr=0.5,0.25", "--storage", f"sqlite:///{storage}"]
        assert out.name.endswith("-sweep"), out
        return ["sweep", str(recipe), "--grid", "train.lr=0.5,0.25", "--set", f"output.dir={out.parent}", "--set",
                f"output.name={out.name[:-len('-sweep')]}"]
    if command == "init-prompts":
        return ["init-prompts", str(recipe), "-o", str(out), "--overwrite"]
    if command == "eval":
        return ["eval", run, "--save-logits", str(out), "--overwrite"]
    if command == "probe-nmi":
        extra = ["--prompts", str(tree["prompts"])] if kind == "prompts" else []
        return ["probe-nmi", run, "-o", str(out), "--overwrite", *extra]
    if command.startswith("export"):
        return ["export", run, "--format", command.split("-")[1], "-o", str(out), "--overwrite"]
    assert command == "predict"
    source = str(tree["onnx"]) if kind == "onnx" else run
    images = str(tree["images"]) if kind == "images" else img
    return ["predict", source, images, "-o", str(out), "--overwrite"]


@pytest.mark.parametrize("command,kind,relation", CASES, ids=["-".join(c) for c in CASES])
def test_no_output_is_an_input(command, kind, relation, tree, tmp_path):
    recipe = write_case_recipe(tmp_path, tree, prompts=kind == "prompts" and command != "probe-nmi")
    if kind == "storage":  # the sweep's own outputs (tmp/runs/r-sweep/...): its report, or a trial's run
        sweep = tmp_path / "runs" / "r-sweep"
        out = sweep / "sweep.json" if relation == "is" else sweep / "000-lr0.5"
        inp = out if relation == "is" else out / "study.db"
    else:
        inp = recipe if kind == "recipe" else tree[kind]
        out = target(command, kind, relation, tmp_path, inp)
    args = command_args(command, kind, tree, recipe, out, tmp_path)
    before = snapshot(tree["root"], tmp_path)
    res = invoke_cli(*args, cwd=tmp_path)
    report = f"vptool {' '.join(args)} -> {res.exit_code}\nstderr: {res.stderr[-1500:]}"
    assert res.exit_code == 2, report
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, report
    line = errors[0]
    assert f" {out}" in line, report  # probe-nmi names the file it would write in the -o folder
    named = tree["run"] if (relation == "contains" and kind == "run") else inp
    assert f" {named} " in line, report
    assert snapshot(tree["root"], tmp_path) == before, "an input or its mtime changed, or something was written"


def test_every_command_and_relation_is_covered():
    assert {c for c, _, _ in CASES} == set(READS)
    for relation in RELATIONS:
        assert any(r == relation for _, _, r in CASES), relation
    assert len(CASES) >= 80


def test_library_refuses_the_same_way(tree, tmp_path):
    """``vptool.load(...).save_pretrained`` and ``vptool.export.export`` refuse an output that is, contains or lies
    inside the folder the model came from or its backbone checkpoint (UserError), and write nothing."""
    import vptool
    from vptool.errors import UserError
    from vptool.export import export

    model = vptool.load(tree["run"])
    before = snapshot(tree["root"], tmp_path)
    for bad, named in [(tree["run"], tree["run"]), (tree["run"] / "sub", tree["run"]), (tree["root"], tree["run"]),
                       (tree["ckpt"], tree["ckpt"])]:
        with pytest.raises(UserError) as exc:
            model.save_pretrained(bad)
        assert f"{bad} " in str(exc.value) and f" {named} " in str(exc.value) and "\n" not in str(exc.value)
        with pytest.raises(UserError) as exc:
            export(tree["run"], "adapter", bad, overwrite=True)
        assert f"{bad} " in str(exc.value) and f" {named} " in str(exc.value)
    assert snapshot(tree["root"], tmp_path) == before
    # a report folder of the run, or any other folder, is fine
    model.save_pretrained(tmp_path / "copy")
    assert vptool.load(tmp_path / "copy").class_names == model.class_names
