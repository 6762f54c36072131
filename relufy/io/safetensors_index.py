"""Lazy view of a safetensors checkpoint folder: headers only, validated, tensors read on demand.

Reading a header costs a few KB however large the shard is, so a whole checkpoint can be
listed and checked (truncation, corrupt headers, index entries naming missing tensors) before
anything is written.
"""

from __future__ import annotations

import io
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import RelufyError
from ..names import INDEX_FILE, ST_DTYPES
from .paths import inside
from .read import HEADER_BYTES, INDEX_BYTES, JSONError, loads_json, open_regular, read_json

DTYPE_BYTES = {st: d.nbytes for st, d in ST_DTYPES.items()}
"""Safetensors dtype -> bytes per element (derived from ``relufy.names.ST_DTYPES``)."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in ``file``

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def read_header(path: Path) -> tuple[dict[str, dict], dict, int]:
    """``(tensors, metadata, data start)`` of one safetensors file, checked against its size. Only
    a regular file is read (``relufy.io.read``), and of it only the header (at most 100 MiB)."""
    with open_regular(path) as f:
        return _header(f, os.fstat(f.fileno()).st_size, path)


def header_of_bytes(data: bytes, where: str | Path) -> tuple[dict[str, dict], dict, int]:
    """``read_header`` of a safetensors file already in memory (``where`` names it in messages)."""
    return _header(io.BytesIO(data), len(data), where)


def _header(f, size: int, path) -> tuple[dict[str, dict], dict, int]:
    try:
        raw = f.read(8)
        if len(raw) < 8:
            raise RelufyError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(HEADER_BYTES, size - 8):
            raise RelufyError(f"{path}: corrupt or truncated safetensors header")
        body = f.read(n)
    except OSError as e:
        raise RelufyError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = loads_json(body, f"{path}: safetensors header")
    except JSONError:
        raise RelufyError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise RelufyError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise RelufyError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    spans = []
    for name, t in header.items():
        try:
            begin, stop = (int(x) for x in t["data_offsets"])
            if not all(isinstance(x, int) and not isinstance(x, bool) for x in (*t["data_offsets"], *t["shape"])):
                raise TypeError
            if any(x < 0 for x in t["shape"]):
                raise ValueError
            nbytes = math.prod(t["shape"]) * DTYPE_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise RelufyError(f"{path}: corrupt safetensors entry for {name!r}") from None
        if stop - begin != nbytes or begin < 0:
            raise RelufyError(f"{path}: corrupt safetensors entry for {name!r} (size does not match shape)")
        spans.append((begin, stop, name))
    end = 0  # the data section must be covered exactly, without gaps or overlaps (as safetensors checks)
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise RelufyError(f"{path}: corrupt safetensors entry for {name!r} (overlapping or misplaced data)")
        end = stop
    if 8 + n + end != size:
        raise RelufyError(f"{path}: truncated safetensors file ({size} bytes, header describes {8 + n + end})")
    return header, metadata, 8 + n


def read_index(index: Path, folder: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index: tensor name -> shard file in ``folder``."""
    try:
        inside(index, folder)
        weight_map = read_json(index, INDEX_BYTES, "safetensors index")["weight_map"]
    except (JSONError, KeyError, TypeError):
        raise RelufyError(f"{index}: corrupt index (no weight_map)") from None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise RelufyError(f"{index}: corrupt index (weight_map must map tensor names to shard file names)")
    for shard in set(weight_map.values()):
        if Path(shard).name != shard or shard in (".", ".."):
            raise RelufyError(f"{index}: corrupt index (shard {shard!r} is not a file name in the model folder)")
    return weight_map


class Checkpoint:
    """The safetensors weights of a model folder (single file or sharded with an index)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists() or index.is_symlink():
            weight_map = read_index(index, self.folder)
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
        if not files:
            raise RelufyError(f"{self.folder}: no safetensors weights found")
        self.files: list[Path] = []
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for name in files:
            path = self.folder / name
            if not path.is_file():
                what = "is a dangling link" if path.is_symlink() else "is not a file" if path.exists() else "is missing"
                raise RelufyError(f"{index}: names shard {name!r}, which {what}" if weight_map is not None else f"{path} {what}")
            inside(path, self.folder)
            header, meta, data_start = read_header(path)
            self.files.append(path)
            self.metadata[name] = meta
            for t, info in header.items():
                if t in self.tensors:
                    raise RelufyError(f"tensor {t!r} is in both {self.tensors[t].file.name} and {name}")
                start = data_start + info["data_offsets"][0]
                self.tensors[t] = TensorInfo(t, info["dtype"], tuple(info["shape"]), path, start)
        if weight_map is not None:
            for t, name in weight_map.items():
                info = self.tensors.get(t)
                if info is None or info.file.name != name:
                    raise RelufyError(f"{index}: names tensor {t!r} in {name!r}, which does not hold it")
        self.index = weight_map

    def loaded_tensors(self) -> dict[str, TensorInfo]:
        """The tensors transformers loads from the folder: those of the index, else of
        ``model.safetensors`` (other ``.safetensors`` files beside it, such as an export's
        ``sparsity.safetensors``, are not weights), else all."""
        if self.index is None and any(p.name == "model.safetensors" for p in self.files):
            return {n: t for n, t in self.tensors.items() if t.file.name == "model.safetensors"}
        return self.tensors

    def tensors_in(self, path: Path) -> list[TensorInfo]:
        return [t for t in self.tensors.values() if t.file == path]

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)
