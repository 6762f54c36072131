"""Fidelity of an export's predictors as the threshold moves: on the export's held-out windows,
the fraction of neurons computed, of active neurons missed, perplexity and next-token top-1
agreement with the dense model, for each threshold.

    python benchmarks/predictor_fidelity.py runs/export/smollm2 --data path/to/wikitext-2-raw/wiki.valid.raw \
        [--thresholds=-2,-1,-0.5,0,0.5] [--seq-len 512 --max-tokens 32768 --heldout-fraction 0.1]
"""

from __future__ import annotations

import argparse
import json
import math

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("--data", required=True)
    parser.add_argument("--thresholds", default="-2,-1,-0.5,0,0.5")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    args = parser.parse_args()

    import relufy
    from relufy.export.calibration import PredictedOnly
    from relufy.measure.sites import ffn_sites, observing, tapped
    from relufy.modeling.predictor import load_predictors
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.text import load_texts, tokenize, windows

    model = relufy.load(args.export, dtype=torch.float32).eval()
    info = model.config.relufy["export"]["predictors"]
    loaded = load_predictors(args.export)
    sites = ffn_sites(model)
    predictors = {
        (s, e): loaded[(s.name, e if s.kind == "experts" else None)].float() for s, _ in sites for e in range(s.experts)
    }
    ids = tokenize(load_texts(args.data), load_tokenizer(args.export), args.max_tokens)
    wins = windows(ids, args.seq_len)
    held = wins[-max(1, round(len(wins) * args.heldout_fraction)) :]

    import contextlib

    from relufy.measure.evaluate import score

    def run(observer_factory=None):
        tops = []
        ctx = observing(model, observer_factory) if observer_factory else contextlib.nullcontext()
        with ctx:
            nll, count = score(model, held, 1, torch.device("cpu"), top1=tops)
        return math.exp(nll / count), tops, count

    ppl, dense_tops, count = run()
    rows = [{"threshold": None, "ppl": ppl, "computed": 1.0, "missed": 0.0, "top1": 1.0}]
    with tapped(model, sites, info["input"]) as tap:
        for t in (float(x) for x in args.thresholds.split(",")):
            holder = {}

            def factory(s, t=t, holder=holder):
                holder["obs"] = PredictedOnly(s, tap, predictors, t)
                return holder["obs"]

            p, tops, _ = run(factory)
            obs = holder["obs"]
            same = sum(int((a == b).sum()) for a, b in zip(dense_tops, tops, strict=True))
            rows.append(
                {
                    "threshold": t,
                    "ppl": p,
                    "computed": obs.kept / obs.total,
                    "missed": obs.missed / max(obs.active, 1),
                    "top1": same / sum(a.numel() for a in tops),
                }
            )
    print(f"held-out: {len(held)} windows, {count} predicted tokens; export threshold {info['threshold']}")
    print("| threshold | neurons computed | active missed | ppl | x dense | top-1 agreement |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "dense" if r["threshold"] is None else f"{r['threshold']:g}"
        print(f"| {name} | {r['computed']:.1%} | {r['missed']:.1%} | {r['ppl']:.2f} | {r['ppl'] / ppl:.2f}x | {r['top1']:.1%} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
