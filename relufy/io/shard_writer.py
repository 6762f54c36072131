"""Streaming safetensors writer: the header first, then tensor bytes one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a shard in memory at once; a shard of a
large model is several GB. Here the header is computed from shapes and dtypes alone, so peak
memory is one tensor, whatever the shard or model size.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .safetensors_index import DTYPE_BYTES

TORCH_TO_ST = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write ``entries`` (name, safetensors dtype, shape) to ``path``, fetching each tensor from
    ``produce(name)`` only when its bytes are due. ``on_tensor(nbytes)`` reports progress."""
    entries = list(entries)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, dtype, shape in entries:
            tensor = produce(name).to(ST_TO_TORCH[dtype]).contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            f.write(data.data)
            if on_tensor:
                on_tensor(data.nbytes)
            del tensor, data


def copy_file(src: Path, dst: Path, link: bool = False) -> None:
    """Copy at disk speed (copy_file_range/sendfile through shutil), or hard-link with ``link``."""
    if link:
        try:
            dst.hardlink_to(src)
            return
        except OSError:
            pass  # other filesystem: fall back to a copy
    shutil.copyfile(src, dst)
