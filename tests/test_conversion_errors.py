"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import save_tiny, tiny_config, tiny_model


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "src"
    save_tiny("llama", path)
    return path


def assert_refused(tmp_path, code, err, *needles):
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("relufy: error:")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "relufy-" in p.name], list(tmp_path.iterdir())


def test_missing_config(tmp_path, src, cli):
    (src / "config.json").unlink()
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "no config.json")


def test_truncated_safetensors(tmp_path, src, cli):
    shard = src / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "truncated", "model.safetensors")


def test_corrupt_safetensors_header(tmp_path, src, cli):
    shard = src / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    shard.write_bytes(bytes(data))
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "corrupt")


def test_index_names_missing_tensor(tmp_path, cli):
    src = tmp_path / "src"
    tiny_model("llama").save_pretrained(src, max_shard_size="20KB")
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.gate_proj.weight"] = next(iter(index["weight_map"].values()))
    index_path.write_text(json.dumps(index))
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "model.layers.9.mlp.gate_proj.weight")


def test_shape_contradicts_config(tmp_path, src, cli):
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 64
    (src / "config.json").write_text(json.dumps(config))
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "model.layers.0.mlp.", "48", "64", "config.json")


def test_unknown_activation(tmp_path, src, cli):
    code, err, _ = cli("convert", src, tmp_path / "out", "--activation", "gelu")
    assert_refused(tmp_path, code, err, "gelu")


@pytest.mark.parametrize("extra,needle", [((), "threshold"), (("--threshold", "-1"), ">= 0")])
def test_fatrelu_threshold(tmp_path, src, cli, extra, needle):
    code, err, _ = cli("convert", src, tmp_path / "out", "--activation", "fatrelu", *extra)
    assert_refused(tmp_path, code, err, needle)


def test_threshold_without_fatrelu(tmp_path, src, cli):
    code, err, _ = cli("convert", src, tmp_path / "out", "--threshold", "0.1")
    assert_refused(tmp_path, code, err, "fatrelu only")


def test_out_exists(tmp_path, src, cli):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert code == 2 and "--force" in err and len(err.splitlines()) == 1
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_src_is_out(tmp_path, src, cli):
    before = sorted(p.name for p in src.iterdir())
    code, err, _ = cli("convert", src, src, "--force")
    assert code == 2 and "is the input" in err
    assert sorted(p.name for p in src.iterdir()) == before


@pytest.mark.parametrize("model_type", ["gpt2", "gpt_oss", "bert"])
def test_unsupported_family(tmp_path, cli, model_type):
    from transformers import AutoConfig

    src = tmp_path / "src"
    src.mkdir()
    AutoConfig.for_model(model_type).save_pretrained(src)
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "unsupported model family", model_type, "llama", "mixtral")


def test_missing_source(tmp_path, cli):
    code, err, _ = cli("convert", tmp_path / "nope", tmp_path / "out")
    assert_refused(tmp_path, code, err, "no such model")


def test_hub_id_offline(tmp_path, cli):
    code, err, _ = cli("convert", "relufy-test/not-a-model", tmp_path / "out")
    assert_refused(tmp_path, code, err, "relufy-test/not-a-model", "Hub")


def test_info_error(tmp_path, cli):
    code, err, _ = cli("info", tmp_path)
    assert code == 2 and "no config.json" in err and len(err.splitlines()) == 1


def test_real_process_has_no_traceback(tmp_path):
    """The console entry point as users run it."""
    tiny_config("llama").save_pretrained(tmp_path / "src")
    proc = subprocess.run(
        [sys.executable, "-m", "relufy", "convert", str(tmp_path / "src"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"relufy: error: {tmp_path / 'src'}: no safetensors weights found"]
    assert not (tmp_path / "out").exists()


def test_overlapping_tensor_data(tmp_path, src, cli):
    import struct

    shard = src / "model.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = header[names[0]], header[names[1]]
    if a["data_offsets"][1] - a["data_offsets"][0] == b["data_offsets"][1] - b["data_offsets"][0]:
        b["data_offsets"] = list(a["data_offsets"])  # same size, same bytes: overlap, leaving a gap
    else:
        pytest.skip("first two tensors differ in size")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob)) if len(blob) <= n else b""
    assert len(blob) == n
    shard.write_bytes(data[:8] + blob + data[8 + n :])
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "overlapping or misplaced")


def test_tensor_in_two_shards(tmp_path, src, cli):
    import shutil

    shutil.copy(src / "model.safetensors", src / "model-copy.safetensors")
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(tmp_path, code, err, "is in both")
