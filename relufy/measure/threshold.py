"""Training-free activation sparsity by magnitude thresholds (the TEAL / CATS baseline of ``relufy eval
--threshold-sparsity``).

For a level ``s``, every FFN site (a dense FFN, a shared expert, each routed expert) gets one
threshold ``t`` on the magnitude of its combined activation ``h = act(gate) * up`` (the value the
down projection reads, and the one the paper's top-k metric ranks, Eq. 3/4): ``t`` is chosen so that
a fraction ``s`` of the ``|h|`` entries seen on the calibration tokens are below it, and the model
is then run with the entries ``|h| < t`` set to zero. CATS thresholds ``|act(gate)|`` only and TEAL
the input of each projection; thresholding ``h`` itself drops exactly the terms the down projection
would add, so it is the variant comparable with the top-k curve and with a dReLU model's own zeros.

Calibration runs the unmasked model over the calibration tokens and thresholds every site on those
activations (as TEAL and CATS do), so with all sites masked at once the realized sparsity of later
layers drifts a little from ``s``: ``relufy eval`` reports the sparsity it measures on the scored
windows. The quantile is exact: a first pass builds a histogram of ``log2 |h|`` per site and expert,
a second pass keeps only the values in the bins where the wanted ranks fall. A site's entries that
are already zero count as below every threshold (a dReLU model at ``s`` under its own sparsity keeps
``t = 0``, nothing more is dropped). A routed expert that no calibration token reached takes the mean
threshold of its layer's other experts.
"""

from __future__ import annotations

import torch

from ..text import Window
from .sites import ActivationCounter, ffn_sites, observing

BINS = 4096
LOG2_RANGE = (-64.0, 32.0)  # |h| outside 2^-64 .. 2^32 falls into the first / last bin


def _bins(a: torch.Tensor) -> torch.Tensor:
    """Histogram bin of each positive magnitude (the same float32 arithmetic in both passes)."""
    lo, hi = LOG2_RANGE
    return ((a.log2() - lo) * (BINS / (hi - lo))).floor().clamp_(0, BINS - 1).long()


def _key(index, module, expert, per_expert: bool = True) -> tuple[str, int]:
    return index[id(module)].name, (expert or 0) if per_expert else 0


class _Histograms:
    """Pass 1: per (site, expert) the zeros, the positive entries and a histogram of their ``log2 |h|``."""

    def __init__(self, sites, per_expert: bool = True):
        self.index = {id(m): s for s, m in sites}
        self.per_expert = per_expert
        self.zeros: dict = {}
        self.counts: dict = {}

    def __call__(self, module, combined, expert):
        key = _key(self.index, module, expert, self.per_expert)
        a = combined.detach().abs().float().reshape(-1)
        positive = a[a > 0]
        hist = torch.bincount(_bins(positive), minlength=BINS)
        zeros = (a == 0).sum()
        if key in self.counts:
            self.counts[key] += hist
            self.zeros[key] += zeros
        else:
            self.counts[key], self.zeros[key] = hist, zeros
        return combined


class _BinValues:
    """Pass 2: the magnitudes that fall into the wanted bins of each (site, expert)."""

    def __init__(self, sites, wanted: dict, per_expert: bool = True):
        self.index = {id(m): s for s, m in sites}
        self.wanted = wanted  # key -> sorted list of bins
        self.per_expert = per_expert
        self.values: dict = {}  # (key, bin) -> list of tensors

    def __call__(self, module, combined, expert):
        key = _key(self.index, module, expert, self.per_expert)
        bins = self.wanted.get(key)
        if bins:
            a = combined.detach().abs().float().reshape(-1)
            a = a[a > 0]
            b = _bins(a)
            for want in bins:
                self.values.setdefault((key, want), []).append(a[b == want])
        return combined


class Calibration:
    """The thresholds of every level: ``thresholds[s][site name]`` is a list with one ``t`` per expert
    (one item for a dense FFN or shared expert); ``below[s]`` the fraction of calibration entries
    that are zero or under their ``t`` (over all sites and experts), ``entries`` how many there were."""

    def __init__(self, thresholds: dict, below: dict, entries: int, uncalibrated: int):
        self.thresholds = thresholds
        self.below = below
        self.entries = entries
        self.uncalibrated = uncalibrated  # routed experts no calibration token reached


def calibration_windows(ids: torch.Tensor, seq_len: int, bos_id: int | None = None) -> list[Window]:
    """The calibration tokens as back-to-back chunks of ``seq_len`` (BOS first with ``bos_id``),
    every token seen once; nothing is scored (labels all -100)."""
    body = seq_len - (bos_id is not None)
    out = []
    for start in range(0, len(ids), body):
        chunk = ids[start : start + body]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id], dtype=chunk.dtype), chunk])
        out.append(Window(chunk, torch.full_like(chunk, -100)))
    return out


def calibrate(model, levels, forward, per_expert: bool = True) -> Calibration:
    """Per level ``s`` in ``levels``, per FFN site and expert, the threshold ``t`` under which a
    fraction ``s`` of the calibration entries ``|h|`` lie: two calls of ``forward()``, one pass of
    the unmasked model over the calibration windows each (``relufy.measure.evaluate.score``).
    ``per_expert=False``: one threshold per site, on the entries of all its experts together
    (every expert's item in ``thresholds`` is that one)."""
    with observing(model, lambda sites: _Histograms(sites, per_expert)) as hist:
        forward()
    counts = {k: c.cpu() for k, c in hist.counts.items()}
    zeros = {k: int(z) for k, z in hist.zeros.items()}
    # per (key, level): the rank among the positive entries of the first entry not dropped
    plan: dict = {}
    wanted: dict = {}
    for key, c in counts.items():
        positive = int(c.sum())
        n = positive + zeros[key]
        cum = c.cumsum(0)
        for s in levels:
            k = round(s * n)  # entries to fall below t
            if k <= zeros[key]:
                plan[key, s] = None  # t = 0: the zeros alone reach s
            elif k - zeros[key] >= positive:
                plan[key, s] = float("inf")
            else:
                r = k - zeros[key]
                b = int(torch.searchsorted(cum, torch.tensor(r), right=True))
                plan[key, s] = (b, r - (int(cum[b - 1]) if b else 0))
                wanted.setdefault(key, set()).add(b)
    wanted = {k: sorted(v) for k, v in wanted.items()}
    with observing(model, lambda sites: _BinValues(sites, wanted, per_expert)) as picked:
        forward()
    values = {k: torch.cat(v).sort().values.cpu() if v else torch.empty(0) for k, v in picked.values.items()}

    def pick(key, s) -> tuple[float, int]:
        """``t`` and the entries under it (zeros included) of one (site, expert) at level ``s``."""
        step, z, c = plan[key, s], zeros[key], counts[key]
        if step is None:
            return 0.0, z
        if step == float("inf"):
            return step, z + int(c.sum())
        b, r = step
        v = values.get((key, b), torch.empty(0))
        if len(v):  # a forward pass that is not bitwise repeatable may move a value across a bin edge
            t = float(v[min(r, len(v) - 1)])
        else:
            t = 2 ** (LOG2_RANGE[0] + b * (LOG2_RANGE[1] - LOG2_RANGE[0]) / BINS)
        return t, z + int(c[:b].sum()) + int((v < t).sum())

    entries = sum(int(c.sum()) + zeros[k] for k, c in counts.items())
    thresholds: dict = {s: {} for s in levels}
    below: dict = {}
    uncalibrated = 0
    for s in levels:
        dropped = 0
        for site, _ in ffn_sites(model):
            if not per_expert:
                t, n = pick((site.name, 0), s) if (site.name, 0) in counts else (0.0, 0)
                thresholds[s][site.name] = [t] * site.experts
                dropped += n
                continue
            ts = []
            for e in range(site.experts):
                if (site.name, e) in counts:
                    t, n = pick((site.name, e), s)
                    ts.append(t)
                    dropped += n
                else:
                    ts.append(None)
            seen = [t for t in ts if t is not None]
            fill = sum(seen) / len(seen) if seen else 0.0
            if s == levels[0]:
                uncalibrated += len(ts) - len(seen)
            thresholds[s][site.name] = [fill if t is None else t for t in ts]
        below[s] = dropped / entries if entries else float("nan")
    return Calibration(thresholds, below, entries, uncalibrated)


class ThresholdMask:
    """Observer: zero the entries of the combined activation whose magnitude is under the site's
    (expert's) threshold; a threshold of 0 leaves the activation untouched."""

    def __init__(self, sites, thresholds: dict):
        self.t = {id(m): thresholds[s.name] for s, m in sites}

    def __call__(self, module, combined, expert):
        t = self.t[id(module)][expert or 0]
        if t == 0:
            return combined
        return combined.masked_fill(combined.abs() < t, 0)


class MaskedCounter(ActivationCounter):
    """Observer: a mask (``TopKMask``, ``ThresholdMask``), then the counts of ``ActivationCounter``
    on what it leaves (the zeros a masked pass realizes)."""

    def __init__(self, sites, mask):
        super().__init__(sites)
        self.mask = mask

    def __call__(self, module, combined, expert):
        return super().__call__(module, self.mask(module, combined, expert), expert)
