"""The recipes and tables travel with the package: inside the wheel, listed by ``vptool recipes ls``, copied by
``vptool recipes cp``, and named by ``vptool train NAME``. Expected values come from the source tree's files,
listed with ``glob`` and read with ``yaml`` here, not from ``vptool.shipped``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import RECIPES, invoke_cli

from vptool import shipped
from vptool.errors import UserError

ROOT = RECIPES.parent
STEMS = sorted(p.stem for p in RECIPES.glob("*.yaml"))
TABLE_STEMS = sorted(p.stem for p in (RECIPES / "tables").glob("*.yaml"))

#: a small benchmark table in the layout `vptool table` reads (top-level table, title, source, columns, rows)
TABLE = {
    "table": "digits", "title": "Digits: prompt depth", "source": "VPT Table 1 (shape only)",
    "groups": [{"name": "all", "columns": ["digits", "birds"]}],
    "columns": [{"name": "digits", "data": {"dataset": "digits"}},
                {"name": "birds", "data": {"dataset": "fgvc-json", "root": "data/fgvc/CUB_200_2011"}}],
    "rows": [{"name": "VPT-deep", "recipe": "quickstart"}, {"name": "Linear", "recipe": "linear_digits"}],
}


# ---------------------------------------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a clean copy of the source tree (no stale build/ folder can add or keep files)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for name in ("vptool", "recipes"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "dist").glob("vptool-*.whl")
    return path


def test_the_wheel_holds_every_recipe_and_table(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    recipes = sorted(n.removeprefix("vptool/recipes/").removesuffix(".yaml") for n in names
                     if n.startswith("vptool/recipes/") and n.count("/") == 2 and n.endswith(".yaml"))
    tables = sorted(n.removeprefix("vptool/recipes/tables/").removesuffix(".yaml") for n in names
                    if n.startswith("vptool/recipes/tables/") and n.endswith(".yaml"))
    assert len(STEMS) > 50 and recipes == STEMS
    assert tables == TABLE_STEMS
    assert not [n for n in names if n.startswith("recipes/")], "recipes must ship inside the package"


def test_the_wheel_holds_every_module_and_asset(wheel):
    """The packages are listed in pyproject.toml (the recipes' mapping needs that): a new subpackage left out of
    the list would be missing from the wheel alone."""
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "vptool").rglob("*")
                if p.is_file() and p.suffix in (".py", ".safetensors") and "__pycache__" not in p.parts}
    assert expected - names == set()


def test_the_unpacked_wheel_finds_its_own_recipes(wheel, tmp_path):
    """Installed from the wheel (here: unpacked, the files a wheel install lays out), vptool reads the recipes from
    its own package folder, not from a source tree."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import json, vptool.shipped as s; print(json.dumps([str(s.shipped_root()), sorted(s.shipped_recipes())]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    root, stems = json.loads(proc.stdout)
    assert Path(root) == site / "vptool" / "recipes"
    assert stems == STEMS


# ------------------------------------------------------------------------------------------------- recipes ls
def test_ls_json_lists_every_recipe_with_its_method():
    res = invoke_cli("recipes", "ls", "--json")
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)
    assert [e["name"] for e in entries] == STEMS
    methods = {p.stem: yaml.safe_load(p.read_text())["method"] for p in RECIPES.glob("*.yaml")}
    assert {e["name"]: e["method"] for e in entries} == methods
    assert {e["kind"] for e in entries} == {"recipe"}
    by_name = {e["name"]: e for e in entries}
    # read off the files' headers and keys by hand
    assert by_name["vpt_deep_mae_cub"]["paper_tables"] == ["GateVPT Table 1", "SPT Table 2"]
    assert by_name["vpt_deep_mae_cub"]["needs"] == ["fgvc-json data/fgvc/CUB_200_2011",
                                                    "checkpoints/mae_pretrain_vit_base.pth"]
    assert by_name["vpt_deep_in21k_cub"]["paper_tables"] == ["VPT Table 1"]
    assert by_name["vptm_beitv2_pcam"]["paper_tables"] == ["VPTM Table 3"]
    assert by_name["quickstart"]["paper_tables"] == [] and by_name["quickstart"]["needs"] == []
    assert by_name["vpt_swin_digits"]["needs"] == []  # random frozen backbone, bundled digits


def test_ls_text_has_one_line_per_recipe():
    res = invoke_cli("recipes", "ls")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0].split()[:2] == ["NAME", "METHOD"]
    assert [line.split()[0] for line in lines[1:]] == STEMS
    quick = next(line for line in lines if line.startswith("quickstart "))
    assert quick.split() == ["quickstart", "vpt-deep", "bundled"]


@pytest.fixture
def shipped_folder(tmp_path, monkeypatch) -> Path:
    """A shipped folder of two recipes and one table, in place of vptool's own."""
    folder = tmp_path / "shipped"
    (folder / "tables").mkdir(parents=True)
    for stem in ("quickstart", "vpt_deep_mae_cub"):
        shutil.copy(RECIPES / f"{stem}.yaml", folder)
    (folder / "tables" / "digits_depth.yaml").write_text(yaml.safe_dump(TABLE, sort_keys=False))
    monkeypatch.setattr(shipped, "shipped_root", lambda: folder)
    return folder


def test_ls_tables_lists_the_tables_too(shipped_folder):
    res = invoke_cli("recipes", "ls", "--tables", "--json")
    assert res.exit_code == 0, res.output
    entries = json.loads(res.stdout)
    assert [(e["kind"], e["name"]) for e in entries] == [("recipe", "quickstart"), ("recipe", "vpt_deep_mae_cub"),
                                                          ("table", "digits_depth")]
    table = entries[-1]
    assert table["title"] == TABLE["title"] and table["source"] == TABLE["source"]
    assert table["needs"] == ["data/fgvc/CUB_200_2011"] and table["recipes"] == ["linear_digits", "quickstart"]
    text = invoke_cli("recipes", "ls", "--tables")
    assert text.exit_code == 0 and "digits_depth" in text.stdout and TABLE["title"] in text.stdout
    plain = json.loads(invoke_cli("recipes", "ls", "--json").stdout)
    assert [e["kind"] for e in plain] == ["recipe", "recipe"]


def test_no_tables_folder_lists_none(shipped_folder):
    shutil.rmtree(shipped_folder / "tables")
    res = invoke_cli("recipes", "ls", "--tables")
    assert res.exit_code == 0, res.output
    assert "no benchmark tables shipped" in res.stdout
    assert shipped.shipped_tables() == {}


def test_resolve_table(shipped_folder, tmp_path, monkeypatch):
    assert shipped.resolve_table("digits_depth") == shipped_folder / "tables" / "digits_depth.yaml"
    assert shipped.resolve_table("digits_depth.yaml") == shipped_folder / "tables" / "digits_depth.yaml"
    mine = tmp_path / "digits_depth.yaml"
    mine.write_text("table: mine\n")
    monkeypatch.chdir(tmp_path)
    assert shipped.resolve_table("digits_depth.yaml") == Path("digits_depth.yaml")  # an existing path wins
    with pytest.raises(UserError) as exc:
        shipped.resolve_table("digits_dpth")
    msg = str(exc.value)
    assert "\n" not in msg and "digits_dpth" in msg and "did you mean digits_depth?" in msg


# ------------------------------------------------------------------------------------------------- recipes cp
def test_cp_copies_byte_for_byte(tmp_path):
    dest = tmp_path / "my.yaml"
    res = invoke_cli("recipes", "cp", "vpt_deep_mae_cub", str(dest))
    assert res.exit_code == 0, res.output
    assert dest.read_bytes() == (RECIPES / "vpt_deep_mae_cub.yaml").read_bytes()
    folder = tmp_path / "configs"
    folder.mkdir()
    res = invoke_cli("recipes", "cp", "quickstart.yaml", str(folder))
    assert res.exit_code == 0, res.output
    assert (folder / "quickstart.yaml").read_bytes() == (RECIPES / "quickstart.yaml").read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["configs", "my.yaml", "quickstart.yaml"]  # no leftovers


def test_cp_never_overwrites_without_force(tmp_path):
    dest = tmp_path / "my.yaml"
    dest.write_text("mine\n")
    res = invoke_cli("recipes", "cp", "quickstart", str(dest))
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and str(dest) in res.stderr and "--force" in res.stderr
    assert dest.read_text() == "mine\n"
    res = invoke_cli("recipes", "cp", "quickstart", str(tmp_path))  # the folder's quickstart.yaml: free
    assert res.exit_code == 0 and (tmp_path / "quickstart.yaml").is_file()
    res = invoke_cli("recipes", "cp", "quickstart", str(dest), "--force")
    assert res.exit_code == 0, res.output
    assert dest.read_bytes() == (RECIPES / "quickstart.yaml").read_bytes()


@pytest.mark.parametrize("args, needles", [
    (("quickstrat", "{tmp}/x.yaml"), ("quickstrat", "did you mean quickstart?", "vptool recipes ls")),
    (("no_such_recipe_at_all", "{tmp}/x.yaml"), ("no_such_recipe_at_all", "vptool recipes ls")),
    (("quickstart", "{tmp}/missing/x.yaml"), ("{tmp}/missing", "folder not found")),
])
def test_cp_bad_input_is_one_line(tmp_path, args, needles):
    res = invoke_cli("recipes", "cp", *(a.replace("{tmp}", str(tmp_path)) for a in args))
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0, res.stderr
    for needle in needles:
        assert needle.replace("{tmp}", str(tmp_path)) in res.stderr
    assert not list(tmp_path.rglob("*.yaml"))


# ----------------------------------------------------------------------------------------- train NAME, or a path
def test_train_takes_a_shipped_name(tmp_path):
    res = invoke_cli("train", "quickstart", "--dry-run", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert f"recipe: {RECIPES / 'quickstart.yaml'} (shipped)" in res.stderr
    plan = json.loads(res.stdout)
    assert plan["recipe"]["method"] == "vpt-deep" and plan["recipe"]["output"]["name"] == "quickstart"
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_an_existing_path_wins_over_a_shipped_name(tmp_path):
    recipe = yaml.safe_load((RECIPES / "linear_digits.yaml").read_text())
    (tmp_path / "quickstart.yaml").write_text(yaml.safe_dump(recipe))
    res = invoke_cli("train", "quickstart.yaml", "--dry-run", "--json", cwd=tmp_path)
    assert res.exit_code == 0, res.output
    assert "(shipped)" not in res.stderr
    assert json.loads(res.stdout)["recipe"]["method"] == recipe["method"] != "vpt-deep"


def test_train_unknown_name_suggests_the_closest(tmp_path):
    res = invoke_cli("train", "quickstrat", cwd=tmp_path)
    assert res.exit_code == 2
    line = res.stderr.strip()
    assert "\n" not in line and "quickstrat" in line and "not found" in line
    assert "did you mean quickstart?" in line and "vptool recipes ls" in line
