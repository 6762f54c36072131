"""What each predictor lever buys, on the same held-out tokens: one calibration pass (rows on disk,
as ``relufy export`` keeps them), then per training variant the predictors trained once and read
at several threshold rules. For each: perplexity with predicted neurons only over dense, % of
neurons computed, % of active neurons missed, lowest and mean per-predictor recall, next-token
top-1 agreement, and the predictors' cost as a share of the dense FFN's multiply-adds.

Windows as ``relufy export`` cuts them (``--max-tokens`` of ``--data`` in ``--seq-len`` windows; the
last ``--heldout-fraction`` held out, its first half picks per-predictor thresholds, the second
half is where every figure is read).

    python benchmarks/predictor_levers.py MODEL --data path/to/wiki.valid.raw \\
        [--variants 'base:{}' 'magnitude:{"predictor_magnitude_power":1}'] [--rules 0,-1,r0.95] [--json out.json]

A variant is ``name:JSON`` of ``relufy export`` option overrides (training: rank, budget, steps,
tokens, loss); a rule is a global threshold (``-1``) or a per-predictor recall target: ``r0.95`` of
the active neurons, ``m0.99`` of their summed ``|activation|``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_VARIANTS = [
    'base:{"predictor_magnitude_power": 0}',
    'magnitude:{"predictor_magnitude_power": 1}',
    'rank-x2:{"predictor_magnitude_power": 0, "predictor_budget": 1.0}',
]


class Limited:
    """A row store read through at most ``rows`` rows per key (None: all)."""

    def __init__(self, store, rows: int | None):
        self.store = store
        self.rows = rows
        self.counts = store.counts

    def load(self, key):
        got = self.store.load(key)
        if got is None or self.rows is None:
            return got
        return got[0][: self.rows], got[1][: self.rows]

    def drop(self, key):
        self.store.drop(key)


class KeepRows:
    """A row store whose ``drop`` keeps the rows (the variants read them again)."""

    def __init__(self, store):
        self.store = store
        self.counts = store.counts

    def load(self, key):
        return self.store.load(key)

    def drop(self, key):
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS)
    parser.add_argument("--rules", default="0,-1,r0.95,r0.97,r0.99")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--work", default=None, help="Scratch folder for the calibration rows (default: a temporary one).")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import relufy
    from relufy.export.calibration import Collector, DiskRows, PredictedOnly
    from relufy.export.options import ExportOptions
    from relufy.export.pipeline import fit_predictors, predictor_cost, split_windows
    from relufy.export.predictors import pick_threshold, predictor_metrics
    from relufy.measure.evaluate import score
    from relufy.measure.sites import ActivationCounter, ffn_sites, observing, tapped
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.text import load_texts, tokenize, windows

    torch.manual_seed(0)
    device = torch.device("cpu")
    model = relufy.load(args.model, dtype=torch.float32).eval()
    sites = ffn_sites(model)
    ids = tokenize(load_texts(args.data), load_tokenizer(args.model), args.max_tokens)
    wins = windows(ids, args.seq_len)
    base = ExportOptions(
        data=args.data, predictors=True, seq_len=args.seq_len, max_tokens=args.max_tokens, heldout_fraction=args.heldout_fraction
    )
    variants = [(v.partition(":")[0], json.loads(v.partition(":")[2] or "{}")) for v in args.variants]
    # the calibration pass keeps as many training rows as the hungriest variant reads
    train_rows = max(base.model_copy(update=o).predictor_tokens for _, o in variants)
    parts = split_windows(wins, base)
    work = Path(args.work or tempfile.mkdtemp(prefix="relufy-levers-"))
    stores = {part: DiskRows(work / part) for part in parts}
    start = time.perf_counter()
    counter = ActivationCounter(sites)
    dense_top1: list = []
    from relufy.export.pipeline import Chain

    with tapped(model, sites, base.predictor_input) as tap:
        collector = Collector(sites, tap, stores=stores, limits={"train": train_rows})
        with observing(model, lambda _: Chain([counter, collector])):
            for part, ws in parts.items():
                collector.part = part
                got = score(model, ws, 1, device, top1=dense_top1 if part == "report" else None)
                if part == "report":
                    nll, count = got
    counts = counter.result()
    positions = sum(len(w.input_ids) for w in wins)
    ppl_dense = math.exp(nll / count)
    print(
        f"calibration pass {time.perf_counter() - start:.0f}s; windows train {len(parts['train'])}, "
        f"tune {len(parts['tune'])}, report {len(parts['report'])} ({count} scored tokens); dense ppl {ppl_dense:.3f}"
    )
    kept = {part: KeepRows(store) for part, store in stores.items()}
    rules = [r.strip() for r in args.rules.split(",")]
    rows = []
    for name, overrides in variants:
        options = base.model_copy(update=overrides)
        limited = {part: Limited(store, options.predictor_tokens if part == "train" else None) for part, store in kept.items()}
        start = time.perf_counter()
        predictors, _, _ = fit_predictors(model, sites, counts, {}, limited, options, device)
        train_s = time.perf_counter() - start
        cost = predictor_cost(predictors, counts, positions)
        for rule in rules:
            if rule[0] in "rm":  # r0.95: 95% of the active neurons; m0.99: 99% of their |activation|
                target = float(rule[1:])
                thresholds = {}
                for key, p in predictors.items():
                    calibration = {part: kept[part].load(key) for part in ("tune", "train")}
                    found = pick_threshold(p, calibration, target, magnitude=rule[0] == "m")
                    thresholds[key] = found[0] if found is not None else 0.0
            else:
                thresholds = dict.fromkeys(predictors, float(rule))
            recalls, mass_recalls, per_predictor = [], [], []
            for key, p in predictors.items():
                data = kept["report"].load(key)
                if data is not None:
                    m = predictor_metrics(p, *data, thresholds[key])
                    recalls.append(m.recall)
                    mass_recalls.append(1 - m.missed_magnitude)
                    per_predictor.append(
                        {"layer": key[0].layer, "expert": key[1] if key[0].routed else None, "rank": p.fc1.weight.shape[0]}
                        | {k: getattr(m, k) for k in ("recall", "computed", "sparsity", "missed_magnitude")}
                    )
            top1: list = []
            with tapped(model, sites, options.predictor_input) as tap:
                with observing(model, lambda s, t=thresholds, p=predictors: PredictedOnly(s, tap, p, t)) as masked:
                    nll_p, _ = score(model, parts["report"], 1, device, top1=top1)
            same = sum(int((a == b).sum()) for a, b in zip(dense_top1, top1, strict=True))
            row = {
                "variant": name,
                "options": overrides,
                "rule": rule,
                "ppl_ratio": math.exp(nll_p / count) / ppl_dense,
                "computed": masked.kept / masked.total,
                "missed": masked.missed / max(masked.active, 1),
                "active": masked.active / masked.total,
                "min_recall": min(recalls),
                "mean_recall": sum(recalls) / len(recalls),
                "min_magnitude_recall": min(mass_recalls),
                "top1": same / sum(a.numel() for a in top1),
                "predictor_cost": cost,
                "train_seconds": train_s,
            }
            print(json.dumps(row), flush=True)
            rows.append(row | {"per_predictor": per_predictor})
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\ndense ppl {ppl_dense:.3f} on {count} held-out tokens")
    print(
        "| variant | rule | ppl x dense | computed | active missed | min recall | mean recall | min magnitude recall "
        "| top-1 | predictor cost |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['rule']} | {r['ppl_ratio']:.3f} | {r['computed']:.1%} | {r['missed']:.1%} | "
            f"{r['min_recall']:.3f} | {r['mean_recall']:.3f} | {r['min_magnitude_recall']:.3f} | {r['top1']:.1%} | "
            f"{r['predictor_cost']:.1%} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"ppl_dense": ppl_dense, "heldout_tokens": count, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
