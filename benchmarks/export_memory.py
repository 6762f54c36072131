"""Peak resident memory of ``relufy export --predictors`` as the calibration token count grows.

Each count runs in a fresh process (the export as the CLI runs it, predictors trained on up to
every training token: ``--predictor-tokens`` = the count) and reports its own peak RSS
(``ru_maxrss``, the kernel's high-water mark), beside the model's weights on disk and the bound
the export keeps: the model + 2 GiB, whatever the count (calibration rows go to disk, one
predictor's rows are read back at a time).

    python benchmarks/export_memory.py MODEL --data TEXT --out runs/bench/export-memory \\
        [--tokens 32768,131072] [--seq-len 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30

CHILD = """
import json, resource, sys, time
from relufy.export.options import ExportOptions
from relufy.export.pipeline import export
args = json.loads(sys.argv[1])
start = time.perf_counter()
result = export(args["model"], args["out"], ExportOptions(**args["options"]), show_progress=True)
print("RESULT " + json.dumps({
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "seconds": time.perf_counter() - start,
    "heldout_tokens": result.heldout_tokens,
    "computed": result.predicted_kept,
    "min_recall": result.min_recall,
    "ppl_ratio": result.ppl_predicted / result.ppl_dense,
}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True, help="Folder for the exports and the results (results.json).")
    parser.add_argument("--tokens", default="32768,131072", help="Calibration token counts (--max-tokens).")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weights = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    rows = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        options = {
            "data": args.data,
            "seq_len": args.seq_len,
            "max_tokens": tokens,
            "predictors": True,
            "predictor_tokens": tokens,
            "force": True,
        }
        spec = {"model": args.model, "out": str(out / f"export-{tokens}"), "options": options}
        print(f"== relufy export --predictors --max-tokens {tokens} --predictor-tokens {tokens}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE, text=True)
        if proc.returncode:
            sys.exit(f"export at {tokens} tokens failed (exit {proc.returncode})")
        got = json.loads(proc.stdout.split("RESULT ", 1)[1])
        got.update(tokens=tokens, wall=time.perf_counter() - start, weights=weights, bound=weights + 2 * GiB)
        rows.append(got)
        print(
            f"   peak RSS {got['peak_rss'] / GiB:.2f} GiB (bound {got['bound'] / GiB:.2f}: model {weights / GiB:.2f} + 2), "
            f"{got['seconds']:.0f} s",
            flush=True,
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n| calibration tokens | peak RSS | model + 2 GiB | within | export time |")
    print("|---:|---:|---:|---|---:|")
    for r in rows:
        ok = "yes" if r["peak_rss"] <= r["bound"] else "NO"
        print(f"| {r['tokens']:,} | {r['peak_rss'] / GiB:.2f} GiB | {r['bound'] / GiB:.2f} GiB | {ok} | {r['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
