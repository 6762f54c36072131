"""Fixtures of the training tests: a tiny converted model and its text, one short reference run
with a checkpoint after every step, and copies of it for the tests that damage checkpoints."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import corpus, save_tiny_with_tokenizer  # noqa: E402
from trainkit import curve, recipe_dict, write_recipe  # noqa: E402

import relufy  # noqa: E402


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-base")
    (root / "text.txt").write_text(corpus()[:30_000])
    save_tiny_with_tokenizer("llama", root / "llama")
    relufy.convert(root / "llama", root / "llama-drelu")
    return root


@pytest.fixture(scope="session")
def reference(base, tmp_path_factory):
    """A finished 5-step run (checkpoints step-2..4 kept) and its (step, loss, lr) curve."""
    from relufy.train.loop import train
    from relufy.train.recipe import validate

    out = tmp_path_factory.mktemp("reference") / "run"
    train(validate(recipe_dict(base, out)), show_progress=False)
    return out, curve(out)


@pytest.fixture
def copy_run(base, reference, tmp_path):
    """``make(name) -> (output_dir, recipe path)``: the reference run as a run killed after its
    step-4 checkpoint (no final/, summary.json or curves.png; metrics up to step 4)."""

    def make(name="run"):
        out = tmp_path / name
        shutil.copytree(reference[0], out, symlinks=True)
        shutil.rmtree(out / "final")
        for name_ in ("summary.json", "curves.png"):
            (out / name_).unlink()
        lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
        (out / "metrics.jsonl").write_text("".join(lines[:4]))
        return out, write_recipe(tmp_path / f"{name}.yaml", recipe_dict(base, out))

    return make
