"""Training and scoring sparsity predictors (the module itself: ``relufy.modeling.predictor``).

A predictor scores every neuron of its FFN from the token's predictor input; a neuron is
predicted active when its score is at least the threshold (default 0, i.e. sigmoid probability
>= 0.5), PowerInfer's rule. A predictor of all zeros therefore keeps every neuron (used for
experts that saw too few calibration tokens). Trained with class-weighted binary cross-entropy
on "combined activation != 0" labels: active neurons are the minority and missing one costs
quality, so positives weigh ``pos_weight`` times more (default: the negative/positive ratio of
the layer, which balances both classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..modeling.predictor import Predictor


@dataclass(frozen=True)
class PredictorMetrics:
    recall: float  # active neurons predicted active
    precision: float  # predicted-active neurons that are active
    predicted_sparsity: float  # fraction of neurons predicted inactive
    sparsity: float  # true fraction of inactive neurons
    tokens: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("recall", "precision", "predicted_sparsity", "sparsity", "tokens")}


def predictor_metrics(
    predictor: Predictor, x: torch.Tensor, y: torch.Tensor, threshold: float, batch: int = 4096
) -> PredictorMetrics:
    tp = fp = fn = kept = active = 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            pred = predictor(x[i : i + batch]) >= threshold
            truth = y[i : i + batch]
            tp += int((pred & truth).sum())
            fp += int((pred & ~truth).sum())
            fn += int((~pred & truth).sum())
            kept += int(pred.sum())
            active += int(truth.sum())
    total = y.numel()
    return PredictorMetrics(
        recall=tp / (tp + fn) if tp + fn else 1.0,
        precision=tp / (tp + fp) if tp + fp else 1.0,
        predicted_sparsity=1 - kept / total if total else float("nan"),
        sparsity=1 - active / total if total else float("nan"),
        tokens=int(y.shape[0]),
    )


def train_predictor(
    x: torch.Tensor,
    y: torch.Tensor,
    rank: int,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 1024,
    pos_weight: float | None = None,
    seed: int = 0,
) -> Predictor:
    """Fit a predictor to inputs ``x [N, hidden]`` and active masks ``y [N, width]`` (bool)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, width = x.shape[1], y.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = Predictor(hidden, width, rank).to(x.device)
    if pos_weight is None:
        pos = float(y.float().mean())
        pos_weight = (1 - pos) / pos if 0 < pos < 1 else 1.0
    weight = torch.tensor(pos_weight, device=x.device)
    # the residual stream's scale varies a lot between layers: fit on unit-RMS inputs and fold
    # the scale into fc1 at the end, so the stored predictor reads the raw input
    scale = x.float().pow(2).mean().sqrt().clamp_min(1e-6)
    xs = x / scale
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1), eta_min=lr * 0.1)
    n = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=generator).to(x.device)
        logits = predictor(xs[idx])
        loss = F.binary_cross_entropy_with_logits(logits, y[idx].float(), pos_weight=weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        predictor.fc1.weight.div_(scale)
    return predictor.eval().requires_grad_(False)
