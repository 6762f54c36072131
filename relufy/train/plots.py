"""The PNG of training curves written at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import save_png


def plot_curves(metrics: Path, out: Path) -> Path | None:
    rows = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line.strip()]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in rows])
    axes[0].set(xlabel="step", ylabel="training loss", title="Loss")
    held = [(r["step"], r["heldout_ppl"]) for r in rows if r.get("heldout_ppl")]
    if held:
        ax = axes[0].twinx()
        ax.plot(*zip(*held), "o--", color="tab:orange")
        ax.set_ylabel("held-out ppl")
    axes[1].plot(steps, [r["lr"] for r in rows], color="tab:green")
    axes[1].set(xlabel="step", ylabel="learning rate", title="Schedule")
    axes[2].plot(steps, [100 * r["sparsity"] for r in rows], color="tab:red")
    axes[2].set(xlabel="step", ylabel="zeros in FFN activation (%)", ylim=(0, 100), title="Activation sparsity")
    fig.tight_layout()
    save_png(fig, out, dpi=110)
    plt.close(fig)
    return out
