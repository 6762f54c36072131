"""What every refusal must look like: exit status 2, one line on stderr, no traceback, and every
file that existed before byte-identical afterwards (nothing added unless a test allows it)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class Snapshot:
    """Contents and modes of every file (and link) under ``roots``, taken now."""

    def __init__(self, *roots: Path):
        self.roots = [Path(r) for r in roots]
        self.files = self._take()

    def _take(self) -> dict[str, tuple]:
        seen = {}
        for root in self.roots:
            if not root.exists():
                continue
            for dirpath, dirnames, filenames in os.walk(root):
                for name in dirnames + filenames:
                    path = Path(dirpath) / name
                    if path.is_symlink():
                        seen[str(path)] = ("link", os.readlink(path))
                    elif path.is_file():
                        seen[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)
                    else:
                        seen[str(path)] = ("dir",)
        return seen

    def assert_unchanged(self, allow_new=()):
        """Every entry as before; entries that were not there are allowed only under ``allow_new``."""
        now = self._take()
        changed = [p for p, v in self.files.items() if now.get(p) != v]
        assert not changed, f"changed or removed: {changed[:5]}"
        new = [p for p in now if p not in self.files and not any(Path(p).is_relative_to(a) for a in allow_new)]
        assert not new, f"new entries: {new[:5]}"


def assert_one_line(code, err, *needles):
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("relufy: error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


def assert_refused(snapshot: Snapshot, code, err, *needles, allow_new=()):
    assert_one_line(code, err, *needles)
    snapshot.assert_unchanged(allow_new)


def _unshare() -> list[str] | None:
    """A command prefix giving a private mount namespace (root, or an unprivileged user namespace)."""
    import subprocess

    for prefix in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True).returncode == 0
        except FileNotFoundError:
            return None
        if ok:
            return prefix
    return None


def run_on_tmpfs(mnt: Path, args: list, size_kb: int | None = None, read_only: bool = False, before: str = "", after: str = ""):
    """Run ``python -m relufy *args`` with a private tmpfs mounted at ``mnt`` (a real small or
    read-only filesystem, gone when the process ends); ``after``: a shell command run afterwards
    in the same namespace (``{mnt}`` filled in), its stdout captured; ``before``: one run first."""
    import shlex
    import subprocess
    import sys

    import pytest

    prefix = _unshare()
    if prefix is None:
        pytest.skip("no private mount namespace on this machine (unshare)")
    Path(mnt).mkdir(parents=True, exist_ok=True)
    opts = ",".join(filter(None, [f"size={max(size_kb, 4)}k" if size_kb else "", "ro" if read_only else ""]))
    relufy = " ".join(shlex.quote(str(a)) for a in [sys.executable, "-m", "relufy", *args])
    script = (
        f"mount -t tmpfs {'-o ' + opts if opts else ''} tmpfs {shlex.quote(str(mnt))} || exit 97; "
        f"{before.format(mnt=shlex.quote(str(mnt))) or ':'}; {relufy} >/dev/null; code=$?; "
        f"{after.format(mnt=shlex.quote(str(mnt))) or ':'}; exit $code"
    )
    proc = subprocess.run([*prefix, "sh", "-c", script], capture_output=True, text=True)
    if proc.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc
