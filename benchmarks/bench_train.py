"""Throughput of ``relufy train`` against a bare PyTorch loop, and the cost of sparsity logging.

Same model (the embedded SmolLM2-135M converted to dReLU), same packed batches, same AdamW,
micro-batch, accumulation and precision (fp32 by default; ``--precision bf16`` is autocast, as
Accelerate's mixed precision), on the GPU when there is one. Variants, interleaved and repeated,
median tokens/s over the steps after the first (warm-up):

- ``bare loop``: forward, backward, clip, AdamW step; nothing else;
- ``relufy train, no sparsity logging`` (``log.sparsity=false``);
- ``relufy train`` (default: per-layer zero counts every step).

    python benchmarks/bench_train.py [--steps 6] [--seq-len 256] [--batch 4] [--repeats 2] [--precision bf16]

Model FLOPs utilisation (MFU) is printed when the device's peak is known (``--peak-tflops``, or
the bf16 dense peak of a recognised GPU): training FLOPs per token ``6 N + 12 L d T`` (N: the
parameters every token multiplies with, the tied embedding counted once as the LM head; L
layers, d hidden size, T sequence length: the attention scores) times tokens/s over the peak.
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


def main() -> None:
    import relufy
    from relufy.embedded import smollm2_gguf
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.train import mixture as train_mixture
    from relufy.train.loop import train
    from relufy.train.recipe import validate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, help="a text file to train on (e.g. Tiny Shakespeare); default: Python's help text")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--peak-tflops", type=float, help="the device's peak for --precision (MFU); default: known GPUs")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scratch = Path(tempfile.mkdtemp())
    model_path = relufy.convert(smollm2_gguf(), scratch / "drelu")
    text = args.data
    if text is None:
        import pydoc_data.topics

        text = scratch / "topics.txt"
        text.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    tokens_per_step = args.seq_len * args.batch

    def recipe(out, sparsity_log):
        return validate(
            {
                "name": "bench",
                "output_dir": str(out),
                "model": {"path": str(model_path)},
                "data": {"sources": [{"data": str(text)}], "seq_len": args.seq_len, "heldout_fraction": 0.0},
                "optim": {"lr": 1e-5, "min_lr": 1e-6, "warmup_steps": 0},
                "budget": {"max_steps": args.steps, "micro_batch_size": args.batch, "grad_accum": 1},
                "precision": args.precision,
                "log": {"every": 1, "sparsity": sparsity_log},
            }
        )

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
        model = relufy.load(model_path, dtype=torch.float32).to(device).train()
        mixture, _ = train_mixture.build(recipe(scratch / "x", True).data, load_tokenizer(model_path), 0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))
        times = []
        for _ in range(args.steps):
            ids, labels = mixture.batch(args.batch).to(device)
            sync(device)
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            times.append(time.perf_counter() - start)
        return tokens_per_step * (args.steps - 1) / sum(times[1:])

    variants = {"bare loop": bare, "relufy train, no sparsity logging": relufy_run(False), "relufy train": relufy_run(True)}
    results = {k: [] for k in variants}
    for i in range(args.repeats):
        for name, fn in variants.items():
            results[name].append(fn(i))
    med = {k: statistics.median(v) for k, v in results.items()}
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"SmolLM2-135M dReLU, {args.precision}, {where}, seq {args.seq_len} x batch {args.batch}, "
        f"{args.steps} steps (first excluded), {args.repeats} repeats"
    )
    flops = train_flops_per_token(relufy.load(model_path, dtype=torch.float32), args.seq_len)
    peak = args.peak_tflops or (known_peak_tflops(torch.cuda.get_device_name()) if device.type == "cuda" else None)
    print(
        "| variant | tokens/s (median) | vs bare loop |"
        + (" MFU |" if peak else "")
        + "\n|---|---:|---:|"
        + ("---:|" if peak else "")
    )
    for k, v in med.items():
        mfu = f" {v * flops / (peak * 1e12):.1%} |" if peak else ""
        print(f"| {k} | {v:,.0f} | {v / med['bare loop']:.3f}x |{mfu}")
    ratio = med["relufy train"] / med["bare loop"]
    cost = 1 - med["relufy train"] / med["relufy train, no sparsity logging"]
    print(f"relufy train / bare = {ratio:.3f} (target >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}")
    print(f"sparsity logging cost = {cost:.1%} (target <= 5%): {'met' if cost <= 0.05 else 'MISSED'}")
    if args.json:
        report = {
            "tokens_per_second": med,
            "runs": results,
            "precision": args.precision,
            "device": where,
            "train_flops_per_token": flops,
            "peak_tflops": peak,
        }
        if peak:
            report["mfu"] = {k: v * flops / (peak * 1e12) for k, v in med.items()}
        args.json.write_text(json.dumps(report, indent=2))


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# bf16 dense tensor-core peaks (TFLOP/s), from the vendors' data sheets (SXM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0}


def known_peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def train_flops_per_token(model, seq_len: int) -> float:
    """``6 N + 12 L d T``: N the parameters each token multiplies with (input embedding lookups
    excluded, the LM head included, a tied embedding counted once as the head)."""
    cfg = model.config
    n = model.num_parameters(exclude_embeddings=not cfg.tie_word_embeddings)
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


if __name__ == "__main__":
    sys.exit(main())
