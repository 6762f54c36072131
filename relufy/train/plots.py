"""The PNG of training curves written at the end of a run.

Reads ``metrics.jsonl`` as the loop writes it: a line that is not a whole JSON record (a run
killed while appending) is skipped, and a value that is ``null`` (not finite when logged) is
left out of its curve. ``mark`` goes into the PNG's ``Description`` text chunk: ``relufy train``
marks its ``curves.png`` with the run's id, and replaces only a ``curves.png`` so marked
(``relufy.train.rundir``).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..io.atomic import atomic_file
from .checkpoint import read_metrics


def _points(rows: list[dict], key: str, scale: float = 1.0) -> list[tuple[int, float]]:
    out = []
    for r in rows:
        value = r.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            out.append((r["step"], scale * value))
    return out


def plot_curves(metrics: Path, out: Path, mark: str | None = None) -> Path | None:
    rows = read_metrics(metrics)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def draw(ax, points, *args, **kwargs):
        if points:
            ax.plot(*zip(*points, strict=True), *args, **kwargs)

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    draw(axes[0], _points(rows, "loss"))
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
    held = [(s, v) for s, v in _points(rows, "heldout_ppl") if v]
    if held:
        ax = axes[0].twinx()
        draw(ax, held, "o--", color="tab:orange")
        ax.set_ylabel("held-out ppl")
    draw(axes[1], _points(rows, "lr"), color="tab:green")
    axes[1].set(xlabel="step", ylabel="learning rate", title="Schedule")
    draw(axes[2], _points(rows, "sparsity", 100.0), color="tab:red")
    axes[2].set(xlabel="step", ylabel="zeros in FFN activation (%)", ylim=(0, 100), title="Activation sparsity")
    fig.tight_layout()
    with atomic_file(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Description": mark} if mark else None)
    plt.close(fig)
    return out
