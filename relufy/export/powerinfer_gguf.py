"""PowerInfer's GGUF, written directly: ``relufy export --layout powerinfer-gguf``.

Hand-written because no library writes PowerInfer's GGUF dialect: llama.cpp's and the ``gguf``
package's converters know neither its ``bamboo`` architecture with predictor tensors
(``blk.N.fc1`` / ``blk.N.fc2``) and transposed down projections (``blk.N.ffn_down_t``), nor its
``powerinfer.sparse_threshold`` key, nor its file magic ``PWRI`` (what makes PowerInfer load a
file for sparse inference; a plain ``GGUF`` one runs dense). PowerInfer's own ``convert.py``
needs its gguf-py fork and numpy < 2 beside relufy.

What it writes is what ``convert.py`` of SJTU-IPADS/PowerInfer at commit ``d3ebd7c`` (file line
numbers below are from there) writes for the folder of ``--layout powerinfer`` with
``--vocabtype bpe`` (``spm`` when the tokenizer is a ``tokenizer.model``) and ``--outtype
{f32,f16,q8_0}``: the same keys in the same order with the same types and values, the same
tensors (names, shapes, types, bytes) in the same order, the same alignment and padding, so the
same file byte for byte (q8_0: but for the departures below). Only the ``gguf`` package's
``GGUFWriter`` frames the file; every choice of content follows ``convert.py``:

- keys (``OutputFile.add_meta_arch``, convert.py:841-878): ``general.architecture`` (bamboo),
  ``general.name`` (the model folder's name; ``LLaMA v2`` when the context is 4096), then
  ``bamboo.{context_length, embedding_length, block_count, feed_forward_length}``,
  ``bamboo.rope.dimension_count`` (hidden / heads), ``bamboo.attention.{head_count,
  head_count_kv, layer_norm_rms_epsilon}``, ``bamboo.rope.freq_base``, ``bamboo.rope.scaling.*``
  for linear / yarn, ``general.file_type`` (0 f32, 1 f16, 7 q8_0: ``GGMLFileType``,
  convert.py:118-122), ``powerinfer.sparse_threshold`` (float32, from ``predictor/config.json``;
  gguf-py/gguf/constants.py:74-75); then the vocabulary (``add_meta_vocab``, convert.py:880-898)
  and ``gguf.SpecialVocab`` (gguf-py/gguf/vocab.py): merges, special token ids, add-bos/eos flags;
- tensors: the checkpoint's in the order of its ``model.safetensors`` (sorted by name), renamed
  by ``gguf.TensorNameMap`` (``token_embd``, ``output``, ``blk.N.attn_q`` ...), q and k permuted
  to GGML's rotary layout (convert.py:447-453), ``mlp.down_proj`` stored transposed as
  ``blk.N.ffn_down_t`` (``postprocess_transpose``, convert.py:1038-1048); then per layer the
  predictor ``blk.N.fc1.weight`` (``[rank, hidden]`` as in torch) and ``blk.N.fc2.weight``
  (``[width, rank]``), read from fp16 files (convert.py:1117-1134); 1-D tensors are f32, the rest
  ``--outtype`` (``type_for_tensor``, convert.py:124-128); q8_0 is convert.py's own numpy
  quantizer (convert.py:81-95), which rounds ``x / d`` half to even where ``gguf.quants`` rounds
  ``x * (1 / d)`` half away from zero (ggml's C reference), so a few quants differ by one;
- the file: GGUF v3, 32-byte alignment, every tensor padded to 32 bytes, then the first four
  bytes overwritten with ``PWRI`` (convert.py:1301-1304; ggml.c:19480-19486 reads it).

Departures, all under q8_0 (f16 and f32 files are convert.py's byte for byte):

- ``blk.N.ffn_down_t`` stays f16. PowerInfer's CPU kernel for it (``GGML_OP_AXPY``: any type but
  q4_0 goes to ``ggml_compute_forward_mul_mat_axpy``, ggml.c:14913-14923, which reads the rows as
  f16 whatever their type, ggml.c:14314 and 14430) turns convert.py's q8_0 file into NaN logits
  (PowerInfer's ``perplexity``: nan on every chunk); with this one f16 matrix per layer it runs;
- a matrix whose rows are not a multiple of 32 values (a predictor of rank 48, say) stays f16,
  since a q8_0 block cannot straddle rows; convert.py quantizes it across rows, which ggml misreads.

And a sharded checkpoint gives convert.py its tensors shard by shard, here sorted as one: the
same tensors, in another order.

The GPU/CPU neuron split PowerInfer makes on first GPU use reads ``activation/activation_{i}.pt``
beside the GGUF (llama.cpp:3088-3110), which the layout writes there.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import RelufyError

POWERINFER_COMMIT = "d3ebd7c5666348cf43c22f0d62dfbc9a763cffb8"
MAGIC = b"PWRI"  # ggml.h:247 GGUF_POWERINFER_MAGIC
GGUF_FILE = "model.gguf"
GGUF_TYPES = ("f16", "q8_0", "f32")
_ALIGNMENT = 32  # gguf-py/gguf/constants.py:13
_Q8_0_BLOCK = 32

# ggml tensor types (constants.py:416-434) and general.file_type per --outtype (convert.py:118-122)
_F32, _F16, _Q8_0 = 0, 1, 8
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}
# token types (constants.py:401-408)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# HF Llama / Mistral names -> PowerInfer's (gguf-py/gguf/tensor_mapping.py, constants.py:150-175)
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down_t",  # stored transposed (convert.py:1038-1048)
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.weight")


def gguf_name(name: str) -> str | None:
    """PowerInfer's name of a HF Llama tensor; None for one the bamboo architecture lacks."""
    if name.endswith(".weight") and name[: -len(".weight")] in _GLOBAL:
        return _GLOBAL[name[: -len(".weight")]] + ".weight"
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in _BLOCK:
        return f"blk.{m.group(1)}.{_BLOCK[m.group(2)]}.weight"
    return None


# ---- tensors ---------------------------------------------------------------------------------------


def permute(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF's rotate-half q / k rows to GGML's interleaved rotary layout (convert.py:447-453)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (f16 scale + 32 int8) of float32 ``values`` along the last axis, as bytes: exactly
    convert.py's quantizer (convert.py:81-95)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    blocks = values.reshape(-1, _Q8_0_BLOCK)
    d = np.abs(blocks).max(axis=1) / np.float32(127)
    with np.errstate(divide="ignore", invalid="ignore"):
        qs = (blocks / d[:, None]).round()
    qs[d == 0] = 0
    out = np.empty(len(blocks), dtype=np.dtype([("d", "<f2"), ("qs", "i1", (_Q8_0_BLOCK,))]))
    out["d"] = d
    out["qs"] = qs
    return out.view(np.uint8).reshape(*values.shape[:-1], -1)


def tensor_type(name: str, shape: tuple[int, ...], gguf_type: str) -> int:
    """1-D f32, else ``gguf_type`` (convert.py:124-128); under q8_0, f16 for ``ffn_down_t`` (PowerInfer's
    CPU kernel reads it as f16) and for rows that do not hold whole blocks."""
    if len(shape) < 2 or gguf_type == "f32":
        return _F32
    if gguf_type == "q8_0" and shape[-1] % _Q8_0_BLOCK == 0 and not name.endswith("ffn_down_t.weight"):
        return _Q8_0
    return _F16


def _nbytes(shape: tuple[int, ...], qtype: int) -> int:
    n = int(np.prod(shape))
    return {_F32: 4 * n, _F16: 2 * n, _Q8_0: n // _Q8_0_BLOCK * (2 + _Q8_0_BLOCK)}[qtype]


def _encode(values: np.ndarray, qtype: int) -> np.ndarray:
    """``values`` (the tensor as stored in the checkpoint: f32, f16 or bf16 read as f32) in ``qtype``,
    through the conversions convert.py makes (``astype``, then its quantizer)."""
    if qtype == _F16:
        return np.ascontiguousarray(values.astype(np.float16))
    values = np.ascontiguousarray(values.astype(np.float32))
    return quantize_q8_0(values) if qtype == _Q8_0 else values


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def tensor_plan(state: dict[str, torch.Tensor], predictors: dict[int, dict[str, torch.Tensor]], config: dict):
    """``(gguf name, shape, loader)`` of every tensor, in convert.py's order; a loader gives the array
    as the file stores it before the type conversion (permuted, transposed)."""
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    if "lm_head.weight" not in state:  # tied: convert.py reads the untied copy the powerinfer layout saves
        state = {**state, "lm_head.weight": state["model.embed_tokens.weight"]}
    plan = []
    for name in sorted(state):  # model.safetensors lists its tensors sorted by name
        new = gguf_name(name)
        if new is None:
            raise RelufyError(f"layout powerinfer-gguf: PowerInfer's bamboo architecture has no tensor for {name}")
        tensor = state[name]
        shape = tuple(tensor.shape)

        def load(tensor=tensor, name=name):
            values = _numpy(tensor)
            if name.endswith("self_attn.q_proj.weight"):
                return permute(values, n_head, n_head)
            if name.endswith("self_attn.k_proj.weight"):
                return permute(values, n_head, n_head_kv)
            return values.T if name.endswith("mlp.down_proj.weight") else values

        plan.append((new, shape[::-1] if new.endswith("ffn_down_t.weight") else shape, load))
    for layer in sorted(predictors):
        for key in ("fc1.weight", "fc2.weight"):
            tensor = predictors[layer][key].to(torch.float16)  # the powerinfer layout's fp16 files
            plan.append((f"blk.{layer}.{key}", tuple(tensor.shape), lambda tensor=tensor: _numpy(tensor)))
    return plan


# ---- vocabulary ------------------------------------------------------------------------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) of a protobuf message."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, wire, value


def sentencepiece_pieces(path: Path) -> list[tuple[bytes, float, int]]:
    """``(piece, score, token type)`` of a sentencepiece ``tokenizer.model`` as convert.py's
    ``SentencePieceVocab`` reads them (convert.py:400-426), from the protobuf directly (no
    sentencepiece needed): ModelProto field 1 is the pieces, each {1: piece, 2: score, 3: type},
    sentencepiece's types numbered as GGUF's; user-defined pieces count as normal there."""
    try:
        pieces = []
        for field, wire, value in _fields(path.read_bytes()):
            if field != 1 or wire != 2:
                continue
            piece, score, kind = b"", 0.0, _NORMAL
            for f, w, v in _fields(value):
                if f == 1 and w == 2:
                    piece = bytes(v)
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    kind = v
            pieces.append((piece, score, kind if kind in (_UNKNOWN, _CONTROL, _UNUSED, _BYTE) else _NORMAL))
    except (ValueError, IndexError, struct.error) as e:
        raise RelufyError(f"{path}: not a sentencepiece model ({e})") from None
    if not pieces:
        raise RelufyError(f"{path}: not a sentencepiece model (no pieces)")
    return pieces


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _vocab(folder: Path) -> tuple[str, list, list[float], list[int], int, int]:
    """(tokenizer model, tokens, scores, types, size, base size) as convert.py's ``load_vocab`` reads
    ``folder``: ``tokenizer.model`` (spm, convert.py:379-437) or ``vocab.json`` (bpe, convert.py:324-376),
    with ``added_tokens.json`` when present."""
    added_path = folder / "added_tokens.json"
    added = _json(added_path) if added_path.is_file() else None
    if (folder / "tokenizer.model").is_file():
        pieces = sentencepiece_pieces(folder / "tokenizer.model")
        base = len(pieces)
        new = {i: piece for piece, i in (added or {}).items() if i >= base}
        if sorted(new) != list(range(base, base + len(new))):
            raise RelufyError(f"{added_path}: added token ids must follow the vocabulary's {base} pieces")
        entries = pieces + [(new[i].encode("utf-8"), -1000.0, _USER_DEFINED) for i in sorted(new)]
        model = "llama"
    elif (folder / "vocab.json").is_file():
        vocab = _json(folder / "vocab.json")
        if added is None:  # convert.py falls back to tokenizer.json's added tokens not in the vocabulary
            tj = folder / "tokenizer.json"
            items = _json(tj).get("added_tokens", []) if tj.is_file() else []
            added = {item["content"]: item["id"] for item in items if item["content"] not in vocab}
        base = len(vocab)
        if sorted(added.values()) != list(range(base, base + len(added))):
            raise RelufyError(f"{folder}: added token ids must follow the vocabulary's {base} tokens")
        by_id = {i: token for token, i in vocab.items()}
        if sorted(by_id) != list(range(base)):
            raise RelufyError(f"{folder / 'vocab.json'}: token ids are not 0..{base - 1}")
        entries = [(by_id[i], 0.0, _NORMAL) for i in range(base)]
        entries += [(text.encode("utf-8"), -1000.0, _CONTROL) for text, _ in sorted(added.items(), key=lambda kv: kv[1])]
        model = "gpt2"
    else:
        raise RelufyError(
            "layout powerinfer-gguf needs a BPE tokenizer.json or a sentencepiece tokenizer.model (as PowerInfer's converter)"
        )
    return model, [e[0] for e in entries], [float(e[1]) for e in entries], [int(e[2]) for e in entries], len(entries), base


def _merges(folder: Path) -> list[str]:
    """``gguf.SpecialVocab``'s merges: ``tokenizer.json``'s when they are strings, else ``merges.txt``
    (gguf-py/gguf/vocab.py ``_try_load_from_tokenizer_json``, ``_try_load_merges_txt``)."""
    tj = folder / "tokenizer.json"
    if tj.is_file():
        merges = _json(tj).get("model", {}).get("merges")
        if isinstance(merges, list) and merges and isinstance(merges[0], str):
            return merges
    path = folder / "merges.txt"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[0].strip().startswith("#"):
        lines = lines[1:]
    out = []
    for line in lines:
        parts = line.strip().split(None, 3)
        if len(parts) == 2:
            out.append(f"{parts[0]} {parts[1]}")
    return out


_SPECIAL = ("bos", "eos", "unk", "sep", "pad")
_SPECIAL_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic (constants.py:65)
    "pad": "tokenizer.ggml.padding_token_id",
}


def _special(folder: Path, config: dict, n_vocab: int) -> tuple[dict[str, int], dict[str, bool]]:
    """Special token ids and add-token flags as ``gguf.SpecialVocab`` finds them: tokenizer.json's
    added tokens named in tokenizer_config.json first, then config.json's ``*_token_id``."""
    ids: dict[str, int] = {}
    flags: dict[str, bool] = {}

    def put(kind, tid):
        if isinstance(tid, int) and 0 <= tid < n_vocab and kind not in ids:
            ids[kind] = tid

    tj, tc = folder / "tokenizer.json", folder / "tokenizer_config.json"
    added = _json(tj).get("added_tokens") if tj.is_file() else None
    if added is not None and tc.is_file():
        tok_config = _json(tc)
        for kind in _SPECIAL:
            if isinstance(tok_config.get(f"add_{kind}_token"), bool):
                flags[kind] = tok_config[f"add_{kind}_token"]
            entry = tok_config.get(f"{kind}_token")
            content = entry.get("content") if isinstance(entry, dict) else entry
            if isinstance(content, str):
                put(kind, next((a.get("id") for a in added if a.get("content") == content), None))
    for kind in _SPECIAL:
        put(kind, config.get(f"{kind}_token_id"))
    return ids, {k: v for k, v in flags.items() if k in ("bos", "eos")}  # the fork's writer has no other add_* keys


# ---- the file --------------------------------------------------------------------------------------


def write(
    path: Path,
    folder: Path,
    config: dict,
    state: dict[str, torch.Tensor],
    predictors: dict[int, dict[str, torch.Tensor]],
    threshold: float,
    gguf_type: str = "f16",
    name: str | None = None,
) -> None:
    """PowerInfer's GGUF at ``path``: what convert.py writes for a model folder holding ``config``
    (the bamboo ``config.json`` of the powerinfer layout) and the tokenizer files in ``folder``,
    weights ``state`` (HF names) and per layer the fp16 predictor ``{"fc1.weight", "fc2.weight"}``,
    ``threshold`` (PowerInfer's ``sparse_threshold``), ``--outtype gguf_type``. ``name``:
    ``general.name`` (convert.py names it after the model folder). Tensors are converted and written
    one at a time."""
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise RelufyError(f"layout powerinfer-gguf: tensor type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    arch = config.get("model_type", "bamboo")
    vocab_model, tokens, scores, types, n_tokens, n_base = _vocab(folder)
    special, add_flags = _special(folder, config, n_tokens)  # SpecialVocab sees the size before the check below
    n_vocab = config["vocab_size"]
    if n_vocab != n_tokens:  # check_vocab_size (convert.py:820-836)
        if n_vocab != n_base:
            raise RelufyError(
                f"layout powerinfer-gguf: the model has {n_vocab} token embeddings, its tokenizer {n_tokens} tokens"
            )
        tokens, scores, types = tokens[:n_base], scores[:n_base], types[:n_base]
    merges = _merges(folder) if vocab_model == "gpt2" else []
    if vocab_model == "gpt2" and not merges:
        raise RelufyError("layout powerinfer-gguf: the BPE tokenizer has no merges")

    n_ctx = config.get("max_sequence_length", config.get("max_position_embeddings"))
    hidden, n_head = config["hidden_size"], config["num_attention_heads"]
    writer = gguf.GGUFWriter(path, arch)
    add = writer.add_key_value
    U32, F32, STR, BOOL, ARR = (
        gguf.GGUFValueType.UINT32,
        gguf.GGUFValueType.FLOAT32,
        gguf.GGUFValueType.STRING,
        gguf.GGUFValueType.BOOL,
        gguf.GGUFValueType.ARRAY,
    )
    general_name = "LLaMA v2" if n_ctx == 4096 else (name or "LLaMA")
    add("general.name", general_name, STR)
    add(f"{arch}.context_length", n_ctx, U32)
    add(f"{arch}.embedding_length", hidden, U32)
    add(f"{arch}.block_count", config["num_hidden_layers"], U32)
    add(f"{arch}.feed_forward_length", config["intermediate_size"], U32)
    add(f"{arch}.rope.dimension_count", hidden // n_head, U32)
    add(f"{arch}.attention.head_count", n_head, U32)
    add(f"{arch}.attention.head_count_kv", config.get("num_key_value_heads") or n_head, U32)
    add(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"], F32)
    if config.get("rope_theta") is not None:
        add(f"{arch}.rope.freq_base", config["rope_theta"], F32)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") in ("linear", "yarn"):
        add(f"{arch}.rope.scaling.type", scaling["type"], STR)
        add(f"{arch}.rope.scaling.factor", scaling["factor"], F32)
        if scaling["type"] == "yarn":
            add(f"{arch}.rope.scaling.original_context_length", scaling["original_max_position_embeddings"], U32)
            if "finetuned" in scaling:
                add(f"{arch}.rope.scaling.finetuned", bool(scaling["finetuned"]), BOOL)
    add("general.file_type", _FILE_TYPE[gguf_type], U32)
    add("powerinfer.sparse_threshold", float(threshold), F32)
    add("tokenizer.ggml.model", vocab_model, STR)
    add("tokenizer.ggml.tokens", tokens, ARR)
    add("tokenizer.ggml.scores", scores, ARR)
    add("tokenizer.ggml.token_type", types, ARR)
    if merges:
        add("tokenizer.ggml.merges", merges, ARR)
    for kind, tid in special.items():
        add(_SPECIAL_KEYS[kind], tid, U32)
    for kind, value in add_flags.items():
        add(f"tokenizer.ggml.add_{kind}_token", value, BOOL)

    plan = tensor_plan(state, predictors, config)
    for new, shape, _ in plan:
        qtype = gguf.GGMLQuantizationType(tensor_type(new, shape, gguf_type))
        writer.add_tensor_info(new, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for new, shape, load in plan:
            writer.write_tensor_data(_encode(load(), tensor_type(new, shape, gguf_type)))
    finally:
        writer.close()
    with open(path, "r+b") as f:  # convert.py:1301-1304
        f.write(MAGIC)
