"""A config.json must describe its weights: sizes the weights do not hold are refused before any
skeleton is built, and missing, unexpected or misshapen tensors are an error naming them (never a
model run on part of its weights); layouts and leftovers transformers loads correctly pass."""

from __future__ import annotations

import json
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from safety import Snapshot, assert_refused
from tiny import corpus, save_tiny_with_tokenizer

import relufy
from relufy.errors import RelufyError
from relufy.modeling.weights import check_weights

FAMILIES = ["llama", "qwen3_moe", "mixtral"]
EXPERTS_KEY = {"qwen3_moe": "num_local_experts", "mixtral": "num_local_experts"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    (root / "text.txt").write_text(corpus()[:3000])
    out = {"root": root}
    for family in FAMILIES:
        save_tiny_with_tokenizer(family, root / family)
        out[family] = relufy.convert(root / family, root / f"{family}-drelu")
    return out


def _copy(models, family, tmp_path, **changes) -> object:
    folder = tmp_path / family
    shutil.copytree(models[family], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _args(command, folder, models, tmp_path):
    return {
        "info": ("info", folder),
        "convert": ("convert", folder, tmp_path / "out"),
        "generate": ("generate", folder, "--max-new-tokens", "1"),
        "eval": ("eval", folder, "--data", models["root"] / "text.txt", "--seq-len", "32"),
        "export": ("export", folder, tmp_path / "out", "--data", models["root"] / "text.txt", "--seq-len", "32"),
    }[command]


def _within(seconds, fn, *args):
    out = {}
    start = time.perf_counter()
    thread = threading.Thread(target=lambda: out.update(result=fn(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still working after {seconds} s"
    return out["result"], time.perf_counter() - start


COMMANDS = ["info", "convert", "generate", "eval"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("command", COMMANDS)
def test_fewer_layers_than_the_weights(models, tmp_path, cli, family, command):
    """A config of 1 layer over 2-layer weights ran generate and eval on one layer (exit 0, a warning
    table), and convert copied the weights under it."""
    folder = _copy(models, family, tmp_path, num_hidden_layers=1)
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*_args(command, folder, models, tmp_path))
    assert_refused(snap, code, err, "that config.json does not describe (model.layers.1.", "do not belong together")


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("command", COMMANDS + ["export"])
def test_a_hundred_thousand_layers_over_two(models, tmp_path, cli, family, command):
    """info and convert built a skeleton of 100,000 layers for minutes (convert then wrote it out)."""
    folder = _copy(models, family, tmp_path, num_hidden_layers=100_000)
    snap = Snapshot(tmp_path)
    (code, err, _), seconds = _within(120, cli, *_args(command, folder, models, tmp_path))
    assert_refused(snap, code, err, "config.json says 100,000 layers (num_hidden_layers) but the weights hold 2")
    assert "no tensor model.layers.2.*" in err and seconds < 60


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("command", COMMANDS)
def test_experts_the_weights_do_not_hold(models, tmp_path, cli, family, command):
    folder = _copy(models, family, tmp_path, **{EXPERTS_KEY[family]: 100_000})
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*_args(command, folder, models, tmp_path))
    assert_refused(snap, code, err, "config.json says 100,000 routed experts per layer but the weights hold 4")
    folder = _copy(models, family, tmp_path / "fewer", **{EXPERTS_KEY[family]: 3})
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*_args(command, folder, models, tmp_path / "fewer"))
    assert_refused(snap, code, err, "tensor(s) that config.json does not describe (model.layers.0.", ".experts.3.")


@pytest.mark.parametrize("command", ["info", "generate", "eval", "export"])
def test_sizes_that_do_not_match_the_shapes(models, tmp_path, cli, command):
    """Every tensor's shape, where a model is built or loaded (convert, which imports neither torch
    nor transformers, checks the counts and the FFN and embedding shapes)."""
    folder = _copy(models, "llama", tmp_path, num_attention_heads=8)  # 8 heads of 8: attention 64 wide, not 32
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*_args(command, folder, models, tmp_path))
    needle = "tensor model.layers.0.self_attn.o_proj.weight has shape [32, 32] in the weights, but config.json implies [32, 64]"
    assert_refused(snap, code, err, needle, "(and 3 more tensor(s))")


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("command", ["generate", "eval"])
def test_a_tensor_missing(models, tmp_path, cli, family, command):
    folder = _copy(models, family, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    gone = "model.layers.1.post_attention_layernorm.weight"
    save_file({k: v for k, v in tensors.items() if k != gone}, folder / "model.safetensors", metadata={"format": "pt"})
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*_args(command, folder, models, tmp_path))
    assert_refused(snap, code, err, f"the weights lack 1 tensor(s) that config.json implies ({gone})")


def test_many_names_shown_as_the_first_few(models, tmp_path):
    shapes = {"model.embed_tokens.weight": (96, 32), **{f"model.layers.{i}.x.weight": (1,) for i in range(12)}}
    config = json.loads((models["llama"] / "config.json").read_text())
    with pytest.raises(RelufyError) as e:
        check_weights(config, shapes, "m")
    message = str(e.value)  # 12 layers present: the counts hold, the names are what is wrong
    assert message == (
        "m: the weights lack 20 tensor(s) that config.json implies (lm_head.weight, model.layers.0.input_layernorm.weight, "
        "model.layers.0.mlp.down_proj.weight and 17 more); config and weights do not belong together"
    )


# ---- what transformers loads correctly is not refused -------------------------------------------------


def _rewrite(folder, rename=None, add=None, drop=()):
    tensors = load_file(folder / "model.safetensors")
    tensors = {(rename(k) if rename else k): v for k, v in tensors.items() if k not in drop}
    tensors.update(add or {})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _runs(cli, folder):
    for args in (("info", folder), ("generate", folder, "--max-new-tokens", "1")):
        code, err, _ = cli(*args)
        assert code == 0, err


def test_tied_embeddings_without_and_with_an_lm_head(tmp_path, cli):
    save_tiny_with_tokenizer("llama", tmp_path / "tied", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    out = relufy.convert(tmp_path / "tied", tmp_path / "tied-drelu")
    _runs(cli, out)
    embed = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    _rewrite(out, add={"lm_head.weight": embed.clone()})  # saved anyway: transformers ties it
    _runs(cli, out)


def test_leftover_buffers_and_predictors_in_the_shards(models, tmp_path, cli):
    folder = _copy(models, "llama", tmp_path)
    _rewrite(
        folder,
        add={
            "model.rotary_emb.inv_freq": torch.ones(4),
            "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
            "model.layers.0.mlp.predictor.fc1.weight": torch.zeros(8, 32),  # an older export's index listed them
        },
    )
    _runs(cli, folder)


def test_mixtral_hub_names_and_fused_experts(models, tmp_path, cli):
    """Mixtral's hub layout (block_sparse_moe, w1/w2/w3) and experts saved fused (transformers
    before 5.24) both load: neither is refused."""
    hub = _copy(models, "mixtral", tmp_path / "a")
    renames = {".gate_proj.": ".w1.", ".up_proj.": ".w3.", ".down_proj.": ".w2."}

    def hub_name(k):
        if ".experts." in k:
            k = k.replace(".mlp.", ".block_sparse_moe.")
            for a, b in renames.items():
                k = k.replace(a, b)
        return k

    _rewrite(hub, rename=hub_name)
    _runs(cli, hub)
    fused = _copy(models, "qwen3_moe", tmp_path / "b")
    tensors = load_file(fused / "model.safetensors")
    out = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in (0, 1):
        e = f"model.layers.{layer}.mlp.experts"
        gate_up = [torch.cat([tensors[f"{e}.{i}.gate_proj.weight"], tensors[f"{e}.{i}.up_proj.weight"]]) for i in range(4)]
        out[f"{e}.gate_up_proj"] = torch.stack(gate_up)
        out[f"{e}.down_proj"] = torch.stack([tensors[f"{e}.{i}.down_proj.weight"] for i in range(4)])
    save_file(out, fused / "model.safetensors", metadata={"format": "pt"})
    _runs(cli, fused)


def test_a_sharded_checkpoint_with_other_safetensors_beside(models, tmp_path):
    """Only the weights transformers loads are compared: the index's shards (or model.safetensors),
    not an export's sparsity.safetensors beside them."""
    from tiny import tiny_model

    tiny_model("llama").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    save_file({"layers.0.dense.counts": torch.zeros(1, 48, dtype=torch.int64)}, tmp_path / "sharded" / "sparsity.safetensors")
    assert relufy.info(tmp_path / "sharded").layers == 2
    folder = _copy(models, "llama", tmp_path)
    save_file({"layers.0.dense.counts": torch.zeros(1, 48, dtype=torch.int64)}, folder / "sparsity.safetensors")
    assert relufy.info(folder).layers == 2
