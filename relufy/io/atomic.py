"""Atomic output folders and files: written beside the target under a hidden name, renamed at the end.

A failure or a kill leaves at most a hidden ``.NAME.relufy-*`` entry, never a ``NAME`` that
looks complete, and the next write of ``NAME`` removes such leftovers. While a folder is being
written its parent holds ``.NAME.relufy-lock`` (an advisory ``flock``, released by the kernel
even on SIGKILL), so a second relufy writing the same target stops at once. The final rename
never replaces a folder that appeared meanwhile (``renameat2(RENAME_NOREPLACE)``); with
``force`` an existing target is replaced only once the new one is whole.

Nothing here follows a link it did not expect: the lock is opened with ``O_NOFOLLOW`` and must
be a regular file, temporary entries are created exclusively (``mkstemp``/``mkdtemp``), and a
file target that is a link, a device, a pipe or a socket is refused rather than replaced.

Files get the usual umask-based mode, except that weights and statistics (``.safetensors``,
``.gguf``, ``.bin``) never get wider permissions than the input weights they were made from (a
0600 GGUF converts to 0600 shards), and copies of input files keep at most their source's
(``keep_mode``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import stat
import tempfile
from pathlib import Path

from ..errors import RelufyError
from .paths import check_output_dir, refuse_unexpected

_LEFTOVERS = ("tmp", "old", "gguf")
_KEPT: set[str] = set()  # files (absolute paths) whose mode was set from their source


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def keep_mode(path: Path, source_mode: int) -> None:
    """Give ``path`` (a copy of an input file) at most its source's permissions, and keep them."""
    os.chmod(path, source_mode & 0o777 & (0o666 & ~_umask()))
    _KEPT.add(str(Path(path).absolute()))


_WEIGHTS = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def input_mode(inputs) -> int:
    """The permission bits every output may have given its ``inputs`` (files, or model folders:
    their weight files): those all of them grant, so an owner-only input gives owner-only outputs."""
    allowed = 0o666
    for inp in inputs:
        inp = Path(inp)
        try:
            files = [inp] if inp.is_file() else [f for f in inp.iterdir() if f.suffix in _WEIGHTS and f.is_file()]
            for f in files:
                allowed &= os.stat(f).st_mode
        except OSError:  # gone or unreadable: its reader reports it
            continue
    return allowed & 0o666


def _publish_mode(path: Path, directory: bool, allowed: int = 0o666) -> None:
    """mkdtemp/mkstemp (and some writers, e.g. safetensors) create owner-only paths; give the
    result, and for a folder everything in it, the usual umask-based mode; weights and statistics
    within ``allowed`` (``input_mode`` of the inputs)."""
    mask = _umask()

    def file_mode(name: str) -> int:
        return 0o666 & ~mask & (allowed if name.endswith(_WEIGHTS) else 0o666)

    path.chmod(0o777 & ~mask if directory else 0o666 & ~mask & allowed)  # a lone file: ``allowed`` is for it
    if directory:
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                file = os.path.join(root, name)
                if os.path.abspath(file) in _KEPT:
                    _KEPT.discard(os.path.abspath(file))
                elif os.stat(file).st_nlink == 1:  # hard links (convert --link) share the source's inode
                    os.chmod(file, file_mode(name))


_libc = None


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename`` that fails with FileExistsError if ``dst`` exists (an empty folder included)."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = _libc.renameat2
    except (OSError, AttributeError):  # not glibc / not Linux
        renameat2 = None
    if renameat2 is not None:
        at_fdcwd, noreplace = -100, 1
        if renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):  # EINVAL: the filesystem lacks the flag
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():  # fallback under the lock: racy only against non-relufy writers
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def target_lock(out: Path):
    """Hold ``.NAME.relufy-lock`` beside ``out``; refuse if another process holds it."""
    lock = out.parent / f".{out.name}.relufy-lock"
    while True:
        try:  # O_NONBLOCK: a pipe planted under the lock's name must not block the open
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666 & ~_umask())
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise RelufyError(f"{lock} is a link; relufy does not follow it (remove it)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise RelufyError(f"{lock} is not a regular file; relufy does not use it (remove it)")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RelufyError(f"{out} is being written by another relufy process") from None
        try:  # the holder before us may have unlinked the file we opened: lock the current one
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def remove_leftovers(out: Path) -> None:
    """Hidden folders of earlier writes of ``out`` that were killed (call with the lock held)."""
    for kind in _LEFTOVERS:
        for stale in out.parent.glob(f".{out.name}.relufy-{kind}-*"):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def scratch_dir(out: Path, kind: str) -> Path:
    """A hidden folder beside ``out`` for intermediate files; removed as a leftover if not by the caller."""
    assert kind in _LEFTOVERS
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.relufy-{kind}-", dir=out.parent))


@contextlib.contextmanager
def atomic_dir(out: Path, force: bool = False, inputs=(), what: str = "OUT"):
    """Yield a hidden temporary folder that becomes ``out`` when the block succeeds.

    ``inputs`` are the resolved paths the caller reads: ``out`` may not be, hold or lie in one.
    """
    inputs = list(inputs)
    allowed = input_mode(inputs)
    out = check_output_dir(out, force, inputs, what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(out):
        remove_leftovers(out)
        check_output_dir(out, force, inputs, what)  # again, under the lock
        tmp = scratch_dir(out, "tmp")
        try:
            yield tmp
            _publish_mode(tmp, directory=True, allowed=allowed)
            _publish(tmp, out, force)
        except Exception as e:
            if is_disk_full(e):
                raise RelufyError(f"no space left on device writing {out} (nothing was written)") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, also when a writer in another language wraps it (safetensors: "os error 28")."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True
    text = str(e)
    return "No space left on device" in text or "os error 28" in text or "StorageFull" in text


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse before writing ``nbytes`` next to ``out`` when its filesystem has less free."""
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise RelufyError(
            f"no space left on device for {out}: it needs {nbytes / 2**20:,.1f} MiB, {free / 2**20:,.1f} MiB are free"
        )


def _publish(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if force and (out.exists() or out.is_symlink()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.relufy-old-", dir=out.parent))
        old.rmdir()
        out.rename(old)
    try:
        _rename_noreplace(tmp, out)
    except FileExistsError:
        if old is not None:
            with contextlib.suppress(OSError):
                _rename_noreplace(old, out)
        raise RelufyError(f"{out} appeared while relufy was writing it; left it as it is (use --force to replace it)") from None
    except BaseException:
        if old is not None:
            with contextlib.suppress(OSError):
                _rename_noreplace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: Path, allowed: int = 0o666):
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.
    ``allowed``: the permission bits it may get at most (``input_mode`` of what it was made from)."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(path):
        refuse_unexpected(path)
        remove_leftovers(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.relufy-tmp-", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        try:
            yield tmp
            _publish_mode(tmp, directory=False, allowed=allowed)
            os.replace(tmp, path)
        except Exception as e:
            if is_disk_full(e):
                raise RelufyError(f"no space left on device writing {path} (left as it was)") from None
            raise
        finally:
            tmp.unlink(missing_ok=True)


def save_png(fig, path: Path, dpi: int = 120) -> Path:
    """A matplotlib figure written atomically as PNG to exactly ``path`` (no suffix appended)."""
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
