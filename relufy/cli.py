"""The ``relufy`` command line: a thin Typer layer over the library functions."""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .errors import RelufyError

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException, NoArgsIsHelpError
from typer import Abort

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn SwiGLU language models into sparse-activation dReLU models (Turbo Sparse).",
)


class Activation(str, Enum):
    drelu = "drelu"
    reglu = "reglu"
    relu2 = "relu2"
    fatrelu = "fatrelu"
    swiglu = "swiglu"


class DType(str, Enum):
    keep = "keep"
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Model folder (safetensors), .gguf file, or hub id.")],
    out: Annotated[str, typer.Argument(help="Output folder (written atomically).")],
    activation: Annotated[Activation, typer.Option(help="Gated activation to convert to.")] = Activation.drelu,
    threshold: Annotated[float | None, typer.Option(help="FATReLU threshold T (fatrelu only).")] = None,
    dtype: Annotated[DType, typer.Option(help="Weight dtype of OUT.")] = DType.keep,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link unchanged shards instead of copying.")] = False,
):
    """Convert SRC to a dReLU (or other gated ReLU) checkpoint at OUT."""
    from .conversion import convert as run

    done = run(src, out, activation=activation.value, threshold=threshold, dtype=dtype.value, force=force, link=link)
    typer.echo(f"wrote {done}")


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="Model folder, .gguf file, or hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Family, activation, sizes, experts and parameter counts of a model."""
    from .model_info import info as run

    result = run(path)
    if as_json:
        typer.echo(json.dumps(result.model_dump(), indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(path))
    rows = [
        ("family", result.family),
        ("activation", result.activation + (f" (T={result.threshold})" if result.threshold is not None else "")),
        ("layers", result.layers),
        ("hidden / FFN", f"{result.hidden_size} / {result.ffn_size}"),
    ]
    if result.routed_experts:
        rows += [
            ("experts", f"{result.routed_experts} routed, {result.shared_experts} shared, top-{result.experts_per_token}"),
            ("expert FFN", result.expert_ffn_size),
        ]
    rows += [
        ("parameters", f"{result.params_total:,}"),
        ("FFN parameters", f"{result.params_ffn:,} ({result.params_ffn / result.params_total:.1%})"),
    ]
    if result.relufy:
        rows += [(f"relufy.{k}", v) for k, v in result.relufy.items() if k not in ("activation", "threshold")]
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="Model folder, .gguf file, or hub id.")],
    prompt: Annotated[str, typer.Option(help="The user message.")] = "What is the capital of France?",
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate (greedy).")] = 32,
    chat: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template.")] = True,
    sparse: Annotated[str, typer.Option(help="off; exact (sparse FFNs, same output); predictor (predicted neurons only).")] = "off",
):
    """Greedy generation from MODEL; prints the text and tokens/s."""
    from .generate import generate as run

    result = run(model, prompt, max_new_tokens=max_new_tokens, chat=chat, sparse=sparse)
    typer.echo(result.text)
    typer.echo(f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, sparse {sparse}]", err=True)


@app.command("eval")
def eval_(
    models: Annotated[list[str], typer.Argument(help="Model folders, .gguf files or hub ids (originals too).")],
    data: Annotated[str, typer.Option(help="Text file, .jsonl, .parquet, or hub NAME:CONFIG:SPLIT.")],
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    stride: Annotated[int | None, typer.Option(help="New tokens scored per window (default seq-len - 1).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Use only the first N tokens of the data.")] = None,
    bos: Annotated[bool, typer.Option("--bos", help="Start each window with BOS.")] = False,
    topk: Annotated[str, typer.Option(help="Comma-separated top-k sparsity levels, e.g. 0,0.5,0.8,0.85,0.9.")] = "",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, fp32, bf16, fp16.")] = "auto",
    json_out: Annotated[str | None, typer.Option("--json", help="Write results as JSON here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Write PNG plots into this folder.")] = None,
    stats_out: Annotated[str | None, typer.Option(help="Write activation counts (.safetensors).")] = None,
):
    """Perplexity, activation sparsity and the top-k curve of one or more models."""
    from .measure.evaluate import EvalOptions, evaluate
    from .measure.report import print_table, write_json, write_plots

    try:
        levels = tuple(float(x) for x in topk.split(",") if x.strip())
    except ValueError:
        raise RelufyError(f"--topk must be comma-separated numbers, got {topk!r}") from None
    options = _options(
        EvalOptions, data=data, seq_len=seq_len, stride=stride, max_tokens=max_tokens, bos=bos, topk=levels,
        batch_size=batch_size, device=device, dtype=dtype,
    )  # fmt: skip
    from .io.paths import check_output_file, check_output_folder
    from .io.source import local_inputs

    inputs = local_inputs(*models, data)  # outputs are checked before the long computation
    json_out = json_out and check_output_file(json_out, inputs, "--json")
    plot = plot and check_output_folder(plot, inputs, "--plot")
    targets = []
    if stats_out is not None:
        first = check_output_file(stats_out, inputs, "--stats-out")
        targets = [first] if len(models) == 1 else [first.with_name(f"{first.stem}.{i}{first.suffix}") for i in range(len(models))]
        targets = [check_output_file(t, inputs, "--stats-out") for t in targets]
    results = evaluate(models, options)
    print_table([r for r, _ in results])
    if json_out:
        write_json([r for r, _ in results], options, json_out)
    if plot:
        for path in write_plots([r for r, _ in results], plot):
            typer.echo(f"wrote {path}", err=True)
    for target, (_, stats) in zip(targets, results, strict=False):
        stats.save(target)
        typer.echo(f"wrote {target}", err=True)


class Layout(str, Enum):
    hf = "hf"
    powerinfer = "powerinfer"


@app.command("export")
def export_(
    model: Annotated[str, typer.Argument(help="A relufy checkpoint (converted, usually trained).")],
    out: Annotated[str, typer.Argument(help="Output folder (written atomically).")],
    stats: Annotated[str | None, typer.Option(help="Statistics from relufy eval --stats-out.")] = None,
    data: Annotated[str | None, typer.Option(help="Calibration text: profiles (without --stats) and trains predictors.")] = None,
    layout: Annotated[Layout, typer.Option(help="hf, or powerinfer (PowerInfer's converter input).")] = Layout.hf,
    dtype: Annotated[DType, typer.Option(help="Weight dtype of OUT.")] = DType.keep,
    reorder: Annotated[bool, typer.Option("--reorder", help="Permute neurons hottest first (function unchanged).")] = False,
    predictors: Annotated[bool, typer.Option("--predictors", help="Train a predictor per FFN (per expert).")] = False,
    predictor_rank: Annotated[int | None, typer.Option(help="Rank of every predictor (default: per layer from its sparsity).")] = None,
    predictor_threshold: Annotated[float, typer.Option(help="Neuron computed when its score >= this.")] = 0.0,
    predictor_input: Annotated[str, typer.Option(help="residual (before the FFN norm) or ffn (the FFN input).")] = "residual",
    predictor_steps: Annotated[int, typer.Option(help="Adam steps per predictor.")] = 300,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="Calibration tokens read from --data.")] = 32768,
    eval_json: Annotated[str | None, typer.Option(help="relufy eval --json output to quote in the card.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    report: Annotated[str | None, typer.Option(help="Write the export summary (JSON) here.")] = None,
):
    """Export MODEL for sparse inference: statistics, reordering, predictors, engine layout."""
    from .export.pipeline import export as run
    from .export.options import ExportOptions

    options = _options(
        ExportOptions, layout=layout.value, dtype=dtype.value, stats=stats, data=data, reorder=reorder,
        predictors=predictors, predictor_rank=predictor_rank, predictor_threshold=predictor_threshold,
        predictor_input=predictor_input, predictor_steps=predictor_steps, seq_len=seq_len,
        max_tokens=max_tokens, eval_json=eval_json, device=device,
    )  # fmt: skip
    if report:
        from .io.paths import check_output_file
        from .io.source import local_inputs

        report = check_output_file(report, local_inputs(model, stats, data, eval_json, out), "--report")
    result = run(model, out, options, force=force)
    if result.predictors:
        typer.echo(
            f"held-out perplexity {result.ppl_dense:.2f} dense, {result.ppl_predicted:.2f} with predicted neurons "
            f"({result.predicted_kept:.1%} computed, {result.missed_active:.1%} of active neurons missed, "
            f"top-1 agreement {result.top1_agreement:.1%})"
        )
    if report:
        from .io.atomic import atomic_file

        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(result.summary(), indent=2) + "\n")
    typer.echo(f"wrote {result.out} (overall sparsity {result.sparsity['overall']:.1%})")


def _options(cls, **values):
    """Build a pydantic options object; a bad value becomes one line naming the option."""
    from pydantic import ValidationError

    try:
        return cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        raise RelufyError(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg'].removeprefix('Value error, ')}") from None


@app.command()
def bench(
    model: Annotated[str | None, typer.Argument(help="A relufy model: its FFN shape, its sparsity (--stats) and generation speed.")] = None,
    stats: Annotated[str | None, typer.Option(help="Statistics (relufy eval --stats-out, or an export's sparsity.safetensors).")] = None,
    sparsities: Annotated[str, typer.Option(help="Fixed sparsity levels.")] = "0.5,0.8,0.9,0.95",
    shapes: Annotated[str, typer.Option(help="FFN shapes: 7b (4096x14336), model, or HxI.")] = "model,7b",
    dtypes: Annotated[str, typer.Option(help="fp32, bf16.")] = "fp32,bf16",
    threads: Annotated[str, typer.Option(help="Thread counts.")] = "1,2",
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per variant (median).")] = 10,
    generation: Annotated[bool, typer.Option(help="Also time end-to-end generation of MODEL (off / exact / predictor).")] = True,
    new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated per mode.")] = 32,
    json_out: Annotated[str | None, typer.Option("--json", help="Write the results as JSON here.")] = None,
    plot: Annotated[str | None, typer.Option(help="Write the speedup-vs-sparsity PNG here.")] = None,
):
    """FFN decode latency dense vs exact-sparse vs predictor-sparse, and generation tokens/s."""
    from .bench import run_bench

    run_bench(model, stats, sparsities, shapes, dtypes, threads, repeats, generation, new_tokens, json_out, plot)


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML (see recipes/).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted key=value overrides, e.g. optim.lr=1e-4.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in output_dir.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and print it; train nothing.")] = False,
):
    """Continued pretraining from a recipe, under Accelerate (accelerate launch for many GPUs)."""
    from .train.recipe import load_recipe

    spec = load_recipe(recipe, overrides or [])
    from .train.loop import preflight

    preflight(spec, download=not dry_run)  # paths and context length, before anything loads
    if dry_run:
        import yaml

        typer.echo(yaml.safe_dump(json.loads(spec.model_dump_json()), sort_keys=False))
        return
    from .train.loop import train as run

    final = run(spec, resume=resume)
    if os.environ.get("RANK", "0") == "0":  # one line for a multi-process launch
        typer.echo(f"wrote {final}")


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed and on which path."""
    import errno

    where = e.filename if e.filename is not None else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {where}' if where else ''}"
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    if not sys.stderr.isatty():  # logs get plain lines (relufy.progress), not redrawn tqdm bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already (relufy used as a library): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except RelufyError as e:
        print(f"relufy: error: {e}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("relufy: interrupted", file=sys.stderr)
        sys.exit(130)
    except NoArgsIsHelpError:  # plain `relufy`: Typer printed the help
        sys.exit(0)
    except ClickException as e:  # bad options and arguments
        print(f"relufy: error: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except OSError as e:  # disk full, permissions, a path that changed under us
        print(f"relufy: error: {_os_error(e)}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except Abort:
        sys.exit(1)
