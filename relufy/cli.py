"""The ``relufy`` command line: a thin Typer layer over the library functions."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from .errors import RelufyError

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException
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
    out: Annotated[Path, typer.Argument(help="Output folder (written atomically).")],
    activation: Annotated[Activation, typer.Option(help="Gated activation to convert to.")] = Activation.drelu,
    threshold: Annotated[float | None, typer.Option(help="FATReLU threshold T (fatrelu only).")] = None,
    dtype: Annotated[DType, typer.Option(help="Weight dtype of OUT.")] = DType.keep,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing OUT.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Hard-link unchanged shards instead of copying.")] = False,
):
    """Convert SRC to a dReLU (or other gated ReLU) checkpoint at OUT."""
    from .convert import convert as run

    done = run(src, out, activation=activation.value, threshold=threshold, dtype=dtype.value, force=force, link=link)
    typer.echo(f"wrote {done}")


@app.command()
def info(
    path: Annotated[str, typer.Argument(help="Model folder, .gguf file, or hub id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Family, activation, sizes, experts and parameter counts of a model."""
    from .info import info as run

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
):
    """Greedy generation from MODEL; prints the text and tokens/s."""
    from .generate import generate as run

    result = run(model, prompt, max_new_tokens=max_new_tokens, chat=chat)
    typer.echo(result.text)
    typer.echo(f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s]", err=True)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except RelufyError as e:
        print(f"relufy: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("relufy: interrupted", file=sys.stderr)
        sys.exit(130)
    except ClickException as e:  # bad options and arguments
        print(f"relufy: error: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        sys.exit(2)
    except Abort:
        sys.exit(1)
