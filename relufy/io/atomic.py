"""Atomic output folders: write into a hidden temporary folder beside the target, rename at the end.

A failure or a kill leaves at most a ``.NAME.relufy-tmp-*`` folder, never a ``NAME`` that looks
complete; with ``force`` an existing target is replaced only once the new one is whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import RelufyError


def check_target(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise RelufyError(f"{out} exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise RelufyError(f"{out} exists and is not a folder")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_mode(path: Path, directory: bool) -> None:
    """mkdtemp/mkstemp (and some writers, e.g. safetensors) create owner-only paths; give the
    result, and for a folder everything in it, the usual umask-based mode."""
    mask = _umask()
    path.chmod((0o777 if directory else 0o666) & ~mask)
    if directory:
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                file = os.path.join(root, name)
                if os.stat(file).st_nlink == 1:  # hard links (convert --link) share the source's inode
                    os.chmod(file, 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False):
    out = Path(out).absolute()
    check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.relufy-tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish_mode(tmp, directory=True)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.relufy-old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.relufy-tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _publish_mode(tmp, directory=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
