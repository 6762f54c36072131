"""The suite's hang guard (tests/hang.py) stops a silent process and lets a slow, working one finish."""

from __future__ import annotations

import sys
import time

import pytest
from hang import run_watched


def test_a_silent_process_is_stopped():
    start = time.monotonic()
    with pytest.raises(AssertionError, match="no output for 2 s"):
        run_watched([sys.executable, "-c", "import time; print('start', flush=True); time.sleep(60)"], quiet_seconds=2)
    assert time.monotonic() - start < 30


def test_a_working_process_runs_past_the_quiet_limit():
    """Four seconds of work, a line every half second: twice the quiet limit, and not stopped."""
    script = "import time, sys\nfor i in range(8):\n    print(i, file=sys.stderr, flush=True); time.sleep(0.5)\nprint('done')"
    proc = run_watched([sys.executable, "-c", script], quiet_seconds=2)
    assert proc.returncode == 0 and proc.stdout == "done\n" and proc.stderr.split() == [str(i) for i in range(8)]
