"""Hang guards that do not fail a slow machine: a subprocess is stopped for making no progress (no
output for a long while), or after many times its idle duration, never near the time it takes.

``RELUFY_TEST_SLACK`` (default 10) scales every bound: a machine busier than ten times idle can
raise it. The suite's durations on an idle machine are in the comments where each bound is set.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time

SLACK = float(os.environ.get("RELUFY_TEST_SLACK", "10"))


def bound(idle_seconds: float) -> float:
    """A hang guard for something that takes ``idle_seconds`` on an idle machine."""
    return idle_seconds * SLACK


def run_watched(argv: list[str], quiet_seconds: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(argv, capture_output=True, text=True)``, stopped only when it prints nothing
    (stdout and stderr together) for ``quiet_seconds``: a long pipeline on a loaded machine keeps
    going as long as it keeps working. The whole process group is stopped, so children go too."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, start_new_session=True, **kwargs)
        size, last = -1, time.monotonic()
        while proc.poll() is None:
            time.sleep(1)
            now = os.fstat(out.fileno()).st_size + os.fstat(err.fileno()).st_size
            if now != size:
                size, last = now, time.monotonic()
            elif time.monotonic() - last > quiet_seconds:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                out.seek(0), err.seek(0)
                tail = (out.read() + err.read()).decode(errors="replace")[-3000:]
                raise AssertionError(f"no output for {quiet_seconds:.0f} s, stopped: {argv}\n{tail}")
        out.seek(0), err.seek(0)
        stdout, stderr = (f.read().decode(errors="replace") for f in (out, err))
        return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
