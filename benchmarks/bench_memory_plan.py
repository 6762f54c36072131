"""The memory plan of ``relufy train --dry-run`` against the measured peak RSS of real runs.

Short real runs of ``recipes/smollm2-recovery-cpu.yaml`` (SmolLM2-135M dReLU: the FFN warm start
with an L1 hold, distillation over the full vocabulary from the original, L1) on this CPU, with
fewer steps and warm-start tokens, no checkpoints; each run's plan (``relufy.train.memory``, for
the same recipe and process count, as ``--dry-run`` prints it) beside the peak RSS of each of its
processes. Runs:

- ``1 process``: ``python -m relufy train RECIPE``;
- ``2 processes, DDP``: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m relufy train RECIPE``;
- ``2 processes, FSDP2``: the FSDP2 CPU harness of the tests (tests/train/fsdp2_launch.py under
  ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2``, gloo);
- ``baseline``: a process that imports what ``relufy train`` imports, builds the Accelerator, the
  tokenizer and the data mixture and stops: its resident memory then (``VmRSS``; its peak, with
  the tokenizer's transients, is printed too) against the plan's ``CPU_BASELINE``.

Peak RSS: each process's ``VmHWM`` (the kernel's high-water mark of its resident memory) read from
``/proc/PID/status`` every 50 ms until it exits (growth in its last 50 ms would be missed); the
workers of a launch are the processes whose environment has ``LOCAL_RANK``. The harness itself
does not matter (``VmHWM`` starts anew at ``exec``).

    python benchmarks/bench_memory_plan.py --model runs/demo/drelu [--data builtin:pydoc] \\
        [--runs single,ddp,fsdp2,baseline] [--steps 3] [--warmstart-tokens 2048] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "smollm2-recovery-cpu.yaml"
GiB = 2**30


def overrides(args, out: Path) -> list[str]:
    return [
        f"output_dir={out}",
        f"model.path={args.model}",
        f"data.sources=[{{data: {json.dumps(args.data)}}}]",
        f"budget.max_steps={args.steps}",
        "optim.warmup_steps=1",
        "checkpoint.every=0",
        "log.every=1",
        "log.eval_every=0",
        f"sparsity.ffn_warmstart.tokens={args.warmstart_tokens}",
        f"sparsity.ffn_warmstart.steps={args.warmstart_steps}",
        *args.set,
    ]


def write_recipe(args, out: Path, path: Path) -> Path:
    import yaml

    from relufy.train.recipe import apply_overrides, dump, validate

    raw = apply_overrides(yaml.safe_load(RECIPE.read_text()), overrides(args, out))
    path.write_text(dump(validate(raw, str(RECIPE))))
    return path


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "PPid"):
                out[key] = int(value.split()[0]) * (1024 if key != "PPid" else 1)
    return out


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                tree.setdefault(_status(int(entry))["PPid"], []).append(int(entry))
            except (OSError, KeyError):
                pass
    return tree


def _is_worker(pid: int) -> bool:
    try:
        return b"\0LOCAL_RANK=" in b"\0" + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def measure(cmd: list[str], env: dict, log: Path, launcher: bool) -> tuple[list[int], float]:
    """Run ``cmd``; returns (peak RSS of each worker, seconds). Without ``launcher`` the command's
    own process is the worker."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    peaks: dict[int, int] = {}
    workers: set[int] = set()
    while proc.poll() is None:
        tree = _children()
        todo, seen = [proc.pid], []
        while todo:
            pid = todo.pop()
            seen.append(pid)
            todo += tree.get(pid, [])
        for pid in seen:
            if (pid == proc.pid and not launcher) or (launcher and (pid in workers or _is_worker(pid))):
                workers.add(pid)
                try:
                    peaks[pid] = max(peaks.get(pid, 0), _status(pid)["VmHWM"])
                except (OSError, KeyError):
                    pass
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed (exit {proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    return [peaks[p] for p in sorted(peaks)], seconds


def _port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


BASELINE = """
import sys
from accelerate import Accelerator
import relufy.train.loop  # noqa: F401 - what relufy train imports
from relufy.modeling.tokenizer import load_tokenizer
from relufy.train import mixture
from relufy.train.recipe import load_recipe
recipe = load_recipe(sys.argv[1])
Accelerator()
data = mixture.build(recipe.data, load_tokenizer(recipe.model.path), recipe.seed)
import gc
gc.collect()
rss = [line for line in open("/proc/self/status") if line.startswith("VmRSS")][0].split()[1]
print(f"steady RSS {int(rss) * 1024}")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="the SmolLM2-135M dReLU folder (make demo's runs/demo/drelu)")
    ap.add_argument("--data", default="builtin:pydoc", help="training text (a data.sources entry's data)")
    ap.add_argument("--runs", default="single,ddp,fsdp2,baseline")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmstart-tokens", type=int, default=2048)
    ap.add_argument("--warmstart-steps", type=int, default=5)
    ap.add_argument("--set", action="append", default=[], help="another recipe override (repeatable)")
    ap.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, deleted)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.model = str(Path(args.model).resolve())
    if not args.data.startswith("builtin:") and Path(args.data).exists():
        args.data = str(Path(args.data).resolve())

    from relufy.train import memory
    from relufy.train.recipe import load_recipe

    work = args.workdir or Path(tempfile.mkdtemp(prefix="relufy-bench-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    base_env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    runs = {
        "single": ("1 process", 1, None),
        "ddp": ("2 processes, DDP", 2, "ddp"),
        "fsdp2": ("2 processes, FSDP2", 2, "fsdp2"),
        "baseline": ("baseline: resident after imports, Accelerator, tokenizer, data", 1, None),
    }
    rows = []
    for key in args.runs.split(","):
        label, processes, strategy = runs[key]
        if args.set and key != "baseline":
            label += f" ({', '.join(args.set)})"
        out = work / key
        shutil.rmtree(out, ignore_errors=True)
        recipe = write_recipe(args, out, work / f"{key}.yaml")
        env = dict(base_env)
        launcher = processes > 1
        if key == "single":
            cmd = [py, "-m", "relufy", "train", str(recipe)]
        elif key == "ddp":
            env["ACCELERATE_USE_CPU"] = "true"
            cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_port())]
            cmd += ["-m", "relufy", "train", str(recipe)]
        elif key == "fsdp2":
            env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
            cmd = [py, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml")]
            cmd += ["--num_processes", "2", "--main_process_port", str(_port())]
            cmd += [str(ROOT / "tests/train/fsdp2_launch.py"), str(recipe)]
        else:
            cmd = [py, "-c", BASELINE, str(recipe)]
        print(f"== {label}: {' '.join(cmd)}", flush=True)
        peaks, seconds = measure(cmd, env, work / f"{key}.log", launcher)
        if key == "baseline":  # what stays resident (its peak includes the tokenizer's transients)
            planned, table = memory.CPU_BASELINE, ""
            steady = int((work / f"{key}.log").read_text().split("steady RSS ")[1].split()[0])
            print(f"   peak RSS {peaks[0] / GiB:.2f} GiB, steady RSS {steady / GiB:.2f} GiB", flush=True)
            peaks = [steady]
        else:
            plan = memory.plan_recipe(load_recipe(recipe), processes=processes, strategy=strategy)
            planned, table = plan.per_process, plan.table()
            print(table)
        for rank, peak in enumerate(peaks):
            row = {
                "run": label,
                "process": rank,
                "plan_gib": planned / GiB,
                "measured_gib": peak / GiB,
                "ratio": planned / peak,
                "seconds": seconds,
            }
            rows.append(row)
            print(
                f"   process {rank}: plan {planned / GiB:.2f} GiB, measured peak RSS {peak / GiB:.2f} GiB, "
                f"plan/measured {planned / peak:.2f} ({seconds:.0f} s)",
                flush=True,
            )
    print()
    print("| run | process | plan (GiB) | measured peak RSS (GiB) | plan / measured |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['process']} | {r['plan_gib']:.2f} | {r['measured_gib']:.2f} | {r['ratio']:.2f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
