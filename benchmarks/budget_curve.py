"""The budget curve of a recovery run: perplexity ratio to the original and FFN zeros against
training tokens, on text outside the training sources, with a fitted power-law trend.

    python benchmarks/budget_curve.py runs/recovery-v2 --plot docs/img/budget_curve.png

Reads the run's ``metrics.jsonl`` (the rows with ``eval``: the steps of ``log.eval_steps``, e.g.
log-spaced) and ``summary.json`` (the original model's perplexity on each eval source, and the
figures after the last step). A run with ``sparsity.final_cutoff`` ends its curve on the figures
without the cutoffs and shows those with them as a separate point (a star; the table's last row).
For each eval source the excess ratio ``r - 1`` is fitted as ``a x tokens^-b`` by least squares
in log-log space over the points from ``--fit-from`` tokens on; the table gives the measured
points and the tokens the trend reaches 1.15x and 1.05x at. The trend is an extrapolation from
one small model on one machine: use it for the order of magnitude, not as a promise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from relufy.pipelines.organism import power_law


def fit(points: list[tuple[int, float]]) -> tuple[float, float] | None:
    """``(a, b)`` of ``r - 1 = a x tokens^-b`` over points with r > 1; None with fewer than 2."""
    return power_law(points)


def tokens_for(ratio: float, a: float, b: float) -> float | None:
    if b <= 0:
        return None
    return ((ratio - 1) / a) ** (-1 / b)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--fit-from", type=int, default=0, help="fit on points from this many training tokens on")
    args = ap.parse_args(argv)
    summary = json.loads((args.run / "summary.json").read_text())
    rows = [json.loads(line) for line in (args.run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "eval" in r]
    labels = list(summary["eval"])
    if not labels:
        raise SystemExit(f"{args.run}: the run has no data.eval_sources")
    cutoff = summary.get("cutoff")  # sparsity.final_cutoff: summary's figures are with it, "before" without
    curves, shifted = {}, {}
    for label in labels:
        original = summary["eval"][label]["ppl_original"]
        pts = [(r["tokens"], r["eval"][label]["ppl"] / original, r["eval"][label]["sparsity"]) for r in rows]
        last = cutoff["before"]["eval"][label] if cutoff else summary["eval"][label]
        if not pts or pts[-1][0] != summary["tokens"]:
            pts.append((summary["tokens"], last["ppl"] / original, last["sparsity"]))
        curves[label] = pts
        if cutoff:
            shifted[label] = (summary["eval"][label]["ppl"] / original, summary["eval"][label]["sparsity"])
    print("| training tokens | " + " | ".join(f"{k} ratio | {k} zeros" for k in labels) + " |")
    print("|---:|" + "---:|---:|" * len(labels))
    for i, (tokens, *_rest) in enumerate(curves[labels[0]]):
        cells = []
        for k in labels:
            _, r, z = curves[k][i]
            cells += [f"{r:.2f}x", f"{z:.1%}"]
        print(f"| {tokens:,} | " + " | ".join(cells) + " |")
    if cutoff:
        cells = [f"{shifted[k][0]:.2f}x | {shifted[k][1]:.1%}" for k in labels]
        print(f"| {summary['tokens']:,} + final cutoff at {cutoff['sparsity']:.0%} | " + " | ".join(cells) + " |")
    trends = {}
    for k in labels:
        trend = fit([(t, r) for t, r, _ in curves[k] if t >= args.fit_from])
        trends[k] = trend
        if trend:
            a, b = trend
            need = {x: tokens_for(x, a, b) for x in (1.15, 1.05)}
            said = ", ".join(f"{x}x at ~{v:,.0f} tokens" if v else f"{x}x: not approached" for x, v in need.items())
            print(f"{k}: ratio - 1 = {a:.3g} x tokens^-{b:.3f} (fit from {args.fit_from:,} tokens); trend: {said}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, az) = plt.subplots(1, 2, figsize=(11, 4))
        for i, k in enumerate(labels):
            t = [p[0] for p in curves[k]]
            ax.plot(t, [p[1] for p in curves[k]], "o", color=f"C{i}", label=f"{k} (measured)")
            if trends[k]:
                a, b = trends[k]
                grid = [t[0] * (t[-1] * 30 / t[0]) ** (j / 60) for j in range(61)]
                ax.plot(grid, [1 + a * x**-b for x in grid], "--", color=f"C{i}", label=f"{k}: 1 + {a:.3g} T^-{b:.2f}")
            az.plot(t, [100 * p[2] for p in curves[k]], "o-", color=f"C{i}", label=k)
            if cutoff:
                ax.plot(t[-1], shifted[k][0], "*", ms=12, color=f"C{i}", label=f"{k}: final cutoff")
                az.plot(t[-1], 100 * shifted[k][1], "*", ms=12, color=f"C{i}", label=f"{k}: final cutoff")
        fitted = f" (trend fitted from {args.fit_from:,} tokens)" if args.fit_from else ""
        ax.axhline(1.15, color="grey", lw=1, ls=":")
        ax.set(xscale="log", yscale="log", xlabel="training tokens", ylabel="perplexity / original's (outside text)")
        ax.annotate("1.15x", (0.01, 1.15), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey")
        ax.set_title("Recovery against training tokens" + fitted, fontsize=10)
        ax.legend(fontsize=8)
        az.set(xscale="log", xlabel="training tokens", ylabel="FFN zeros (%)", title="Zeros on the same text")
        az.legend(fontsize=8)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
