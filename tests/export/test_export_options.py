"""relufy export: predictor options that would write nonsense are refused before any work."""

from __future__ import annotations

import pytest
from safety import Snapshot, assert_refused
from tiny import drelu_with_text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("export-options"))


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
