"""What OUT holds: weights, dtypes, shards, side files, config block, code, atomicity."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from safetensors import safe_open
from tiny import MOE_FAMILIES, save_tiny, tiny_model

import relufy
from relufy.modeling.remote import imported_modules
from relufy.names import MODELING_FILE


def tensors(folder):
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture
def sharded(tmp_path):
    src = tmp_path / "src"
    tiny_model("mixtral").save_pretrained(src, max_shard_size="40KB")
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "README.md").write_text("original card")
    return src


def test_weights_copied_bit_exact_with_side_files(tmp_path, sharded):
    out = relufy.convert(sharded, tmp_path / "out")
    assert len(list(out.glob("*.safetensors"))) > 1
    for f in sharded.glob("*.safetensors"):
        assert (out / f.name).read_bytes() == f.read_bytes()
    assert (
        json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
        == json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    )
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert (out / name).read_bytes() == (sharded / name).read_bytes()
    card = (out / "README.md").read_text()
    # the source by its folder name: never a path of the machine that converted it
    assert "drelu" in card and "trust_remote_code=True" in card and f"`{sharded.name}`" in card
    assert str(sharded) not in card and str(sharded) not in (out / "config.json").read_text()


def test_config_block(tmp_path, sharded):
    out = relufy.convert(sharded, tmp_path / "out", activation="fatrelu", threshold=0.25)
    config = json.loads((out / "config.json").read_text())
    block = config["relufy"]
    assert block["activation"] == "fatrelu" and block["threshold"] == 0.25
    assert block["base_model_type"] == "mixtral" and block["base_activation"] == "silu"
    assert block["base_architectures"] == ["MixtralForCausalLM"]
    assert block["source"] == sharded.name and block["relufy_version"] == relufy.__version__
    assert config["model_type"] == "relufy_mixtral" and config["hidden_act"] == "relufy_fatrelu"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_relufy.RelufyForCausalLM"


def test_generated_code_imports_only_what_transformers_needs(tmp_path, sharded):
    out = relufy.convert(sharded, tmp_path / "out")
    # safetensors (for the export's predictors) is one of transformers' own requirements
    assert imported_modules((out / MODELING_FILE).read_text()) == {"torch", "transformers", "contextlib", "safetensors"}


def test_swiglu_is_identity(tmp_path, sharded):
    out = relufy.convert(sharded, tmp_path / "out", activation="swiglu")
    config = json.loads((out / "config.json").read_text())
    original = json.loads((sharded / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "relufy"} == original
    assert not (out / MODELING_FILE).exists()


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_reencodes_tensor_by_tensor(tmp_path, sharded, dtype, torch_dtype):
    out = relufy.convert(sharded, tmp_path / "out", dtype=dtype)
    before, after = tensors(sharded), tensors(out)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == torch_dtype
        assert torch.equal(after[k], v.to(torch_dtype))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in after.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]
    model = relufy.load(out)
    assert next(model.parameters()).dtype == torch_dtype


def test_link_hardlinks_shards(tmp_path, sharded):
    out = relufy.convert(sharded, tmp_path / "out", link=True)
    for f in sharded.glob("*.safetensors"):
        assert os.stat(out / f.name).st_ino == os.stat(f).st_ino


def test_force_replaces_whole(tmp_path, sharded):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    relufy.convert(sharded, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir() if "relufy-" in p.name] == []


def test_reconvert_relufy_checkpoint(tmp_path, sharded):
    """A relufy checkpoint converts again (e.g. to another activation or dtype) from its base."""
    first = relufy.convert(sharded, tmp_path / "a", activation="drelu")
    second = relufy.convert(first, tmp_path / "b", activation="reglu", dtype="bf16")
    block = json.loads((second / "config.json").read_text())["relufy"]
    assert block["activation"] == "reglu" and block["base_model_type"] == "mixtral"
    assert block["base_activation"] == "silu"


def test_failure_leaves_nothing(tmp_path, sharded, monkeypatch):
    conv = sys.modules["relufy.conversion"]

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(conv, "render_modeling", boom)
    with pytest.raises(RuntimeError):
        relufy.convert(sharded, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_experts_kernels_refused(tmp_path, family):
    model = relufy.load(save_tiny(family, tmp_path / "m") and tmp_path / "m", activation="drelu")
    model.config._experts_implementation = "sonicmoe"
    with pytest.raises(NotImplementedError, match="sonicmoe"):
        model(torch.tensor([[3, 4, 5]]))


def test_output_is_readable_by_others(tmp_path, sharded):
    old = os.umask(0o022)
    try:
        out = relufy.convert(sharded, tmp_path / "out")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755


def test_config_without_activation_key_uses_the_default(tmp_path, sharded):
    config = json.loads((sharded / "config.json").read_text())
    del config["hidden_act"]
    (sharded / "config.json").write_text(json.dumps(config))
    out = relufy.convert(sharded, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["relufy"]["base_activation"] == "silu"
