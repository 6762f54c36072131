"""The model organism's tables: recovery methods against the budget, as a fraction of pretraining.

    python -m relufy.pipelines.organism budget PRETRAIN/summary.json 1     # 1% of its tokens
    python -m relufy.pipelines.organism table runs/organism/base --plot runs/organism/base/recovery.png

``make organism`` writes the folders this reads (one ``ORG`` per organism):
``pretrain/<activation>/`` (the SwiGLU organism and its twins trained from scratch),
``convert/<activation>/final`` (the untrained conversions), ``recover/<method>/<percent>/``
(each method at each budget), and in each of them ``eval-heldout.json`` / ``eval-ood.json``
(``relufy eval`` on the held-out and the out-of-domain text, same windows for every model).

The table gives per model: training tokens and their share of the organism's pretraining, the
perplexity on both texts and its ratio to the SwiGLU organism's, FFN zeros on the held-out text,
the perplexity with only the top 10% of ``|act(gate) * up|`` kept per token, and wall time.
The training-free thresholds (TEAL/CATS) come from the SwiGLU organism's ``thresholds-<text>.json``. The fit is
``ratio - 1 = a * f^-b`` per method over its budgets (f: the fraction of pretraining tokens),
and from it the fraction at which the ratio would reach 1.05: a forecast, labelled as one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import RelufyError
from ..io.atomic import atomic_file, save_png
from ..io.read import REPORT_BYTES, read_json
from . import run_command

TEXTS = ("heldout", "ood")
METHOD_LABELS = {
    "relufy": "relufy (staged warm start + distillation + L1 + final cutoff)",
    "turbosparse": "Turbo Sparse (dReLU, plain LM loss)",
    "prosparse": "ProSparse (ReLU, progressive L1, final shift)",
    "relufy-reglu": "relufy's recipe on the ReGLU conversion",
}
TARGET = 1.05


def _json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return read_json(path, REPORT_BYTES)  # a regular file within bounds, or one line


def pretrain_tokens(summary: Path) -> int:
    data = _json(summary)
    if data is None:
        raise RelufyError(f"{summary}: missing (pretrain the organism first: make organism-pretrain)")
    return int(data["tokens"])


def budget_tokens(summary: Path, percent: float) -> int:
    """``percent`` of the pretraining tokens recorded in ``summary`` (at least one)."""
    if not 0 < percent <= 100:
        raise RelufyError(f"budget {percent}: a percentage in (0, 100]")
    return max(1, round(pretrain_tokens(summary) * percent / 100))


def _model_row(folder: Path) -> dict | None:
    """A model folder's eval figures on both texts (None when its evals are missing)."""
    row: dict = {}
    for text in TEXTS:
        data = _json(folder / f"eval-{text}.json")
        if data is None:
            return None
        model = data["models"][0]
        row[text] = {
            "ppl": model["ppl"],
            "zeros": model["sparsity"]["mean"],
            "topk90": next((t["ppl"] for t in model.get("topk") or [] if abs(t["sparsity"] - 0.9) < 1e-9), None),
        }
    summary = _json(folder / "summary.json") or {}
    row["tokens"] = summary.get("tokens")
    wall = _json(folder / "wall.json")
    row["seconds"] = wall["seconds"] if wall else None
    return row


def collect(root: Path) -> dict:
    """Every model's figures under one organism folder, with the ratios to the SwiGLU organism."""
    base = _model_row(root / "pretrain" / "swiglu")
    if base is None:
        raise RelufyError(f"{root}/pretrain/swiglu: no eval-heldout.json / eval-ood.json (run make organism)")
    total = pretrain_tokens(root / "pretrain" / "swiglu" / "summary.json")
    rows: list[dict] = []

    def add(kind: str, name: str, row: dict, tokens: int | None, method: str | None = None, percent=None, dense=None):
        entry = {**row, "kind": kind, "name": name, "method": method, "percent": percent, "tokens": tokens}
        for text in TEXTS:
            entry[text]["ratio"] = row[text]["ppl"] / (dense or base)[text]["ppl"]
        rows.append(entry)

    add("pretrained", "SwiGLU organism", base, total)
    # the training-free thresholds, scored on their own windows (past the calibration tokens):
    # their ratio is to the organism's dense perplexity on those windows
    thresholds = {text: _json(root / "pretrain" / "swiglu" / f"thresholds-{text}.json") for text in TEXTS}
    if all(thresholds.values()):
        models = {text: thresholds[text]["models"][0] for text in TEXTS}
        dense = {text: {"ppl": models[text]["ppl"]} for text in TEXTS}
        for t in (0.5, 0.9):
            th = {text: next((x for x in models[text]["threshold"] if abs(x["sparsity"] - t) < 1e-9), None) for text in TEXTS}
            if all(th.values()):
                row = {text: {"ppl": th[text]["ppl"], "zeros": th[text]["realized"]["mean"], "topk90": None} for text in TEXTS}
                row["seconds"] = None
                add("training-free", f"TEAL/CATS threshold {t:.0%}", row, 0, dense=dense)
    for act in ("drelu", "reglu"):
        row = _model_row(root / "convert" / act)
        if row:
            add("converted", f"{act} conversion, untrained", row, 0)
    grid = sorted((p for p in (root / "recover").glob("*/*") if p.is_dir()), key=lambda p: (p.parent.name, float(p.name)))
    for folder in grid:
        method, percent = folder.parent.name, folder.name
        row = _model_row(folder)
        if row:
            add("recovered", METHOD_LABELS.get(method, method), row, row["tokens"], method, float(percent))
    for act in ("drelu", "reglu"):
        row = _model_row(root / "pretrain" / act)
        if row:
            add("scratch", f"{act} twin from scratch (same tokens)", row, row["tokens"])
    return {"organism": root.name, "pretrain_tokens": total, "rows": rows, "fits": fits(rows)}


def power_law(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """``(a, b)`` of ``ratio - 1 = a * x^-b`` by least squares in log-log over points ``(x, ratio)``
    with ratio > 1 and x > 0; None with fewer than two such points."""
    pts = [(math.log(x), math.log(r - 1)) for x, r in points if x > 0 and r > 1]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return math.exp(my - slope * mx), -slope


def fit_power(points: list[tuple[float, float]]) -> dict | None:
    """``power_law`` over ``(fraction, ratio)`` points, with the fraction at which it reaches ``TARGET``."""
    fit = power_law(points)
    if fit is None:
        return None
    a, b = fit
    reach = (a / (TARGET - 1)) ** (1 / b) if b > 0 else None  # f where a f^-b = TARGET - 1
    return {"a": a, "b": b, "points": sum(1 for f, r in points if f > 0 and r > 1), "fraction_at_target": reach}


def fits(rows: list[dict]) -> dict:
    out = {}
    for method in sorted({r["method"] for r in rows if r["method"]}):
        pts = [(r["percent"] / 100, r["heldout"]["ratio"]) for r in rows if r["method"] == method]
        out[method] = fit_power(pts)
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(table: dict) -> str:
    lines = [
        f"Organism `{table['organism']}`: pretrained on {table['pretrain_tokens']:,} tokens. Ratios are to its "
        "perplexity on the same windows; zeros are the mean over FFN layers on the held-out text.",
        "",
        "| model | tokens | % of pretraining | held-out ppl | ratio | out-of-domain ppl | ratio | FFN zeros "
        "| top-k 90% ppl | wall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table["rows"]:
        share = None if r["tokens"] is None else 100 * r["tokens"] / table["pretrain_tokens"]
        name = r["name"] if r["percent"] is None else f"{r['name']} @ {r['percent']:g}%"
        lines.append(
            f"| {name} | {_f(r['tokens'], '{:,}')} | {_f(share, '{:.2f}%')} | {r['heldout']['ppl']:.2f} | "
            f"{r['heldout']['ratio']:.3f}x | {r['ood']['ppl']:.2f} | {r['ood']['ratio']:.3f}x | "
            f"{r['heldout']['zeros']:.1%} | {_f(r['heldout']['topk90'])} | {_f(r['seconds'], '{:.0f} s')} |"
        )
    lines += ["", "Fit per method, held-out ratio - 1 = a * f^-b (f: fraction of pretraining tokens); a forecast of the f"]
    lines += [f"at which the ratio reaches {TARGET}x:", ""]
    for method, fit in table["fits"].items():
        if fit is None:
            lines.append(f"- {method}: fewer than two budgets above 1.0x; no fit")
        else:
            at = _f(fit["fraction_at_target"], "{:.2%}")
            lines.append(f"- {method}: a = {fit['a']:.3g}, b = {fit['b']:.3f} ({fit['points']} budgets); {TARGET}x at f = {at}")
    return "\n".join(lines) + "\n"


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    titles = ("held-out (same kind of text)", "out of domain (dictionary)")
    for ax, text, title in zip(axes, TEXTS, titles, strict=True):
        ax.axhline(1.0, color="grey", lw=1)
        ax.axhline(TARGET, color="tab:green", ls="--", lw=1, label=f"target {TARGET}x")
        for i, method in enumerate(m for m in METHOD_LABELS if any(r["method"] == m for r in table["rows"])):
            pts = sorted((r["percent"], r[text]["ratio"], r["heldout"]["zeros"]) for r in table["rows"] if r["method"] == method)
            ax.plot([p for p, _, _ in pts], [q for _, q, _ in pts], marker="o", color=f"C{i}", label=METHOD_LABELS[method])
            for p, q, z in pts:
                ax.annotate(f"{z:.0%}", (p, q), textcoords="offset points", xytext=(3, 4), fontsize=7, color=f"C{i}")
        for r in table["rows"]:
            if r["kind"] == "scratch" and r["name"].startswith("drelu"):
                ax.axhline(r[text]["ratio"], color="black", ls=":", lw=1, label="dReLU twin from scratch")
            if r["kind"] == "training-free" and r["name"].endswith("90%"):
                ax.axhline(r[text]["ratio"], color="grey", ls="-.", lw=1, label="SwiGLU organism, thresholds at 90%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.2f}x"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:.2f}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(sorted({r["percent"] for r in table["rows"] if r["percent"]}))
        ax.set_xlabel("recovery tokens, % of the organism's pretraining")
        ax.set_ylabel("perplexity / SwiGLU organism's")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Organism {table['organism']}: recovery against budget (labels: FFN zeros on held-out text)", fontsize=10)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def tune_markdown(root: Path, names: list[str]) -> str:
    """The tuning runs (``ORG/tune/<variant>``), judged on the held-out slice of the training text
    only: perplexity after the warm start, at the end before the final cutoff, and at the end,
    each with its zeros, and the end's ratio to the organism on the same slice."""
    lines = [
        "| variant | start (after the warm start, if any) | zeros | before the cutoff | zeros | end | zeros | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    original = None
    for name in names:
        s = _json(root / "tune" / name / "summary.json")
        if s is None:
            lines.append(f"| {name} | - | - | - | - | - | - | - |")
            continue
        original = original or s.get("heldout_ppl_original")
        before = (s.get("cutoff") or {}).get("before") or {}
        ratio = s["heldout_ppl"] / original if original else None
        lines.append(
            f"| {name} | {s['heldout_ppl_before']:.2f} | {s['heldout_sparsity_before']:.1%} | "
            f"{_f(before.get('heldout_ppl'))} | {_f(before.get('heldout_sparsity'), '{:.1%}')} | "
            f"{s['heldout_ppl']:.2f} | {s['heldout_sparsity']:.1%} | {_f(ratio, '{:.3f}x')} |"
        )
    head = f"The organism on the same slice: {_f(original)} (the distilled runs' teacher)."
    return head + "\n\n" + "\n".join(lines) + "\n"


LLAMA31_PRETRAIN_TOKENS = 15e12  # Llama-3.1's reported pretraining tokens
# one 8xH100 node on the Llama-3.1-8B recovery recipe at 30% and 40% MFU (docs/guide-llama-8b.md's estimate)
NODE_TOKENS_PER_S = (26_000, 34_800)


def forecast(tables: list[dict], smollm2: dict | None, total: float = LLAMA31_PRETRAIN_TOKENS) -> dict:
    """Per organism and method: the fraction of pretraining at which the fitted trend reaches
    ``TARGET``, and what that fraction of ``total`` tokens costs on one 8xH100 node."""
    rows = []
    for table in tables:
        for method, fit in table["fits"].items():
            f = fit and fit["fraction_at_target"]
            tokens = f * total if f else None
            hours = [tokens / rate / 3600 for rate in NODE_TOKENS_PER_S] if tokens else None
            rows.append(
                {
                    "organism": table["organism"],
                    "method": method,
                    "fit": fit,
                    "fraction": f,
                    "tokens": tokens,
                    "node_hours": hours,
                }
            )
    out = {"target": TARGET, "pretrain_tokens": total, "node_tokens_per_s": NODE_TOKENS_PER_S, "rows": rows}
    if smollm2:
        pts = [(t / smollm2["pretrain_tokens"], r) for t, r in smollm2["points"]]
        out["smollm2"] = {"points": pts, "fit_last4": fit_power(pts[-4:])}
    return out


def forecast_markdown(fc: dict) -> str:
    lines = [
        f"Forecast (an extrapolation of the fits above, not a measurement): the fraction of pretraining "
        f"tokens at which held-out perplexity reaches {fc['target']}x the SwiGLU model's, applied to "
        f"{fc['pretrain_tokens'] / 1e12:.0f}T pretraining tokens (Llama-3.1), and the hours of one 8xH100 node at "
        f"{fc['node_tokens_per_s'][0]:,} / {fc['node_tokens_per_s'][1]:,} tokens/s (30% / 40% MFU).",
        "",
        "| organism | method | fraction | tokens | node-hours (30% / 40% MFU) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in fc["rows"]:
        if r["fraction"] is None:
            lines.append(f"| {r['organism']} | {r['method']} | - | - | - |")
            continue
        h = r["node_hours"]
        lines.append(
            f"| {r['organism']} | {r['method']} | {r['fraction']:.2%} | {r['tokens'] / 1e9:,.1f}B | {h[0]:,.0f} / {h[1]:,.0f} |"
        )
    return "\n".join(lines) + "\n"


def forecast_plot(tables: list[dict], fc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.6))
    ax.axhline(TARGET - 1, color="tab:green", ls="--", lw=1, label=f"{TARGET}x")
    styles = {"base": "-", "small": "--"}
    for table in tables:
        for i, method in enumerate(METHOD_LABELS):
            pts = sorted((r["percent"] / 100, r["heldout"]["ratio"]) for r in table["rows"] if r["method"] == method)
            if not pts:
                continue
            ls = styles.get(table["organism"], ":")
            ax.plot(
                [f for f, _ in pts],
                [max(r - 1, 1e-4) for _, r in pts],
                marker="o",
                ls=ls,
                color=f"C{i}",
                label=f"{table['organism']}: {method}",
            )
            fit = table["fits"].get(method)
            if fit and fit["b"] > 0:
                xs = [pts[-1][0] * 10 ** (k / 10) for k in range(0, 31)]
                ax.plot(xs, [fit["a"] * x ** -fit["b"] for x in xs], ls=":", lw=1, color=f"C{i}")
    if fc.get("smollm2"):
        pts = fc["smollm2"]["points"]
        ax.plot([f for f, _ in pts], [r - 1 for _, r in pts], marker="s", color="black", label="SmolLM2-135M (measured)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("recovery tokens / pretraining tokens")
    ax.set_ylabel("held-out perplexity ratio - 1")
    ax.set_title("Recovery against the budget as a share of pretraining (dotted: fitted trend)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relufy.pipelines.organism", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("budget", help="print PERCENT of the pretraining tokens in SUMMARY")
    b.add_argument("summary", type=Path)
    b.add_argument("percent", type=float)
    t = sub.add_parser("table", help="ORG/table.md and ORG/table.json from the organism's evals")
    t.add_argument("root", type=Path)
    t.add_argument("--plot", type=Path, help="a PNG of the ratio against the budget, one line a method")
    u = sub.add_parser("tune", help="the tuning runs' table (ORG/tune/<variant>), on the training text's held-out slice")
    u.add_argument("root", type=Path)
    u.add_argument("variants", nargs="+")
    f = sub.add_parser("forecast", help="the forecast from one or more organisms' table.json, beside SmolLM2's curve")
    f.add_argument("tables", type=Path, nargs="+", help="ORG/table.json files")
    f.add_argument("--smollm2", type=Path, help="SmolLM2's measured budget curve (docs/data/smollm2-budget-curve.json)")
    f.add_argument("--plot", type=Path)
    f.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    command = {"budget": _budget, "tune": _tune, "forecast": _forecast, "table": _table}[args.cmd]
    return run_command(lambda: command(args))


def _write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _budget(args) -> None:
    print(budget_tokens(args.summary, args.percent))


def _tune(args) -> None:
    text = tune_markdown(args.root, args.variants)
    _write_text(args.root / "tune" / "table.md", text)
    print(text)


def _forecast(args) -> None:
    tables = []
    for path in args.tables:
        table = _json(path)
        if table is None:
            raise RelufyError(f"{path}: missing (make organism first)")
        tables.append(table)
    fc = forecast(tables, _json(args.smollm2) if args.smollm2 else None)
    if args.json:
        _write_text(args.json, json.dumps(fc, indent=2) + "\n")
    if args.plot:
        forecast_plot(tables, fc, args.plot)
    print(forecast_markdown(fc))


def _table(args) -> None:
    table = collect(args.root)
    text = markdown(table)
    _write_text(args.root / "table.json", json.dumps(table, indent=2) + "\n")
    _write_text(args.root / "table.md", text)
    if args.plot:
        plot(table, args.plot)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
