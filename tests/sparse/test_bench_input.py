"""relufy bench: thread counts and shapes this machine cannot run are refused before allocating."""

from __future__ import annotations

import os

import pytest
from safety import Snapshot, assert_refused


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--threads", "100000"), f"this machine has {os.cpu_count()} CPUs"),
        (("--threads", "0"), "--threads: thread counts must be positive"),
        (("--threads", "1.5"), "--threads: Input should be a valid integer"),
        (("--threads", "nan"), "--threads: Input should be a valid integer"),
        (("--shapes", "1000000x1000000"), "the benchmark needs about"),
        (("--shapes", "0x16"), "sizes must be positive"),
        (("--sparsities", "nan"), "--sparsities: Input should be a finite number"),
        (("--sparsities", "1.5"), "--sparsities: sparsity levels must lie in [0, 1)"),
    ],
)
def test_refused_before_any_work(tmp_path, cli, args, needle):
    snap = Snapshot(tmp_path)
    code, err, _ = cli("bench", "--shapes", "8x16", "--no-generation", *args, "--json", tmp_path / "b.json")
    assert_refused(snap, code, err, needle)
