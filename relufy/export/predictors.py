"""Training, thresholding and scoring sparsity predictors (the module itself: ``relufy.modeling.predictor``).

A predictor scores every neuron of its FFN from the token's predictor input; a neuron is
predicted active when its score is at least the threshold, PowerInfer's rule. A predictor of all
zeros therefore keeps every neuron at any threshold <= 0 (used for experts that saw too few
calibration tokens).

Training: binary cross-entropy on "combined activation != 0" labels. Active neurons are the
minority and missing one costs quality, so positives weigh ``pos_weight`` times more (default:
the negative/positive ratio of the layer, which balances both classes). With
``magnitude_power`` p > 0 a positive's weight is further multiplied by ``|a|^p / mean(|a|^p)``
(``a`` its activation; the mean over the layer's positives): missing a large activation costs
more, and the average weight of positives is unchanged.

Start: given its FFN's pre-activations (``preact``), a predictor starts from the FFN's own
weights (``linear_init``) rather than at random. A neuron is active when its gate and up
pre-activations are both positive, and both are linear in the FFN input, which is the predictor
input up to the norm in front of the FFN (RMSNorm: a per-token positive scale, which signs
ignore). ``linear_init`` fits, by least squares over the calibration rows, the map from the
predictor input to the standardized gate and up pre-activations (times each row's RMS, which
makes the map linear), then keeps its best rank-``r`` part over the input distribution
(reduced-rank regression: the top eigenvectors of the whitened fit). ``fc1`` holds the ``r``
input directions twice, as ``+v`` and ``-v``, so that ``relu(z) - relu(-z) = z`` passes them on
linearly, and ``fc2`` starts at each neuron's gate + up estimate from them. The BCE steps then
correct what a sum of the two estimates gets wrong about "both positive". No library computes
this (it reads the FFN's weights through relufy's layouts), hence the few lines of linear
algebra here.

Threshold: ``recall_threshold`` picks, per predictor, the largest threshold whose recall on the
given rows is at least a target (the (1 - target) quantile of the active neurons' scores).

Inputs ``x`` may be any float dtype (bfloat16 calibration rows are cast batch by batch); labels
``y`` are a bool mask or ``relufy.export.calibration.encode_magnitude`` codes (0: inactive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling.predictor import Predictor
from .calibration import decode_magnitude


@dataclass(frozen=True)
class PredictorMetrics:
    recall: float  # active neurons predicted active
    precision: float  # predicted-active neurons that are active
    predicted_sparsity: float  # fraction of neurons predicted inactive
    sparsity: float  # true fraction of inactive neurons
    tokens: int
    computed: float = float("nan")  # fraction of neurons predicted active (1 - predicted_sparsity)
    missed: float = float("nan")  # fraction of active neurons predicted inactive (1 - recall)
    missed_magnitude: float = float("nan")  # share of the active neurons' |activation| predicted inactive (codes only)

    def as_dict(self) -> dict:
        keys = ("recall", "precision", "predicted_sparsity", "sparsity", "tokens", "computed", "missed", "missed_magnitude")
        return {k: getattr(self, k) for k in keys}


def _scores(predictor: Predictor, x: torch.Tensor) -> torch.Tensor:
    w = predictor.fc1.weight
    with torch.no_grad():
        return predictor(x.to(w.device, w.dtype))


def predictor_metrics(
    predictor: Predictor, x: torch.Tensor, y: torch.Tensor, threshold: float, batch: int = 4096
) -> PredictorMetrics:
    tp = fp = fn = kept = active = 0
    mass = missed_mass = 0.0
    codes = y.dtype == torch.uint8
    for i in range(0, x.shape[0], batch):
        pred = (_scores(predictor, x[i : i + batch]) >= threshold).cpu()
        truth = y[i : i + batch] != 0
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
        kept += int(pred.sum())
        active += int(truth.sum())
        if codes:
            m = decode_magnitude(y[i : i + batch])
            mass += float(m.sum())
            missed_mass += float((m * ~pred).sum())
    total = y.numel()
    recall = tp / (tp + fn) if tp + fn else 1.0
    return PredictorMetrics(
        recall=recall,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        predicted_sparsity=1 - kept / total if total else float("nan"),
        sparsity=1 - active / total if total else float("nan"),
        tokens=int(y.shape[0]),
        computed=kept / total if total else float("nan"),
        missed=1 - recall,
        missed_magnitude=missed_mass / mass if mass > 0 else (0.0 if codes else float("nan")),
    )


def recall_threshold(
    predictor: Predictor, x: torch.Tensor, y: torch.Tensor, recall: float, batch: int = 4096, magnitude: bool = False
) -> float | None:
    """The largest threshold at which ``predictor`` keeps at least ``recall`` of the active neurons of
    rows ``x`` / ``y`` (None when they hold no active neuron). ``magnitude``: ``recall`` of their
    summed ``|activation|`` instead of their count (``y`` must be magnitude codes): a predictor may
    then drop many small activations to keep the large ones, which is what the output feels."""
    if magnitude and y.dtype != torch.uint8:
        raise ValueError("a magnitude recall needs magnitude codes (relufy.export.calibration.encode_magnitude)")
    positives, weights = [], []
    for i in range(0, x.shape[0], batch):
        s = _scores(predictor, x[i : i + batch]).cpu()
        active = y[i : i + batch] != 0
        positives.append(s[active])
        if magnitude:
            weights.append(decode_magnitude(y[i : i + batch][active]))
    scores = torch.cat(positives).float() if positives else torch.empty(0)
    n = scores.numel()
    if n == 0:
        return None
    if magnitude:
        order = scores.argsort(descending=True)
        mass = torch.cat(weights)[order].double().cumsum(0)
        # the fewest highest-scoring positives whose magnitude reaches recall of the total
        k = int(torch.searchsorted(mass, recall * float(mass[-1]) * (1 - 1e-12))) + 1
        return float(scores[order[min(k, n) - 1]])
    # keep the k highest-scoring positives, k = ceil(recall * n): threshold = the k-th highest score
    k = min(n, math.ceil(round(recall * n, 6)))
    if k <= 0:
        return float("inf")
    return float(scores.kthvalue(n - k + 1).values)


def pick_threshold(predictor: Predictor, rows: dict, recall: float, magnitude: bool = False) -> tuple[float, str] | None:
    """``recall_threshold`` on the first of ``rows`` (``{name: (x, y) or None}``, in order) that
    holds an active neuron: ``(threshold, name)``, or None when none does."""
    for name, data in rows.items():
        found = recall_threshold(predictor, *data, recall, magnitude=magnitude) if data is not None else None
        if found is not None:
            return found, name
    return None


def _chunks(n: int, size: int = 8192):
    return ((i, min(i + size, n)) for i in range(0, n, size))


def linear_init(
    x: torch.Tensor, preact, rank: int, scale: float, device=None, chunk: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """A predictor's start from its FFN's weights (see the module docstring): the first ``2 r`` units,
    ``(fc1 [2 r, hidden], fc2 [width, 2 r])`` with ``r = min(rank // 2, hidden)``, for inputs divided
    by ``scale``. ``preact(rows)`` gives the FFN's gate and up pre-activations ``(g, u)``, each
    ``[rows, width]``, of predictor-input rows, linear in the rows
    (``relufy.measure.sites.preactivations``). The other units (past ``2 * hidden``, an odd last
    one) keep their random start. Memory beyond the rows: one ``[hidden, 2 * width]`` float32
    matrix, a few ``[hidden, hidden]`` ones (the eigensolver's workspace included) and one chunk of
    pre-activations (at a 7B shape, 4096 x 14336, about 0.8 GiB: docs/benchmarks.md)."""
    device = torch.device(device) if device is not None else x.device
    n, hidden = x.shape
    cov = xt = total = square = None
    for a, b in _chunks(n, chunk):
        xb = x[a:b].to(device, torch.float32)
        t = torch.cat(preact(xb), 1).float()
        xs = xb / scale
        if cov is None:
            cov = torch.zeros(hidden, hidden, device=device)
            xt = torch.zeros(hidden, t.shape[1], device=device)
            total = torch.zeros(t.shape[1], device=device, dtype=torch.float64)
            square = torch.zeros_like(total)
        cov += xs.T @ xs
        xt += xs.T @ t
        total += t.sum(0).double()
        square += t.pow(2).sum(0).double()
        del t
    cov /= n
    xt /= n
    std = ((square / n) - (total / n).pow(2)).clamp_min(0).sqrt().float().clamp_min(1e-6)
    xt /= std  # standardized targets: gate and up weigh the same
    evals, evecs = torch.linalg.eigh(cov)
    del cov
    evals = evals.clamp_min(0) + 1e-4 * float(evals.mean()) + 1e-30  # a small ridge: few rows stay finite
    inv_half = (evecs * evals.rsqrt()) @ evecs.T
    del evecs
    # the least-squares map B = C^-1 X'T, whitened: C^(1/2) B = C^(-1/2) X'T, in place by columns
    fit = xt
    for a, b in _chunks(fit.shape[1], 4096):
        fit[:, a:b] = inv_half @ fit[:, a:b]
    width = fit.shape[1] // 2
    r = min(rank // 2, hidden)
    top = torch.linalg.eigh(fit @ fit.T).eigenvectors[:, hidden - r :].flip(1)  # [hidden, r], best first
    directions = inv_half @ top  # [hidden, r]: unit-variance projections of the input
    coeff = top.T @ fit  # [r, 2 * width]: the rank-r fit of the standardized (g, u)
    score = coeff[:, :width] + coeff[:, width:]
    return torch.cat([directions.T, -directions.T]), torch.cat([score.T, -score.T], 1)


def train_predictor(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 1024,
    pos_weight: float | None = None,
    seed: int = 0,
    magnitude_power: float = 0.0,
    device=None,
    preact=None,
) -> Predictor:
    """Fit a predictor to inputs ``x [N, hidden]`` and labels ``y [N, width]`` (bool, or uint8
    magnitude codes, which ``magnitude_power`` > 0 needs); trains on ``device`` (default: x's).
    ``preact``: the FFN's ``(gate, up)`` pre-activations of input rows, to start from its weights
    (``linear_init``); None starts at random."""
    if magnitude_power and y.dtype != torch.uint8:
        raise ValueError("a magnitude-weighted loss needs magnitude codes (relufy.export.calibration.encode_magnitude)")
    device = torch.device(device) if device is not None else x.device
    generator = torch.Generator().manual_seed(seed)
    n, hidden, width = x.shape[0], x.shape[1], y.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = Predictor(hidden, width, rank).to(device)
    positives = sum(int(torch.count_nonzero(y[a:b])) for a, b in _chunks(n))
    if pos_weight is None:
        pos = positives / max(y.numel(), 1)
        pos_weight = (1 - pos) / pos if 0 < pos < 1 else 1.0
    magnitude_mean = 1.0
    if magnitude_power and positives:
        total = 0.0
        for a, b in _chunks(n):
            total += float(decode_magnitude(y[a:b]).pow(magnitude_power).sum())
        magnitude_mean = total / positives
    # the residual stream's scale varies a lot between layers: fit on unit-RMS inputs and fold
    # the scale into fc1 at the end, so the stored predictor reads the raw input
    square = sum(float(x[a:b].float().pow(2).sum()) for a, b in _chunks(n))
    scale = max((square / max(x.numel(), 1)) ** 0.5, 1e-6)
    if preact is not None:
        fc1, fc2 = linear_init(x, preact, rank, scale, device)
        with torch.no_grad():
            predictor.fc1.weight[: fc1.shape[0]] = fc1
            predictor.fc2.weight[:, : fc2.shape[1]] = fc2
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.1)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator)
        xb = (x[idx].float() / scale).to(device)
        yb = y[idx].to(device)
        target = (yb != 0).float()
        logits = predictor(xb)
        if magnitude_power:
            w = decode_magnitude(yb).pow_(magnitude_power).div_(magnitude_mean).mul_(pos_weight)
            weight = torch.where(yb != 0, w, torch.ones_like(w))
            loss = F.binary_cross_entropy_with_logits(logits, target, weight=weight)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        predictor.fc1.weight.div_(scale)
    return predictor.eval().requires_grad_(False)
