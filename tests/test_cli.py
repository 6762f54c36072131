"""The relufy entry point as users run it."""

from __future__ import annotations

import subprocess
import sys


def test_no_arguments_prints_the_help():
    proc = subprocess.run([sys.executable, "-m", "relufy"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "convert" in proc.stdout and "relufy: error" not in proc.stderr
    assert proc.stdout.count("Usage") == 1


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

    models = {
        "convert": ConvertOptions,
        "info": InfoOptions,
        "generate": GenerateOptions,
        "eval": EvalOptions,
        "export": ExportOptions,
        "bench": BenchOptions,
        "train": TrainOptions,
    }
    group = typer.main.get_command(app)
    assert set(group.commands) == set(models)
    for name, model in models.items():
        options = {p.name: p for p in group.commands[name].params if p.param_type_name == "option" and p.name != "help"}
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
