"""Recovery methods side by side on one budget, judged on text outside the training sources.

    python benchmarks/recovery_ablation.py runs/ablation --model runs/demo/drelu \
        --train-data runs/data/teacher-smollm2.jsonl --eval-data builtin:pydoc --eval-data wiki.valid.raw \
        --variants base,stages,hidden,anneal [--set budget.max_steps=40 ...]

Every variant is ``recipes/smollm2-recovery-cpu.yaml`` with the shared overrides below (``--set``
adds more) and its own (``VARIANTS``), trained one after the other into ``OUT/<variant>`` (a
variant with a ``summary.json`` is not trained again). Each run scores ``data.eval_sources`` (the
``--eval-data`` texts; a variant whose training text is one of them drops it) and the original
model's perplexity on them, so ``summary.json`` holds the ratio. Then the original and every
variant's final model are scored by ``relufy eval`` on the first eval text: dense, at 90%
top-k, and under per-layer thresholds calibrated to 90% zeros (the training-free stand-in for
ProSparse's final FATReLU shift; ``OUT/<variant>/levels.json``, the original's in
``OUT/original-levels.json``). The variants train without the recipe's final cutoff (the shift
itself is measured at the hour); a run given one with ``--set`` is read as it stood before it
(its summary's ``cutoff.before``, its weights scored without the cutoffs). The table (markdown)
gives per variant: wall time, zeros, the perplexity ratio on each eval text and the in-domain
slice, and those three perplexities, with the original's in a last row; ``OUT/table.md`` and
``OUT/table.json`` keep it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPE = "smollm2-recovery-cpu"

# variant -> its own overrides of the shared settings (yaml values, as `relufy train` takes them)
VARIANTS: dict[str, list[str]] = {
    # the shipped recipe's terms: FFN warm start with an L1 hold, distillation, constant L1 5
    "base": [],
    # the same terms on Tiny Shakespeare + WikiText-2 validation instead of the teacher's samples
    "corpora": ["data.sources=[{data: SHAKESPEARE}, {data: WIKI}]"],
    # ProSparse: the L1 coefficient rises in 3 sine stages to 15 instead of a constant 5
    "stages": ["sparsity.l1=15", "sparsity.l1_schedule=sine-stages", "sparsity.l1_stages=3"],
    # distillation on every layer's hidden state as well as the logits
    "hidden": ["sparsity.distill.hidden_weight=1.0"],
    # annealing SiLU -> dReLU over the first 15 steps instead of the FFN warm start
    "anneal": ["sparsity.ffn_warmstart=null", "sparsity.anneal_steps=15", "sparsity.l1_warmup_steps=15"],
    # a higher peak learning rate
    "lr1e-3": ["optim.lr=1e-3", "optim.min_lr=1e-4"],
    # the warm start fits blocks of 5 layers against the teacher's hidden states, not one FFN at a time
    "block5": ["sparsity.ffn_warmstart.block=5"],
    # the two that beat the base at 40 steps, together
    "block5-lr1e-3": ["sparsity.ffn_warmstart.block=5", "optim.lr=1e-3", "optim.min_lr=1e-4"],
    # the same with blocks of 10 layers
    "block10-lr1e-3": ["sparsity.ffn_warmstart.block=10", "optim.lr=1e-3", "optim.min_lr=1e-4"],
    # blocks of 3 layers
    "block3": ["sparsity.ffn_warmstart.block=3"],
    # each FFN alone first (the base's fit), then blocks of 5 from there
    "ffn-block5": ["sparsity.ffn_warmstart.block=[1, 5]"],
    # twice the L1 coefficient while training (the warm start's is unchanged)
    "l1-10": ["sparsity.l1=10"],
}


def shared(args) -> list[str]:
    evals = ", ".join(f"{{data: {d}, max_tokens: {args.eval_tokens}}}" for d in args.eval_data)
    return [
        f"model.path={args.model}",
        f"data.sources=[{{data: {args.train_data}}}]",
        f"data.eval_sources=[{evals}]",
        "data.heldout_fraction=0.02",
        "budget.max_steps=40",
        "optim.warmup_steps=5",
        "sparsity.ffn_warmstart.tokens=8192",
        "sparsity.ffn_warmstart.steps=100",
        "checkpoint.every=0",
        "log.every=5",
        "log.eval_steps=[]",
        "sparsity.final_cutoff=null",  # the methods before ProSparse's final shift (the hour's table has it)
        *args.set,
    ]


def resolve(item: str, args) -> str:
    return item.replace("SHAKESPEARE", args.shakespeare or "SHAKESPEARE").replace("WIKI", args.wiki or "WIKI")


def run_variant(name: str, args) -> None:
    out = args.out / name
    if (out / "summary.json").exists():
        return
    own = [resolve(x, args) for x in VARIANTS[name]]
    overrides = shared(args) + own + [f"output_dir={out}"]
    if any("SHAKESPEARE" in x or "WIKI" in x for x in own):
        raise SystemExit(f"variant {name} needs --shakespeare and --wiki")
    trains_on = " ".join(x for x in own if x.startswith("data.sources="))
    if trains_on:  # an eval text that this variant trains on is dropped from its eval sources
        evals = [d for d in args.eval_data if d not in trains_on]
        overrides.append("data.eval_sources=[" + ", ".join(f"{{data: {d}, max_tokens: {args.eval_tokens}}}" for d in evals) + "]")
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "relufy", "train", RECIPE, *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    (out / "wall.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))


def levels(model: str, data: str, tokens: int, out: Path) -> dict:
    """``relufy eval`` of ``model`` dense, at 90% top-k and under per-layer thresholds calibrated to
    90% zeros (the training-free stand-in for ProSparse's final FATReLU shift), kept in ``out``."""
    if not out.exists():
        cmd = [sys.executable, "-m", "relufy", "eval", model, "--data", data, "--seq-len", "256"]
        cmd += ["--max-tokens", str(tokens), "--topk", "0.9", "--threshold-sparsity", "0.9", "--json", str(out)]
        subprocess.run(cmd, check=True)
    (scored,) = json.loads(out.read_text())["models"]
    return scored


def before_cutoff(model: Path) -> Path:
    """``model`` as it stood before a final cutoff: itself when its config has none, else a sibling
    folder ``<model>-uncut`` with the cutoffs left out of its config and links to the other files."""
    config = json.loads((model / "config.json").read_text())
    if not config.get("relufy", {}).get("cutoffs"):
        return model
    uncut = model.with_name(model.name + "-uncut")
    uncut.mkdir(exist_ok=True)
    for f in model.iterdir():
        if f.name != "config.json" and not (uncut / f.name).exists():
            (uncut / f.name).symlink_to(f.resolve())
    del config["relufy"]["cutoffs"]
    (uncut / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return uncut


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", required=True, help="the converted, untrained dReLU model")
    ap.add_argument("--train-data", required=True, help="the training text of every variant but `corpora`")
    ap.add_argument("--eval-data", action="append", required=True, help="text outside the training sources (repeat)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--shakespeare", help="Tiny Shakespeare's input.txt (variant corpora)")
    ap.add_argument("--wiki", help="WikiText-2 validation (variant corpora)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="one more shared override (repeat)")
    ap.add_argument("--train-only", action="store_true", help="train the variants, make no table")
    args = ap.parse_args(argv)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]}; known: {', '.join(VARIANTS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        run_variant(name, args)
    if args.train_only:
        return

    from relufy.embedded import smollm2_gguf

    first = args.eval_data[0]
    original = levels(str(smollm2_gguf()), first, args.eval_tokens, args.out / "original-levels.json")
    trained = [
        levels(str(before_cutoff(args.out / n / "final")), first, args.eval_tokens, args.out / n / "levels.json") for n in names
    ]
    labels = None
    rows = []
    for name, scored in zip(names, trained, strict=True):
        s = json.loads((args.out / name / "summary.json").read_text())
        wall = json.loads((args.out / name / "wall.json").read_text())["seconds"]
        labels = labels or list(s["eval"])
        # a run trained with a final cutoff (--set) is read as it stood before it, like the others
        b = s.get("cutoff", {}).get("before", s)
        rows.append(
            {
                "variant": name,
                "minutes": wall / 60,
                "tokens": s["tokens"],
                "zeros": b["heldout_sparsity"],
                "in_domain_ratio": b["heldout_ppl"] / s["heldout_ppl_original"],
                "eval": {k: v["ppl"] / s["eval"][k]["ppl_original"] for k, v in b["eval"].items()},
                "eval_zeros": {k: v["sparsity"] for k, v in b["eval"].items()},
                "dense": scored["ppl"],
                "topk90": scored["topk"][0]["ppl"],
                "threshold90": scored["threshold"][0]["ppl"],
                "threshold90_zeros": scored["threshold"][0]["realized"]["mean"],
            }
        )
    head = ["variant", "wall", "train tokens", "zeros (in-domain)"] + [f"{k} ratio" for k in labels]
    head += ["in-domain ratio", f"dense ppl ({labels[0]} windows)", "top-k 90% ppl", "90%-threshold ppl (zeros)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        ratios = [f"{r['eval'][k]:.2f}x" if r["eval"].get(k) else "(trained on it)" for k in labels]
        cells = [r["variant"], f"{r['minutes']:.0f} min", f"{r['tokens']:,}", f"{r['zeros']:.1%}", *ratios]
        cells += [f"{r['in_domain_ratio']:.2f}x", f"{r['dense']:.2f}", f"{r['topk90']:.2f}"]
        cells.append(f"{r['threshold90']:.2f} ({r['threshold90_zeros']:.1%})")
        lines.append("| " + " | ".join(cells) + " |")
    o = original
    cells = ["original", "", "", "0.0%", *[""] * (len(labels) + 1), f"{o['ppl']:.2f}", f"{o['topk'][0]['ppl']:.2f}"]
    cells.append(f"{o['threshold'][0]['ppl']:.2f} ({o['threshold'][0]['realized']['mean']:.1%})")
    lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (args.out / "table.md").write_text(table + "\n")
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
