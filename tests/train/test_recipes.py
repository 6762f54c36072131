"""The recipes shipped inside the package: found by name, listed, copied, run by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_with_tokenizer

import relufy
from relufy.errors import RelufyError
from relufy.pipelines import cluster
from relufy.train import recipes
from relufy.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def test_recipes_live_in_the_package():
    folder = recipes.root()
    assert folder == Path(relufy.__file__).parent / "recipes"
    files = sorted(folder.glob("*.yaml"))
    assert [r.name for r in recipes.shipped("train")] == [p.stem for p in files] and len(files) >= 12
    assert {r.name for r in recipes.shipped("accelerate")} == {"accelerate/ddp", "accelerate/fsdp2", "accelerate/fsdp2-multinode"}
    # a clone keeps its recipes/ paths (Makefile, docs): the top-level folder is the package's
    assert (ROOT / "recipes").resolve() == folder.resolve()
    assert (ROOT / "recipes" / "accelerate" / "fsdp2.yaml").is_file()


def test_every_recipe_says_what_it_is_for():
    """Its header's first line is a whole phrase: not empty, not cut mid-sentence."""
    for recipe in recipes.shipped():
        summary = recipe.summary
        assert len(summary) >= 20, recipe.name
        assert not summary.endswith((",", "(", ":", " the", " a")), (recipe.name, summary)
        assert not summary.startswith("#")


def test_header_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("#\n#   First words.\n# second\nname: x\n")
    assert recipes.header_line(path) == "First words."
    path.write_text("name: x\n# not a header\n")
    assert recipes.header_line(path) == ""


def test_find_and_resolve(tmp_path, monkeypatch):
    demo = recipes.root() / "demo-smollm2-cpu.yaml"
    assert recipes.find("demo-smollm2-cpu").path == demo
    assert recipes.find("demo-smollm2-cpu.yaml").path == demo
    assert recipes.find("accelerate/fsdp2").path == recipes.root() / "accelerate" / "fsdp2.yaml"
    with pytest.raises(RelufyError, match="no training recipe named 'accelerate/fsdp2'; shipped: ablation-300m-drelu, "):
        recipes.find("accelerate/fsdp2", "train")
    monkeypatch.chdir(tmp_path)
    assert recipes.resolve("demo-smollm2-cpu") == demo
    # a path wins when it exists
    (tmp_path / "demo-smollm2-cpu").write_text("name: mine\n")
    assert recipes.resolve("demo-smollm2-cpu") == Path("demo-smollm2-cpu")
    with pytest.raises(RelufyError) as e:
        recipes.resolve("no-such-recipe")
    message = str(e.value)
    assert "\n" not in message and message.startswith("recipe no-such-recipe not found: no such file, nor a shipped recipe (")
    assert all(r.name in message for r in recipes.shipped("train")) and "accelerate/" not in message


def test_load_recipe_by_name():
    recipe = load_recipe("demo-smollm2-cpu", ["budget.max_steps=3"])
    assert recipe.name == "demo-smollm2" and recipe.budget.max_steps == 3
    shipped = yaml.safe_load((recipes.root() / "smollm2-recovery-cpu.yaml").read_text())
    assert load_recipe("smollm2-recovery-cpu").name == shipped["name"]


def test_copy(tmp_path):
    source = (recipes.root() / "demo-smollm2-cpu.yaml").read_bytes()
    into = recipes.copy("demo-smollm2-cpu", tmp_path)  # a folder: NAME.yaml inside it
    assert into == tmp_path / "demo-smollm2-cpu.yaml" and into.read_bytes() == source
    dest = recipes.copy("accelerate/fsdp2", tmp_path / "sub" / "mine.yaml")
    assert yaml.safe_load(dest.read_text())["distributed_type"] == "FSDP"
    dest.write_text("edited\n")
    with pytest.raises(RelufyError, match=r"mine\.yaml exists \(--force replaces it\)$"):
        recipes.copy("accelerate/fsdp2", dest)
    assert dest.read_text() == "edited\n"  # left as it was
    recipes.copy("accelerate/fsdp2", dest, force=True)
    assert dest.read_bytes() == (recipes.root() / "accelerate" / "fsdp2.yaml").read_bytes()
    with pytest.raises(RelufyError, match="no recipe named 'nope'"):
        recipes.copy("nope", tmp_path / "x.yaml")
    assert not (tmp_path / "x.yaml").exists()
    # atomic: nothing but the copies is left behind (no temporary or lock files)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["demo-smollm2-cpu.yaml", "mine.yaml", "sub"]


def test_recipes_commands(cli, tmp_path):
    code, err, out = cli("recipes", "list")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(recipes.shipped())
    for line, recipe in zip(lines, recipes.shipped(), strict=True):
        name, summary = line.split(maxsplit=1)
        assert (name, summary) == (recipe.name, recipe.summary)
    code, err, out = cli("recipes", "copy", "smollm2-recovery-cpu", tmp_path)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'smollm2-recovery-cpu.yaml'}", err
    code, err, _ = cli("recipes", "copy", "smollm2-recovery-cpu", tmp_path)
    assert code == 2 and err == f"relufy: error: {tmp_path / 'smollm2-recovery-cpu.yaml'} exists (--force replaces it)"
    code, err, _ = cli("recipes", "copy", "smollm2-recovery-cpu", tmp_path, "--force")
    assert code == 0, err
    code, err, _ = cli("recipes", "copy", "nope", tmp_path)
    assert code == 2 and len(err.splitlines()) == 1 and "demo-smollm2-cpu" in err


def test_train_takes_a_recipe_name(cli, tmp_path):
    model = tmp_path / "tiny"
    save_tiny_with_tokenizer("llama", model)
    overrides = [f"model.path={model}", f"output_dir={tmp_path / 'run'}", "data.seq_len=32", "budget.max_steps=2"]
    overrides.append("optim.warmup_steps=1")  # the dry run refuses what the run would: a warmup past its 2 steps
    code, err, out = cli("train", "demo-smollm2-cpu", *overrides, "--dry-run")
    assert code == 0, err
    resolved = yaml.safe_load(out)
    assert resolved["name"] == "demo-smollm2" and resolved["budget"]["max_steps"] == 2
    assert resolved["model"]["path"] == str(model)
    code, err, _ = cli("train", "demo-smollm2", "--dry-run")
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("relufy: error: recipe demo-smollm2 not found: no such file, nor a shipped recipe (")
    assert "demo-smollm2-cpu" in err


def test_cluster_pipelines_use_shipped_recipes(tmp_path, capsys, monkeypatch):
    for pipeline in cluster.PIPELINES.values():
        assert recipes.find(pipeline.recipe, "train").path.is_file()
    monkeypatch.chdir(tmp_path)  # the recipe and the default accelerate config come from the package
    code = cluster.main(["mistral", "--dry-run", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "ok: recipe turbosparse-mistral-7b: valid" in out
    assert "ok: accelerate config fsdp2.yaml: FSDP, 8 processes on 1 machine(s)" in out
    assert f"--config_file {recipes.root() / 'accelerate' / 'fsdp2.yaml'}" in out
    assert "-m relufy train turbosparse-mistral-7b model.path=" in out
