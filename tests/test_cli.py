"""The relufy entry point as users run it."""

from __future__ import annotations

import subprocess
import sys


def test_no_arguments_prints_the_help():
    proc = subprocess.run([sys.executable, "-m", "relufy"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout and "convert" in proc.stdout and "relufy: error" not in proc.stderr
    assert proc.stdout.count("Usage") == 1
