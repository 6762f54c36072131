"""relufy export: predictor options that would write nonsense are refused before any work."""

from __future__ import annotations

import pytest
from safety import Snapshot, assert_refused
from tiny import corpus, save_tiny_with_tokenizer

import relufy


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-options")
    save_tiny_with_tokenizer("llama", root / "llama")
    (root / "text.txt").write_text(corpus()[:3000])
    return relufy.convert(root / "llama", root / "drelu")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--predictor-threshold", "nan"), "--predictor-threshold"),
        (("--predictor-threshold", "inf"), "--predictor-threshold"),
        (("--predictor-rank", "100000"), "--predictor-rank 100000 exceeds the model's hidden size 32"),
    ],
)
def test_predictor_options(model, tmp_path, cli, args, needle):
    snap = Snapshot(tmp_path, model)
    code, err, _ = cli("export", model, tmp_path / "out", "--data", model.parent / "text.txt", "--predictors", *args)
    assert_refused(snap, code, err, needle)
