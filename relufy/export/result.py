"""What ``relufy export`` found: one ``PredictorRecord`` per predictor (fitted in
``pipeline.fit_predictors``, scored in ``ExportRun.score``, read by the layout and the card) and the
``ExportResult`` summary (``--json``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .predictors import PredictorMetrics


@dataclass
class PredictorRecord:
    """One predictor (one FFN, one expert): its shape and threshold, its metrics on the held-out
    report rows (``heldout``: None when that expert got no report tokens) and, once the model ran
    with predicted neurons only, what it computed and missed there (``in_situ``)."""

    layer: int
    kind: str
    expert: int | None  # None: a dense FFN or a shared expert
    rank: int
    threshold: float
    threshold_from: str  # "global" (--predictor-threshold), or the rows that set it: "tune", "train"
    heldout: PredictorMetrics | None = None
    in_situ: dict[str, float] = field(default_factory=dict)  # computed, missed, density in the predicted-only run

    @property
    def recall(self) -> float | None:
        return self.heldout.recall if self.heldout is not None else None

    @property
    def precision(self) -> float | None:
        return self.heldout.precision if self.heldout is not None else None

    @property
    def predicted_sparsity(self) -> float | None:
        return self.heldout.predicted_sparsity if self.heldout is not None else None

    @property
    def computed(self) -> float | None:
        return self.heldout.computed if self.heldout is not None else None

    @property
    def missed(self) -> float | None:
        return self.heldout.missed if self.heldout is not None else None

    @property
    def computed_in_situ(self) -> float | None:
        return self.in_situ.get("computed")

    @property
    def missed_in_situ(self) -> float | None:
        return self.in_situ.get("missed")

    def as_dict(self) -> dict:
        """The record as the ``--json`` summary lists it (held-out and in-situ keys only when measured)."""
        out = {
            "layer": self.layer,
            "kind": self.kind,
            "expert": self.expert,
            "rank": self.rank,
            "threshold": self.threshold,
            "threshold_from": self.threshold_from,
        }
        if self.heldout is not None:
            out.update(self.heldout.as_dict())
        out.update({f"{k}_in_situ": v for k, v in self.in_situ.items()})
        return out


@dataclass
class ExportResult:
    out: Path
    layout: str
    sparsity: dict
    reordered: bool
    predictors: list[PredictorRecord] = field(default_factory=list)
    ppl_dense: float | None = None
    ppl_predicted: float | None = None
    predicted_kept: float | None = None  # fraction of neurons computed with predictors
    missed_active: float | None = None  # fraction of active neurons the predictors dropped
    top1_agreement: float | None = None  # next-token argmax equal with predicted neurons only vs dense
    heldout_tokens: int = 0  # tokens of the report windows (every held-out figure is read there)
    tune_tokens: int = 0  # tokens of the windows that picked the per-predictor thresholds
    predictor_recall: float | None = None  # the recall each predictor's threshold was set to reach (None: one threshold)
    predictor_cost: float | None = None  # predictor multiply-adds per token / the dense FFN's
    seconds: float = 0.0

    @property
    def recalls(self) -> list[float]:
        """Held-out recall of every scored predictor."""
        return [p.recall for p in self.predictors if p.recall is not None]

    @property
    def mean_recall(self) -> float | None:
        recalls = self.recalls
        return sum(recalls) / len(recalls) if recalls else None

    @property
    def min_recall(self) -> float | None:
        """Lowest held-out recall over predictors."""
        return min(self.recalls, default=None)

    def summary(self) -> dict:
        out = {}
        for name in (
            *("out", "layout", "sparsity", "reordered", "predictors", "ppl_dense", "ppl_predicted", "predicted_kept"),
            *("missed_active", "top1_agreement", "heldout_tokens", "tune_tokens", "predictor_recall", "min_recall"),
            *("predictor_cost", "seconds"),
        ):
            value = getattr(self, name)
            out[name] = str(value) if isinstance(value, Path) else value
        out["predictors"] = [p.as_dict() for p in self.predictors]
        return out
