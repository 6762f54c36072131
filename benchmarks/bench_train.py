"""Throughput of ``relufy train`` against a bare PyTorch loop, and the cost of sparsity logging.

Same model (the embedded SmolLM2-135M converted to dReLU), same packed batches, same AdamW,
micro-batch, accumulation and precision (fp32, CPU). Variants, interleaved and repeated, median
tokens/s over the steps after the first (warm-up):

- ``bare loop``: forward, backward, clip, AdamW step; nothing else;
- ``relufy train, no sparsity logging`` (``log.sparsity=false``);
- ``relufy train`` (default: per-layer zero counts every step).

    python benchmarks/bench_train.py [--steps 6] [--seq-len 256] [--batch 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def main() -> None:
    import relufy
    from relufy.embedded import smollm2_gguf
    from relufy.generate import load_tokenizer
    from relufy.train import data as train_data
    from relufy.train.loop import train
    from relufy.train.recipe import validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp())
    model_path = relufy.convert(smollm2_gguf(), scratch / "drelu")
    text = TEXT if TEXT.exists() else None
    if text is None:
        import pydoc_data.topics

        text = scratch / "topics.txt"
        text.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    tokens_per_step = args.seq_len * args.batch

    def recipe(out, sparsity_log):
        return validate({
            "name": "bench", "output_dir": str(out), "model": {"path": str(model_path)},
            "data": {"sources": [{"data": str(text)}], "seq_len": args.seq_len, "heldout_fraction": 0.0},
            "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 0},
            "budget": {"max_steps": args.steps, "micro_batch_size": args.batch, "grad_accum": 1},
            "log": {"every": 1, "sparsity": sparsity_log},
        })  # fmt: skip

    def relufy_run(sparsity_log):
        def run(i):
            out = scratch / f"run-{sparsity_log}-{i}"
            train(recipe(out, sparsity_log), show_progress=False)
            rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            # tokens/s over steps 2..N from the cumulative figures of steps 1 and N
            t1 = rows[0]["tokens"] / rows[0]["tokens_per_second"]
            tn = rows[-1]["tokens"] / rows[-1]["tokens_per_second"]
            return (rows[-1]["tokens"] - rows[0]["tokens"]) / (tn - t1)

        return run

    def bare(i):
        torch.manual_seed(0)
        model = relufy.load(model_path, dtype=torch.float32).train()
        mixture, _ = train_data.build(recipe(scratch / "x", True).data, load_tokenizer(model_path), 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        times = []
        for _ in range(args.steps):
            ids = mixture.batch(args.batch)
            start = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        return tokens_per_step * (args.steps - 1) / sum(times[1:])

    variants = {"bare loop": bare, "relufy train, no sparsity logging": relufy_run(False), "relufy train": relufy_run(True)}
    results = {k: [] for k in variants}
    for i in range(args.repeats):
        for name, fn in variants.items():
            results[name].append(fn(i))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"SmolLM2-135M dReLU, fp32, CPU ({torch.get_num_threads()} threads), seq {args.seq_len} x batch {args.batch}, "
          f"{args.steps} steps (first excluded), {args.repeats} repeats")  # fmt: skip
    print("| variant | tokens/s (median) | vs bare loop |\n|---|---:|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {v / med['bare loop']:.3f}x |")
    ratio = med["relufy train"] / med["bare loop"]
    cost = 1 - med["relufy train"] / med["relufy train, no sparsity logging"]
    print(f"relufy train / bare = {ratio:.3f} (target >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}")
    print(f"sparsity logging cost = {cost:.1%} (target <= 5%): {'met' if cost <= 0.05 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"tokens_per_second": med, "runs": results}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
