"""Cost of relufy eval's instrumentation: throughput with sparsity tracking vs a plain forward.

Three variants score the same token windows of the same model, interleaved and repeated, and
the median tokens/s of each is reported:

- ``transformers``: the model as transformers loads it (no relufy code on the path);
- ``relufy plain``: relufy.load (activation swapped), no observer;
- ``relufy tracking``: relufy.load with the activation counter of ``relufy eval``.

The model is the embedded SmolLM2-135M converted to dReLU (or ``--model``); the text is WikiText-2
validation passed with ``--data``, else Python's pydoc topics.

    python benchmarks/bench_eval.py [--tokens 4096] [--seq-len 512] [--repeats 3] [--json out.json]
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
    from relufy.measure.evaluate import score
    from relufy.measure.sites import ActivationCounter, observing
    from relufy.modeling.tokenizer import load_tokenizer
    from relufy.text import load_texts, tokenize, windows

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a relufy checkpoint (default: SmolLM2-135M converted to dReLU)")
    ap.add_argument("--data", help="a text file to score (e.g. WikiText-2's wiki.valid.raw); default: Python's help text")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    torch.manual_seed(0)
    scratch = tempfile.TemporaryDirectory()
    model_path = args.model or relufy.convert(smollm2_gguf(), Path(scratch.name) / "drelu")
    data = args.data
    if data is None:
        import pydoc_data.topics

        data = Path(scratch.name) / "topics.txt"
        data.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    tokenizer = load_tokenizer(model_path)
    wins = windows(tokenize(load_texts(str(data)), tokenizer, args.tokens), args.seq_len)
    positions = sum(len(w.input_ids) for w in wins)

    from transformers import AutoModelForCausalLM

    swapped = relufy.load(model_path, dtype=torch.float32).eval()
    bare = AutoModelForCausalLM.from_pretrained(model_path, trust_remote_code=True, dtype=torch.float32).eval()

    def run_plain(model):
        return score(model, wins, 1, torch.device("cpu"))

    def run_tracking():
        with observing(swapped, ActivationCounter):
            return score(swapped, wins, 1, torch.device("cpu"))

    variants = {
        "transformers (remote code)": lambda: run_plain(bare),
        "relufy plain": lambda: run_plain(swapped),
        "relufy tracking": run_tracking,
    }
    run_plain(swapped)  # warm-up
    times = {k: [] for k in variants}
    nll = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            nll[name] = fn()[0]
            times[name].append(time.perf_counter() - start)
    assert len({round(v, 3) for v in nll.values()}) == 1, f"variants disagree: {nll}"
    rows = {k: positions / statistics.median(v) for k, v in times.items()}
    base = rows["relufy plain"]
    print(
        f"model: {model_path}\ndata: {data} ({positions} positions, seq {args.seq_len}, {args.repeats} repeats, "
        f"torch threads {torch.get_num_threads()})"
    )
    print("| variant | tokens/s (median) | vs relufy plain |\n|---|---:|---:|")
    for name, tps in rows.items():
        print(f"| {name} | {tps:,.0f} | {tps / base:.3f}x |")
    ratio = rows["relufy tracking"] / base
    print(f"tracking / plain = {ratio:.3f} (target >= 0.9): {'met' if ratio >= 0.9 else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"positions": positions, "tokens_per_second": rows, "ratio": ratio}, indent=2))
    scratch.cleanup()


if __name__ == "__main__":
    sys.exit(main())
