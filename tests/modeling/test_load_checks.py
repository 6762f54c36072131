"""A config that does not describe its weights is refused, never run half random."""

from __future__ import annotations

import json

import pytest
from safety import Snapshot, assert_refused
from tiny import corpus, save_tiny_with_tokenizer

import relufy


@pytest.fixture
def model(tmp_path):
    save_tiny_with_tokenizer("llama", tmp_path / "llama")
    (tmp_path / "text.txt").write_text(corpus()[:3000])
    return relufy.convert(tmp_path / "llama", tmp_path / "drelu")


def _edit(model, **changes):
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("command", ["eval", "generate", "export"])
def test_more_layers_than_the_weights(tmp_path, model, cli, command):
    _edit(model, num_hidden_layers=3)  # the weights hold 2
    args = {
        "eval": ("eval", model, "--data", tmp_path / "text.txt", "--seq-len", "32"),
        "generate": ("generate", model, "--max-new-tokens", "2"),
        "export": ("export", model, tmp_path / "out", "--data", tmp_path / "text.txt", "--seq-len", "32"),
    }[command]
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "model.layers.2.", "config and weights do not belong together")


@pytest.mark.parametrize(
    "key,value",
    [("num_attention_heads", 0), ("hidden_size", -32), ("num_hidden_layers", 1.5), ("vocab_size", None if False else "96")],
)
@pytest.mark.parametrize("command", ["info", "eval", "convert"])
def test_sizes_that_are_not_positive_whole_numbers(tmp_path, model, cli, command, key, value):
    _edit(model, **{key: value})
    args = {
        "info": ("info", model),
        "eval": ("eval", model, "--data", tmp_path / "text.txt", "--seq-len", "32"),
        "convert": ("convert", model, tmp_path / "out"),
    }[command]
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "config.json is not a valid llama config")


@pytest.mark.parametrize(
    "cutoffs,message",
    [
        ({"model.layers.0.self_attn": 0.1}, "cutoffs name 1 module(s) that are not FFNs of this model, e.g. 'model.layers.0."),
        ({"model.layers.0.mlp": -0.1}, "the relufy block's cutoffs.model.layers.0.mlp: Input should be greater than or equal"),
        ({"model.layers.0.mlp": "x"}, "the relufy block's cutoffs.model.layers.0.mlp: Input should be a valid number"),
    ],
)
def test_cutoffs_that_do_not_fit_the_model(tmp_path, model, cli, cutoffs, message):
    config = json.loads((model / "config.json").read_text())
    _edit(model, relufy={**config["relufy"], "cutoffs": cutoffs})
    snap = Snapshot(tmp_path)
    code, err, _ = cli("eval", model, "--data", tmp_path / "text.txt", "--seq-len", "32")
    assert_refused(snap, code, err, message)
