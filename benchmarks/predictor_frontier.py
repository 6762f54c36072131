"""Per layer: how many neurons a predictor must compute to keep 95% of the active ones, against
its rank and its start (at random, or from the FFN's own weights: ``--predictor-init``). This is
the frontier behind a per-layer recall target: no threshold rule can do better than the
predictor's own ranking of the neurons.

    python benchmarks/predictor_frontier.py MODEL --data builtin:pydoc --max-tokens 65536 \\
        --layers 0,15,27,29 --ranks 128,256,576 [--json out.json]

Windows as ``relufy export`` cuts them (train / tune / report). Each predictor trains on the same
train rows with ``relufy export``'s loss, steps and rows per predictor (``--options``: JSON of
export option overrides, e.g. ``{"predictor_magnitude_power": 0}`` to count every active neuron
alike). Figures per layer and predictor:

- ``computed``: the share of neurons it computes on the report rows at the threshold that keeps
  exactly 95% of their active neurons (the best any threshold can do there);
- ``tuned``: computed share and recall at the threshold picked on the tune rows (what
  ``relufy export --predictor-recall 0.95 --predictor-recall-of neurons`` does);
- ``cost``: its multiply-adds per token over the dense FFN's (``rank * (hidden + width)`` over
  ``3 * hidden * width``).

The floor is ``0.95 x active``: a layer with more than 26.3% of its neurons active cannot keep
95% of them within 25% computed, whatever the predictor.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


class Only:
    """Observer: ``inner`` on the chosen FFN modules, the rest passed through."""

    def __init__(self, inner, modules):
        self.inner = inner
        self.ids = {id(m) for m in modules}

    def __call__(self, module, combined, expert):
        return self.inner(module, combined, expert) if id(module) in self.ids else combined


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--layers", default="0,15,29")
    parser.add_argument("--ranks", default="128,256")
    parser.add_argument("--starts", default="random,weights", help="predictor starts: random, weights")
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--options", default='{"predictor_magnitude_power": 0}')
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import relufy
    from relufy.export.calibration import Collector, MemoryRows
    from relufy.export.options import ExportOptions
    from relufy.export.pipeline import split_windows, train_as
    from relufy.export.predictors import predictor_metrics, recall_threshold
    from relufy.measure.evaluate import score
    from relufy.measure.sites import ffn_sites, observing, tapped
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.text import load_texts, tokenize, windows

    device = torch.device("cpu")
    model = relufy.load(args.model, dtype=torch.float32).eval()
    layers = [int(v) for v in args.layers.split(",")]
    sites = [(s, m) for s, m in ffn_sites(model) if s.layer in layers and not s.routed]
    if not sites:
        raise SystemExit(f"no dense FFN at layers {args.layers}")
    options = ExportOptions(
        data=args.data, predictors=True, seq_len=args.seq_len, max_tokens=args.max_tokens, **json.loads(args.options)
    )
    ids = tokenize(load_texts(args.data), load_tokenizer(args.model), args.max_tokens)
    parts = split_windows(windows(ids, args.seq_len), options)
    stores = {part: MemoryRows() for part in parts}
    start = time.perf_counter()
    with tapped(model, sites, options.predictor_input) as tap:
        collector = Collector(sites, tap, stores=stores, limits={"train": options.predictor_tokens})
        with observing(model, lambda _: Only(collector, [m for _, m in sites])):
            for part, ws in parts.items():
                collector.part = part
                score(model, ws, 1, device)
    print(f"calibration {time.perf_counter() - start:.0f}s; windows " + ", ".join(f"{p} {len(w)}" for p, w in parts.items()))

    rows = []
    for site, module in sites:
        x, y = stores["train"].load((site, 0))
        xu, yu = stores["tune"].load((site, 0))
        xr, yr = stores["report"].load((site, 0))
        hidden = x.shape[1]
        density = float((yr != 0).float().mean())
        for rank in [int(v) for v in args.ranks.split(",")]:
            for start_from in args.starts.split(","):
                t0 = time.perf_counter()
                started = options.model_copy(update={"predictor_init": start_from})
                predictor = train_as(started, x, y, rank, device, model, site, module)
                best = predictor_metrics(predictor, xr, yr, recall_threshold(predictor, xr, yr, args.recall))
                tuned = predictor_metrics(predictor, xr, yr, recall_threshold(predictor, xu, yu, args.recall))
                row = {
                    "layer": site.layer,
                    "active": density,
                    "rank": rank,
                    "start": start_from,
                    "computed": best.computed,
                    "tuned_computed": tuned.computed,
                    "tuned_recall": tuned.recall,
                    "cost": rank * (hidden + site.width) / (3 * hidden * site.width),
                    "seconds": time.perf_counter() - t0,
                }
                rows.append(row)
                print(json.dumps(row), flush=True)

    print(f"\n| layer | active | floor | rank | cost | start | computed at {args.recall:.0%} | tuned: computed / recall |")
    print("|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        print(
            f"| {r['layer']} | {r['active']:.1%} | {args.recall * r['active']:.1%} | {r['rank']} | {r['cost']:.1%} | "
            f"{r['start']} | {r['computed']:.1%} | {r['tuned_computed']:.1%} / {r['tuned_recall']:.3f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"recall": args.recall, "options": args.options, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
