"""Tabulate recovery runs: held-out perplexity and FFN zeros before and after each run, next to
the original SwiGLU model scored on the same held-out sequences; optionally a PNG of both.

    python benchmarks/recovery_table.py runs/recovery                       # make recovery-smollm2
    python benchmarks/recovery_table.py runs/recovery-hour --plot docs/img/recovery_hour.png

Runs are the sub-folders holding a ``summary.json`` (``--runs a,b`` picks and orders them); all
must share one held-out slice (same data section and seed), which is checked. Runs with
``data.eval_sources`` get a second table: perplexity, ratio to the original and zeros on each
text outside the training sources, from their ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def plot(path: Path, ppl0: float, rows: list[tuple[str, dict]], aim_ppl: float = 1.5, aim_zeros: float = 0.85) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(ppl0, color="grey", ls="--", lw=1)
    ax.text(0.505, ppl0 * 0.92, f"original SwiGLU {ppl0:.1f}", color="grey", va="top", fontsize=8)
    ax.fill_between(
        [aim_zeros, 1.0],
        0,
        aim_ppl * ppl0,
        color="tab:green",
        alpha=0.12,
        label=f"aim: <= {aim_ppl}x ppl at >= {aim_zeros:.0%} zeros",
    )
    for i, (name, s) in enumerate(rows):
        color = f"C{i}"
        x0, y0, x1, y1 = s["heldout_sparsity_before"], s["heldout_ppl_before"], s["heldout_sparsity"], s["heldout_ppl"]
        ax.annotate("", (x1, y1), (x0, y0), arrowprops={"arrowstyle": "->", "color": color, "alpha": 0.6})
        ax.scatter([x0], [y0], color=color, marker="o", facecolors="none")
        ax.scatter([x1], [y1], color=color, marker="o", label=f"{name}: {y1:.1f} ({y1 / ppl0:.2f}x) at {x1:.1%}")
    ax.set_yscale("log")
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("FFN zeros on held-out text (mean of layers)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Recovery: before (open) -> after training (filled)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", default="runs/recovery")
    ap.add_argument("--runs", help="comma-separated sub-folders, in table order (default: all, sorted)")
    ap.add_argument("--plot", type=Path, help="write a PNG: ppl vs zeros, before -> after")
    args = ap.parse_args(argv)

    import torch
    import yaml

    import relufy
    from relufy.embedded import smollm2_gguf
    from relufy.measure.meter import heldout_eval
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.train import mixture as train_mixture
    from relufy.train.recipe import Recipe

    root = Path(args.root)
    names = args.runs.split(",") if args.runs else sorted(p.parent.name for p in root.glob("*/summary.json"))
    if not names:
        raise SystemExit(f"no runs (*/summary.json) under {root}")
    recipes = {n: Recipe.model_validate(yaml.safe_load((root / n / "recipe.yaml").read_text())) for n in names}
    key = {n: (r.data.model_dump_json(), r.seed) for n, r in recipes.items()}
    if len(set(key.values())) != 1:
        raise SystemExit(f"runs differ in data or seed, so their held-out slices differ: {', '.join(names)}")
    recipe = recipes[names[0]]
    gguf = smollm2_gguf()
    _, heldout = train_mixture.build(recipe.data, load_tokenizer(gguf), recipe.seed)
    original = relufy.load(gguf, dtype=torch.float32)
    ppl0, sp0 = heldout_eval(original, heldout, torch.device("cpu"))
    print(
        f"held-out: {heldout.ids.numel():,} tokens ({len(heldout.ids)} x {heldout.ids.shape[1]}) "
        f"of {', '.join(s.data for s in recipe.data.sources)}"
    )
    print("| model | steps | train tokens | held-out ppl before | after | x original | FFN zeros before | after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| original SmolLM2-135M (SwiGLU) | - | - | {ppl0:,.2f} | | 1.00x | {sp0:.1%} | |")
    rows = []
    for name in names:
        s = json.loads((root / name / "summary.json").read_text())
        rows.append((name, s))
        print(
            f"| dReLU, {name} | {s['steps']} | {s['tokens']:,} | {s['heldout_ppl_before']:,.1f} | {s['heldout_ppl']:,.2f} | "
            f"{s['heldout_ppl'] / ppl0:.2f}x | {s['heldout_sparsity_before']:.1%} | {s['heldout_sparsity']:.1%} |"
        )
    outside = sorted({label for _, s in rows for label in s.get("eval") or {}})
    if outside:  # data.eval_sources: text outside the training mixture, the run's own original figures
        print()
        print("Text outside the training sources (data.eval_sources; x original = the teacher on the same text):")
        head = " | ".join(f"{label} ppl | x original | zeros" for label in outside)
        print(f"| model | {head} |")
        print("|---|" + "---:|---:|---:|" * len(outside))
        for name, s in rows:
            cells = []
            for label in outside:
                e = (s.get("eval") or {}).get(label)
                if e is None:
                    cells += ["-", "-", "-"]
                else:
                    ratio = f"{e['ratio']:.2f}x" if e.get("ratio") else "-"
                    cells += [f"{e['ppl']:,.2f}", ratio, f"{e['sparsity']:.1%}"]
            print(f"| dReLU, {name} | " + " | ".join(cells) + " |")
    if args.plot:
        plot(args.plot, ppl0, rows)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
