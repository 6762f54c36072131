"""The relufy entry point as users run it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_no_arguments_prints_the_help():
    proc = subprocess.run([sys.executable, "-m", "relufy"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "convert" in proc.stdout and "relufy: error" not in proc.stderr
    assert proc.stdout.count("Usage") == 1
    for flag in ("--version", "--verbose", "-v", "--quiet", "-q", "recipes"):
        assert flag in proc.stdout, flag


def test_a_group_without_a_command_prints_its_help(cli):
    code, err, out = cli("recipes")
    assert code == 0 and err == ""
    assert "Usage" in out and "list" in out and "copy" in out


def test_version():
    from importlib.metadata import version

    import relufy

    proc = subprocess.run([sys.executable, "-m", "relufy", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"relufy {version('relufy')}\n" and proc.stderr == ""
    assert version("relufy") == relufy.__version__  # pyproject and the package agree


def test_version_without_distribution_metadata(cli, monkeypatch):
    import importlib.metadata

    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    monkeypatch.setattr("relufy.__version__", "9.8.7")
    code, _, out = cli("--version")
    assert code == 0 and out == "relufy 9.8.7\n"


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny import save_tiny_with_tokenizer

    path = tmp_path_factory.mktemp("cli") / "llama"
    save_tiny_with_tokenizer("llama", path)
    return path


def test_quiet_leaves_results_and_errors(cli, tiny_llama, tmp_path):
    from relufy import progress

    code, err, out = cli("convert", tiny_llama, tmp_path / "a")
    assert code == 0 and "weights: done" in err and out.startswith("wrote "), err  # progress lines off a terminal
    before = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    code, err, out = cli("-q", "convert", tiny_llama, tmp_path / "b")
    assert code == 0 and err == "" and out == f"wrote {tmp_path / 'b'}\n"
    code, err, _ = cli("--quiet", "convert", tiny_llama, tmp_path / "b")
    assert code == 2 and err.startswith("relufy: error: ") and "exists" in err  # errors still shown
    # a later command in this process is not quiet
    assert not progress.is_quiet() and {k: os.environ.get(k) for k in before} == before
    code, err, _ = cli("convert", tiny_llama, tmp_path / "c")
    assert code == 0 and "weights: done" in err


def test_silent_progress_prints_nothing(capsys):
    from relufy import progress

    progress.set_quiet(True)
    try:
        with progress.token_progress() as bars:
            task = bars.add_task("tokens", total=10)
            bars.update(task, advance=10, line=True)
        with progress.byte_progress("bytes", 100) as advance:
            advance(100)
    finally:
        progress.set_quiet(False)
    assert capsys.readouterr().err == ""
    with progress.token_progress() as bars:
        bars.update(bars.add_task("tokens", total=10), advance=10)
    assert "tokens: done" in capsys.readouterr().err


def test_verbose_shows_debug_logs(cli, tiny_llama):
    code, err, out = cli("-v", "info", tiny_llama, "--json")
    assert code == 0, err
    assert "relufy DEBUG: relufy " in err and "torch " in err and "command: -v info" in err
    assert '"activation"' in out  # the result is unchanged
    code, err, _ = cli("info", tiny_llama, "--json")
    assert code == 0 and "DEBUG" not in err


def test_verbose_shows_transformers_info(tiny_llama):
    """In a fresh process: transformers reads its verbosity when imported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    verbose = subprocess.run([sys.executable, "-m", "relufy", "-v", "info", tiny_llama], capture_output=True, text=True, env=env)
    assert verbose.returncode == 0, verbose.stderr
    assert "[transformers]" in verbose.stderr and "LlamaConfig" in verbose.stderr
    plain = subprocess.run([sys.executable, "-m", "relufy", "info", tiny_llama], capture_output=True, text=True, env=env)
    assert plain.returncode == 0 and "LlamaConfig" not in plain.stderr
    assert plain.stdout == verbose.stdout


def test_verbose_and_quiet_together_are_refused(cli):
    code, err, _ = cli("-v", "-q", "recipes", "list")
    assert code == 2 and err == "relufy: error: give at most one of -v/--verbose and -q/--quiet"


def test_every_option_is_one_model_field():
    """Each command's flags are exactly its options model's fields, with the field's help."""
    import typer

    from relufy.bench import BenchOptions
    from relufy.cli import app
    from relufy.conversion import ConvertOptions
    from relufy.export.options import ExportOptions
    from relufy.generate import GenerateOptions
    from relufy.measure.options import EvalOptions
    from relufy.model_info import InfoOptions
    from relufy.options import flag_of
    from relufy.train.recipe import TrainOptions
    from relufy.train.recipes import RecipesCopyOptions, RecipesListOptions

    models = {
        "convert": ConvertOptions,
        "info": InfoOptions,
        "generate": GenerateOptions,
        "eval": EvalOptions,
        "export": ExportOptions,
        "bench": BenchOptions,
        "train": TrainOptions,
        "recipes list": RecipesListOptions,
        "recipes copy": RecipesCopyOptions,
    }
    group = typer.main.get_command(app)
    commands = {}
    for name, command in group.commands.items():
        subcommands = getattr(command, "commands", None)  # a group: recipes
        commands.update({f"{name} {sub}": c for sub, c in subcommands.items()} if subcommands else {name: command})
    assert set(commands) == set(models)
    for name, model in models.items():
        options = {p.name: p for p in commands[name].params if p.param_type_name == "option" and p.name != "help"}
        assert set(options) == set(model.model_fields), name
        for field, param in options.items():
            assert param.opts[0] == flag_of(model, field), (name, field)
            assert param.help == model.model_fields[field].description, (name, field)


def test_export_help_lists_every_field():
    proc = subprocess.run(
        [sys.executable, "-m", "relufy", "export", "--help"],
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "COLUMNS": "300"},
    )
    from relufy.export.options import ExportOptions
    from relufy.options import flag_of

    for field in ExportOptions.model_fields:
        assert flag_of(ExportOptions, field) in proc.stdout, field


def test_ctrl_c_exits_130_with_one_line(tiny_llama, tmp_path):
    """SIGINT during a command: exit status 130 and "relufy: interrupted" last, no traceback (Click
    turns the KeyboardInterrupt into Abort before relufy's handler sees it)."""
    import signal
    import time

    from hang import bound
    from tiny import corpus

    (tmp_path / "text.txt").write_text(corpus() * 8)  # 3.7 MB: seconds of work, a few hundred MB
    cmd = ["-v", "eval", str(tiny_llama), "--data", str(tmp_path / "text.txt"), "--seq-len", "64"]
    # as at a terminal: SIGINT at its default in the command (a test run started in the background
    # by a shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt)
    proc = subprocess.Popen(
        [sys.executable, "-m", "relufy", *cmd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = []
    for line in proc.stderr:  # -v logs the command line once the command has started
        seen.append(line)
        if "command:" in line:
            break
    # Ctrl-C until it stops: this checks what a user sees when it takes
    deadline = time.monotonic() + bound(60)  # a hang guard, far above the seconds it takes
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
    proc.wait(timeout=10)
    err = "".join(seen) + proc.stderr.read()  # the same buffered reader: nothing it read ahead is lost
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "relufy: interrupted", err
