"""``relufy bench``: FFN decode latency (``relufy.sparse.timing``) at fixed and measured sparsity,
and end-to-end generation tokens/s of a model per sparse mode."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

from .errors import RelufyError


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RelufyError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    return values


def run_bench(model, stats, sparsities, shapes, dtypes, threads, repeats, generation, new_tokens, json_out, plot) -> dict:
    import torch

    from .progress import console
    from .sparse.timing import DTYPES, SHAPES, bench_ffn, write_plot

    levels = _floats(sparsities, "sparsities")
    if any(not 0 <= s < 1 for s in levels):  # nan fails this too
        raise RelufyError(f"--sparsities must lie in [0, 1), got {sparsities!r}")
    raw_threads = _floats(threads, "threads")
    if not raw_threads or any(not math.isfinite(t) or t < 1 or t != int(t) for t in raw_threads):
        raise RelufyError(f"--threads must be positive whole numbers, got {threads!r}")
    thread_counts = [int(t) for t in raw_threads]
    cores = os.cpu_count() or 1
    if max(thread_counts) > cores:
        raise RelufyError(f"--threads {max(thread_counts)}: this machine has {cores} CPUs (more threads only measure contention)")
    dtype_names = [d.strip() for d in dtypes.split(",") if d.strip()]
    for d in dtype_names:
        if d not in DTYPES:
            raise RelufyError(f"--dtypes: unknown dtype {d!r} (fp32, bf16)")
    from .io.paths import check_output_file
    from .io.source import local_inputs, resolve

    inputs = local_inputs(model, stats)
    json_out = json_out and check_output_file(json_out, inputs, "--json")
    plot = plot and check_output_file(plot, inputs, "--plot")
    measured = None
    config = None
    if model is not None:
        from .modeling.spec import base_config

        config = resolve(model).config_dict()
        block = config.get("relufy") or {}
        if block.get("activation") not in ("drelu", "reglu", "relu2", "fatrelu"):
            raise RelufyError(f"{model}: not a ReLU-family relufy model (sparse decoding needs exact zeros)")
        base_config(config)
    if stats is not None:
        from .measure.stats import Stats

        loaded = Stats.load(Path(stats))
        if config is not None:
            from .measure.sites import ffn_sites
            from .modeling.load import skeleton

            loaded.match(ffn_sites(skeleton(config)), stats)
        measured = loaded.overall_sparsity()
    named = {}
    for shape in (s.strip() for s in shapes.split(",") if s.strip()):
        if shape == "model":
            if config is None:
                continue
            named["model"] = (config["hidden_size"], config.get("intermediate_size") or config.get("moe_intermediate_size"))
        elif shape in SHAPES:
            named[shape] = SHAPES[shape]
        else:
            try:
                h, i = (int(v) for v in shape.lower().split("x"))
            except ValueError:
                raise RelufyError(f"--shapes: {shape!r} is not 7b, model or HxI") from None
            named[shape] = (h, i)
    if not named:
        raise RelufyError("no FFN shape to measure (--shapes model needs MODEL)")
    for shape, (h, i) in named.items():
        _check_fits(shape, h, i)

    from .sparse.kernels import backend

    cases = []
    plan = [(name, h, i, d, t, s, False) for name, (h, i) in named.items() for d in dtype_names for t in thread_counts for s in levels]
    if measured is not None:
        plan += [(name, h, i, d, t, measured, True) for name, (h, i) in named.items() for d in dtype_names for t in thread_counts]
    from .progress import token_progress

    with token_progress() as progress:
        task = progress.add_task(f"FFN cases ({backend()} kernels)", total=len(plan))
        for name, h, i, d, t, s, is_measured in plan:
            cases.append(bench_ffn(name, h, i, d, t, s, is_measured, repeats))
            progress.advance(task, 1)
    gen = []
    if model is not None and generation:
        modes = ["off", "exact"] + (["predictor"] if (Path(model) / "predictors.safetensors").is_file() else [])
        gen = bench_generation(model, modes, new_tokens)

    from rich.table import Table

    table = Table(title=f"FFN decode latency (ms, median of {repeats}); {backend()} kernels")
    for col in ("shape", "dtype", "threads", "sparsity", "dense", "exact", "predictor", "exact x", "predictor x", "limit"):
        table.add_column(col, justify="right")
    for c in cases:
        table.add_row(f"{c.shape} {c.hidden}x{c.width}", c.dtype, str(c.threads), f"{c.sparsity:.1%}" + (" (measured)" if c.measured else ""),
                      f"{c.dense_ms:.2f}", f"{c.exact_ms:.2f}", f"{c.predictor_ms:.2f}", f"{c.exact_speedup:.2f}",
                      f"{c.predictor_speedup:.2f}", f"{c.limit:.1f}")  # fmt: skip
    console.print(table)
    for row in gen:
        console.print(f"generation {row['mode']}: {row['decode_tokens_per_second']:.1f} tokens/s decoding, {row['tokens_per_second']:.1f} "
                      f"with the prompt ({row['new_tokens']} tokens)"
                      + ("" if row["mode"] == "off" else f", same text as dense: {row['same_text_as_off']}"))  # fmt: skip
    result = {
        "relufy_bench": 1,
        "backend": backend(),
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "model": model,
        "measured_sparsity": measured,
        "ffn": [c.as_dict() for c in cases],
        "generation": gen,
    }
    if json_out:
        from .io.atomic import atomic_file

        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        write_plot(cases, plot)
    return result


def _check_fits(shape: str, hidden: int, width: int) -> None:
    """Refuse a shape whose synthetic FFN (fp32 gate, up and down, plus a working copy) would not
    fit in half of this machine's memory, before allocating anything."""
    if hidden < 1 or width < 1:
        raise RelufyError(f"--shapes {shape}: sizes must be positive")
    need = 2 * 3 * hidden * width * 4
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no check
        return
    if need > memory // 2:
        raise RelufyError(f"--shapes {shape}: the benchmark needs about {need / 2**30:,.1f} GiB, this machine has {memory / 2**30:,.1f} GiB")


def bench_generation(path: str, modes: list[str], new_tokens: int = 32, prompt: str = "Write a short story about a lighthouse.") -> list[dict]:
    """End-to-end greedy generation tokens/s of one model per sparse mode (same prompt, same length)."""
    import torch

    from .generate import generate
    from .modeling.load import load

    model = load(path, dtype=torch.float32).eval()
    rows = []
    texts = {}
    for mode in modes:
        generate(path, prompt, max_new_tokens=4, model=model, sparse=mode)  # warm up
        first = generate(path, prompt, max_new_tokens=1, min_new_tokens=1, model=model, sparse=mode)  # prefill + 1 token
        result = generate(path, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, model=model, sparse=mode)
        texts[mode] = result.text
        decode = result.seconds - first.seconds
        rows.append({"mode": mode, "new_tokens": result.new_tokens, "seconds": result.seconds, "tokens_per_second": result.tokens_per_second,
                     "decode_tokens_per_second": (result.new_tokens - 1) / decode if decode > 0 else float("nan")})  # fmt: skip
    for row in rows:
        row["same_text_as_off"] = texts[row["mode"]] == texts.get("off")
    return rows
