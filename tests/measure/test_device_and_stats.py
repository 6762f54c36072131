"""Devices that do not exist, and stats files that are malformed, empty or of another model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from safety import Snapshot, assert_refused
from tiny import corpus, save_tiny_with_tokenizer

import relufy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    save_tiny_with_tokenizer("llama", root / "llama")
    save_tiny_with_tokenizer("llama", root / "wide", intermediate_size=64)
    (root / "text.txt").write_text(corpus()[:5000])
    out = {"root": root, "text": root / "text.txt"}
    for name in ("llama", "wide"):
        out[name] = relufy.convert(root / name, root / f"{name}-drelu")
    return out


@pytest.mark.parametrize(
    "device,needle",
    [("tpu", "not a device"), ("cuda", "CUDA GPU"), ("cuda:7", "CUDA GPU"), ("meta", "relufy runs on cpu, cuda or mps")],
)
@pytest.mark.parametrize("command", ["eval", "export"])
def test_device_this_machine_lacks(models, tmp_path, cli, command, device, needle):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = [models["llama"]] + ([tmp_path / "out"] if command == "export" else [])
    snap = Snapshot(tmp_path, models["root"])
    code, err, _ = cli(command, *args, "--data", models["text"], "--seq-len", "32", "--device", device)
    assert_refused(snap, code, err, f"--device {device}", needle)


def _stats(models, tmp_path, cli, model="llama"):
    path = tmp_path / f"{model}.safetensors"
    code, err, _ = cli(
        "eval", models[model], "--data", models["text"], "--seq-len", "32", "--max-tokens", "256", "--stats-out", path
    )
    assert code == 0, err
    return path


def _rewrite(path, mutate_meta=None, mutate_tensors=None):
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if mutate_meta:
        mutate_meta(meta)
    if mutate_tensors:
        mutate_tensors(tensors)
    save_file(tensors, path, metadata=meta)
    return path


@pytest.mark.parametrize(
    "case,needle",
    [
        ("positions-text", "malformed relufy stats file"),
        ("params-not-json", "malformed relufy stats file"),
        ("params-a-list", "malformed relufy stats file"),
        ("bad-key", "malformed relufy stats file"),
        ("missing-tensor", "malformed relufy stats file"),
        ("float-counts", "malformed relufy stats file"),
        ("zero-tokens", "holds no tokens"),
        ("not-safetensors", "not a readable stats file"),
    ],
)
@pytest.mark.parametrize("command", ["bench", "export"])
def test_malformed_or_empty_stats(models, tmp_path, cli, command, case, needle):
    path = _stats(models, tmp_path, cli)
    first = "layers.0.dense"
    if case == "positions-text":
        _rewrite(path, lambda m: m.update(positions="many"))
    elif case == "params-not-json":
        _rewrite(path, lambda m: m.update(params_per_neuron="{"))
    elif case == "params-a-list":
        _rewrite(path, lambda m: m.update(params_per_neuron="[1, 2]"))
    elif case == "bad-key":
        _rewrite(path, lambda m: m.update(params_per_neuron=json.dumps({"layers0dense": 96})))
    elif case == "missing-tensor":
        _rewrite(path, mutate_tensors=lambda t: t.pop(f"{first}.tokens"))
    elif case == "float-counts":
        _rewrite(path, mutate_tensors=lambda t: t.update({f"{first}.counts": t[f"{first}.counts"].float()}))
    elif case == "zero-tokens":
        _rewrite(path, mutate_tensors=lambda t: t.update({k: torch.zeros_like(v) for k, v in t.items()}))
    else:
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    args = {
        "bench": ("bench", models["llama"], "--stats", path, "--shapes", "model", "--no-generation"),
        "export": ("export", models["llama"], tmp_path / "out", "--stats", path),
    }[command]
    snap = Snapshot(tmp_path, models["root"])
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, needle)


@pytest.mark.parametrize("command", ["bench", "export"])
def test_stats_of_another_model(models, tmp_path, cli, command):
    path = _stats(models, tmp_path, cli, model="wide")
    args = {
        "bench": ("bench", models["llama"], "--stats", path, "--shapes", "model", "--no-generation"),
        "export": ("export", models["llama"], tmp_path / "out", "--stats", path),
    }[command]
    snap = Snapshot(tmp_path, models["root"])
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "1 x 64 neurons in the stats but 1 x 48 in the model")
