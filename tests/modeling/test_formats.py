"""ReLU-family models trained elsewhere (relufy.modeling.formats): each published format, built
from its published config on a tiny seeded model, is read as the function it computes.

The references are independent of relufy: the stock transformers model of the source's family,
its activation that of the source's config (``relu``, ``relu2``), or the published modeling code
of the format written out here (ProSparse's ``fat_relu``, Bamboo's ``BambooMLP.forward``).
"""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny import FAMILIES, save_tiny_with_tokenizer
from transformers import AutoModelForCausalLM

import relufy
from relufy.errors import RelufyError
from relufy.families import FAMILIES as TABLE
from relufy.modeling.formats import recognise


def _ids(n=2, length=16, seed=3):
    return torch.randint(3, 90, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(ids).logits


def _rewrite(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        config.pop(key)
    (folder / "config.json").write_text(json.dumps(config))


def _stock(folder, family="llama", **changes):
    """The stock transformers model of a folder whose config is rewritten back to ``family``."""
    from transformers import AutoConfig

    config = json.loads((folder / "config.json").read_text())
    for key in ("auto_map", "hidden_act_param"):
        config.pop(key, None)
    config.update(model_type=family, **changes)
    cfg = AutoConfig.for_model(**config)
    return AutoModelForCausalLM.from_pretrained(folder, config=cfg)


class _FatReLU(torch.nn.Module):
    """ProSparse's published FATReLU (modeling_sparsellama.py): x where x >= threshold, else 0."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        new_x = torch.zeros_like(x)
        mask = torch.ge(x, self.threshold)
        new_x[mask] = x[mask]
        return new_x


def _bamboo_forward(self, x):
    """Bamboo's published BambooMLP.forward: down(act(gate(x)) * act(up(x))), act = ReLU."""
    return self.down_proj(F.relu(self.gate_proj(x)) * F.relu(self.up_proj(x)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("formats")


@pytest.mark.parametrize("family", FAMILIES)
def test_relu_models_of_every_family_keep_their_function(root, family, capfd):
    """A supported family with its activation key set to relu (ReluLLaMA; a user's ReLU fine-tune):
    converted by default, it stays ReGLU, and its logits are the stock model's (MoE included)."""
    key = TABLE[family].act_key
    src = root / f"{family}-relu"
    save_tiny_with_tokenizer(family, src, **{key: "relu"})
    ids = _ids()
    reference = _logits(AutoModelForCausalLM.from_pretrained(src), ids)
    capfd.readouterr()
    out = relufy.convert(src, root / f"{family}-relu-out")
    err = capfd.readouterr().err
    assert f"a ReGLU {family} model ({key}: relu); kept as ReGLU" in err
    block = json.loads((out / "config.json").read_text())["relufy"]
    assert block["activation"] == "reglu" and block["source_format"].startswith("a ReGLU")
    torch.testing.assert_close(_logits(relufy.load(out), ids), reference, rtol=1e-5, atol=1e-5)
    # read directly (no conversion): the same function, recorded as ReGLU
    model = relufy.load(src)
    assert model.config.relufy["activation"] == "reglu"
    torch.testing.assert_close(_logits(model, ids), reference, rtol=1e-5, atol=1e-5)


def test_relu2_models_keep_their_function(root):
    src = root / "relu2"
    save_tiny_with_tokenizer("llama", src, hidden_act="relu2")
    ids = _ids()
    reference = _logits(AutoModelForCausalLM.from_pretrained(src), ids)
    out = relufy.convert(src, root / "relu2-out")
    assert json.loads((out / "config.json").read_text())["relufy"]["activation"] == "relu2"
    torch.testing.assert_close(_logits(relufy.load(out), ids), reference, rtol=1e-5, atol=1e-5)


def _prosparse(root, name, threshold):
    """A tiny ProSparse-Llama-2 (its published config: SparseLlamaForCausalLM, hidden_act fatrelu,
    hidden_act_param, auto_map to its own code) and its independent reference model."""
    src = root / name
    save_tiny_with_tokenizer("llama", src, hidden_act="relu")
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    for layer in reference.model.layers:
        layer.mlp.act_fn = _FatReLU(threshold)
    _rewrite(
        src,
        model_type="sparsellama",
        architectures=["SparseLlamaForCausalLM"],
        hidden_act="fatrelu",
        hidden_act_param=threshold,
        auto_map={
            "AutoConfig": "configuration_sparsellama.SparseLlamaConfig",
            "AutoModel": "modeling_sparsellama.SparseLlamaModel",
            "AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM",
        },
    )
    return src, reference


def test_prosparse_keeps_fatrelu_with_its_threshold(root, capfd):
    src, reference = _prosparse(root, "prosparse", 0.3)  # tiny random weights: 0.3 zeroes a visible share
    ids = _ids()
    expected = _logits(reference, ids)
    as_relu = _logits(_stock(src, hidden_act="relu"), ids)
    assert (as_relu - expected).abs().max() > 1e-2  # the threshold matters here: the check can fail
    capfd.readouterr()
    out = relufy.convert(src, root / "prosparse-out")
    assert "a ProSparse model (SparseLlamaForCausalLM, FATReLU threshold 0.3); kept as FATReLU (threshold 0.3)" in (
        capfd.readouterr().err
    )
    config = json.loads((out / "config.json").read_text())
    assert config["relufy"]["activation"] == "fatrelu" and config["relufy"]["threshold"] == 0.3
    assert config["model_type"] == "relufy_llama" and "hidden_act_param" not in config
    torch.testing.assert_close(_logits(relufy.load(out), ids), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(relufy.load(src), ids), expected, rtol=1e-5, atol=1e-5)


def test_prosparse_threshold_zero_is_reglu(root):
    src, reference = _prosparse(root, "prosparse-0", 0)
    out = relufy.convert(src, root / "prosparse-0-out")
    assert json.loads((out / "config.json").read_text())["relufy"]["activation"] == "reglu"
    torch.testing.assert_close(_logits(relufy.load(out), _ids()), _logits(reference, _ids()), rtol=1e-5, atol=1e-5)


def _bamboo(root, name):
    """A tiny Bamboo (its published config: BambooForCausalLM, model_type bamboo, hidden_act relu,
    Mistral's shape keys, auto_map to its own code) and its independent reference model."""
    src = root / name
    save_tiny_with_tokenizer("mistral", src, hidden_act="relu", sliding_window=4096)
    reference = AutoModelForCausalLM.from_pretrained(src).eval()
    for layer in reference.model.layers:
        layer.mlp.forward = types.MethodType(_bamboo_forward, layer.mlp)
    _rewrite(
        src,
        model_type="bamboo",
        architectures=["BambooForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_bamboo.BambooConfig",
            "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM",
        },
    )
    return src, reference


def test_bamboo_is_drelu(root, capfd):
    src, reference = _bamboo(root, "bamboo")
    ids = _ids()
    capfd.readouterr()
    out = relufy.convert(src, root / "bamboo-out")
    assert "a Bamboo dReLU model (BambooForCausalLM); kept as dReLU" in capfd.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["relufy"]["activation"] == "drelu" and config["relufy"]["base_model_type"] == "mistral"
    torch.testing.assert_close(_logits(relufy.load(out), ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


def _with_ffn_predictors(src):
    """TurboSparse-Mistral's layout: each FFN's predictor inside the checkpoint (mlp.predictor.fc1/fc2)."""
    tensors = load_file(src / "model.safetensors")
    for i in range(2):
        tensors[f"model.layers.{i}.mlp.predictor.fc1.weight"] = torch.randn(8, 32)
        tensors[f"model.layers.{i}.mlp.predictor.fc2.weight"] = torch.randn(48, 8)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def test_turbosparse_mistral_needs_an_explicit_activation(root, cli):
    src, reference = _bamboo(root, "turbosparse-mistral")
    _with_ffn_predictors(src)
    out = root / "ts-out"
    for command in (("convert", src, out), ("eval", src, "--data", "builtin:pydoc", "--max-tokens", "256")):
        code, err, _ = cli(*command)
        assert code == 2 and "\n" not in err and "Traceback" not in err
        assert "a TurboSparse-Mistral model (BambooForCausalLM with 4 predictor tensors in its FFNs" in err
        assert "--activation drelu" in err
    assert not out.exists()
    code, err, _ = cli("convert", src, out, "--activation", "drelu")
    assert code == 0, err
    assert "converted to the dense dReLU model, its embedded predictors left unused" in err
    ids = _ids()
    torch.testing.assert_close(_logits(relufy.load(out), ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(model_type="turbosparsemixtral", architectures=["TurboSparseMixtralForCausalLM"]), "TurboSparse-Mixtral"),
        (
            dict(model_type="minicpm", architectures=["MiniCPMForCausalLM"], hidden_act="fatrelu", hidden_act_param=0.03),
            "MiniCPM",
        ),
        (dict(hidden_act="relu6"), "hidden_act 'relu6' (ReLU capped at 6) has no relufy activation"),
        (dict(model_type="sparsellama", hidden_act="fatrelu", hidden_act_param="0.01"), "relufy reads hidden_act fatrelu"),
        (dict(model_type="bamboo", hidden_act="silu"), "a Bamboo model (BambooForCausalLM) with hidden_act 'silu'"),
    ],
    ids=["turbosparse-mixtral", "minicpm", "relu6", "bad-threshold", "bamboo-silu"],
)
def test_formats_relufy_cannot_compute_are_refused(root, cli, changes, expected):
    src = root / f"refused-{changes['model_type'] if 'model_type' in changes else 'relu6'}-{len(changes)}"
    shutil.rmtree(src, ignore_errors=True)
    save_tiny_with_tokenizer("llama", src, hidden_act="relu")
    _rewrite(src, **changes)
    for command in (("convert", src, root / "never"), ("info", src)):
        code, err, _ = cli(*command)
        assert code == 2 and expected in err and "\n" not in err and "Traceback" not in err, (command, err)
    assert not (root / "never").exists()


def test_non_gated_relu_ffns_are_refused(root, cli):
    """SparseLLM's relu / relu2 ablation models: a gate and a down projection, no up projection."""
    src = root / "non-gated"
    save_tiny_with_tokenizer("llama", src, hidden_act="relu")
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items() if ".up_proj." not in k}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, err, _ = cli("convert", src, root / "non-gated-out")
    assert code == 2 and "\n" not in err
    assert "model.layers.0.mlp has a gate and a down projection but no up projection" in err


def test_changing_a_relu_models_function_is_said(root, cli):
    src = root / "relu-to-drelu"
    save_tiny_with_tokenizer("llama", src, hidden_act="relu")
    code, err, _ = cli("convert", src, root / "relu-to-drelu-out", "--activation", "drelu")
    assert code == 0, err
    assert "a ReGLU llama model (hidden_act: relu); converted to dReLU, so OUT computes another function" in err
    assert json.loads((root / "relu-to-drelu-out" / "config.json").read_text())["relufy"]["activation"] == "drelu"
    code, err, _ = cli("convert", src, root / "relu-swiglu", "--activation", "swiglu")
    assert code == 2 and "leave --activation out to keep its function" in err and not (root / "relu-swiglu").exists()
    code, err, _ = cli("convert", src, root / "relu-threshold", "--threshold", "0.1")
    assert code == 2 and "--threshold applies to fatrelu only: add --activation fatrelu" in err


def test_swiglu_models_still_become_drelu_and_relufy_checkpoints_keep_theirs(root, cli):
    src = root / "swiglu"
    save_tiny_with_tokenizer("llama", src)
    code, err, _ = cli("convert", src, root / "swiglu-out")
    assert code == 0 and "kept as" not in err and "another function" not in err
    assert json.loads((root / "swiglu-out" / "config.json").read_text())["relufy"]["activation"] == "drelu"
    relufy.convert(src, root / "swiglu-reglu", activation="reglu")
    code, err, _ = cli("convert", root / "swiglu-reglu", root / "reglu-again")
    assert code == 0 and "a relufy ReGLU checkpoint; kept as ReGLU" in err
    assert json.loads((root / "reglu-again" / "config.json").read_text())["relufy"]["activation"] == "reglu"


def test_recognise_leaves_swiglu_and_unknown_models_alone():
    assert recognise({"model_type": "llama", "hidden_act": "silu"}) is None
    assert recognise({"model_type": "gemma2", "hidden_activation": "gelu_pytorch_tanh"}) is None
    assert recognise({"model_type": "gpt2", "activation_function": "relu"}) is None
    with pytest.raises(RelufyError, match="no up projection"):
        recognise({"model_type": "llama", "hidden_act": "relu"}, ["model.layers.0.mlp.gate_proj.weight"])


def test_training_reads_a_prosparse_folder_directly(root, cli):
    """relufy train on the hub folder: the plan, the run and its final model keep FATReLU."""
    import yaml
    from tiny import corpus

    src, _ = _prosparse(root, "prosparse-train", 0.3)
    (root / "train.txt").write_text(corpus()[:20_000])
    recipe = {
        "name": "prosparse",
        "output_dir": str(root / "prosparse-run"),
        "model": {"path": str(src)},
        "data": {"sources": [{"data": str(root / "train.txt")}], "seq_len": 32},
        "optim": {"lr": 1e-3, "warmup_steps": 1},
        "budget": {"max_steps": 2, "micro_batch_size": 2, "grad_accum": 1},
    }
    (root / "prosparse.yaml").write_text(yaml.safe_dump(recipe))
    code, err, _ = cli("train", root / "prosparse.yaml", "--dry-run")
    assert code == 0, err
    code, err, _ = cli("train", root / "prosparse.yaml")
    assert code == 0, err
    block = json.loads((root / "prosparse-run" / "final" / "config.json").read_text())["relufy"]
    assert (block["activation"], block["threshold"]) == ("fatrelu", 0.3)
    assert block["source_format"].startswith("a ProSparse model")
