"""The embedded real model: SmolLM2-135M-Instruct, a Q4_1 GGUF dequantized by transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import relufy
from relufy.embedded import smollm2_gguf
from relufy.generate import generate
from relufy.modeling.tokenizer import load_tokenizer

TEXT = "The quick brown fox jumps over the lazy dog. Sparse activations make decoding faster."


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    root = tmp_path_factory.mktemp("smol")
    gguf = smollm2_gguf()
    return {
        "gguf": gguf,
        "swiglu": relufy.convert(gguf, root / "swiglu", activation="swiglu"),
        "drelu": relufy.convert(gguf, root / "drelu", activation="drelu"),
        "root": root,
    }


def test_gguf_conversion_writes_a_full_checkpoint(smol):
    out = smol["drelu"]
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "modeling_relufy.py",
        "README.md",
    } <= names
    info = relufy.info(out)
    assert (info.family, info.layers, info.hidden_size, info.ffn_size) == ("llama", 30, 576, 1536)
    assert info.activation == "drelu" and 134_000_000 < info.params_total < 135_000_000
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_swiglu_conversion_reproduces_original_logits(smol):
    from transformers import AutoModelForCausalLM

    ids = load_tokenizer(smol["gguf"])(TEXT, return_tensors="pt")["input_ids"]
    original = relufy.load(smol["gguf"], dtype=torch.float32).eval()
    converted = AutoModelForCausalLM.from_pretrained(smol["swiglu"], dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_drelu_loads_without_relufy_and_generates(smol):
    ids = load_tokenizer(smol["drelu"])(TEXT, return_tensors="pt")["input_ids"]
    job = [{"path": str(smol["drelu"]), "ids": ids.tolist(), "out": str(smol["root"] / "remote.pt")}]
    (smol["root"] / "jobs.json").write_text(json.dumps(job))
    script = Path(__file__).with_name("remote_logits.py")
    subprocess.run(
        [sys.executable, str(script), str(smol["root"] / "jobs.json")], check=True, env={**os.environ, "PYTHONPATH": ""}
    )
    remote = torch.load(smol["root"] / "remote.pt", weights_only=True)
    assert "error" not in remote, remote.get("error")
    model = relufy.load(smol["drelu"], dtype=torch.float32).eval()
    with torch.no_grad():
        local = model(ids).logits
    torch.testing.assert_close(remote["logits"], local, rtol=1e-5, atol=1e-5)
    # the activation changed: the untrained dReLU model predicts differently from the original
    original = relufy.load(smol["swiglu"], dtype=torch.float32).eval()
    with torch.no_grad():
        assert (original(ids).logits.argmax(-1) != local.argmax(-1)).float().mean() > 0.2
    result = generate(smol["drelu"], "Hello", max_new_tokens=8, model=model)
    assert result.new_tokens > 0 and result.tokens_per_second > 0
