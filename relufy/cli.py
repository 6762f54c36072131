"""The ``relufy`` command line: each command is a library function, its flags its options model.

A command declares its positional arguments here and nothing else: its options are the fields of
one ``relufy.options.Options`` model (type, default, help), turned into Typer parameters by
``_command``; a bad value is reported by the model, on one line naming the flag.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import shlex
import sys
from enum import Enum
from typing import Annotated, Any, Literal, get_args, get_origin

import typer

from .errors import RelufyError
from .options import flag_of, is_tuple

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
recipes_app = typer.Typer(
    no_args_is_help=True,
    help="The recipes shipped with relufy: list them, or copy one to edit (relufy train also takes their names).",
)
app.add_typer(recipes_app, name="recipes")
log = logging.getLogger("relufy")


def _version() -> str:
    """The installed distribution's version, else the package's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("relufy")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"relufy {_version()}")
        raise typer.Exit()


# what -v and -q set for the libraries relufy calls (read when they are imported)
_LIBRARY_ENV = {
    "verbose": {"TRANSFORMERS_VERBOSITY": "info", "HF_HUB_VERBOSITY": "info"},
    "quiet": {
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
        "TQDM_DISABLE": "1",
    },
}


_SECRET_OPTIONS = ("--token",)
_HF_TOKEN = re.compile(r"hf_[A-Za-z0-9]{8,}")


def _secrets(argv: list[str]) -> list[str]:
    """The token values given on the command line (``--token X``, ``--token=X``) and in HF_TOKEN."""
    found = [os.environ[k] for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN") if os.environ.get(k)]
    for i, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        if flag in _SECRET_OPTIONS:
            found.append(value if eq else argv[i + 1] if i + 1 < len(argv) else "")
    return [s for s in found if s]


def _redact(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HF_TOKEN.sub("hf_***", text)


def _redacted(argv: list[str]) -> str:
    """The command line for the debug log, every token value replaced by ``***``."""
    return _redact(shlex.join(argv), _secrets(argv))


class _StderrHandler(logging.Handler):
    """Log records as plain lines on the current ``sys.stderr``, token values redacted (a token
    never appears in relufy's output, whatever a message quotes)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(_redact(self.format(record), _secrets(sys.argv[1:])), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging never takes the command down
            self.handleError(record)


def _set_verbosity(level: Literal["quiet", "normal", "verbose"]):
    """Apply ``-q`` / ``-v``: relufy's log level, its progress display, the libraries' verbosity
    and progress bars. Returns what undoes it (the CLI run in-process, e.g. by tests)."""
    from . import progress

    undo = []
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    old_level, old_quiet = log.level, progress.is_quiet()
    log.setLevel({"quiet": logging.ERROR, "normal": logging.WARNING, "verbose": logging.DEBUG}[level])
    progress.set_quiet(level == "quiet")
    undo.append(lambda: (log.setLevel(old_level), progress.set_quiet(old_quiet)))
    for key, value in _LIBRARY_ENV.get(level, {}).items():
        old = os.environ.get(key)
        os.environ[key] = value
        undo.append(lambda key=key, old=old: os.environ.pop(key) if old is None else os.environ.__setitem__(key, old))
    if level != "normal" and "transformers" in sys.modules:  # imported already: tell it directly
        hf = sys.modules["transformers"].utils.logging
        old_verbosity, bars = hf.get_verbosity(), hf.is_progress_bar_enabled()
        hf.set_verbosity(logging.INFO if level == "verbose" else logging.ERROR)
        if level == "quiet":
            hf.disable_progress_bar()
        undo.append(lambda: (hf.set_verbosity(old_verbosity), bars and hf.enable_progress_bar()))

    def restore() -> None:
        for step in reversed(undo):
            step()

    return restore


_restore_verbosity: list = []


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", is_eager=True, callback=_print_version, help="Print relufy's version and exit.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="Show relufy's debug log and the libraries' information messages.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("-q", "--quiet", help="Show results and errors only: no progress, no information.")
    ] = False,
) -> None:
    if verbose and quiet:
        raise RelufyError("give at most one of -v/--verbose and -q/--quiet")
    _restore_verbosity.append(_set_verbosity("verbose" if verbose else "quiet" if quiet else "normal"))
    log.debug("relufy %s, %s", _version(), _library_versions())
    log.debug("command: %s", _redacted(sys.argv[1:]))


def _library_versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"python {sys.version.split()[0]}"]
    for name in ("torch", "transformers", "huggingface_hub"):
        try:
            out.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            out.append(f"{name} missing")
    return ", ".join(out)


def _bare(annotation):
    """``X`` of ``X | None``."""
    args = [a for a in get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in get_args(annotation) else annotation


def _option(cls, name: str, field) -> inspect.Parameter:
    """The Typer parameter of one options field."""
    annotation, default = _bare(field.annotation), field.default
    flag, help_text = flag_of(cls, name), field.description
    if annotation is bool:
        decls = [flag] if default is False else [f"{flag}/--no-{flag[2:]}"]
        kind: Any = bool
    elif is_tuple(annotation):  # comma-separated on the command line, split by the model
        decls, kind = [flag], str
        default = None if default is None else ",".join(str(v) for v in default)
    elif get_origin(annotation) is Literal:  # a choice: Typer shows Enums as {a|b|c}
        choices = Enum(f"{name}_choices", {str(v): str(v) for v in get_args(annotation)}, type=str)
        decls, kind = [flag], choices
        default = None if default is None else choices(default)
    else:
        decls, kind = [flag], annotation
    required = field.is_required()
    option = typer.Option(*decls, help=help_text, show_default=default is not None and not required)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=... if required else default,
        annotation=Annotated[kind if required else (kind | None if default is None else kind), option],
    )


def _command(name: str, options_cls, arguments: list[tuple[str, Any, str]], run, group: typer.Typer = app):
    """Register command ``name`` of ``group``: ``arguments`` are (name, type, help) positionals; the
    options are ``options_cls``'s fields; ``run(**arguments, options=...)`` does the work."""

    def command(**values):
        args = {a: values.pop(a) for a, _, _ in arguments}
        options = options_cls.build(**{k: (v.value if isinstance(v, Enum) else v) for k, v in values.items()})
        run(**args, options=options)

    params = []
    for arg, kind, help_text in arguments:
        optional = get_origin(kind) is not None and type(None) in get_args(kind)
        params.append(
            inspect.Parameter(
                arg,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=None if optional else ...,
                annotation=Annotated[kind, typer.Argument(help=help_text, show_default=False)],
            )
        )
    params += [_option(options_cls, n, f) for n, f in options_cls.model_fields.items()]
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = run.__doc__
    group.command(name)(command)


# ---- the commands ---------------------------------------------------------------------------------


def _convert(src: str, out: str, options) -> None:
    """Convert SRC to a dReLU (or other gated ReLU) checkpoint at OUT."""
    from .conversion import convert

    typer.echo(f"wrote {convert(src, out, options)}")


def _info(path: str, options) -> None:
    """Family, activation, sizes, experts and parameter counts of a model."""
    from .model_info import show

    show(path, options)


def _generate(model: str, options) -> None:
    """Greedy generation from MODEL; prints the text and tokens/s."""
    from .generate import generate

    result = generate(model, **options.model_dump())
    typer.echo(result.text)
    typer.echo(f"[{result.new_tokens} tokens, {result.tokens_per_second:.1f} tokens/s, sparse {options.sparse}]", err=True)


def _eval(models: list[str], options) -> None:
    """Perplexity, activation sparsity, the top-k and threshold curves and lm-eval benchmarks of one or more models."""
    from .extras import require
    from .measure.report import run_eval

    if options.plot is not None:
        require("plot", "--plot")

    run_eval(models, options)


def _export(model: str, out: str, options) -> None:
    """Export MODEL for sparse inference: statistics, reordering, predictors, engine layout."""
    from .extras import require

    require("export", "relufy export")
    from .export.pipeline import export

    result = export(model, out, options)
    if result.predictors:
        typer.echo(
            f"held-out perplexity {result.ppl_dense:.2f} dense, {result.ppl_predicted:.2f} with predicted neurons "
            f"({result.predicted_kept:.1%} computed, {result.missed_active:.1%} of active neurons missed, "
            f"top-1 agreement {result.top1_agreement:.1%})"
        )
    typer.echo(f"wrote {result.out} (overall sparsity {result.sparsity['overall']:.1%})")


def _bench(model: str | None, options) -> None:
    """FFN decode latency dense vs exact-sparse vs predictor-sparse, and generation tokens/s."""
    from .bench import run_bench
    from .extras import require

    if options.plot is not None:
        require("plot", "--plot")

    run_bench(model, options)


def _train(recipe: str, overrides: list[str] | None, options) -> None:
    """Continued pretraining from a recipe, under Accelerate (accelerate launch for many GPUs)."""
    from .extras import require
    from .train.recipe import dump, load_recipe

    require("train", "relufy train")

    spec = load_recipe(recipe, overrides or [])
    from .train.loop import preflight

    if options.dry_run:  # what the run checks before its first step (the run itself: in train())
        from .train import rundir
        from .train.mixture import probe_sources

        o = options
        world = o.gpus * o.nodes if o.gpus is not None else o.processes
        out = preflight(spec, download=False, processes=world, tokenizer=True)
        rundir.check(out, spec, resume=o.resume)  # the output folder, as the run will find it
        probes = probe_sources(spec.data)  # every source's first record: its column, or a one-line refusal
        typer.echo(dump(spec))
        for line in probes:
            typer.echo(f"# {line}")  # YAML comments: the output stays the resolved recipe
        from .train.memory import plan_recipe

        try:  # per GPU with --gpus, else this machine's CPU processes; from config.json alone
            plan = plan_recipe(spec, o.gpus, o.nodes, o.gpu_memory, o.strategy, o.processes)
        except RelufyError as e:
            if o.gpus is not None:
                raise
            typer.echo(f"# memory plan: skipped ({e})")  # e.g. a hub model's config offline
            return
        for line in plan.table().splitlines():
            typer.echo(f"# {line}")
        plan.check()  # one line naming what to change, exit 2
        return
    if options.export_step is not None:
        from .train.midrun import export_checkpoint

        preflight(spec)  # paths, and the model as the recipe builds it
        typer.echo(f"wrote {export_checkpoint(spec, options.export_step)}")
        return
    from .io.hub import HubPush
    from .progress import is_quiet
    from .train.loop import train

    final = train(spec, resume=options.resume, show_progress=not is_quiet(), push=HubPush.of(options))
    if os.environ.get("RANK", "0") == "0":  # one line for a multi-process launch
        typer.echo(f"wrote {final}")


def _recipes_list(options) -> None:
    """The shipped recipes: name and what each is for (training recipes, then accelerate configs)."""
    from .train.recipes import table

    typer.echo(table())


def _recipes_copy(name: str, dest: str, options) -> None:
    """Copy the shipped recipe NAME to DEST (a file, or a folder to write NAME.yaml into)."""
    from .train.recipes import copy

    typer.echo(f"wrote {copy(name, dest, force=options.force)}")


def _register() -> None:
    from .bench import BenchOptions
    from .conversion import ConvertOptions
    from .export.options import ExportOptions
    from .generate import GenerateOptions
    from .measure.options import EvalOptions
    from .model_info import InfoOptions
    from .train.recipe import TrainOptions
    from .train.recipes import RecipesCopyOptions, RecipesListOptions

    _command(
        "convert",
        ConvertOptions,
        [("src", str, "Model folder (safetensors), .gguf file, or hub id."), ("out", str, "Output folder (written atomically).")],
        _convert,
    )
    _command("info", InfoOptions, [("path", str, "Model folder, .gguf file, or hub id.")], _info)
    _command("generate", GenerateOptions, [("model", str, "Model folder, .gguf file, or hub id.")], _generate)
    _command("eval", EvalOptions, [("models", list[str], "Model folders, .gguf files or hub ids (originals too).")], _eval)
    _command(
        "export",
        ExportOptions,
        [
            ("model", str, "A relufy checkpoint (converted, usually trained)."),
            ("out", str, "Output folder (written atomically)."),
        ],
        _export,
    )
    _command(
        "bench",
        BenchOptions,
        [("model", str | None, "A relufy model: its FFN shape, sparsity (--stats) and generation speed.")],
        _bench,
    )
    _command(
        "train",
        TrainOptions,
        [
            ("recipe", str, "Recipe YAML file, or the name of a shipped recipe (relufy recipes list)."),
            ("overrides", list[str] | None, "Dotted key=value overrides, e.g. optim.lr=1e-4."),
        ],
        _train,
    )
    _command("list", RecipesListOptions, [], _recipes_list, recipes_app)
    _command(
        "copy",
        RecipesCopyOptions,
        [
            ("name", str, "A shipped recipe's name (relufy recipes list)."),
            ("dest", str, "The file to write, or a folder to write NAME.yaml into."),
        ],
        _recipes_copy,
        recipes_app,
    )


_register()


def _os_error(e: OSError) -> str:
    """One line for an OSError: what failed and on which path."""
    import errno

    where = e.filename if e.filename is not None else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{f' writing {where}' if where else ''}"
    reason = e.strerror or str(e) or type(e).__name__
    return f"{where}: {reason}" if where else reason


def _error(message: str) -> None:
    """The one error line: on one line, token values redacted."""
    print(_redact(f"relufy: error: {message}".replace("\n", " "), _secrets(sys.argv[1:])), file=sys.stderr)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit status 2."""
    if not sys.stderr.isatty():  # logs get plain lines (relufy.progress), not redrawn tqdm bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")  # libraries' own tqdm bars (transformers' GGUF loader)
        if "transformers" in sys.modules:  # imported already (relufy used as a library): tell it directly
            sys.modules["transformers"].utils.logging.disable_progress_bar()
    try:
        code = app(standalone_mode=False)
        if code == 130:  # Typer turns Ctrl-C inside a command into exit code 130 and returns it
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except RelufyError as e:
        _error(str(e))
        sys.exit(2)
    except KeyboardInterrupt:
        print("relufy: interrupted", file=sys.stderr)
        sys.exit(130)
    except NoArgsIsHelpError:  # plain `relufy`: Typer printed the help
        sys.exit(0)
    except ClickException as e:  # bad options and arguments
        _error(e.format_message())
        sys.exit(2)
    except OSError as e:  # disk full, permissions, a path that changed under us
        _error(_os_error(e))
        sys.exit(2)
    except Abort as e:  # Click turns Ctrl-C inside a command into Abort (standalone_mode=False included)
        if isinstance(e.__cause__, KeyboardInterrupt):
            print("relufy: interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(1)
    finally:
        while _restore_verbosity:  # as before -v / -q (the CLI run again in one process)
            _restore_verbosity.pop()()
