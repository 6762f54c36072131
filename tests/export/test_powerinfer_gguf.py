"""relufy export --layout powerinfer-gguf: PowerInfer's GGUF written directly. The file reads back,
holds what PowerInfer's convert.py would write for the powerinfer layout of the same model (keys,
vocabulary, weights permuted / transposed as there, the folded predictors), and bad input fails
cleanly. Byte identity with convert.py itself is a by-hand check (PowerInfer is not installed here)."""

from __future__ import annotations

import json
import shutil
import struct

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tiny import corpus, save_tiny_with_tokenizer

import relufy
from relufy.conversion import convert
from relufy.export.powerinfer_gguf import MAGIC, permute, quantize_q8_0, sentencepiece_pieces

FAST = ("--seq-len", "64", "--max-tokens", "2048", "--predictor-steps", "30")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    save_tiny_with_tokenizer("llama", root / "llama", tie_word_embeddings=True)
    convert(root / "llama", root / "llama-drelu")
    out["llama"] = root / "llama-drelu"
    convert(root / "llama", root / "llama-relu2", activation="relu2")
    out["relu2"] = root / "llama-relu2"
    save_tiny_with_tokenizer("qwen2_moe", root / "moe")
    convert(root / "moe", root / "moe-drelu")
    out["moe"] = root / "moe-drelu"
    (root / "corpus.txt").write_text(corpus()[:40000])
    out["data"] = root / "corpus.txt"
    return out


@pytest.fixture(scope="module")
def powerinfer_folder(converted, tmp_path_factory):
    """The powerinfer layout of the same export: what convert.py would read."""
    from relufy.cli import main

    out = tmp_path_factory.mktemp("pi") / "pi"
    args = ["export", converted["llama"], out, "--data", converted["data"], "--predictors", "--layout", "powerinfer"]
    _run(main, [*args, "--predictor-rank", "16", *FAST])
    return out


def _run(main, args):
    import sys

    old = sys.argv
    sys.argv = ["relufy", *map(str, args)]
    try:
        main()
    finally:
        sys.argv = old


def read_gguf(path, tmp_path) -> gguf.GGUFReader:
    """A PowerInfer GGUF (magic ``PWRI``) read with gguf's reader, from a copy with the GGUF magic."""
    with open(path, "rb") as f:
        assert f.read(4) == MAGIC
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(path, copy)
    with open(copy, "r+b") as f:
        f.write(b"GGUF")
    return gguf.GGUFReader(copy)


def _value(reader, key):
    field = reader.get_field(key)
    assert field is not None, key
    if field.types[0] == gguf.GGUFValueType.ARRAY:
        parts = [field.parts[i] for i in field.data]
        if field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(p).decode("utf-8") for p in parts]
        return [p.tolist()[0] for p in parts]
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else part.tolist()[0]


def _array(t) -> np.ndarray:
    """A tensor of the reader as float32 in numpy (torch) order."""
    data = np.asarray(t.data)
    shape = [int(n) for n in reversed(t.shape)]
    if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        return gguf.quants.dequantize(data, t.tensor_type).reshape(shape)
    return data.astype(np.float32).reshape(shape)


def _q8_0_tolerance(values: np.ndarray) -> np.ndarray:
    """Per element, the q8_0 error bound: half a step (block max / 127) plus the f16 rounding of the scale."""
    blocks = np.abs(values.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    return np.broadcast_to(blocks * (0.5 + 127 * 2**-11) + 1e-7, (blocks.shape[0], 32)).reshape(values.shape)


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_powerinfer_gguf_layout(cli, tmp_path, converted, powerinfer_folder, gguf_type):
    out = tmp_path / "pi"
    code, err, _ = cli(
        "export",
        converted["llama"],
        out,
        "--data",
        converted["data"],
        "--predictors",
        "--layout",
        "powerinfer-gguf",
        "--gguf-type",
        gguf_type,
        "--predictor-rank",
        "16",
        *FAST,
    )
    assert code == 0, err
    files = ["README.md", "activation", "model.gguf", "sparsity.png", "sparsity.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == files
    assert sorted(p.name for p in (out / "activation").iterdir()) == ["activation_0.pt", "activation_1.pt"]
    card = (out / "README.md").read_text()
    assert "--vram-budget" in card and "library_name: gguf" in card
    reader = read_gguf(out / "model.gguf", tmp_path)
    pi = powerinfer_folder
    config = json.loads((pi / "config.json").read_text())

    # keys: convert.py's, with its values for the powerinfer folder of the same export
    expected = {
        "general.architecture": "bamboo",
        "general.name": "pi",
        "bamboo.context_length": 64,
        "bamboo.embedding_length": 32,
        "bamboo.block_count": 2,
        "bamboo.feed_forward_length": 48,
        "bamboo.rope.dimension_count": 8,
        "bamboo.attention.head_count": 4,
        "bamboo.attention.head_count_kv": 2,
        "general.file_type": {"f16": 1, "q8_0": 7}[gguf_type],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.ggml.padding_token_id": 0,
    }
    assert {k: _value(reader, k) for k in expected} == expected
    assert _value(reader, "bamboo.attention.layer_norm_rms_epsilon") == pytest.approx(config["rms_norm_eps"])
    assert _value(reader, "bamboo.rope.freq_base") == pytest.approx(config["rope_theta"])
    threshold = json.loads((pi / "predictor" / "config.json").read_text())["sparse_threshold"]
    assert _value(reader, "powerinfer.sparse_threshold") == threshold
    vocab = json.loads((pi / "vocab.json").read_text())
    assert _value(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    assert set(_value(reader, "tokenizer.ggml.scores")) == {0.0} and set(_value(reader, "tokenizer.ggml.token_type")) == {1}
    merges = (pi / "merges.txt").read_text().splitlines()[1:]
    assert _value(reader, "tokenizer.ggml.merges") == merges and merges
    assert list(reader.fields)[3:5] == ["general.architecture", "general.name"]  # after the header fields

    # tensors: the checkpoint's (sorted by name, as model.safetensors lists them), then the predictors
    tensors = {t.name: t for t in reader.tensors}
    names = [t.name for t in reader.tensors]
    assert names[:3] == ["output.weight", "token_embd.weight", "blk.0.attn_norm.weight"]
    assert names[-4:] == ["blk.0.fc1.weight", "blk.0.fc2.weight", "blk.1.fc1.weight", "blk.1.fc2.weight"]
    assert len(names) == 2 + 1 + 2 * 9 + 4
    source = relufy.load(converted["llama"]).state_dict()
    with safe_open(pi / "model.safetensors", "pt") as f:
        for key in f.keys():  # the powerinfer folder's weights are the model's own (no --reorder)
            torch.testing.assert_close(f.get_tensor(key), source[key])
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hf = {
        "output.weight": source["lm_head.weight"],
        "token_embd.weight": source["model.embed_tokens.weight"],
        "output_norm.weight": source["model.norm.weight"],
    }
    for i in range(2):
        p = f"model.layers.{i}."
        hf |= {
            f"blk.{i}.attn_norm.weight": source[p + "input_layernorm.weight"],
            f"blk.{i}.ffn_norm.weight": source[p + "post_attention_layernorm.weight"],
            f"blk.{i}.attn_q.weight": torch.from_numpy(permute(source[p + "self_attn.q_proj.weight"].numpy(), n_head, n_head)),
            f"blk.{i}.attn_k.weight": torch.from_numpy(permute(source[p + "self_attn.k_proj.weight"].numpy(), n_head, n_kv)),
            f"blk.{i}.attn_v.weight": source[p + "self_attn.v_proj.weight"],
            f"blk.{i}.attn_output.weight": source[p + "self_attn.o_proj.weight"],
            f"blk.{i}.ffn_gate.weight": source[p + "mlp.gate_proj.weight"],
            f"blk.{i}.ffn_up.weight": source[p + "mlp.up_proj.weight"],
            f"blk.{i}.ffn_down_t.weight": source[p + "mlp.down_proj.weight"].T,
        }
        state = torch.load(pi / "predictor" / f"model_{i}.pt", weights_only=True)  # folded, fp16
        assert state["fc1.weight"].shape == (16, 32) and state["fc2.weight"].shape == (48, 16)
        hf |= {f"blk.{i}.fc1.weight": state["fc1.weight"], f"blk.{i}.fc2.weight": state["fc2.weight"]}
    assert set(hf) == set(tensors)
    q8 = gguf.GGMLQuantizationType.Q8_0
    for name, weight in hf.items():
        t, want = tensors[name], weight.float().contiguous().numpy()
        got = _array(t)
        assert got.shape == want.shape, name
        if want.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got, want), name
        elif gguf_type == "f16" or want.shape[-1] % 32 or "ffn_down_t" in name:  # q8_0's f16 exceptions
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(got, want.astype(np.float16).astype(np.float32)), name
        else:
            assert t.tensor_type == q8, name
            assert np.array_equal(np.asarray(t.data).ravel(), quantize_q8_0(want).ravel()), name  # convert.py's quantizer
            assert (np.abs(got - want) <= _q8_0_tolerance(want)).all(), name
    if gguf_type == "q8_0":  # f16: rows of 16 (fc2 at rank 16), the down projections (PowerInfer's CPU kernel)
        assert tensors["blk.0.fc2.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        assert tensors["blk.1.ffn_down_t.weight"].tensor_type == gguf.GGMLQuantizationType.F16
        assert tensors["blk.0.fc1.weight"].tensor_type == q8 and tensors["token_embd.weight"].tensor_type == q8
    # every tensor starts at a 32-byte boundary and the file ends on one (convert.py's padding)
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    assert (out / "model.gguf").stat().st_size % 32 == 0
    # the export block and the activation counts match the powerinfer folder's
    for i in range(2):
        a = torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True)
        assert torch.equal(a, torch.load(pi / "activation" / f"activation_{i}.pt", weights_only=True))


def test_q8_0_quantizer_matches_ggml_within_rounding():
    """convert.py's q8_0 (``x / d`` rounded half to even) against gguf.quants (``x * (1/d)`` rounded half
    away from zero, ggml's C reference): the same scales, quants at most one apart and rarely."""
    tie = np.zeros(32, np.float32)
    tie[:6] = [127, 2.5, -2.5, 3.5, 0.5, -1.5]  # d = 1: exact halves
    q = lambda block: quantize_q8_0(block)[2:8].view(np.int8).tolist()
    assert q(tie) == [127, 2, -2, 4, 0, -2]  # convert.py: half to even
    assert gguf.quants.quantize(tie, gguf.GGMLQuantizationType.Q8_0)[2:8].view(np.int8).tolist() == [127, 3, -3, 4, 1, -2]
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((64, 256)) * rng.uniform(0.01, 3, (64, 1))).astype(np.float32)
    values[0, :32] = 0  # an all-zero block
    ours = quantize_q8_0(values).reshape(-1, 34)
    ref = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0).reshape(-1, 34)
    assert np.array_equal(ours[:, :2], ref[:, :2])  # scales
    diff = np.abs(ours[:, 2:].view(np.int8).astype(int) - ref[:, 2:].view(np.int8).astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.all(ours[0, 2:] == 0)
    back = gguf.quants.dequantize(ours.reshape(64, -1), gguf.GGMLQuantizationType.Q8_0)
    assert (np.abs(back - values) <= _q8_0_tolerance(values)).all()


def _proto_field(number: int, wire: int, payload: bytes) -> bytes:
    def varint(n):
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out

    key = varint(number << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def test_sentencepiece_pieces_from_the_protobuf(tmp_path):
    def piece(text, score=None, kind=None):
        body = _proto_field(1, 2, text.encode())
        if score is not None:
            body += _proto_field(2, 5, struct.pack("<f", score))
        if kind is not None:
            body += _proto_field(3, 0, bytes([kind]))
        return _proto_field(1, 2, body)

    proto = piece("<unk>", 0.0, 2) + piece("<s>", 0.0, 3) + piece("▁the", -1.5) + piece("<0x0A>", 0.0, 6) + piece("x", -2.0, 4)
    proto += _proto_field(2, 2, _proto_field(1, 2, b"trainer spec"))  # other ModelProto fields are skipped
    (tmp_path / "tokenizer.model").write_bytes(proto)
    assert sentencepiece_pieces(tmp_path / "tokenizer.model") == [
        (b"<unk>", 0.0, 2),
        (b"<s>", 0.0, 3),
        ("▁the".encode(), -1.5, 1),
        (b"<0x0A>", 0.0, 6),
        (b"x", -2.0, 1),  # user-defined counts as normal (convert.py)
    ]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("relu2", "(its llama architecture) of llama/mistral; this is a relu2 llama model: use --layout hf"),
        ("moe", "(its llama architecture) of llama/mistral; this is a drelu qwen2_moe model: use --layout hf"),
        ("no-predictors", "layout powerinfer-gguf needs predictors"),
        ("gguf-type-hf", "--gguf-type applies to --layout powerinfer-gguf"),
    ],
)
def test_powerinfer_gguf_bad_input(cli, tmp_path, converted, case, needle):
    data = ("--data", converted["data"])
    gguf_layout = ("--layout", "powerinfer-gguf")
    args = {
        "relu2": (converted["relu2"], *data, "--predictors", *gguf_layout),
        "moe": (converted["moe"], *data, "--predictors", *gguf_layout),
        "no-predictors": (converted["llama"], *data, *gguf_layout),
        "gguf-type-hf": (converted["llama"], *data, "--gguf-type", "q8_0"),
    }[case]
    out = tmp_path / "out"
    code, err, _ = cli("export", args[0], out, *args[1:])
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()
