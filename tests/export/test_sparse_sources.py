"""relufy export on ReLU-family models trained elsewhere (relufy.modeling.formats), read directly
from their hub folders: predictors are trained and reported, and the PowerInfer layouts written
with the architecture that computes the model's FFN (llama for ReGLU, bamboo for dReLU)."""

from __future__ import annotations

import json
import shutil

import gguf
import pytest
import torch
from safetensors import safe_open
from tiny import corpus, save_tiny_with_tokenizer
from transformers import AutoModelForCausalLM

import relufy

FAST = ("--seq-len", "64", "--max-tokens", "2048", "--predictor-steps", "30")


def _rewrite(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _gguf(path, tmp_path) -> gguf.GGUFReader:
    """PowerInfer's GGUF (magic PWRI) read by gguf's reader from a copy with the GGUF magic."""
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(path, copy)
    with open(copy, "r+b") as f:
        assert f.read(4) == b"PWRI"
        f.seek(0)
        f.write(b"GGUF")
    return gguf.GGUFReader(copy)


def _ids(seed=5):
    return torch.randint(3, 90, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse-sources")
    out = {"root": root}
    save_tiny_with_tokenizer("llama", root / "relullama", hidden_act="relu")  # ReluLLaMA's config: a Llama, relu
    out["relullama"] = root / "relullama"
    save_tiny_with_tokenizer("llama", root / "prosparse", hidden_act="relu")
    _rewrite(
        root / "prosparse",
        model_type="sparsellama",
        architectures=["SparseLlamaForCausalLM"],
        hidden_act="fatrelu",
        hidden_act_param=0.01,
        auto_map={"AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM"},
    )
    out["prosparse"] = root / "prosparse"
    save_tiny_with_tokenizer("mistral", root / "bamboo", hidden_act="relu")
    _rewrite(root / "bamboo", model_type="bamboo", architectures=["BambooForCausalLM"])
    out["bamboo"] = root / "bamboo"
    save_tiny_with_tokenizer("mixtral", root / "mixtral-relu", hidden_act="relu")
    out["mixtral"] = root / "mixtral-relu"
    save_tiny_with_tokenizer("llama", root / "swiglu")
    out["swiglu"] = root / "swiglu"
    (root / "corpus.txt").write_text(corpus()[:40000])
    out["data"] = root / "corpus.txt"
    return out


def test_relu_llama_to_powerinfer_folder_directly(cli, sources, tmp_path):
    """A ReluLLaMA-style folder, no conversion: predictors with their report, and PowerInfer's llama
    architecture (relu(gate) * up in its sparse FFN), which stock transformers loads as the source."""
    out = tmp_path / "pi"
    code, err, _ = cli(
        "export", sources["relullama"], out, "--data", sources["data"], "--predictors", "--layout", "powerinfer",
        "--json", tmp_path / "summary.json", *FAST,
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_act"] == "relu" and "auto_map" not in config
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["predictors"]) == 2 and all(0 < p["recall"] <= 1 for p in summary["predictors"])
    assert summary["ppl_dense"] > 0 and summary["ppl_predicted"] > 0
    assert (out / "predictor" / "model_1.pt").is_file() and (out / "activation" / "activation_0.pt").is_file()
    ids = _ids()
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(sources["relullama"]).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits  # stock class, no remote code
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    card = (out / "README.md").read_text()
    assert "relu(gate) * up, this model's function" in card


def test_relu_llama_gguf_is_powerinfers_llama_architecture(cli, sources, tmp_path):
    out = tmp_path / "gguf"
    code, err, _ = cli(
        "export", sources["relullama"], out, "--data", sources["data"], "--predictors", "--layout", "powerinfer-gguf", *FAST
    )
    assert code == 0, err
    reader = _gguf(out / "model.gguf", tmp_path)
    arch = reader.get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    assert reader.get_field("llama.feed_forward_length") is not None and reader.get_field("bamboo.block_count") is None
    names = {t.name for t in reader.tensors}
    assert {"blk.0.fc1.weight", "blk.1.fc2.weight", "blk.0.ffn_down_t.weight"} <= names


def test_bamboo_gguf_stays_bamboo(cli, sources, tmp_path):
    out = tmp_path / "bamboo"
    code, err, _ = cli(
        "export", sources["bamboo"], out, "--data", sources["data"], "--predictors", "--layout", "powerinfer-gguf", *FAST
    )
    assert code == 0, err
    arch = _gguf(out / "model.gguf", tmp_path).get_field("general.architecture")
    assert bytes(arch.parts[arch.data[0]]).decode() == "bamboo"


def test_prosparse_hf_keeps_the_threshold_and_powerinfer_says_it_drops_it(cli, sources, tmp_path):
    out = tmp_path / "hf"
    code, err, _ = cli("export", sources["prosparse"], out, "--data", sources["data"], "--predictors", *FAST)
    assert code == 0, err
    block = json.loads((out / "config.json").read_text())["relufy"]
    assert block["activation"] == "fatrelu" and block["threshold"] == 0.01
    assert block["source_format"] == "a ProSparse model (SparseLlamaForCausalLM, FATReLU threshold 0.01)"
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(relufy.load(out)(ids).logits, relufy.load(sources["prosparse"])(ids).logits)
    assert len(relufy.modeling.predictor.load_predictors(out)) == 2
    code, err, _ = cli(
        "export", sources["prosparse"], tmp_path / "pi", "--data", sources["data"], "--predictors", "--layout", "powerinfer",
        *FAST,
    )  # fmt: skip
    assert code == 0, err
    assert "computes relu(gate) * up with no threshold" in err and "FATReLU threshold 0.01" in err
    assert json.loads((tmp_path / "pi" / "config.json").read_text())["model_type"] == "llama"


def test_relu_moe_gets_per_expert_predictors(cli, sources, tmp_path):
    """A ReLU Mixtral: no engine reads MoE predictors, so hf (or per-expert predictor folders)."""
    code, err, _ = cli(
        "export", sources["mixtral"], tmp_path / "gguf", "--data", sources["data"], "--predictors", "--layout", "powerinfer-gguf",
        *FAST,
    )  # fmt: skip
    assert code == 2 and "takes dense dReLU models" in err and "this is a reglu mixtral model" in err and "\n" not in err
    out = tmp_path / "hf"
    code, err, _ = cli("export", sources["mixtral"], out, "--data", sources["data"], "--predictors", *FAST)
    assert code == 0, err
    with safe_open(out / "predictors.safetensors", "pt") as f:
        names = set(f.keys())
    assert {f"model.layers.{i}.mlp.experts.{e}.predictor.fc1.weight" for i in range(2) for e in range(4)} <= names


def test_a_swiglu_model_still_needs_converting(cli, sources, tmp_path):
    code, err, _ = cli("export", sources["swiglu"], tmp_path / "out", "--data", sources["data"], "--predictors", *FAST)
    assert code == 2 and "a llama model with activation silu, which gives no exact zeros: convert it first" in err
