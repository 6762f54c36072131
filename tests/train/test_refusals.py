"""relufy train refuses bad recipes and paths with one line (exit 2, no traceback), before it
writes anything: every file that existed is byte-identical afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from safety import Snapshot, assert_refused
from trainkit import recipe_dict, write_recipe


@pytest.fixture
def world(base, tmp_path):
    """A project folder holding a model, a tokenizer, a teacher and text of its own."""
    shutil.copytree(base / "llama-drelu", tmp_path / "model")
    shutil.copytree(base / "llama", tmp_path / "teacher")
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "model" / name, tmp_path / "tok" / name)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "text.txt").write_text((base / "text.txt").read_text()[:20_000])
    return tmp_path


def world_recipe(world, out, **overrides):
    raw = recipe_dict(world, out, **overrides)
    raw["model"] = {"path": str(world / "model"), "tokenizer": str(world / "tok")}
    raw["data"]["sources"] = [{"data": str(world / "data" / "text.txt")}]
    raw["sparsity"] = {"distill": {"teacher": str(world / "teacher")}}
    return raw


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "not a text file"),
        (b"- name: t\n- output_dir: out\n", "not a list"),
        (b"just a sentence\n", "not a string"),
        (b"42\n", "not a number"),
        (b"name: [unclosed\n", "not valid YAML"),
    ],
    ids=["binary", "list", "string", "number", "bad-yaml"],
)
def test_recipe_file_that_is_not_a_mapping(tmp_path, cli, content, needle):
    (tmp_path / "r.yaml").write_bytes(content)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", tmp_path / "r.yaml", "optim.lr=1e-4")
    assert_refused(snap, code, err, needle)


@pytest.mark.parametrize(
    "where,value,field",
    [
        ("file", {"optim__lr": float("inf")}, "optim.lr"),
        ("override", "optim.lr=.inf", "optim.lr"),
        ("override", "optim.min_lr=.nan", "optim.min_lr"),
        ("override", "optim.betas=[0.9, .nan]", "optim.betas.1"),
        ("override", "sparsity.l1=-.inf", "sparsity.l1"),
        ("override", "model.threshold=.inf", "model.threshold"),
        ("override", "lora.alpha=.inf", "lora.alpha"),
        (
            "file",
            {"model": {"config": {"model_type": "llama", "rope_theta": float("inf")}, "tokenizer": "x"}},
            "model.config.rope_theta",
        ),
    ],
)
def test_non_finite_numbers_are_refused(base, tmp_path, cli, where, value, field):
    raw = recipe_dict(base, tmp_path / "out", **(value if where == "file" else {}))
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, *([value] if where == "override" else []))
    assert_refused(snap, code, err, field, "finite")


@pytest.mark.parametrize(
    "out,needle",
    [
        ("model", "is model.path"),
        ("data/../model", "is model.path"),
        ("link-to-model", "is model.path"),
        ("model/sub", "is inside model.path"),
        (".", "contains model.path"),
        ("tok", "is model.tokenizer"),
        ("teacher/run", "is inside sparsity.distill.teacher"),
        ("data/text.txt", "data.sources.0.data"),
        ("data", "contains data.sources.0.data"),
    ],
)
def test_output_dir_around_an_input(world, cli, out, needle):
    (world / "link-to-model").symlink_to(world / "model")
    path = write_recipe(world.parent / f"{world.name}.yaml", world_recipe(world, world / out))
    snap = Snapshot(world)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, needle, "choose another output_dir")


def test_output_dir_that_is_a_file(base, tmp_path, cli):
    (tmp_path / "out").write_text("a file")
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, "--resume")
    assert_refused(snap, code, err, "exists and is not a folder")


def test_seq_len_beyond_the_models_context(base, tmp_path, cli):
    """Same style as relufy eval --seq-len: the context comes from config.json, before loading."""
    limit = json.loads((base / "llama-drelu" / "config.json").read_text())["max_position_embeddings"]
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, f"data.seq_len={limit + 1}")
    assert_refused(snap, code, err, f"data.seq_len {limit + 1} exceeds the model's context of {limit} tokens")


def test_seq_len_beyond_a_scratch_configs_context(base, tmp_path, cli):
    raw = recipe_dict(base, tmp_path / "out")
    raw["model"] = {
        "config": {
            "model_type": "llama",
            "max_position_embeddings": 16,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 96,
        },
        "tokenizer": str(base / "llama"),
    }
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, "data.seq_len 32 exceeds the model's context of 16 tokens (model.config)")


def test_dry_run_also_refuses_non_finite(base, tmp_path, cli):
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    code, err, out = cli("train", path, "optim.lr=.inf", "--dry-run")
    assert code == 2 and "optim.lr" in err and "Infinity" not in out and ".inf" not in out
    code, _, out = cli("train", path, "--dry-run")
    assert code == 0 and yaml.safe_load(out)["optim"]["lr"] == 1e-3
