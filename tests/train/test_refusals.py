"""relufy train refuses bad recipes and paths with one line (exit 2, no traceback), before it
writes anything: every file that existed is byte-identical afterwards."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml
from safety import Snapshot, assert_refused
from tiny import save_tiny_with_tokenizer
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
    raw["model"] = _scratch_model(base)
    raw["model"]["config"]["max_position_embeddings"] = 16
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


# ---- round two: what a dry run passed and the run then failed on, silent coercions, unbounded input ----


def _scratch_model(base) -> dict:
    return {
        "config": {
            "model_type": "llama",
            "max_position_embeddings": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "vocab_size": 96,
        },
        "tokenizer": str(base / "llama"),
    }


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["model.activation=bogus"], "unknown activation 'bogus'"),
        (["model.activation=fatrelu", "model.threshold=-1"], "threshold must be >= 0"),
        (["model.threshold=0.5"], "model.threshold needs model.activation: fatrelu"),
        (["lora.target_modules=[nope]"], "lora.target_modules: 'nope' names no module"),
        (["lora.target_modules=[q_proj, nope]"], "lora.target_modules: 'nope' names no module"),
        (["lora.target_modules=[q_proj]", "lora.target_parameters=[nope.weight]"], "'nope.weight' names no parameter"),
        (["optim.betas=[2, -1]"], "optim.betas.0"),
        (["sparsity.distill.teacher=MISSING"], "no such model folder or file"),
        (["sparsity.ffn_warmstart={tokens: 64, steps: 1}", "sparsity.distill.teacher=SCRATCH"], "hidden_size"),
        (["seed=4294967296"], "seed"),
        (["optim.warmup_steps=5"], "optim.warmup_steps (5) must be below the run's 5 steps"),
        (["model.tokenizer=MISSING"], "no such model folder or file"),
    ],
    ids=[
        "activation",
        "threshold",
        "threshold-alone",
        "lora-target",
        "lora-one-bad-target",
        "lora-parameter",
        "betas",
        "teacher",
        "teacher-shape",
        "seed",
        "warmup",
        "tokenizer",
    ],
)
def test_dry_run_refuses_what_the_run_refuses(base, tmp_path, cli, overrides, needle, dry_run):
    """Each passed --dry-run and then failed the run (most with a traceback): now both refuse,
    on one line, having written nothing."""
    scratch = tmp_path / "scratch"
    if any("SCRATCH" in o for o in overrides):
        save_tiny_with_tokenizer("llama", scratch, hidden_size=64, intermediate_size=96)
    overrides = [o.replace("MISSING", str(tmp_path / "missing")).replace("SCRATCH", str(scratch)) for o in overrides]
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, *overrides, *(["--dry-run"] if dry_run else []))
    assert_refused(snap, code, err, needle)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("key,value", [("hidden_size", -32), ("num_hidden_layers", 0), ("vocab_size", True)])
def test_negative_sizes_in_model_config(base, tmp_path, cli, key, value, dry_run):
    raw = recipe_dict(base, tmp_path / "out")
    raw["model"] = _scratch_model(base)
    raw["model"]["config"][key] = value
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, *(["--dry-run"] if dry_run else []))
    assert_refused(snap, code, err, f"model.config: {key} must be a positive whole number")


def test_dry_run_of_a_scratch_config_builds_it(base, tmp_path, cli):
    """The meta-device build also passes what is good: a scratch config with LoRA on its q_proj."""
    raw = recipe_dict(base, tmp_path / "out", lora={"r": 2, "target_modules": ["q_proj"]})
    raw["model"] = _scratch_model(base)
    code, err, out = cli("train", write_recipe(tmp_path / "r.yaml", raw), "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)["lora"]["target_modules"] == ["q_proj"] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "where,value,needle",
    [
        ("file", {"budget__max_steps": True}, "budget.max_steps: Input should be a valid integer, got boolean true"),
        ("override", "budget.max_steps=true", "budget.max_steps: Input should be a valid integer, got boolean true"),
        ("override", "log.every=2.5", "log.every: Input should be a valid integer, got number 2.5"),
        ("override", "optim.lr=true", "optim.lr: expected a number, got the boolean true"),
        ("override", "model.gradient_checkpointing=1", "model.gradient_checkpointing: Input should be a valid boolean"),
        ("override", "lora.target_modules=[]", "lora: target_modules is empty and so is target_parameters"),
        ("override", "lora={target_modules: []}", "nothing to adapt"),
    ],
    ids=["bool-steps-file", "bool-steps", "float-steps", "bool-lr", "int-switch", "no-lora-targets", "lora-only-empty"],
)
def test_no_silent_coercion(base, tmp_path, cli, where, value, needle):
    raw = recipe_dict(base, tmp_path / "out", **(value if where == "file" else {}))
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, *([value] if where == "override" else []), "--dry-run")
    assert_refused(snap, code, err, needle)


def test_yaml_1_1_exponents_are_still_numbers(base, tmp_path, cli):
    """`1e-4` is a string to YAML 1.1: recipes and the README's overrides keep reading it as a number."""
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, tmp_path / "out"))
    code, err, out = cli("train", path, "optim.lr=1e-4", "optim.min_lr=1e-5", "--dry-run")
    assert code == 0, err
    assert yaml.safe_load(out)["optim"]["lr"] == 1e-4


def _top_level(raw: dict) -> list[str]:
    """One ``key: flow-value`` line per top-level entry."""
    return [f"{k}: {json.dumps(v)}" for k, v in raw.items()]  # JSON is YAML


@pytest.mark.parametrize(
    "text,lines,key",
    [
        ("budget: {max_steps: 2}\nbudget: {max_steps: 3}\n", (1, 2), "budget"),
        ("budget:\n  max_steps: 2\n  max_steps: 3\n", (2, 3), "max_steps"),
    ],
    ids=["section", "field"],
)
def test_duplicate_keys_are_refused(base, tmp_path, cli, text, lines, key):
    """YAML loaders keep the last of two equal keys: the first one's value was lost silently."""
    raw = recipe_dict(base, tmp_path / "out")
    del raw["budget"]
    head = _top_level(raw)
    (tmp_path / "r.yaml").write_text("\n".join(head) + "\n" + text)
    first, second = (len(head) + n for n in lines)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", tmp_path / "r.yaml", "--dry-run")
    assert_refused(snap, code, err, f"line {second}: key '{key}' appears twice in one mapping (first on line {first})")


def test_merge_keys_still_override():
    """``<<: *base`` followed by one of its keys is YAML's override, not a duplicate."""
    from relufy.train import recipe_yaml

    assert recipe_yaml.load("d: &d {a: 1, b: 2}\ne: {<<: *d, a: 3}\n", "t") == {"d": {"a": 1, "b": 2}, "e": {"a": 3, "b": 2}}


BOMB = "\n".join(
    [f"{chr(97)}: &{chr(97)} [x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join([f'*{chr(96 + i)}'] * 9)}]" for i in range(1, 9)]
)


@pytest.mark.parametrize("where", ["file", "override"])
def test_alias_bomb_is_refused_at_once(base, tmp_path, where):
    """9 lines that expand to 9^9 values: refused while composing, before anything walks them
    (a subprocess, so that the hang this was shows as a timeout)."""
    import subprocess
    import sys
    import time

    raw = recipe_dict(base, tmp_path / "out")
    if where == "file":
        (tmp_path / "r.yaml").write_text("\n".join(_top_level(raw)) + "\n" + BOMB + "\n")
        extra = []
    else:
        write_recipe(tmp_path / "r.yaml", raw)
        extra = ["extra={" + BOMB.replace("\n", ", ") + "}"]
    snap = Snapshot(tmp_path)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "relufy", "train", str(tmp_path / "r.yaml"), *extra, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.perf_counter() - started < 60
    assert_refused(snap, proc.returncode, proc.stderr.strip(), "aliases expand to more than 100,000 values")


@pytest.mark.parametrize(
    "where,text,needle",
    [
        ("file", "a: &a [*a]\n", "an alias refers to a collection that contains it (a recursive alias)"),
        ("file", "a: &a {b: *a}\n", "a recursive alias"),
        ("override", "extra=&a [*a]", "override extra: line 1: an alias refers to a collection that contains it"),
        ("file", "a: " + "[" * 10_000 + "]" * 10_000 + "\n", "nested more than 64 levels deep"),
        ("override", "extra=" + "[" * 10_000 + "]" * 10_000, "override extra: line 1: nested more than 64 levels deep"),
        ("override", "extra=" + "{a: " * 100 + "1" + "}" * 100, "nested more than 64 levels deep"),
        ("override", "a" + ".a" * 10_000 + "=1", "10,001 levels of keys; a recipe nests at most 64"),
        ("override", "a" + ".a" * 40 + "=" + "[" * 40 + "]" * 40, "nested more than 64 levels deep"),
        ("file", "budget: {max_steps: " + "9" * 5000 + "}\n", "an integer of 5,000 characters"),
        ("override", "budget.max_steps=" + "9" * 5000, "override budget.max_steps: line 1: an integer of 5,000 characters"),
        ("override", "budget.max_steps=" + "9" * 30, "budget.max_steps: an integer of 30 digits is out of range"),
        ("override", "seed=-" + "9" * 30, "seed: an integer of 30 digits is out of range"),
    ],
    ids=[
        "recursive-list",
        "recursive-map",
        "recursive-override",
        "deep-file",
        "deep-override",
        "deep-map-override",
        "deep-key",
        "deep-key-and-value",
        "digits-file",
        "digits-override",
        "int64-override",
        "negative-int64",
    ],
)
def test_unbounded_recipe_input_is_refused(base, tmp_path, cli, where, text, needle):
    raw = recipe_dict(base, tmp_path / "out")
    if where == "file":
        raw.pop("budget") if text.startswith("budget") else None
        (tmp_path / "r.yaml").write_text("\n".join(_top_level(raw)) + "\n" + text)
        overrides = []
    else:
        write_recipe(tmp_path / "r.yaml", raw)
        overrides = [text]
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", tmp_path / "r.yaml", *overrides, "--dry-run")
    assert_refused(snap, code, err, needle)
    assert len(err) < 600  # the message quotes what it must, not the input


def test_validate_bounds_python_dicts(base, tmp_path):
    """relufy.train.recipe.validate walks without recursion: a dict that holds itself, or a bomb
    built in Python, is refused on one line too."""
    from relufy.errors import RelufyError
    from relufy.train.recipe import validate

    raw = recipe_dict(base, tmp_path / "out")
    raw["model"]["config_loop"] = raw["model"]
    with pytest.raises(RelufyError, match="nested more than 64 levels deep"):
        validate(raw)
    raw = recipe_dict(base, tmp_path / "out")
    level = ["x"] * 10
    for _ in range(8):
        level = [level] * 10
    raw["extra"] = level
    with pytest.raises(RelufyError, match="more than 100,000 values"):
        validate(raw)


@pytest.mark.parametrize(
    "name",
    ["../../../../somewhere", "a/b", ".", "..", ".hidden", "run\nrelufy: error: forged", "red\x1b[31mrun", "x" * 101, ""],
    ids=["dotdot", "slash", "dot", "dotdot-alone", "hidden", "newline", "escape", "long", "empty"],
)
@pytest.mark.parametrize("trackers", [[], ["tensorboard"]], ids=["plain", "tensorboard"])
def test_name_is_a_safe_label(base, tmp_path, cli, name, trackers):
    """The name became a folder (TensorBoard's event files, outside the run with ../) and went raw
    into the logs (newlines, escape codes): now letters, digits, '.', '_', '-' only."""
    out = tmp_path / "a" / "b" / "c" / "d" / "out"  # ../../../../somewhere from it stays in tmp_path: seen by the snapshot
    raw = recipe_dict(base, out, name=name, log__trackers=trackers, budget__max_steps=2)
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, "is not a run name: use letters, digits")
    assert "\x1b" not in err


def test_tracker_folder_must_not_be_a_run_folder(base, tmp_path, cli):
    raw = recipe_dict(base, tmp_path / "out", name="checkpoints", log__trackers=["tensorboard"])
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, "--dry-run")
    assert_refused(snap, code, err, "name 'checkpoints'", "choose another name")


@pytest.mark.parametrize(
    "family,lora,needle",
    [
        ("llama", {"target_modules": ["q_proj", "v_prj"]}, "'v_prj' names no module of LlamaForCausalLM"),
        ("mixtral", {}, "'gate_proj' names no module of MixtralForCausalLM and adapts nothing"),
        ("mixtral", {"target_modules": ["q_proj"], "target_parameters": ["experts.gate_up_proj"]}, None),
        ("qwen3_moe", {"target_modules": ["q_proj", "gate_proj", "up_proj"]}, None),  # peft fuses them: not dropped
        ("llama", {"target_modules": [], "target_parameters": ["mlp.gate_proj.weight"]}, None),
    ],
    ids=["typo-beside-good", "mixtral-defaults", "mixtral-experts", "qwen3-moe-fused", "parameters-only"],
)
def test_lora_targets_that_peft_would_drop(family, lora, needle):
    """peft refuses targets only when none matches: one that matches nothing beside others that do
    was dropped without a word. Every target must now adapt something; [] with target_parameters
    adapts those parameters alone (peft's default modules are not added)."""
    from tiny import tiny_model

    from relufy.errors import RelufyError
    from relufy.train.checks import _attach_lora
    from relufy.train.recipe import LoraSpec

    spec = LoraSpec(**lora)
    if needle:
        with pytest.raises(RelufyError, match=re.escape(needle)):
            _attach_lora(lambda: tiny_model(family), spec)
        return
    model = _attach_lora(lambda: tiny_model(family), spec)
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_" in n}
    if family == "llama":
        assert adapted == {"gate_proj"}


def test_a_recipe_that_is_a_pipe_is_refused_without_blocking(tmp_path, cli):
    import os

    os.mkfifo(tmp_path / "recipe.yaml")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", tmp_path / "recipe.yaml", "--dry-run")
    assert_refused(snap, code, err, "named pipe")
