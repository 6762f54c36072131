"""relufy generate: prompts and tokenizers that cannot work are one line."""

from __future__ import annotations

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny, save_tiny_with_tokenizer

import relufy


def test_empty_prompt_without_a_chat_template(tmp_path, cli):
    save_tiny_with_tokenizer("llama", tmp_path / "llama")
    model = relufy.convert(tmp_path / "llama", tmp_path / "drelu")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("generate", model, "--prompt", "", "--no-chat")
    assert_refused(snap, code, err, "the prompt is empty")


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_model_without_a_tokenizer(tmp_path, cli, command):
    save_tiny("llama", tmp_path / "llama")  # weights and config only
    model = relufy.convert(tmp_path / "llama", tmp_path / "drelu")
    (tmp_path / "text.txt").write_text("some words " * 100)
    args = {
        "generate": ("generate", model),
        "eval": ("eval", model, "--data", tmp_path / "text.txt", "--seq-len", "32"),
        "export": ("export", model, tmp_path / "out", "--data", tmp_path / "text.txt", "--seq-len", "32"),
    }[command]
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "no usable tokenizer in the model folder")
