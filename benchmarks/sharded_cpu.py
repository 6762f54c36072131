"""Recovery under FSDP2 against one process and DDP, on the real SmolLM2, on this CPU.

Three runs of one recipe (the one-hour recipe's sparsity terms: FFN warm start with its L1 hold,
distillation, L1; a shortened budget), the same global batch each, one after the other:

- ``one``: ``relufy train``, one process, two threads;
- ``ddp``: ``torchrun --nproc_per_node 2 -m relufy train`` (gloo), one thread each;
- ``fsdp2``: 2 processes of relufy's FSDP2 path through the CPU harness the tests use
  (``tests/train/fsdp2_launch.py``: Accelerate refuses FSDP without GPUs; the harness sets the
  distributed type after the Accelerator is built, everything else is ``relufy train``), one
  thread each.

The teacher is bf16 in all three (what ``teacher_dtype: auto`` picks under FSDP2), so the curves
compare. Printed (and written to ``OUT/sharded_cpu.md``): per run the wall time, training
tokens/s (the loop only, from metrics.jsonl), the warm start's mean zeros, held-out perplexity
and FFN zeros before and after, the largest relative loss difference to ``one`` and to ``ddp`` over the steps,
and the peak RSS of the largest process (psutil, polled every 0.2 s over the process tree).

    python benchmarks/sharded_cpu.py --model runs/demo/drelu --data FILE [--data FILE ...] [--steps 12]

``--model``: the converted dReLU SmolLM2 (``make demo`` writes ``runs/demo/drelu``). ``--data``:
local text files (default: Python's own help text, ``builtin:pydoc``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "train" / "fsdp2_launch.py"


def recipe(model: str, data: list[str], out: Path, steps: int, micro: int) -> dict:
    raw = yaml.safe_load((ROOT / "recipes" / "smollm2-recovery-cpu.yaml").read_text())
    raw.update(name=out.name, output_dir=str(out))
    raw["model"]["path"] = model
    raw["data"]["sources"] = [{"data": d} for d in data]
    raw["data"]["heldout_fraction"] = 0.01
    raw["optim"]["warmup_steps"] = 2
    raw["budget"] = {"max_steps": steps, "micro_batch_size": micro, "grad_accum": 2}
    raw["sparsity"]["distill"]["teacher_dtype"] = "bf16"
    raw["sparsity"]["ffn_warmstart"].update(tokens=1024, steps=20)
    raw["log"] = {"every": 1, "eval_every": 0}
    raw["checkpoint"] = {"every": 0, "keep_last": 1}
    return raw


def peak_rss(proc: subprocess.Popen, peaks: dict) -> None:
    """Poll the process tree until ``proc`` ends: the largest RSS any one process reached."""
    while proc.poll() is None:
        try:
            tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in tree:
                try:
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            return
        time.sleep(0.2)


def run(kind: str, path: Path, log: Path) -> tuple[float, int]:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    if kind == "one":
        env["OMP_NUM_THREADS"] = "2"
        cmd = [sys.executable, "-m", "relufy", "train", str(path)]
    elif kind == "ddp":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "relufy", "train", str(path)]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml")]
        cmd += ["--num_processes", "2", str(HARNESS), str(path)]
    peaks: dict = {}
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=peak_rss, args=(proc, peaks))
        watcher.start()
        proc.wait()
        watcher.join()
    if proc.returncode:
        sys.exit(f"{kind} failed: see {log}")
    return time.time() - start, max(peaks.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="The converted dReLU SmolLM2 folder.")
    parser.add_argument("--data", action="append", help="Text files to train and hold out on (repeatable).")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="runs/sharded-cpu")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = args.data or ["builtin:pydoc"]
    results = {}
    for kind, micro in (("one", 4), ("ddp", 2), ("fsdp2", 2)):
        folder = out / kind
        if (folder / "summary.json").exists():
            print(f"{kind}: done before, read from {folder}")
            results[kind] = json.loads((out / f"{kind}.json").read_text())
            continue
        path = out / f"{kind}.yaml"
        path.write_text(yaml.safe_dump(recipe(args.model, data, folder, args.steps, micro), sort_keys=False))
        print(f"{kind}: training ...", flush=True)
        wall, rss = run(kind, path, out / f"{kind}.log")
        results[kind] = {"wall": wall, "rss": rss}
        (out / f"{kind}.json").write_text(json.dumps(results[kind]))
    rows = {k: [json.loads(x) for x in (out / k / "metrics.jsonl").read_text().splitlines()] for k in results}
    lines = [
        f"SmolLM2-135M dReLU, {args.steps} steps x {rows['one'][0]['tokens']:,} tokens, warm start 1,024 tokens x 20 "
        "steps per layer (L1 20), distillation (bf16 teacher) + L1 5; `python benchmarks/sharded_cpu.py "
        f"--model {args.model} {' '.join('--data ' + d for d in data)} --steps {args.steps}`",
        "",
        "| run | processes | wall | train tokens/s | warm-start zeros | held-out ppl before -> after | FFN zeros after "
        "| max rel. loss diff to one | to ddp | peak RSS per process |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, r in results.items():
        summary = json.loads((out / kind / "summary.json").read_text())
        warm = json.loads((out / kind / "warmstart.json").read_text())
        diff = [
            max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows[kind], rows[ref], strict=True))
            for ref in ("one", "ddp")
        ]
        lines.append(
            f"| {kind} | {1 if kind == 'one' else 2} | {r['wall']:.0f} s | {rows[kind][-1]['tokens_per_second']:.0f} "
            f"| {warm['zeros_after']:.1%} | {summary['heldout_ppl_before']:.2f} -> {summary['heldout_ppl']:.2f} "
            f"| {summary['heldout_sparsity']:.1%} | {diff[0]:.1e} | {diff[1]:.1e} | {r['rss'] / 2**20:,.0f} MiB |"
        )
    text = "\n".join(lines) + "\n"
    (out / "sharded_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
