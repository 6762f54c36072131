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
