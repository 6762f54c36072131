#!/usr/bin/env python
"""Peak memory of streaming a 7B GGUF into a Hugging Face checkpoint (``relufy.io.gguf``).

1. Writes a synthetic ``llama`` GGUF with Llama-2-7B / Mistral-7B shapes (hidden 4096, FFN 14336,
   32 layers, 32 heads / 8 KV heads, vocab 32000, untied output): Q4_0 weights, F32 norms, a
   byte-level vocabulary. The Q4_0 blocks are random bytes under a fixed scale, generated and
   written one tensor at a time (never float32 for the model): about 3.9 GB on disk for 32 layers.
2. Runs ``relufy convert GGUF OUT --dtype D`` (which streams through ``write_gguf_checkpoint``) in a
   child process and reports its wall time
   and peak RSS (``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the GGUF is written by this process,
   so the child is the only one counted).
3. Compares the peak with the bound: 1 GiB + the largest tensor in float32 (the 32000 x 4096
   embedding: 500 MiB). Exits 1 above it. Deletes the GGUF and the output unless ``--keep``.

    python benchmarks/bench_gguf.py --layers 4          # quick run (~0.7 GB GGUF)
    python benchmarks/bench_gguf.py                     # the full 7B, bf16 output (~13.5 GB)
"""

from __future__ import annotations

import argparse
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GiB, MiB = 1024**3, 1024**2
SHAPE = dict(hidden=4096, ffn=14336, layers=32, heads=32, kv_heads=8, vocab=32000)
REPO = Path(__file__).resolve().parent.parent


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """(GGUF name, shape in torch order) of a llama model, in llama.cpp's order."""
    h, f, v = SHAPE["hidden"], SHAPE["ffn"], SHAPE["vocab"]
    kv = h // SHAPE["heads"] * SHAPE["kv_heads"]
    specs = [("token_embd.weight", (v, h))]
    for i in range(layers):
        b = f"blk.{i}"
        specs += [
            (f"{b}.attn_norm.weight", (h,)),
            (f"{b}.attn_q.weight", (h, h)),
            (f"{b}.attn_k.weight", (kv, h)),
            (f"{b}.attn_v.weight", (kv, h)),
            (f"{b}.attn_output.weight", (h, h)),
            (f"{b}.ffn_norm.weight", (h,)),
            (f"{b}.ffn_gate.weight", (f, h)),
            (f"{b}.ffn_up.weight", (f, h)),
            (f"{b}.ffn_down.weight", (h, f)),
        ]
    return specs + [("output_norm.weight", (h,)), ("output.weight", (v, h))]


def write_gguf(path: Path, layers: int) -> None:
    """The synthetic GGUF, one tensor in memory at a time."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    h = SHAPE["hidden"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("synthetic-7b")
    for key, value in {
        "context_length": 4096,
        "block_count": layers,
        "feed_forward_length": SHAPE["ffn"],
        "embedding_length": h,
        "attention.head_count": SHAPE["heads"],
        "attention.head_count_kv": SHAPE["kv_heads"],
        "rope.dimension_count": h // SHAPE["heads"],
        "vocab_size": SHAPE["vocab"],
    }.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32("llama.rope.freq_base", 10000.0)
    # byte-level BPE: specials, the 256 byte symbols, a few merges, then filler tokens
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<unk>", "<s>", "</s>", *bytes_to_unicode().values(), "to", "tok"]
    tokens += [f"tok{i}" for i in range(SHAPE["vocab"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    specs = tensor_specs(layers)
    block, block_bytes = gguf.GGML_QUANT_SIZES[Q.Q4_0]
    for name, shape in specs:
        if len(shape) == 1:
            w.add_tensor_info(name, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            byte_shape = (shape[0], shape[1] // block * block_bytes)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), raw_dtype=Q.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(0)
    scale = np.frombuffer(np.float16(0.02).tobytes(), dtype=np.uint8)
    for _, shape in specs:
        if len(shape) == 1:
            w.write_tensor_data(rng.uniform(0.8, 1.2, shape).astype(np.float32))
            continue
        blocks = np.frombuffer(rng.bytes(shape[0] * shape[1] // block * block_bytes), dtype=np.uint8).copy()
        blocks = blocks.reshape(-1, block_bytes)
        blocks[:, :2] = scale  # a fixed fp16 scale per block; the 4-bit values are random
        w.write_tensor_data(blocks.reshape(shape[0], -1))
    w.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where the GGUF and output go (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"], help="decoder layers (32: the full 7B)")
    parser.add_argument("--dtype", default="bf16", choices=["keep", "bf16", "fp16", "fp32"], help="output dtype")
    parser.add_argument("--keep", action="store_true", help="keep the GGUF and the output")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-gguf-", dir=args.workdir))
    gguf_path, out = work / "synthetic-7b.Q4_0.gguf", work / "out"
    try:
        t = time.perf_counter()
        write_gguf(gguf_path, args.layers)
        size = gguf_path.stat().st_size
        print(f"GGUF: {args.layers} layers, {size / GiB:.2f} GiB, written in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "relufy", "convert", str(gguf_path), str(out), "--dtype", args.dtype], check=True, cwd=REPO
        )
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        written = sum(p.stat().st_size for p in out.iterdir() if p.suffix == ".safetensors")
        largest = SHAPE["vocab"] * SHAPE["hidden"] * 4
        bound = GiB + largest
        print(f"output: {written / GiB:.2f} GiB ({args.dtype}) in {seconds:.0f} s, {written / MiB / seconds:.0f} MiB/s")
        print(
            f"peak RSS {peak / MiB:.0f} MiB; bound 1 GiB + largest tensor in fp32 ({largest / MiB:.0f} MiB) "
            f"= {bound / MiB:.0f} MiB: {'OK' if peak <= bound else 'EXCEEDED'}"
        )
        return 0 if peak <= bound else 1
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
