"""relufy convert: activation options that cannot be written into a config are refused."""

from __future__ import annotations

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf"])
def test_fatrelu_threshold_must_be_finite(tmp_path, cli, threshold):
    save_tiny("llama", tmp_path / "src")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", tmp_path / "src", tmp_path / "out", "--activation", "fatrelu", "--threshold", threshold)
    assert_refused(snap, code, err, "finite number" if threshold != "-inf" else "threshold")
