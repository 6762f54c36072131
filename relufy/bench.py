"""``relufy bench``: FFN decode latency (``relufy.sparse.timing``) at fixed and measured sparsity,
and end-to-end generation tokens/s of a model per sparse mode.

With ``--data`` the model is run on real text with its own predictors (an hf export's, at their
exported thresholds) computing only the neurons they select: per layer the true density (active
neurons) and the predicted density (neurons computed); then the FFN decode time at exactly those
densities, summed over layers, for each shape (the model's, 7B's with the predictor ranks scaled
to the same share of the FFN), beside the synthetic case at the mean density (a predictor exactly
as sparse as the model) and the bound ``1 / density``."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from .errors import RelufyError
from .io.block import RelufyBlock
from .names import PREDICTORS_FILE, ZERO_ACTIVATIONS
from .options import Options, option_field


class BenchOptions(Options):
    """What ``relufy bench`` measures and where it writes the results."""

    stats: str | None = option_field(
        None,
        description="Statistics of MODEL (relufy eval --stats-out, or an export's sparsity.safetensors): "
        "adds its measured sparsity.",
    )
    sparsities: tuple[float, ...] = option_field((0.5, 0.8, 0.9, 0.95), description="Fixed sparsity levels in [0, 1).")
    shapes: tuple[str, ...] = option_field(("model", "7b"), description="FFN shapes: model (MODEL's), 7b (4096x14336) or HxI.")
    dtypes: tuple[Literal["fp32", "bf16"], ...] = option_field(("fp32", "bf16"), description="Weight dtypes.")
    threads: tuple[int, ...] = option_field((1, 2), description="Thread counts (at most this machine's CPUs).")
    repeats: int = option_field(10, ge=1, description="Timed repeats per variant (the median is reported).")
    data: str | None = option_field(
        None,
        description="Text (relufy eval --data specs) to run MODEL's predictors on: FFN time at its real per-layer "
        "true and predicted densities.",
    )
    max_tokens: int = option_field(4096, ge=2, description="Tokens of --data read.")
    seq_len: int = option_field(512, ge=2, description="Tokens per --data window.")
    generation: bool = option_field(True, description="Also time end-to-end generation of MODEL (off / exact / predictor).")
    new_tokens: int = option_field(32, ge=1, description="Tokens generated per mode.")
    json_out: str | None = option_field(None, flag="--json", description="Write the results as JSON here.")
    plot: str | None = option_field(None, description="Write the speedup-vs-sparsity PNG here (this exact path).")

    @field_validator("sparsities")
    @classmethod
    def _levels(cls, v):
        if not v or any(not 0 <= s < 1 for s in v):
            raise ValueError(f"sparsity levels must lie in [0, 1), got {list(v)}")
        return v

    @field_validator("threads")
    @classmethod
    def _threads(cls, v):
        cores = os.cpu_count() or 1
        if not v or min(v) < 1:
            raise ValueError(f"thread counts must be positive, got {list(v)}")
        if max(v) > cores:
            raise ValueError(f"{max(v)} threads: this machine has {cores} CPUs (more threads only measure contention)")
        return v


def run_bench(model: str | None, options: BenchOptions) -> dict:
    """``relufy bench``: the FFN cases for every shape, dtype, thread count and sparsity (and
    MODEL's measured sparsity), then MODEL's generation speed; table, JSON and PNG."""
    import torch

    from .progress import console, show_table
    from .sparse.timing import SHAPES, bench_ffn, write_plot

    o = options
    stats, levels, dtype_names, thread_counts, repeats = o.stats, o.sparsities, o.dtypes, o.threads, o.repeats
    generation, new_tokens, json_out, plot = o.generation, o.new_tokens, o.json_out, o.plot
    from .io.paths import check_output_file, distinct_outputs
    from .io.source import local_inputs, resolve

    inputs = local_inputs(model, stats, o.data)
    if o.data is not None and model is None:
        raise RelufyError("--data needs MODEL (its predictors and activations are read on that text)")
    json_out = json_out and check_output_file(json_out, inputs, "--json")
    plot = plot and check_output_file(plot, inputs, "--plot")
    distinct_outputs(("--json", json_out), ("--plot", plot))
    measured = None
    config = None
    if model is not None:
        from .modeling.spec import base_config
        from .modeling.weights import checked_config

        config = checked_config(resolve(model))
        block = RelufyBlock.read(config, model)
        if block is None or block.activation not in ZERO_ACTIVATIONS:
            raise RelufyError(f"{model}: not a ReLU-family relufy model (sparse decoding needs exact zeros)")
        base_config(config)
    if stats is not None:
        from .measure.stats import Stats

        loaded = Stats.load(Path(stats), "--stats")
        if config is not None:
            from .measure.sites import ffn_sites
            from .modeling.load import skeleton

            loaded.match(ffn_sites(skeleton(config)), stats)
        measured = loaded.overall_sparsity()
    named = {}
    for shape in options.shapes:
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
    real_layers = None
    if o.data is not None:
        real_layers = measure_densities(model, o.data, o.max_tokens, o.seq_len)

    from .sparse.kernels import backend

    cases = []
    plan = [
        (name, h, i, d, t, s, False) for name, (h, i) in named.items() for d in dtype_names for t in thread_counts for s in levels
    ]
    if measured is not None:
        plan += [(name, h, i, d, t, measured, True) for name, (h, i) in named.items() for d in dtype_names for t in thread_counts]
    from .progress import token_progress

    with token_progress() as progress:
        task = progress.add_task(f"FFN cases ({backend()} kernels)", total=len(plan))
        for name, h, i, d, t, s, is_measured in plan:
            cases.append(bench_ffn(name, h, i, d, t, s, is_measured, repeats))
            progress.advance(task, 1)
    real = []
    if real_layers is not None:
        real = bench_real_cases(real_layers, named, config, dtype_names, thread_counts, repeats)
    gen = []
    if model is not None and generation:
        modes = ["off", "exact"] + (["predictor"] if (Path(model) / PREDICTORS_FILE).is_file() else [])
        gen = bench_generation(model, modes, new_tokens)

    from rich.table import Table

    table = Table(title=f"FFN decode latency (ms, median of {repeats}); {backend()} kernels")
    for col in ("shape", "dtype", "threads", "sparsity", "dense", "exact", "predictor", "exact x", "predictor x", "limit"):
        table.add_column(col, justify="right")
    for c in cases:
        table.add_row(
            f"{c.shape} {c.hidden}x{c.width}",
            c.dtype,
            str(c.threads),
            f"{c.sparsity:.1%}" + (" (measured)" if c.measured else ""),
            f"{c.dense_ms:.2f}",
            f"{c.exact_ms:.2f}",
            f"{c.predictor_ms:.2f}",
            f"{c.exact_speedup:.2f}",
            f"{c.predictor_speedup:.2f}",
            f"{c.limit:.1f}",
        )
    show_table(table, console)
    if real:
        _print_real(real, repeats)
    for row in gen:
        console.print(
            f"generation {row['mode']}: {row['decode_tokens_per_second']:.1f} tokens/s decoding, {row['tokens_per_second']:.1f} "
            f"with the prompt ({row['new_tokens']} tokens)"
            + ("" if row["mode"] == "off" else f", same text as dense: {row['same_text_as_off']}")
        )
    result = {
        "relufy_bench": 1,
        "backend": backend(),
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
        "model": model,
        "measured_sparsity": measured,
        "ffn": [c.as_dict() for c in cases],
        "real": real,
        "generation": gen,
    }
    if json_out:
        from .io.atomic import atomic_file

        with atomic_file(json_out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    if plot:
        write_plot(cases, plot)
    return result


def measure_densities(path: str, data: str, max_tokens: int, seq_len: int) -> list[dict]:
    """Per layer, on ``data``: the true density (active neurons) and, when MODEL has predictors
    (an hf export), the density they select, the model computing only those (so later layers see
    what a predictor-sparse engine feeds them); MoE layers: the token-weighted mean over the
    layer's FFNs and experts."""
    import torch

    from .io.block import PredictorsInfo
    from .measure.evaluate import score
    from .measure.sites import ActivationCounter, ffn_sites, observing, tapped
    from .modeling.load import load
    from .modeling.tokenizer import load_tokenizer
    from .text import load_texts, tokenize, windows

    model = load(path, dtype=torch.float32).eval()
    sites = ffn_sites(model)
    wins = windows(tokenize(load_texts(data), load_tokenizer(path), max_tokens), seq_len)
    block = RelufyBlock.read(model.config)
    export = block.export if block else None
    has_predictors = (Path(path) / PREDICTORS_FILE).is_file() and _reads_predictors(export)
    per_key: dict = {}
    if has_predictors:
        from .export.calibration import PredictedOnly
        from .modeling.predictor import load_predictors
        from .sparse.engine import predictor_thresholds

        info = (export.predictors if export else None) or PredictorsInfo()
        loaded = load_predictors(path)
        predictors = {(s, e): loaded[(s.name, e if s.routed else None)].float() for s, _ in sites for e in range(s.experts)}
        by_name = predictor_thresholds(path, model)
        thresholds = (
            {(s, e): by_name[(s.name, e if s.routed else None)] for s, _ in sites for e in range(s.experts)}
            if by_name is not None
            else info.threshold
        )
        with tapped(model, sites, info.input) as tap:
            with observing(model, lambda s: PredictedOnly(s, tap, predictors, thresholds)) as masked:
                score(model, wins, 1, torch.device("cpu"))
        for key, p in predictors.items():
            m = masked.key_metrics(key)
            per_key[key] = (m["tokens"], m["density"], m["computed"], p.fc1.weight.shape[0])
    else:
        with observing(model, ActivationCounter) as counter:
            score(model, wins, 1, torch.device("cpu"))
        for site, (counts, tokens) in counter.result().items():
            for e in range(site.experts):
                n = int(tokens[e])
                per_key[(site, e)] = (n, float(counts[e].sum()) / (n * site.width) if n else float("nan"), None, None)
    layers: dict[int, list] = {}
    for (site, _), (n, density, computed, rank) in per_key.items():
        if n and density == density:
            layers.setdefault(site.layer, []).append((n, density, computed, rank))
    out = []
    for layer in sorted(layers):
        rows = layers[layer]
        n = sum(r[0] for r in rows)
        row = {"layer": layer, "tokens": n, "density": sum(r[0] * r[1] for r in rows) / n}
        row["predicted_density"] = sum(r[0] * r[2] for r in rows) / n if has_predictors else None
        row["rank"] = round(sum(r[0] * r[3] for r in rows) / n) if has_predictors else None
        out.append(row)
    return out


def _reads_predictors(export) -> bool:
    """Whether an export's layout (``relufy.export.registry``) keeps predictors relufy runs; True for
    a model that was not exported."""
    from .export.registry import layout_named

    return export is None or layout_named(export.layout).relufy_predictors


def bench_real_cases(layers: list[dict], named: dict, config, dtypes, threads, repeats: int) -> list[dict]:
    """``bench_real`` per shape, dtype and thread count at ``layers``' densities, each beside the
    synthetic case at the mean density."""
    from .progress import token_progress
    from .sparse.timing import bench_ffn, bench_real, scaled_rank

    model_shape = (config["hidden_size"], config.get("intermediate_size") or config.get("moe_intermediate_size"))
    mean_density = sum(r["density"] for r in layers) / len(layers)
    out = []
    plan = [(name, h, i, d, t) for name, (h, i) in named.items() for d in dtypes for t in threads]
    with token_progress() as progress:
        task = progress.add_task("FFN at real densities", total=len(plan))
        for name, h, i, d, t in plan:
            spec = [
                (
                    r["layer"],
                    r["density"],
                    r["predicted_density"],
                    scaled_rank(r["rank"], model_shape, (h, i)) if r["rank"] is not None else None,
                )
                for r in layers
            ]
            case = bench_real(name, h, i, d, t, spec, repeats).as_dict()
            synthetic = bench_ffn(name, h, i, d, t, min(max(1 - mean_density, 0.0), 0.999), True, repeats)
            case["synthetic_exact_speedup"] = synthetic.exact_speedup
            case["synthetic_predictor_speedup"] = synthetic.predictor_speedup
            out.append(case)
            progress.advance(task, 1)
    return out


def _print_real(real: list[dict], repeats: int) -> None:
    from rich.table import Table

    from .progress import console, show_table

    table = Table(title=f"FFN decode per token at the model's real densities (ms summed over layers, median of {repeats})")
    cols = ("shape", "dtype", "threads", "active", "predicted", "dense", "exact", "predictor", "exact x", "predictor x")
    for col in (*cols, "synthetic predictor x", "limit"):
        table.add_column(col, justify="right")
    for c in real:

        def pct(v):
            return "-" if v is None else f"{v:.1%}"

        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        table.add_row(
            f"{c['shape']} {c['hidden']}x{c['width']}",
            c["dtype"],
            str(c["threads"]),
            pct(c["density"]),
            pct(c["predicted_density"]),
            f"{c['dense_ms']:.2f}",
            f"{c['exact_ms']:.2f}",
            num(c["predictor_ms"], ".2f"),
            f"{c['exact_speedup']:.2f}",
            num(c["predictor_speedup"], ".2f"),
            f"{c['synthetic_predictor_speedup']:.2f}",
            f"{c['limit']:.1f}",
        )
    show_table(table, console)


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
        raise RelufyError(
            f"--shapes {shape}: the benchmark needs about {need / 2**30:,.1f} GiB, this machine has {memory / 2**30:,.1f} GiB"
        )


def bench_generation(
    path: str, modes: list[str], new_tokens: int = 32, prompt: str = "Write a short story about a lighthouse."
) -> list[dict]:
    """End-to-end greedy generation tokens/s of one model per sparse mode (same prompt, same length)."""
    import torch

    from .generate import generate
    from .modeling.load import load

    model = load(path, dtype=torch.float32).eval()
    rows = []
    texts = {}
    for mode in modes:
        generate(path, prompt, max_new_tokens=4, model=model, sparse=mode)  # warm up
        result = generate(path, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, model=model, sparse=mode)
        texts[mode] = result.text
        rows.append(
            {
                "mode": mode,
                "new_tokens": result.new_tokens,
                "seconds": result.seconds,
                "tokens_per_second": result.tokens_per_second,
                "decode_tokens_per_second": result.decode_tokens_per_second,
            }
        )
    for row in rows:
        row["same_text_as_off"] = texts[row["mode"]] == texts.get("off")
    return rows
