"""FFN decode latency, dense vs exact-sparse vs predictor-sparse, on synthetic FFNs of any shape
and sparsity (the cases of ``relufy bench``).

FFN cases are synthetic, so any sparsity can be set exactly: random weights of the shape, one
random token ``x``, and the rows' signs flipped so that for ``x`` the gate is positive on a
fraction ``sqrt(1 - s)`` of neurons and the up projection positive on a fraction ``1 - s`` of
all neurons, inside those: dReLU's combined activation is then non-zero on exactly ``1 - s``.
The exact path pays a dense gate, the up projection on the gate-active rows and the down
projection on the active ones; the predictor path pays its predictor (rank from
``relufy.export.predictors.auto_rank``) and gate, up and down on the ``1 - s`` neurons it selects
(its threshold is set at that quantile: a predictor as sparse as the model).

Dense is the faster of PyTorch's ``F.linear`` and relufy's kernel over all rows, in the same
dtype and thread count. Variants run interleaved, ``repeats`` times each; medians are reported.

``bench_real`` times one FFN shape at a model's own per-layer densities (``relufy bench --data``):
per layer the exact path at the layer's true density and the predictor path at the density its
predictor selects, with the layer's predictor rank; the per-token FFN time is the sum over
layers. The weights are drawn once per shape; each layer only flips the signs of rows (the
exact path's cost depends on which rows are positive, not on their values).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..io.atomic import save_png
from ..modeling.predictor import Predictor, auto_rank
from ..names import torch_dtype_of_name
from . import kernels
from .ffn import SparseFFN

SHAPES = {"7b": (4096, 14336)}


@dataclass
class FFNCase:
    shape: str
    hidden: int
    width: int
    dtype: str
    threads: int
    sparsity: float
    measured: bool  # the model's own measured sparsity (else a fixed level)
    dense_ms: float
    dense_torch_ms: float
    dense_kernel_ms: float
    exact_ms: float
    predictor_ms: float
    predictor_rank: int
    gate_active: float

    @property
    def exact_speedup(self) -> float:
        return self.dense_ms / self.exact_ms

    @property
    def predictor_speedup(self) -> float:
        return self.dense_ms / self.predictor_ms

    @property
    def limit(self) -> float:
        return 1 / (1 - self.sparsity)

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "exact_speedup": self.exact_speedup,
            "predictor_speedup": self.predictor_speedup,
            "limit": self.limit,
        }


def _signed(w: torch.Tensor, x: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Flip rows of ``w`` so that ``w @ x`` is positive exactly on ``positive``."""
    sign = torch.sign(w @ x)
    sign[sign == 0] = 1
    want = torch.where(positive, 1.0, -1.0)
    return w * (sign * want)[:, None]


def make_case(hidden: int, width: int, sparsity: float, seed: int = 0):
    """Weights (fp32), token and index sets for one synthetic dReLU FFN at ``sparsity``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(hidden, generator=g)
    gate_frac = math.sqrt(1 - sparsity)
    order = torch.randperm(width, generator=g)
    gate_pos = torch.zeros(width, dtype=torch.bool)
    gate_pos[order[: max(1, round(gate_frac * width))]] = True
    both = torch.zeros(width, dtype=torch.bool)
    both[order[: max(1, round((1 - sparsity) * width))]] = True
    up_pos = both | (~gate_pos & (torch.rand(width, generator=g) < 0.5))
    scale = hidden**-0.5
    gate = _signed(torch.randn(width, hidden, generator=g) * scale, x, gate_pos)
    up = _signed(torch.randn(width, hidden, generator=g) * scale, x, up_pos)
    down = torch.randn(hidden, width, generator=g) * width**-0.5
    return gate, up, down, x[None], gate_frac


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_ffn(
    shape: str,
    hidden: int,
    width: int,
    dtype: str,
    threads: int,
    sparsity: float,
    measured: bool = False,
    repeats: int = 10,
    seed: int = 0,
) -> FFNCase:
    gate, up, down, x, gate_frac = make_case(hidden, width, sparsity, seed)
    dt = torch_dtype_of_name(dtype)
    ffn = SparseFFN(gate.to(dt), up.to(dt), down.to(dt), "drelu")
    del gate, up, down
    rank = auto_rank(hidden, width, sparsity)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = Predictor(hidden, width, rank).to(dt).requires_grad_(False)
    with torch.no_grad():
        scores = predictor(x.to(dt)).float()
    keep = max(1, round((1 - sparsity) * width))
    ffn.predictor = predictor
    ffn.predictor_threshold = float(scores.topk(keep).values[0, -1])
    all_rows, all_out = torch.arange(width), torch.arange(hidden)
    down_rows = ffn.down_t.t().contiguous()  # [hidden, width]: a plain dense GEMV for the baseline

    def dense_kernel():  # relufy's kernel over every row, no zero is skipped
        h = torch.relu(kernels.rows_dot(ffn.gate, x, all_rows)) * torch.relu(kernels.rows_dot(ffn.up, x, all_rows))
        return kernels.rows_dot(down_rows, h, all_out)

    variants = {
        "dense_torch": lambda: ffn.dense(x),
        "dense_kernel": dense_kernel,
        "exact": lambda: ffn.exact(x),
        "predictor": lambda: ffn.predicted(x, x),
    }
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for fn in variants.values():  # warm up
                fn()
            times = {k: [] for k in variants}
            for _ in range(repeats):
                for k, fn in variants.items():
                    times[k].append(_time(fn))
    finally:
        torch.set_num_threads(previous)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return FFNCase(
        shape,
        hidden,
        width,
        dtype,
        threads,
        sparsity,
        measured,
        min(ms["dense_torch"], ms["dense_kernel"]),
        ms["dense_torch"],
        ms["dense_kernel"],
        ms["exact"],
        ms["predictor"],
        rank,
        gate_frac,
    )


@dataclass
class LayerTime:
    layer: int
    density: float  # fraction of neurons active (measured on text)
    predicted_density: float | None  # fraction the layer's predictor selects (None: no predictor)
    rank: int | None
    exact_ms: float
    predictor_ms: float | None


@dataclass
class RealCase:
    shape: str
    hidden: int
    width: int
    dtype: str
    threads: int
    dense_ms: float  # one layer's dense FFN
    layers: list[LayerTime]

    @property
    def dense_total_ms(self) -> float:
        return self.dense_ms * len(self.layers)

    @property
    def exact_total_ms(self) -> float:
        return sum(t.exact_ms for t in self.layers)

    @property
    def predictor_total_ms(self) -> float | None:
        if any(t.predictor_ms is None for t in self.layers):
            return None
        return sum(t.predictor_ms for t in self.layers)

    @property
    def density(self) -> float:
        return sum(t.density for t in self.layers) / len(self.layers)

    @property
    def predicted_density(self) -> float | None:
        if any(t.predicted_density is None for t in self.layers):
            return None
        return sum(t.predicted_density for t in self.layers) / len(self.layers)

    @property
    def limit(self) -> float:
        """Dense work over active work: the speedup if only active neurons cost anything."""
        return 1 / max(self.density, 1e-9)

    def as_dict(self) -> dict:
        predictor = self.predictor_total_ms
        return {
            "shape": self.shape,
            "hidden": self.hidden,
            "width": self.width,
            "dtype": self.dtype,
            "threads": self.threads,
            "density": self.density,
            "predicted_density": self.predicted_density,
            "dense_ms": self.dense_total_ms,
            "exact_ms": self.exact_total_ms,
            "predictor_ms": predictor,
            "exact_speedup": self.dense_total_ms / self.exact_total_ms,
            "predictor_speedup": self.dense_total_ms / predictor if predictor else None,
            "limit": self.limit,
            "layers": [asdict(t) for t in self.layers],
        }


def _positive_rows(width: int, fraction: float, order: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(width, dtype=torch.bool)
    mask[order[: max(1, round(fraction * width))]] = True
    return mask


def bench_real(
    shape: str,
    hidden: int,
    width: int,
    dtype: str,
    threads: int,
    layers: list[tuple[int, float, float | None, int | None]],
    repeats: int = 10,
    seed: int = 0,
) -> RealCase:
    """``layers``: ``(layer, density, predicted density or None, predictor rank or None)`` per layer."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(hidden, generator=g)
    scale = hidden**-0.5
    gate0 = torch.randn(width, hidden, generator=g) * scale
    up0 = torch.randn(width, hidden, generator=g) * scale
    sign_g, sign_u = torch.sign(gate0 @ x), torch.sign(up0 @ x)
    sign_g[sign_g == 0], sign_u[sign_u == 0] = 1, 1
    dt = torch_dtype_of_name(dtype)
    down = (torch.randn(hidden, width, generator=g) * width**-0.5).to(dt)
    ffn = SparseFFN(gate0.to(dt), up0.to(dt), down, "drelu")
    x = x[None]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = []
    try:
        with torch.inference_mode():
            all_rows, all_out = torch.arange(width), torch.arange(hidden)
            down_rows = ffn.down_t.t().contiguous()

            def dense_kernel():  # as in bench_ffn: the faster of this and F.linear is the baseline
                h = torch.relu(kernels.rows_dot(ffn.gate, x, all_rows)) * torch.relu(kernels.rows_dot(ffn.up, x, all_rows))
                return kernels.rows_dot(down_rows, h, all_out)

            baseline = {"torch": lambda: ffn.dense(x), "kernel": dense_kernel}
            for fn in baseline.values():
                fn()
            dense_times = {k: [] for k in baseline}
            for _ in range(repeats):
                for k, fn in baseline.items():
                    dense_times[k].append(_time(fn))
            dense_ms = min(statistics.median(v) for v in dense_times.values())
            for layer, density, predicted, rank in layers:
                order = torch.randperm(width, generator=g)
                gate_pos = _positive_rows(width, math.sqrt(max(density, 0.0)), order)
                both = _positive_rows(width, density, order)
                up_pos = both | (~gate_pos & (torch.rand(width, generator=g) < 0.5))
                ffn.gate = (gate0 * (sign_g * torch.where(gate_pos, 1.0, -1.0))[:, None]).to(dt).contiguous()
                ffn.up = (up0 * (sign_u * torch.where(up_pos, 1.0, -1.0))[:, None]).to(dt).contiguous()
                ffn._all_rows = None
                variants = {"exact": lambda: ffn.exact(x)}
                if predicted is not None and rank is not None:
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(seed + layer)
                        ffn.predictor = Predictor(hidden, width, rank).to(dt).requires_grad_(False)
                    ffn._pred_rows = None
                    scores = ffn.predictor(x.to(dt)).float()
                    keep = max(1, round(predicted * width))
                    ffn.predictor_threshold = float(scores.topk(keep).values[0, -1])
                    variants["predictor"] = lambda: ffn.predicted(x, x)
                for fn in variants.values():
                    fn()
                times = {k: [] for k in variants}
                for _ in range(repeats):
                    for k, fn in variants.items():
                        times[k].append(_time(fn))
                ms = {k: statistics.median(v) for k, v in times.items()}
                out.append(LayerTime(layer, density, predicted, rank, ms["exact"], ms.get("predictor")))
    finally:
        torch.set_num_threads(previous)
    return RealCase(shape, hidden, width, dtype, threads, dense_ms, out)


def scaled_rank(rank: int, model_shape: tuple[int, int], shape: tuple[int, int], multiple: int = 16) -> int:
    """The rank whose predictor costs the same share of a ``shape`` FFN as ``rank`` does of a
    ``model_shape`` one (cost ``rank * (hidden + width)`` against ``3 * hidden * width``)."""
    (h0, w0), (h1, w1) = model_shape, shape
    r = rank * (h1 * w1 / (h1 + w1)) / (h0 * w0 / (h0 + w0))
    return int(max(multiple, min(multiple * math.ceil(r / multiple), min(h1, w1))))


def write_plot(cases: list[FFNCase], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(c.shape, c.dtype, c.threads) for c in cases})
    fig, axes = plt.subplots(1, len({(c.shape) for c in cases}), figsize=(6 * len({c.shape for c in cases}), 4), squeeze=False)
    shapes = sorted({c.shape for c in cases})
    for ax, shape in zip(axes[0], shapes, strict=True):
        fixed = sorted({c.sparsity for c in cases if c.shape == shape})
        ax.plot(fixed, [1 / (1 - s) for s in fixed], "k--", label="limit 1/(1-s)")
        for sh, dtype, threads in groups:
            if sh != shape:
                continue
            rows = sorted((c for c in cases if (c.shape, c.dtype, c.threads) == (sh, dtype, threads)), key=lambda c: c.sparsity)
            s = [c.sparsity for c in rows]
            ax.plot(s, [c.exact_speedup for c in rows], "o-", label=f"exact {dtype} {threads}t")
            ax.plot(s, [c.predictor_speedup for c in rows], "s:", label=f"predictor {dtype} {threads}t")
        ax.set(
            xlabel="sparsity s",
            ylabel="speedup over dense",
            yscale="log",
            title=f"FFN decode, {shape} ({rows[0].hidden}x{rows[0].width})",
        )
        ax.axhline(1, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
