"""Calibration data for sparsity predictors, and the observer that runs a model on predicted
neurons only.

A predictor reads one vector per token and scores each neuron of one FFN (one expert for MoE).
Its input is, by the engines' convention, the residual stream entering the FFN's norm
(``input="residual"``: the decoder layer's ``Family.ffn_norm`` input); ``input="ffn"`` reads the
FFN's own (normalized) input instead. Labels are "the neuron's combined activation is non-zero",
exactly the neurons a sparse FFN must compute.

Rows are kept compactly, one (site, expert) at a time readable: the input in bfloat16 (the
residual stream can exceed float16's range; bfloat16 is what the models run in anyway) and per
neuron one byte, ``encode_magnitude(|combined activation|)``: 0 exactly when the neuron is
inactive (so the labels are exact), else a log2 code at 1/8-octave steps that the
magnitude-weighted loss reads. ``DiskRows`` appends them to files in a scratch folder (what
``relufy export`` uses: memory does not grow with the calibration tokens), ``MemoryRows`` keeps
the same bytes in memory (tests, small runs); both give identical rows.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from ..measure.sites import InputTap, Site

INPUT_DTYPE = torch.bfloat16
_STEPS = 8  # magnitude codes per octave
_ZERO = 128  # code of magnitude 1


def encode_magnitude(a: torch.Tensor) -> torch.Tensor:
    """uint8 codes of ``|a|``: 0 where ``a == 0``, else ``round(8 * log2|a|) + 128`` clamped to [1, 255]
    (magnitudes 2^-16 .. 2^16 at 9% resolution; smaller non-zeros still get code 1)."""
    m = a.detach().abs().float()
    code = (torch.log2(m.clamp_min(1e-30)) * _STEPS).round_().add_(_ZERO).clamp_(1, 255)
    return torch.where(m > 0, code, torch.zeros_like(code)).to(torch.uint8)


def decode_magnitude(codes: torch.Tensor) -> torch.Tensor:
    """float32 magnitudes of ``encode_magnitude`` codes (0 stays 0)."""
    m = torch.exp2((codes.float() - _ZERO) / _STEPS)
    return torch.where(codes > 0, m, torch.zeros_like(m))


def row_bytes(hidden: int, width: int) -> int:
    """Bytes one calibration row takes: the input in bfloat16 and one code byte per neuron."""
    return 2 * hidden + width


class MemoryRows:
    """Rows per key, kept in memory (the same bytes ``DiskRows`` writes)."""

    def __init__(self):
        self._x: dict = {}
        self._m: dict = {}
        self.counts: dict = {}

    def add(self, key, x: torch.Tensor, codes: torch.Tensor) -> None:
        self._x.setdefault(key, []).append(x.to("cpu", INPUT_DTYPE).contiguous())
        self._m.setdefault(key, []).append(codes.to("cpu").contiguous())
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def load(self, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(inputs [N, hidden] bfloat16, codes [N, width] uint8)`` or None when the key has no rows."""
        if key not in self._x:
            return None
        return torch.cat(self._x[key]), torch.cat(self._m[key])

    def drop(self, key) -> None:
        self._x.pop(key, None)
        self._m.pop(key, None)

    def close(self) -> None:
        self._x.clear()
        self._m.clear()


class DiskRows:
    """Rows per key appended to two files in ``root``: ``{i}.x`` (bfloat16 inputs) and ``{i}.m``
    (uint8 codes); one key is read back at a time."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index: dict = {}
        self.shape: dict = {}
        self.counts: dict = {}

    def _paths(self, key) -> tuple[Path, Path]:
        i = self.index.setdefault(key, len(self.index))
        return self.root / f"{i}.x", self.root / f"{i}.m"

    def add(self, key, x: torch.Tensor, codes: torch.Tensor) -> None:
        px, pm = self._paths(key)
        self.shape[key] = (x.shape[1], codes.shape[1])
        with open(px, "ab") as f:
            f.write(x.to("cpu", INPUT_DTYPE).contiguous().view(torch.int16).numpy().tobytes())
        with open(pm, "ab") as f:
            f.write(codes.to("cpu").contiguous().numpy().tobytes())
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def load(self, key) -> tuple[torch.Tensor, torch.Tensor] | None:
        if key not in self.index:
            return None
        px, pm = self._paths(key)
        hidden, width = self.shape[key]
        x = torch.from_numpy(np.fromfile(px, dtype=np.int16)).view(INPUT_DTYPE).reshape(-1, hidden)
        m = torch.from_numpy(np.fromfile(pm, dtype=np.uint8)).reshape(-1, width)
        return x, m

    def drop(self, key) -> None:
        if key in self.index:
            for p in self._paths(key):
                p.unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class Collector:
    """Observer: appends (input, magnitude codes) rows per site and expert to ``stores[part]``,
    at most ``limits[part]`` rows per key (None: no limit); ``part`` is set by the caller before
    each run over a group of windows. With no stores given, one ``MemoryRows`` part ``"train"``
    limited to ``max_rows`` (``data()`` returns it decoded)."""

    def __init__(self, sites, tap: InputTap, max_rows: int | None = None, stores: dict | None = None, limits=None):
        self.index = {id(module): site for site, module in sites}
        self.tap = tap
        self.stores = stores if stores is not None else {"train": MemoryRows()}
        self.limits = limits if limits is not None else {"train": max_rows}
        self.part = next(iter(self.stores))

    def __call__(self, module, combined, expert):
        store = self.stores.get(self.part)
        if store is None:
            return combined
        key = (self.index[id(module)], expert or 0)
        have = store.counts.get(key, 0)
        limit = self.limits.get(self.part)
        take = combined.reshape(-1, combined.shape[-1]).shape[0]
        if limit is not None:
            take = min(take, limit - have)
        if take > 0:
            x = self.tap.rows(module, expert)
            store.add(key, x[:take], encode_magnitude(combined.reshape(-1, combined.shape[-1])[:take]))
        return combined

    def data(self) -> dict[tuple[Site, int], tuple[torch.Tensor, torch.Tensor]]:
        """The ``train`` rows: ``{key: (inputs float32, active mask bool)}``."""
        store = self.stores["train"]
        out = {}
        for key in list(store.counts):
            x, m = store.load(key)
            out[key] = (x.float(), m != 0)
        return out


def threshold_of(thresholds, key) -> float:
    """``thresholds``: one float for every predictor, or ``{key: float}``."""
    return float(thresholds[key]) if isinstance(thresholds, dict) else float(thresholds)


class PredictedOnly:
    """Observer: compute only the neurons the predictors select (score >= threshold, one for all or
    one per (site, expert)); the rest are zeroed. Tallies, overall and per (site, expert), how many
    neurons were kept and how many active ones were missed (active: non-zero given the inputs this
    run feeds the layer, i.e. after the earlier layers' masking)."""

    def __init__(self, sites, tap: InputTap, predictors: dict[tuple[Site, int], torch.nn.Module], threshold=0.0):
        self.index = {id(module): site for site, module in sites}
        self.tap = tap
        self.predictors = predictors
        self.threshold = threshold
        self.kept = 0
        self.total = 0
        self.missed = 0
        self.active = 0
        self.per_key: dict[tuple[Site, int], list[int]] = {}  # key -> [kept, total, active, missed, tokens]

    def __call__(self, module, combined, expert):
        site = self.index[id(module)]
        key = (site, expert or 0)
        predictor = self.predictors[key]
        x = self.tap.rows(module, expert)
        with torch.no_grad():
            keep = predictor(x.to(predictor.fc1.weight.dtype)) >= threshold_of(self.threshold, key)
        keep = keep.reshape(combined.shape)
        active = combined != 0
        kept, total, act, missed = int(keep.sum()), keep.numel(), int(active.sum()), int((active & ~keep).sum())
        self.kept += kept
        self.total += total
        self.active += act
        self.missed += missed
        tally = self.per_key.setdefault(key, [0, 0, 0, 0, 0])
        for i, v in enumerate((kept, total, act, missed, total // max(combined.shape[-1], 1))):
            tally[i] += v
        return combined * keep

    def key_metrics(self, key) -> dict:
        """``computed`` (fraction of neurons kept), ``missed`` (of active ones), ``density`` (active), tokens."""
        kept, total, active, missed, tokens = self.per_key.get(key, [0, 0, 0, 0, 0])
        return {
            "computed": kept / total if total else math.nan,
            "missed": missed / active if active else 0.0,
            "density": active / total if total else math.nan,
            "tokens": tokens,
        }
