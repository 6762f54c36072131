"""Reading a model folder: links stay inside it, malformed indexes and relufy blocks are one line."""

from __future__ import annotations

import json
import shutil

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny, tiny_model, tiny_tokenizer

import relufy


@pytest.fixture
def src(tmp_path):
    save_tiny("llama", tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


@pytest.fixture
def converted(tmp_path, src):
    return relufy.convert(src, tmp_path / "drelu")


@pytest.mark.parametrize("name", ["special_tokens_map.json", "config.json", "model.safetensors"])
def test_link_out_of_the_model_folder_is_not_followed(tmp_path, src, cli, name):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    secret.chmod(0o600)
    (src / name).unlink(missing_ok=True)
    (src / name).symlink_to(secret)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(snap, code, err, name, "link out of the model folder")


def test_links_inside_the_folder_are_followed(tmp_path, src):
    (src / "extra").mkdir()
    shutil.move(src / "tokenizer.json", src / "extra" / "tokenizer.json")
    (src / "tokenizer.json").symlink_to("extra/tokenizer.json")
    out = relufy.convert(src, tmp_path / "out")
    assert not (out / "tokenizer.json").is_symlink()
    assert (out / "tokenizer.json").read_bytes() == (src / "extra" / "tokenizer.json").read_bytes()


def test_hub_cache_snapshot_links_to_its_blobs(tmp_path, src):
    """A snapshot of the Hugging Face cache links every file to ../../blobs: that is inside."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(src.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(f"../../blobs/blob{i}")
    out = relufy.convert(snapshot, tmp_path / "out")
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()


@pytest.fixture
def sharded(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    return tmp_path / "sharded"


@pytest.mark.parametrize(
    "weight_map,needle",
    [
        (["model.safetensors"], "weight_map must map tensor names to shard file names"),
        ({"model.embed_tokens.weight": 5}, "weight_map must map tensor names to shard file names"),
        ({"model.embed_tokens.weight": "../src/model.safetensors"}, "is not a file name in the model folder"),
        (None, "weight_map must map"),
    ],
)
def test_malformed_index(tmp_path, sharded, cli, weight_map, needle):
    index = sharded / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", sharded, tmp_path / "out")
    assert_refused(snap, code, err, "model.safetensors.index.json", needle)


def test_model_safetensors_is_a_folder(tmp_path, src, cli):
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").mkdir()
    (src / "model.safetensors" / "x").write_text("x")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(snap, code, err, "model.safetensors is not a file")
    assert "index" not in err


def test_model_safetensors_is_a_dangling_link(tmp_path, src, cli):
    (src / "model.safetensors").unlink()
    (src / "model.safetensors").symlink_to(src / "gone.safetensors")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", src, tmp_path / "out")
    assert_refused(snap, code, err, "model.safetensors is a dangling link")


BAD_BLOCKS = [
    ("dReLU", "the relufy block is not a JSON object"),
    ({"activation": "drelu"}, "the relufy block's base_model_type: Field required"),
    (
        {"activation": 3, "base_model_type": "llama", "base_architectures": [], "base_activation": "silu"},
        "the relufy block's activation: Input should be 'drelu'",
    ),
    (
        {
            "activation": "fatrelu",
            "threshold": "high",
            "base_model_type": "llama",
            "base_architectures": [],
            "base_activation": "silu",
        },
        "the relufy block's threshold: Input should be a valid number",
    ),
    (
        {
            "activation": "drelu",
            "base_model_type": "llama",
            "base_architectures": [],
            "base_activation": "silu",
            "export": {"layout": "tflite"},
        },
        "the relufy block's export.layout: Input should be 'hf', 'powerinfer' or 'powerinfer-gguf'",
    ),
]


@pytest.mark.parametrize(
    "block,needle", BAD_BLOCKS, ids=["string", "missing-keys", "bad-activation", "bad-threshold", "bad-export"]
)
@pytest.mark.parametrize("command", ["convert", "info", "eval", "generate", "export", "bench"])
def test_malformed_relufy_block(tmp_path, converted, cli, command, block, needle):
    config = json.loads((converted / "config.json").read_text())
    config["relufy"] = block
    (converted / "config.json").write_text(json.dumps(config))
    (tmp_path / "text.txt").write_text("some text " * 50)
    args = {
        "convert": ("convert", converted, tmp_path / "out"),
        "info": ("info", converted),
        "eval": ("eval", converted, "--data", tmp_path / "text.txt"),
        "generate": ("generate", converted),
        "export": ("export", converted, tmp_path / "out", "--data", tmp_path / "text.txt"),
        "bench": ("bench", converted, "--shapes", "model"),
    }[command]
    snap = Snapshot(tmp_path)
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "config.json", needle)


def test_a_path_typo_is_not_only_a_hub_error(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("info", "runs/drelu")
    assert_refused(snap, code, err, "runs/drelu: no such local folder", "Hub")
