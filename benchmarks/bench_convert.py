#!/usr/bin/env python
"""Benchmark ``relufy convert`` against ``cp -r`` on a synthetic Mistral-7B-shaped checkpoint.

What it does (see docs/benchmarks.md for results):

1. Writes a valid ``mistral`` Hugging Face folder (config.json, sharded bf16 safetensors with
   ``model.safetensors.index.json``, tensor names as ``MistralForCausalLM.save_pretrained``
   writes them) with real 7B tensor shapes (hidden 4096, FFN 14336, 32/8 heads, head_dim 128,
   vocab 32000) and only as many layers as make it about ``--gib`` GiB. Tensors are generated
   and written one at a time (memory: one tensor). Generation is not timed.
2. Warms the page cache with one untimed ``cp -r``, then times, in rotating order and
   ``--repeat`` times each: ``cp -r SRC DST``, ``relufy convert SRC OUT`` (copy path),
   ``relufy convert SRC OUT --dtype fp16`` (re-encode path) and ``relufy convert SRC OUT --link``.
   Each command runs as a child process; its peak RSS is the ``ru_maxrss`` that ``os.wait4``
   returns for that child alone. /proc/PID/status is also sampled to split the peak into
   anonymous memory and file-backed (mmap'ed, page-cache) memory. After each run the output is
   ``sync``-ed (timed separately: "wall+sync") and deleted.
3. Does the same at a smaller size (``--small-gib``) to check that peak RSS is flat in the
   checkpoint size.
4. Prints a markdown table and the verdict for each target; writes JSON to ``--json PATH``
   (default ``bench-out/bench_convert.json``).

Targets: convert wall time <= 1.2x ``cp -r``; peak RSS <= 1 GiB for a 6 GiB
checkpoint; peak RSS flat as the checkpoint grows.

    python benchmarks/bench_convert.py --gib 6            # make bench-convert
    python benchmarks/bench_convert.py --gib 1 --small-gib 0.5 --repeat 1   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

GiB = 1024**3
MiB = 1024**2

# Mistral-7B-v0.1 / v0.3 shapes (v0.1 vocab).
MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=32000,
)
BF16_BYTES = 2
REPO = Path(__file__).resolve().parent.parent

TARGET_WALL_RATIO = 1.2
TARGET_RSS_BYTES = 1 * GiB
TARGET_FLAT_GROWTH = 0.10  # peak RSS may grow at most 10% from the small to the large checkpoint


# --------------------------------------------------------------------------- synthetic checkpoint


def tensor_specs(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order MistralForCausalLM.state_dict() (and save_pretrained) has them."""
    h, i = MISTRAL_7B["hidden_size"], MISTRAL_7B["intermediate_size"]
    q = MISTRAL_7B["num_attention_heads"] * MISTRAL_7B["head_dim"]
    kv = MISTRAL_7B["num_key_value_heads"] * MISTRAL_7B["head_dim"]
    v = MISTRAL_7B["vocab_size"]
    specs = [("model.embed_tokens.weight", (v, h))]
    for n in range(layers):
        p = f"model.layers.{n}"
        specs += [
            (f"{p}.self_attn.q_proj.weight", (q, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, q)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
        ]
    specs += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return specs


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * BF16_BYTES


def layers_for(gib: float) -> int:
    fixed = sum(nbytes(s) for _, s in tensor_specs(0))
    per_layer = sum(nbytes(s) for _, s in tensor_specs(1)) - fixed
    return max(1, round((gib * GiB - fixed) / per_layer))


def mistral_config(layers: int) -> dict:
    return {
        "architectures": ["MistralForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": MISTRAL_7B["head_dim"],
        "hidden_act": "silu",
        "hidden_size": MISTRAL_7B["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": MISTRAL_7B["intermediate_size"],
        "max_position_embeddings": 32768,
        "model_type": "mistral",
        "num_attention_heads": MISTRAL_7B["num_attention_heads"],
        "num_hidden_layers": layers,
        "num_key_value_heads": MISTRAL_7B["num_key_value_heads"],
        "rms_norm_eps": 1e-05,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": MISTRAL_7B["vocab_size"],
    }


def shard(specs, max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy sharding in state-dict order, like transformers' split_torch_state_dict_into_shards."""
    shards, cur, size = [], [], 0
    for name, shape in specs:
        n = nbytes(shape)
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape))
        size += n
    if cur:
        shards.append(cur)
    return shards


def write_shard(path: Path, entries, seed: int) -> None:
    """Streaming safetensors writer: header from shapes, then one freshly generated tensor at a time."""
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
        offset += nbytes(shape)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in entries:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = torch.randn(shape, dtype=torch.bfloat16, generator=gen).mul_(0.02)
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t


def build_checkpoint(folder: Path, gib: float, shard_gib: float) -> dict:
    """Generate the checkpoint in a child process: the parent must not import torch (see run_measured)."""
    cmd = [sys.executable, __file__, "--_generate", str(folder), "--gib", str(gib), "--shard-gib", str(shard_gib)]
    return json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)


def _generate(folder: Path, gib: float, shard_gib: float) -> dict:
    layers = layers_for(gib)
    specs = tensor_specs(layers)
    shards = shard(specs, int(shard_gib * GiB))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(mistral_config(layers), indent=2) + "\n")
    (folder / "generation_config.json").write_text(
        json.dumps({"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2}, indent=2) + "\n"
    )
    weight_map = {}
    t0 = time.perf_counter()
    for k, entries in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / fname, entries, seed=k)
        weight_map.update({name: fname for name, _ in entries})
    total = sum(nbytes(s) for _, s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    os.sync()
    shard_sizes = sorted((p.stat().st_size for p in folder.glob("*.safetensors")), reverse=True)
    return {
        "path": str(folder),
        "layers": layers,
        "tensors": len(specs),
        "shards": len(shards),
        "largest_shard_bytes": shard_sizes[0],
        "tensor_bytes": total,
        "bytes_on_disk": sum(p.stat().st_size for p in folder.iterdir()),
        "largest_tensor_bytes": max(nbytes(s) for _, s in specs),
        "generate_s": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- measurement


class ProcSampler(threading.Thread):
    """Samples VmRSS / RssAnon / RssFile of one pid from /proc until it is gone."""

    def __init__(self, pid: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak = {"VmRSS": 0, "VmHWM": 0, "RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self):
        path = f"/proc/{self.pid}/status"
        while not self.stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        key = line.split(":", 1)[0]
                        if key in self.peak:
                            self.peak[key] = max(self.peak[key], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
                pass
            self.stop.wait(self.interval)


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; wall time, and ru_maxrss of that child alone (os.wait4).

    Linux carries the RSS high-water mark of the pre-exec address space (a copy of this process)
    into ru_maxrss, so this process stays small (no torch import): ru_maxrss has a floor of about
    this process's RSS (~15 MiB, visible in the ``cp -r`` row). VmHWM, sampled from /proc, has no
    such floor but can miss the last few milliseconds.
    """
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        sampler = ProcSampler(p.pid)
        sampler.start()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    t1 = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t1
    return {
        "wall_s": wall,
        "sync_s": sync_s,
        "wall_sync_s": wall + sync_s,
        "maxrss_bytes": ru.ru_maxrss * 1024,  # Linux reports KiB
        "vmhwm_bytes": sampler.peak["VmHWM"],
        "peak_anon_bytes": sampler.peak["RssAnon"],
        "peak_file_bytes": sampler.peak["RssFile"],
        "user_s": ru.ru_utime,
        "sys_s": ru.ru_stime,
    }


def relufy_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "relufy", "convert", *args]


CASES = {"cp": "cp -r", "keep": "convert (keep)", "fp16": "convert --dtype fp16", "link": "convert --link"}


def cases(src: Path, out: Path) -> dict[str, list[str]]:
    return {
        "cp -r": ["cp", "-r", str(src), str(out)],
        "convert (keep)": relufy_cmd(str(src), str(out)),
        "convert --dtype fp16": relufy_cmd(str(src), str(out), "--dtype", "fp16"),
        "convert --link": relufy_cmd(str(src), str(out), "--link"),
    }


def remove(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    for leftover in path.parent.glob(f".{path.name}.relufy-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    os.sync()


def check_output(out: Path, name: str, ckpt: dict) -> None:
    """Cheap sanity check that the command produced a whole checkpoint."""
    shards = sorted(out.glob("*.safetensors"))
    if len(shards) != ckpt["shards"] or not (out / "config.json").is_file():
        raise SystemExit(f"{name}: unexpected output in {out}: {[p.name for p in out.iterdir()]}")
    size = sum(p.stat().st_size for p in shards)
    if name == "convert --link" and shards[0].stat().st_nlink < 2:
        raise SystemExit(f"{name}: {shards[0]} is not a hard link")
    expected = ckpt["tensor_bytes"]
    if abs(size - expected) > 1 * MiB * ckpt["shards"]:
        raise SystemExit(f"{name}: output shards hold {size} bytes, expected about {expected}")


def measure_size(label: str, gib: float, args, only: list[str] | None = None) -> dict:
    work = Path(args.workdir)
    src, out = work / f"src-{label}", work / f"out-{label}"
    remove(src)
    remove(out)
    need = gib * GiB * 2.2 + GiB
    free = shutil.disk_usage(work).free
    if free < need:
        raise SystemExit(f"{work}: {free / GiB:.1f} GiB free, need about {need / GiB:.1f} GiB for --gib {gib}")
    print(f"[{label}] generating ~{gib} GiB checkpoint in {src} ...", flush=True)
    ckpt = build_checkpoint(src, gib, args.shard_gib)
    print(
        f"[{label}] {ckpt['layers']} layers, {ckpt['shards']} shards, {ckpt['tensor_bytes'] / GiB:.2f} GiB "
        f"(generated in {ckpt['generate_s']} s)",
        flush=True,
    )
    todo = {k: v for k, v in cases(src, out).items() if only is None or k in only}
    if "cp -r" not in todo:
        todo = {"cp -r": cases(src, out)["cp -r"], **todo}  # the baseline is always measured
    # Warm-up: one untimed cp -r, so that the source is in the page cache for every timed run.
    warm = run_measured(["cp", "-r", str(src), str(out)], work / "warmup.log")
    remove(out)
    runs: dict[str, list[dict]] = {k: [] for k in todo}
    names = list(todo)
    for r in range(args.repeat):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the order every round
        for name in order:
            res = run_measured(todo[name], work / "run.log")
            check_output(out, name, ckpt)
            remove(out)
            res["round"], res["position"] = r, order.index(name)
            runs[name].append(res)
            print(
                f"[{label}] round {r + 1}/{args.repeat} {name:22s} wall {res['wall_s']:7.2f} s  "
                f"+sync {res['sync_s']:6.2f} s  peak RSS {res['maxrss_bytes'] / MiB:8.1f} MiB "
                f"(anon {res['peak_anon_bytes'] / MiB:.0f}, file {res['peak_file_bytes'] / MiB:.0f})",
                flush=True,
            )
    if not args.keep:
        remove(src)
    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "wall_s_median": statistics.median(r["wall_s"] for r in rs),
            "wall_sync_s_median": statistics.median(r["wall_sync_s"] for r in rs),
            "maxrss_bytes_max": max(r["maxrss_bytes"] for r in rs),
            "vmhwm_bytes_max": max(r["vmhwm_bytes"] for r in rs),
            "peak_anon_bytes_max": max(r["peak_anon_bytes"] for r in rs),
            "peak_file_bytes_max": max(r["peak_file_bytes"] for r in rs),
            "user_s_median": statistics.median(r["user_s"] for r in rs),
            "sys_s_median": statistics.median(r["sys_s"] for r in rs),
        }
    return {"label": label, "gib_requested": gib, "checkpoint": ckpt, "warmup": warm, "runs": runs, "summary": summary}


def measure_startup(args) -> dict:
    """Fixed cost of a convert process without weight I/O: interpreter, the imports relufy convert
    does, config validation and rendering the modeling code (what _convert_folder does besides
    reading headers and writing weights)."""
    code = (
        "import relufy.cli; from relufy.modeling.spec import ConfigView; from relufy.families import family_for; "
        "from relufy.modeling.remote import render_modeling; "
        f"ConfigView({mistral_config(1)!r}).hidden_size; render_modeling(family_for('mistral'))"
    )
    rs = [run_measured([sys.executable, "-c", code], Path(args.workdir) / "startup.log") for _ in range(3)]
    return {
        "wall_s_median": statistics.median(r["wall_s"] for r in rs),
        "maxrss_bytes_max": max(r["maxrss_bytes"] for r in rs),
        "peak_anon_bytes_max": max(r["peak_anon_bytes"] for r in rs),
    }


# --------------------------------------------------------------------------- report


def machine_info(workdir: Path) -> dict:
    def sh(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except Exception as e:  # noqa: BLE001
            return f"n/a ({e})"

    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = json.loads(
        sh(
            [
                sys.executable,
                "-c",
                "import json, platform, torch, safetensors, transformers; print(json.dumps({'python': "
                "platform.python_version(), 'torch': torch.__version__, 'safetensors': safetensors.__version__, "
                "'transformers': transformers.__version__}))",
            ]
        )
    )
    return {
        "nproc": sh(["nproc"]),
        "cpu": cpu,
        "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "df": sh(["df", "-h", str(workdir)]),
        "fs": sh(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", str(workdir)]),
        "cp": sh(["cp", "--version"]).splitlines()[0],
        "kernel": platform.release(),
        **versions,
        "relufy_commit": sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "relufy_dirty": bool(sh(["git", "-C", str(REPO), "status", "--porcelain", "--", "relufy"])),
    }


def table(sizes: list[dict]) -> str:
    rows = [
        "| checkpoint | command | wall (median) | wall+sync (median) | vs `cp -r` | peak RSS (ru_maxrss) "
        "| of which anon | of which file-mapped |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in sizes:
        c = s["checkpoint"]
        ckpt = f"{c['tensor_bytes'] / GiB:.2f} GiB, {c['layers']} layers, {c['shards']} shards"
        cp = s["summary"].get("cp -r")
        for name, m in s["summary"].items():
            ratio = f"{m['wall_s_median'] / cp['wall_s_median']:.2f}x" if cp else "-"
            rows.append(
                f"| {ckpt} | `{name}` | {m['wall_s_median']:.2f} s | {m['wall_sync_s_median']:.2f} s | {ratio} "
                f"| {m['maxrss_bytes_max'] / MiB:.0f} MiB | {m['peak_anon_bytes_max'] / MiB:.0f} MiB "
                f"| {m['peak_file_bytes_max'] / MiB:.0f} MiB |"
            )
    return "\n".join(rows)


def verdicts(big: dict, small: dict | None) -> list[dict]:
    out = []
    s = big["summary"]
    cp, cp_sync = s["cp -r"]["wall_s_median"], s["cp -r"]["wall_sync_s_median"]
    for name in ("convert (keep)", "convert --dtype fp16"):
        if name not in s:
            continue
        ratio = s[name]["wall_s_median"] / cp
        ratio_sync = s[name]["wall_sync_s_median"] / cp_sync
        out.append(
            {
                "target": f"wall time <= {TARGET_WALL_RATIO}x cp -r",
                "command": name,
                "value": f"{s[name]['wall_s_median']:.2f} s vs {cp:.2f} s = {ratio:.2f}x "
                f"(with sync: {s[name]['wall_sync_s_median']:.2f} s vs {cp_sync:.2f} s = {ratio_sync:.2f}x)",
                "ratio": ratio,
                "ratio_with_sync": ratio_sync,
                "met": ratio <= TARGET_WALL_RATIO,
            }
        )
    gib = big["checkpoint"]["tensor_bytes"] / GiB
    for name in ("convert (keep)", "convert --dtype fp16", "convert --link"):
        if name not in s:
            continue
        rss = s[name]["maxrss_bytes_max"]
        out.append(
            {
                "target": f"peak RSS <= 1 GiB ({gib:.2f} GiB checkpoint)",
                "command": name,
                "value": f"{rss / MiB:.0f} MiB (anon {s[name]['peak_anon_bytes_max'] / MiB:.0f}, "
                f"file-mapped {s[name]['peak_file_bytes_max'] / MiB:.0f})",
                "met": rss <= TARGET_RSS_BYTES,
            }
        )
    if small is not None:
        sg = small["checkpoint"]["tensor_bytes"] / GiB
        for name in ("convert (keep)", "convert --dtype fp16"):
            if name not in s or name not in small["summary"]:
                continue
            a, b = small["summary"][name]["maxrss_bytes_max"], s[name]["maxrss_bytes_max"]
            growth = b / a - 1
            out.append(
                {
                    "target": f"peak RSS flat (growth <= {TARGET_FLAT_GROWTH:.0%}) from {sg:.2f} to {gib:.2f} GiB",
                    "command": name,
                    "value": f"{a / MiB:.0f} -> {b / MiB:.0f} MiB ({growth:+.1%})",
                    "met": growth <= TARGET_FLAT_GROWTH,
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gib", type=float, default=6.0, help="size of the main synthetic checkpoint (GiB)")
    ap.add_argument("--small-gib", type=float, default=2.0, help="size of the second checkpoint (0: skip)")
    ap.add_argument("--shard-gib", type=float, default=2.0, help="largest shard (GiB); HF's default is 5 GB")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per command and size (median reported)")
    ap.add_argument("--workdir", default="/tmp/relufy-bench-convert", help="scratch folder (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (checkpoints) at the end")
    ap.add_argument(
        "--json",
        type=Path,
        default=REPO / "bench-out" / "bench_convert.json",
        help="write all results (raw runs included) to this file ('' to skip; default: bench-out/, git-ignored)",
    )
    ap.add_argument(
        "--commands", default="cp,keep,fp16,link", help=f"comma-separated subset of {','.join(CASES)} (cp always runs)"
    )
    ap.add_argument("--_generate", type=Path, help=argparse.SUPPRESS)  # internal: write one checkpoint, print JSON
    args = ap.parse_args()
    if args._generate:
        print(json.dumps(_generate(args._generate, args.gib, args.shard_gib)))
        return
    only = [CASES[c.strip()] for c in args.commands.split(",") if c.strip()]

    work = Path(args.workdir)
    created = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    print(subprocess.run(["df", "-h", str(work)], capture_output=True, text=True).stdout, flush=True)
    try:
        machine = machine_info(work)
        startup = measure_startup(args)
        print(
            f"startup (interpreter + imports + config + modeling code, no weight I/O): "
            f"{startup['wall_s_median']:.2f} s, "
            f"{startup['maxrss_bytes_max'] / MiB:.0f} MiB",
            flush=True,
        )
        sizes = []
        small = None
        if args.small_gib > 0 and layers_for(args.small_gib) < layers_for(args.gib):
            small = measure_size("small", args.small_gib, args, only)
            sizes.append(small)
        big = measure_size("main", args.gib, args, only)
        sizes.insert(0, big)
    finally:
        if not args.keep:
            for p in (work / "out-main", work / "out-small", work / "src-main", work / "src-small"):
                shutil.rmtree(p, ignore_errors=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)
            else:
                for log in ("warmup.log", "run.log", "startup.log"):
                    (work / log).unlink(missing_ok=True)

    ver = verdicts(big, small)
    md = table(sizes)
    print()
    print(md)
    print()
    print(
        f"startup (interpreter + imports + config + modeling code, no weight I/O): "
        f"{startup['wall_s_median']:.2f} s, {startup['maxrss_bytes_max'] / MiB:.0f} MiB peak RSS"
    )
    print()
    for v in ver:
        print(f"- {'MET   ' if v['met'] else 'MISSED'} {v['target']}: `{v['command']}` {v['value']}")
    if args.json and str(args.json) not in ("", "."):
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": machine,
            "startup": startup,
            "sizes": sizes,
            "verdicts": ver,
            "table_md": md,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
