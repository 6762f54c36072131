"""relufy.io.gguf: a GGUF streamed into a checkpoint is what transformers' from_pretrained +
save_pretrained write (relufy's former path), file for file and bit for bit; bad files are refused
in one line naming the file.

Tiny GGUFs are written here from ``tiny_model(family)`` the way llama.cpp lays them out: tensor
names from gguf's name maps (through transformers' ``get_gguf_hf_weights_map``, inverted), Q/K rows
permuted for llama, Gemma norms stored as ``w + 1``, MoE experts as 3D tensors, llama.cpp's
metadata keys, and the vocabulary of ``tiny_tokenizer()`` as a gpt2-style BPE.
"""

from __future__ import annotations

import filecmp
import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q
from packaging.version import Version
from safetensors import safe_open
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

from relufy.errors import RelufyError
from relufy.io.gguf import check_gguf, write_gguf_checkpoint

# relufy's families that transformers reads from GGUF, and llama.cpp's architecture names for them
GGUF_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
}
# sizes transformers' GGUF reader does not take from the metadata (it keeps the config defaults)
OVERRIDES = {
    "qwen3": dict(head_dim=128),
    "qwen2_moe": dict(moe_intermediate_size=1408, shared_expert_intermediate_size=5632),
    "qwen3_moe": dict(moe_intermediate_size=768),
}
TORCH_DTYPE = {"keep": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def vocab():
    tok = tiny_tokenizer()
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, merges


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of llama Q/K rows (transformers' LlamaTensorProcessor undoes it)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(
    path: Path,
    family: str,
    vocab,
    qtype=None,
    float_type=np.float32,
    arch: str | None = None,
    tensors: bool = True,
    drop=(),
    kv: dict | None = None,
    **overrides,
):
    """A llama.cpp-style GGUF of ``tiny_model(family, **overrides)``: 2D weights in ``qtype`` where rows
    allow it (else ``float_type``), norms and biases F32. For broken files: ``arch`` names another
    architecture, ``tensors=False`` writes the metadata only, ``drop`` leaves GGUF tensors out, ``kv``
    overrides integer metadata. Returns the model."""
    model = tiny_model(family, **{**OVERRIDES.get(family, {}), **overrides})
    cfg = model.config
    real_arch = GGUF_ARCH[family]
    arch = arch or real_arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    rope = cfg.rope_parameters
    ints = {
        "context_length": cfg.max_position_embeddings,
        "block_count": cfg.num_hidden_layers,
        "feed_forward_length": cfg.intermediate_size,
        "embedding_length": cfg.hidden_size,
        "attention.head_count": cfg.num_attention_heads,
        "attention.head_count_kv": cfg.num_key_value_heads,
        "rope.dimension_count": cfg.head_dim,
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
    }
    if getattr(cfg, "sliding_window", None):
        ints["attention.sliding_window"] = cfg.sliding_window
    if family.endswith("_moe"):
        ints.update(expert_count=cfg.num_experts, expert_used_count=cfg.num_experts_per_tok)
        ints["expert_feed_forward_length"] = cfg.moe_intermediate_size
    for key, value in {**ints, **(kv or {})}.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", rope.get("rope_theta") or rope["full_attention"]["rope_theta"])
    tokens, merges = vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    if real_arch.startswith("gemma"):  # llama.cpp writes scores with Gemma's vocabulary; transformers < 5.18 needs them
        w.add_token_scores([0.0] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    processor = TENSOR_PROCESSORS.get(real_arch, TensorProcessor)(config=cfg.to_dict())
    gguf_names: dict[str, list[str]] = {}
    for g, hf in get_gguf_hf_weights_map(model, processor).items():
        gguf_names.setdefault(hf, []).append(g if g.endswith((".weight", ".bias")) else g + ".weight")
    for hf, value in model.state_dict().items() if tensors else ():
        if hf not in gguf_names or (hf == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # llama.cpp writes no output.weight for tied embeddings
        value = value.numpy()
        names = sorted(gguf_names[hf], key=lambda g: "_up_" in g)  # fused experts: gate, then up
        for name, v in zip(names, np.split(value, len(names), axis=1) if len(names) > 1 else [value], strict=True):
            if real_arch == "llama" and ".attn_q." in name:
                v = _permute(v, cfg.num_attention_heads)
            if real_arch == "llama" and ".attn_k." in name:
                v = _permute(v, cfg.num_key_value_heads)
            if real_arch.startswith("gemma") and name.endswith("norm.weight"):
                v = v + 1
            if "ffn_gate_inp_shexp" in name:
                v = v[0]  # llama.cpp stores the shared expert's gate as 1D
            if name in drop:
                continue
            v = np.ascontiguousarray(v)
            if v.ndim == 1 or "norm" in name:
                w.add_tensor(name, v.astype(np.float32))
            elif qtype is not None and v.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(v, qtype)
                w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
            else:
                w.add_tensor(name, v.astype(float_type))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


def former_path(gguf_path: Path, out: Path, dtype: str = "keep", tokenizer: bool = True, **save_kwargs) -> None:
    """What relufy did before: the whole model in memory, then save_pretrained."""
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=TORCH_DTYPE[dtype])
    if getattr(model, "hf_quantizer", None) is not None:  # transformers >= 5.17 reads GGUF through a quantizer
        model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out, **save_kwargs)
    if tokenizer:
        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(out)


def streamed(gguf_path: Path, out: Path, dtype: str = "keep", **kwargs) -> Path:
    out.mkdir()
    write_gguf_checkpoint(gguf_path, out, dtype, **kwargs)
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


# transformers before 5.24 saves a model it read from a GGUF in another layout than the one relufy
# writes (and 5.24 saves): MoE experts fused under one name, shards in another order
SAVES_AS_RELUFY = Version(transformers.__version__) >= Version("5.24")


def assert_same(ref: Path, out: Path, skip=(), dtype: str = "keep") -> None:
    """Every tensor (name, dtype, shape, bytes), then every file, identical."""
    if not SAVES_AS_RELUFY:
        return assert_same_loaded(ref, out, skip, dtype)
    a, b = tensors(ref), tensors(out)
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert (t.dtype, t.shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(t.view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in out.iterdir() if p.name not in skip)
    for name in names:
        assert filecmp.cmp(ref / name, out / name, shallow=False), name


def assert_same_loaded(ref: Path, out: Path, skip=(), dtype: str = "keep") -> None:
    """Both checkpoints load to the same tensors (name, dtype, shape, bytes); the other files are identical."""
    a = AutoModelForCausalLM.from_pretrained(ref, dtype=TORCH_DTYPE[dtype]).state_dict()
    b = AutoModelForCausalLM.from_pretrained(out, dtype=TORCH_DTYPE[dtype]).state_dict()
    assert sorted(a) == sorted(b)
    for name, t in a.items():
        assert (t.dtype, t.shape) == (b[name].dtype, b[name].shape), name
        assert torch.equal(t.view(-1).view(torch.uint8), b[name].view(-1).view(torch.uint8)), name
    names = sorted(p.name for p in ref.iterdir() if not p.name.startswith("model"))
    assert names == sorted(p.name for p in out.iterdir() if not p.name.startswith("model") and p.name not in skip)
    for name in names:
        assert filecmp.cmp(ref / name, out / name, shallow=False), name


CASES = [  # family, how the GGUF stores 2D weights (a ggml quantization, or F16/F32), output dtype
    ("llama", Q.Q4_0, "keep"),
    ("llama", np.float16, "bf16"),
    ("qwen2", Q.Q8_0, "keep"),
    ("qwen2", Q.BF16, "bf16"),
    ("qwen3", Q.Q4_0, "bf16"),
    ("gemma2", np.float16, "fp32"),
    ("gemma3_text", Q.Q8_0, "fp16"),
    ("phi3", Q.Q4_0, "keep"),
    ("qwen2_moe", Q.Q8_0, "bf16"),
    ("qwen3_moe", Q.Q4_0, "keep"),
]


def _id(x) -> str:
    return getattr(x, "name", None) or getattr(x, "__name__", str(x))


@pytest.mark.parametrize(("family", "stored", "dtype"), CASES, ids=_id)
def test_tiny_families_as_former_path(tmp_path, vocab, family, stored, dtype):
    path = tmp_path / "model.gguf"
    quantized = isinstance(stored, Q)
    write_gguf(path, family, vocab, qtype=stored if quantized else None, float_type=np.float32 if quantized else stored)
    former_path(path, tmp_path / "ref", dtype)
    assert_same(tmp_path / "ref", streamed(path, tmp_path / "out", dtype), dtype=dtype)
    info = check_gguf(path)
    assert (info.model_type, info.architecture) == (family, GGUF_ARCH[family])


def test_tied_embeddings_and_shards_as_former_path(tmp_path, vocab):
    """No output.weight in the GGUF: lm_head is tied and not saved; sharded like save_pretrained."""
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", vocab, qtype=Q.Q8_0, tie_word_embeddings=True)
    former_path(path, tmp_path / "ref", "bf16", tokenizer=False, max_shard_size="8KB")
    out = streamed(path, tmp_path / "out", "bf16", max_shard_size="8KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    assert "lm_head.weight" not in json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert_same(tmp_path / "ref", out, skip={"tokenizer.json", "tokenizer_config.json"}, dtype="bf16")


def test_float32_gguf_gives_back_the_model(tmp_path, vocab):
    """llama.cpp's layout undone: an F32 GGUF of a model streams back to its exact weights."""
    path = tmp_path / "model.gguf"
    model = write_gguf(path, "llama", vocab)
    got = tensors(streamed(path, tmp_path / "out"))
    assert got.keys() == model.state_dict().keys()
    assert all(torch.equal(got[name], t) for name, t in model.state_dict().items())


def test_smollm2_as_former_path(tmp_path):
    """The embedded model: a real Q4_1 llama.cpp file with tied embeddings and a 49k vocabulary."""
    from relufy.embedded import smollm2_gguf

    path = smollm2_gguf()
    former_path(path, tmp_path / "ref", tokenizer=False)  # the tokenizer is the same call in both paths
    out = streamed(path, tmp_path / "out")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert_same(tmp_path / "ref", out, skip={"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"})


# --------------------------------------------------------------------------- refused inputs


def _valid(tmp_path, vocab, **kw) -> Path:
    path = tmp_path / "model.gguf"
    write_gguf(path, "llama", vocab, qtype=Q.Q8_0, **kw)
    return path


def _cut(path: Path, size: int) -> Path:
    cut = path.with_name("cut.gguf")
    cut.write_bytes(path.read_bytes()[:size])
    return cut


def _data_start(path: Path) -> int:
    return min(t.data_offset for t in gguf.GGUFReader(path).tensors)


BAD = {
    "empty": (lambda tmp, v: _cut(_valid(tmp, v), 0), "empty"),
    "random bytes": (lambda tmp, v: _bytes(tmp, np.random.default_rng(0).bytes(4096)), "not a GGUF file"),
    "magic then garbage": (lambda tmp, v: _bytes(tmp, b"GGUF" + np.random.default_rng(0).bytes(4096)), "corrupt"),
    "cut in the header": (lambda tmp, v: _cut(_valid(tmp, v), 300), "truncated"),
    "cut in the tensor data": (
        lambda tmp, v: _cut(p := _valid(tmp, v), (_data_start(p) + p.stat().st_size) // 2),
        "truncated",
    ),
    "architecture transformers cannot read": (lambda tmp, v: _valid(tmp, v, arch="bert"), "unsupported GGUF"),
    "architecture relufy does not convert": (lambda tmp, v: _valid(tmp, v, arch="stablelm"), "unsupported model"),
    "vocabulary only": (lambda tmp, v: _valid(tmp, v, tensors=False), "no tensors"),
    "missing FFN tensor": (lambda tmp, v: _valid(tmp, v, drop={"blk.1.ffn_down.weight"}), "blk.1.ffn_down.weight"),
    "missing embedding": (lambda tmp, v: _valid(tmp, v, drop={"token_embd.weight"}), "token_embd.weight"),
    "shape against metadata": (lambda tmp, v: _valid(tmp, v, kv={"feed_forward_length": 64}), "metadata implies"),
    # sizes the tensors do not hold: refused from the tensor table, before a model of that size is built
    "more layers than the tensors": (
        lambda tmp, v: _valid(tmp, v, kv={"block_count": 100_000}),
        "the GGUF metadata says 100,000 layers (num_hidden_layers) but the weights hold 2: no tensor blk.2.*",
    ),
    "tensors of a layer past the metadata": (lambda tmp, v: _valid(tmp, v, kv={"block_count": 1}), "blk.1."),
    "huge embedding": (lambda tmp, v: _valid(tmp, v, kv={"embedding_length": 1 << 30}), "metadata implies"),
}


def _bytes(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_refused_in_one_line(tmp_path, vocab, case):
    make, words = BAD[case]
    path = make(tmp_path, vocab)
    with pytest.raises(RelufyError) as e:
        check_gguf(path)
    message = str(e.value)
    assert str(path) in message and words in message and "\n" not in message
    (tmp_path / "out").mkdir()
    with pytest.raises(RelufyError, match="^" + re.escape(str(path))):
        write_gguf_checkpoint(path, tmp_path / "out")
    assert not any((tmp_path / "out").iterdir())  # refused before anything is written


@pytest.mark.parametrize("case", list(BAD))
def test_bad_gguf_through_the_command_line(tmp_path, vocab, cli, case):
    """As users meet it: convert (and info, eval, generate for files broken in their structure)."""
    from safety import Snapshot, assert_refused

    make, words = BAD[case]
    path = make(tmp_path, vocab)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", path, tmp_path / "out")
    assert_refused(snap, code, err, str(path), words)
    if case in ("empty", "random bytes", "magic then garbage", "cut in the header", "cut in the tensor data", "vocabulary only"):
        (tmp_path / "t.txt").write_text("words " * 50)
        snap = Snapshot(tmp_path)
        for args in (("info", path), ("eval", path, "--data", tmp_path / "t.txt"), ("generate", path)):
            code, err, _ = cli(*args)
            assert_refused(snap, code, err, str(path), words)


@pytest.mark.parametrize("case", ["more layers than the tensors", "tensors of a layer past the metadata"])
def test_sizes_the_tensors_do_not_hold_refused_by_every_command(tmp_path, vocab, cli, case):
    """info built a skeleton of 100,000 layers (minutes), then showed it; generate and eval ran a
    model of block_count layers over a file holding more. Now all refuse from the tensor table."""
    from safety import Snapshot, assert_refused

    make, words = BAD[case]
    path = make(tmp_path, vocab)
    (tmp_path / "t.txt").write_text("words " * 50)
    snap = Snapshot(tmp_path)
    for args in (("info", path), ("eval", path, "--data", tmp_path / "t.txt"), ("generate", path, "--max-new-tokens", "1")):
        code, err, _ = cli(*args)
        assert_refused(snap, code, err, str(path), words)


def test_an_owner_only_gguf_converts_to_owner_only_weights(tmp_path, vocab):
    """Outputs are never wider in permissions than the weights they come from: a 0600 GGUF gives
    0600 shards (the umask's 0644 before), while relufy's own config and card keep the umask's mode."""
    import os
    import stat

    from relufy import convert

    path = _valid(tmp_path, vocab)
    path.chmod(0o600)
    old = os.umask(0o022)
    try:
        out = convert(path, tmp_path / "out")
    finally:
        os.umask(old)
    shards = list(out.glob("*.safetensors"))
    assert shards and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in shards)
    assert stat.S_IMODE((out / "config.json").stat().st_mode) == 0o644
