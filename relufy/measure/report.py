"""Showing eval results: a rich table, a JSON file, PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import save_png
from .evaluate import EvalOptions, ModelEval

SCHEMA_VERSION = 1


def to_json(results: list[ModelEval], options: EvalOptions) -> dict:
    return {
        "relufy_eval": SCHEMA_VERSION,
        "options": options.scoring(),
        "models": [r.model_dump() for r in results],
    }


def write_json(results: list[ModelEval], options: EvalOptions, path: Path) -> None:
    from ..io.atomic import atomic_file

    with atomic_file(Path(path)) as tmp:
        tmp.write_text(json.dumps(to_json(results, options), indent=2) + "\n")


def _name(r: ModelEval) -> str:
    return Path(r.model).name or r.model


def print_table(results: list[ModelEval], console=None) -> None:
    """The perplexity table (with --data; with --threshold-sparsity also the perplexity-vs-sparsity
    table) and the benchmark tables (with --tasks)."""
    from ..progress import show_table

    if any(r.ppl is not None for r in results):
        show_table(perplexity_table(results), console)
    if any(r.threshold for r in results):
        show_table(sparsity_table(results), console)
    if any(r.tasks for r in results):
        for table in tasks_tables(results):
            show_table(table, console)


def perplexity_table(results: list[ModelEval]):
    """One row per model: perplexity, zeros, active FFN and the top-k curve (``@s``)."""
    from rich.table import Table

    results = [r for r in results if r.ppl is not None]
    levels = sorted({p["sparsity"] for r in results for p in r.topk if p.get("ppl") is not None})
    table = Table(title="relufy eval (ppl @ s: top-k perplexity with a fraction s of FFN neurons dropped)")
    for col in ("model", "act", "tokens", "ppl", "zeros", "active FFN"):
        table.add_column(col, justify="left" if col in ("model", "act") else "right")
    for s in levels:
        table.add_column(f"@{s:.0%}", justify="right")
    for r in results:
        curve = {p["sparsity"]: p.get("ppl") for p in r.topk}
        table.add_row(
            _name(r),
            r.activation,
            f"{r.tokens:,}",
            f"{r.ppl:,.2f}",
            f"{r.sparsity['mean']:.1%}",
            f"{r.active_ffn_param_fraction:.1%}",
            *(f"{curve[s]:,.2f}" if curve.get(s) is not None else "" for s in levels),
        )
    return table


def sparsity_table(results: list[ModelEval]):
    """Perplexity against the FFN zeros each way of dropping neurons reached on the scored tokens:
    the model as is, each top-k level and each threshold level (one row each)."""
    from rich.table import Table

    table = Table(
        title="relufy eval: perplexity vs FFN sparsity (top-k: per token; threshold: |act(gate)*up| < t, t calibrated "
        "on tokens not scored)"
    )
    for col in ("model", "act", "method", "s", "zeros", "active FFN", "ppl"):
        table.add_column(col, justify="left" if col in ("model", "act", "method") else "right")
    for r in results:
        if r.ppl is None:
            continue
        table.add_row(
            _name(r),
            r.activation,
            "as is",
            "",
            f"{r.sparsity['mean']:.1%}",
            f"{r.active_ffn_param_fraction:.1%}",
            f"{r.ppl:,.2f}",
        )
        for method, rows in (("top-k", r.topk), ("threshold", r.threshold)):
            for p in rows:
                if p.get("ppl") is None or (method == "top-k" and p["sparsity"] == 0):
                    continue
                table.add_row(
                    "",
                    "",
                    method,
                    f"{p['sparsity']:.0%}",
                    f"{p['realized']['mean']:.1%}",
                    f"{p['active_ffn_param_fraction']:.1%}",
                    f"{p['ppl']:,.2f}",
                )
    return table


def _cell(m: dict | None) -> str:
    if m is None:
        return ""
    if not isinstance(m["value"], (int, float)):
        return str(m["value"])
    return f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")


def _metric_table(title: str, columns: list[tuple[str, dict]]):
    """Rows: every (task, metric) of ``columns``; one column per ``(label, {task: entry})``."""
    from rich.table import Table

    rows: dict[tuple[str, str], int | None] = {}
    for _, tasks in columns:
        for task, entry in tasks.items():
            for metric in entry["metrics"]:
                if rows.get((task, metric)) is None:
                    rows[(task, metric)] = entry.get("samples")
    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("n", justify="right")
    for label, _ in columns:
        table.add_column(label, justify="right")
    for (task, metric), n in rows.items():
        cells = [_cell(tasks.get(task, {}).get("metrics", {}).get(metric)) for _, tasks in columns]
        table.add_row(task, metric, "" if n is None else str(n), *cells)
    return table


def tasks_tables(results: list[ModelEval]) -> list:
    """The benchmarks of every model as is, side by side (value ± stderr); then, per model run at
    levels (``--tasks-at-levels``), its benchmarks at each top-k (``@s``) and threshold (``t@s``,
    with the zero fraction the thresholds reached on the perplexity text) level."""
    tables = [
        _metric_table(
            "relufy eval --tasks (lm-evaluation-harness; value ± stderr)",
            [(f"{_name(r)} ({r.activation})", r.tasks) for r in results if r.tasks],
        )
    ]
    for r in results:
        columns = [(f"@{p['sparsity']:.0%}", p["tasks"]) for p in r.topk if p.get("tasks") and p["sparsity"] > 0]
        columns += [
            (f"t@{p['sparsity']:.0%} ({p['realized']['mean']:.0%} zeros)", p["tasks"])
            for p in r.threshold
            if p.get("tasks") and p["sparsity"] > 0
        ]
        if r.tasks and columns:
            tables.append(
                _metric_table(f"{_name(r)} ({r.activation}) --tasks at sparsity levels", [("as is", r.tasks), *columns])
            )
    return tables


def _label(r: ModelEval) -> str:
    return f"{Path(r.model).name or r.model} ({r.activation})"


def write_plots(results: list[ModelEval], folder: Path) -> list[Path]:
    """Per-layer sparsity bars (per model), per-expert heat maps (MoE), ppl vs top-k sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, r in enumerate(results):
        if r.ppl is None:
            continue
        fig, ax = plt.subplots(figsize=(max(6, len(r.sparsity["per_layer"]) * 0.25), 3.5))
        ax.bar(range(len(r.sparsity["per_layer"])), [100 * s for s in r.sparsity["per_layer"]], color="tab:blue")
        ax.axhline(100 * r.sparsity["mean"], color="tab:red", ls="--", label=f"mean {r.sparsity['mean']:.1%}")
        ax.set(xlabel="layer", ylabel="zeros in FFN activation (%)", ylim=(0, 100), title=f"Activation sparsity: {_label(r)}")
        ax.legend(loc="lower right")
        fig.tight_layout()
        written.append(folder / plot_names(len(results))[i])
        save_png(fig, written[-1])
        plt.close(fig)
        if r.moe:
            grid = [[float("nan") if v is None else 100 * v for v in row] for row in r.moe["per_expert"]]
            fig, ax = plt.subplots(figsize=(max(5, len(grid[0]) * 0.35), max(3, len(grid) * 0.3)))
            im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
            ax.set(xlabel="expert", ylabel="MoE layer", title=f"Zeros per expert (%): {_label(r)}")
            ax.set_yticks(range(len(r.moe["layers"])), r.moe["layers"])
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(folder / plot_names(len(results))[len(results) + i])
            save_png(fig, written[-1])
            plt.close(fig)
    if any(p.get("ppl") is not None for r in results for p in r.topk + r.threshold):
        fig, ax = plt.subplots(figsize=(8.5, 4))
        for r in results:
            curve = [p for p in r.topk if p.get("ppl") is not None]
            if curve:
                ax.plot([100 * p["sparsity"] for p in curve], [p["ppl"] for p in curve], marker="o", label=_label(r))
            if r.threshold:  # at the zero fraction the thresholds reached on the scored tokens
                xs = [100 * p["realized"]["mean"] for p in r.threshold]
                ax.plot(xs, [p["ppl"] for p in r.threshold], marker="s", ls="--", label=f"{_label(r)} threshold")
        ax.set(
            xlabel="sparsity (% of FFN neurons dropped per token: top-k; realized zeros: threshold)",
            ylabel="perplexity",
            yscale="log",
            title="Perplexity vs activation sparsity (paper Eq. 3/4)",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        written.append(folder / plot_names(len(results))[-1])
        save_png(fig, written[-1])
        plt.close(fig)
    return written


def plot_names(n_models: int) -> list[str]:
    """Every file name ``write_plots`` may write for ``n_models`` models: sparsity bars per model,
    then expert maps per model (MoE), then the perplexity-vs-sparsity curve."""
    bars, maps = [f"sparsity_{i}.png" for i in range(n_models)], [f"experts_{i}.png" for i in range(n_models)]
    return [*bars, *maps, "ppl_vs_sparsity.png"]


def run_eval(models: list[str], options: EvalOptions) -> list[ModelEval]:
    """``relufy eval``: outputs checked before any model loads, then every model scored, the table
    printed and the JSON, plots and statistics written (each atomically)."""
    from ..io.paths import check_output_file, check_output_folder, distinct_outputs, refuse_unexpected
    from ..io.source import local_inputs
    from ..progress import console
    from .evaluate import evaluate

    inputs = local_inputs(*models, options.data)
    json_out = options.json_out and check_output_file(options.json_out, inputs, "--json")
    plot = options.plot and check_output_folder(options.plot, inputs, "--plot")
    for name in plot_names(len(models)) if plot else ():
        refuse_unexpected(plot / name)  # before the models run, not after
    targets = []
    if options.stats_out is not None:
        first = check_output_file(options.stats_out, inputs, "--stats-out")
        targets = (
            [first] if len(models) == 1 else [first.with_name(f"{first.stem}.{i}{first.suffix}") for i in range(len(models))]
        )
        targets = [check_output_file(t, inputs, "--stats-out") for t in targets]
    distinct_outputs(("--json", json_out), *(("--stats-out", t) for t in targets))
    results = evaluate(models, options)
    print_table([r for r, _ in results])
    if json_out:
        write_json([r for r, _ in results], options, json_out)
    if plot:
        for path in write_plots([r for r, _ in results], plot):
            console.print(f"wrote {path}", highlight=False)
    from ..io.atomic import input_mode

    for target, (_, stats) in zip(targets, results, strict=False):
        stats.save(target, allowed=input_mode(inputs))
        console.print(f"wrote {target}", highlight=False)
    return [r for r, _ in results]
