"""The sparse FFN kernels: a small C++ extension (``kernels.cpp``), compiled once per machine
with torch's extension builder (``make install`` builds it; otherwise the first use does, ~1
minute) and cached under ``$RELUFY_CACHE`` (default ``~/.cache/relufy``). Without a compiler the
same functions run in plain PyTorch (``index_select`` + matmul, ``embedding_bag``): correct, but
the gathers copy the selected rows, so they are slower.

``RELUFY_KERNELS=torch`` forces the PyTorch versions.

- ``rows_dot(W, x, idx) -> [batch, k]``: ``y[b, j] = W[idx[j]] . x[b]``
- ``rows_axpy(W, v, idx) -> [batch, hidden]``: ``y[b] = sum_j v[b, j] * W[idx[j]]``
- ``gate_up(Wg, Wu, x, t) -> (g, u)``: the gate for every neuron and, in the same pass, the up
  projection only where some token's gate exceeds ``t`` (0 elsewhere)

``W`` is ``[neurons, hidden]`` (fp32 or bf16, contiguous), ``x``/``v`` fp32, ``idx`` int64.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

_SOURCE = Path(__file__).with_name("kernels.cpp")
_EXT = None
_TRIED = False


def _cache_dir() -> Path:
    root = Path(os.environ.get("RELUFY_CACHE", Path.home() / ".cache" / "relufy"))
    digest = hashlib.sha256(_SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    return root / f"kernels-{digest}"


def extension():
    """The compiled extension, or None (no compiler, or ``RELUFY_KERNELS=torch``)."""
    global _EXT, _TRIED
    if os.environ.get("RELUFY_KERNELS") == "torch":
        return None
    if _EXT is not None or _TRIED:
        return _EXT
    _TRIED = True
    try:
        from torch.utils.cpp_extension import load

        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        _EXT = load(
            name="relufy_sparse_kernels",
            sources=[str(_SOURCE)],
            build_directory=str(folder),
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler / ninja: the PyTorch versions still work
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        warnings.warn(
            f"relufy: sparse C++ kernels unavailable, using PyTorch ops ({reason})",
            stacklevel=2,
        )
        _EXT = None
    return _EXT


def backend() -> str:
    return "cpp" if extension() is not None else "torch"


def rows_dot(w: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    ext = extension()
    if ext is not None and w.device.type == "cpu":
        return ext.rows_dot(w, x, idx)
    return F.linear(x, w.index_select(0, idx).to(x.dtype))


def gate_up(wg: torch.Tensor, wu: torch.Tensor, x: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate for every neuron, up only where some token's gate > ``threshold`` (0 elsewhere)."""
    ext = extension()
    if ext is not None and wg.device.type == "cpu":
        g, u = ext.gate_up(wg, wu, x, float(threshold))
        return g, u
    g = rows_dot(wg, x, torch.arange(wg.shape[0], device=wg.device))
    idx = (g > threshold).any(0).nonzero().squeeze(1)
    u = torch.zeros_like(g)
    u[:, idx] = rows_dot(wu, x, idx)
    return g, u


def rows_axpy(w: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    ext = extension()
    if ext is not None and w.device.type == "cpu":
        return ext.rows_axpy(w, v, idx)
    if w.dtype == v.dtype:  # weighted sum of rows, without copying them
        offsets = torch.zeros(1, dtype=torch.long, device=w.device)
        return torch.cat([F.embedding_bag(idx, w, offsets, mode="sum", per_sample_weights=v[b]) for b in range(v.shape[0])])
    return v @ w.index_select(0, idx).to(v.dtype)


if __name__ == "__main__":  # python -m relufy.sparse.kernels: build now (make install does)
    print(f"relufy sparse kernels: {backend()} ({_cache_dir()})")
