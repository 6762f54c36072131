"""Streaming safetensors writer: the header first, then tensor bytes one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a shard in memory at once; a shard of a
large model is several GB. Here the header is computed from shapes and dtypes alone, so peak
memory is one tensor, whatever the shard or model size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from ..names import torch_dtype_of_st
from .atomic import keep_mode
from .safetensors_index import DTYPE_BYTES, TensorInfo

CHUNK_BYTES = 64 * 1024 * 1024


def recoded_chunks(info: TensorInfo, target: str, chunk_bytes: int = CHUNK_BYTES) -> Iterable[memoryview]:
    """The bytes of ``info`` converted to dtype ``target``, read with plain file reads in chunks
    (no memory map: pages of the source never pile up in the process's memory)."""
    import torch

    step = max(chunk_bytes - chunk_bytes % DTYPE_BYTES[info.dtype], DTYPE_BYTES[info.dtype])
    src, dst = torch_dtype_of_st(info.dtype), torch_dtype_of_st(target)
    with open(info.file, "rb") as f:
        f.seek(info.start)
        remaining = info.nbytes
        while remaining:
            buf = bytearray(min(step, remaining))
            if f.readinto(buf) != len(buf):
                raise OSError(f"{info.file}: unexpected end of file in {info.name}")
            remaining -= len(buf)
            if src == dst:
                yield memoryview(buf)
            else:
                yield memoryview(torch.frombuffer(buf, dtype=src).to(dst).view(torch.uint8).numpy())


def write_safetensors(
    path: Path,
    entries: Iterable[tuple[str, str, tuple[int, ...]]],
    produce: Callable[[str], Iterable],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write ``entries`` (name, safetensors dtype, shape) to ``path``; ``produce(name)`` yields the
    tensor's bytes in chunks, fetched only when due. Returns the number of tensor bytes written."""
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
        for name, _, _ in entries:
            written = sum(f.write(chunk) for chunk in produce(name))
            expected = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
            if written != expected:
                raise ValueError(f"{name}: wrote {written} bytes, expected {expected}")
    return offset


def copy_file(src: Path, dst: Path, link: bool = False) -> None:
    """Copy in the kernel (``copy_file_range``, as GNU cp does; it can share extents on
    reflink filesystems), falling back to shutil; or hard-link with ``link``. A copy gets at
    most the permissions of its source (a private file stays private)."""
    _copy(src, dst, link)
    if not dst.samefile(src):
        keep_mode(dst, os.stat(src).st_mode)


def _copy(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            dst.hardlink_to(src)
            return
        except OSError:
            pass  # other filesystem: fall back to a copy
    try:
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            size, done = os.fstat(fi.fileno()).st_size, 0
            while done < size:
                n = os.copy_file_range(fi.fileno(), fo.fileno(), size - done)
                if n == 0:
                    break
                done += n
        if done == size:
            return
    except (AttributeError, OSError):
        pass  # no copy_file_range here (old kernel, other OS, cross-device on old kernels)
    shutil.copyfile(src, dst)
