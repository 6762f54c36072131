"""The rules every command applies to the paths a user gives, before any long work.

- Paths are compared resolved (``..`` and symlinks followed), never as spelled: ``x/../proj``
  and a link to ``proj`` are ``proj``.
- An output folder must not be an input, lie inside one, or contain one (``--force`` would
  delete the input with it); an output file must not lie inside an input model folder or be an
  input file. An empty path (an unset shell variable) is refused, not read as ``.``.
- An output's parent must be a folder this process can write in, and an output file must not
  be an existing folder; so a bad path fails at once, not after an hour of computation.
- Outputs are regular files or folders, or absent: a device node, a pipe or a socket given as
  an output is refused (writing ``--json /dev/null`` as root would otherwise replace the system's
  ``/dev/null`` with a regular file), and so is one path given for two outputs.
- Links inside a model folder are followed only when they stay inside it (the Hugging Face cache
  links a snapshot's files to its ``blobs`` folder, which counts as inside).

Standard library only: ``pathlib`` compares spellings, not places, and nothing in the stack
states the input/output relations a conversion tool needs.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import RelufyError


def user_path(path: str | os.PathLike, what: str) -> Path:
    """``path`` resolved (``~``, ``..`` and links); an empty or blank path is refused."""
    if not str(path).strip():
        raise RelufyError(f"{what} is an empty path")
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise RelufyError(f"{path}: cannot resolve the path ({e.strerror or e})") from None


def _related(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _writable_parent(path: Path, what: str) -> None:
    """The nearest existing ancestor of ``path`` must be a folder we can create entries in."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():
            raise RelufyError(f"{what}: {parent} is a dangling link")
        parent = parent.parent
    if not parent.is_dir():
        raise RelufyError(f"{what}: {parent} is not a folder")
    try:  # a real probe: access() says yes to root on read-only mounts' cousins (/proc, /sys)
        fd, probe = tempfile.mkstemp(prefix=".relufy-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        read_only = e.errno == errno.EROFS
        reason = "read-only file system" if read_only else e.strerror or "not writable"
        raise RelufyError(f"{what}: cannot write in {parent} ({reason})") from None


def _special(path: Path) -> str | None:
    """What ``path`` is when it exists and is neither a regular file nor a folder (links followed)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kinds = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a named pipe"))
    return next((name for test, name in kinds if test(mode)), "a socket" if stat.S_ISSOCK(mode) else "a special file")


def refuse_special(path: Path, spelled: str | os.PathLike, what: str) -> None:
    """Refuse an output that exists and is a device, pipe or socket (relufy writes regular files only)."""
    kind = _special(path)
    if kind is not None:
        raise RelufyError(f"{what} {spelled} is {kind}, not a regular file; relufy writes only regular files")


def _odd_entry(path: Path) -> str | None:
    """What ``path`` is when it exists as a link ("link") or as anything but a regular file
    ("special"); None when it is absent or a regular file."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return "link" if stat.S_ISLNK(mode) else None if stat.S_ISREG(mode) else "special"


def refuse_planted_lock(target: Path) -> None:
    """The lock relufy will hold beside ``target`` (``.NAME.relufy-lock``) must be absent or a
    regular file: a link or a pipe planted there is refused now, before any long work."""
    lock = target.parent / f".{target.name}.relufy-lock"
    odd = _odd_entry(lock)
    if odd == "link":
        raise RelufyError(f"{lock} is a link; relufy does not follow it (remove it)")
    if odd:
        raise RelufyError(f"{lock} is not a regular file; relufy does not use it (remove it)")


def refuse_unexpected(path: Path) -> None:
    """A file relufy names itself (inside a folder it was given) must be absent or a regular file:
    a link, device, pipe or socket there is not replaced."""
    odd = _odd_entry(path)
    if odd == "link":
        raise RelufyError(f"{path} is a link; relufy does not replace links (remove it or name its target)")
    if odd:
        raise RelufyError(f"{path} exists and is not a regular file; relufy writes only regular files")


def distinct_outputs(*outputs: tuple[str, Path | None]) -> None:
    """Refuse two outputs (``(what, resolved path)``; ``None`` for one not asked for) at one path:
    the second would silently overwrite the first."""
    seen: dict[Path, str] = {}
    for what, path in outputs:
        if not path:
            continue
        if path in seen:
            raise RelufyError(f"{seen[path]} and {what} are the same file {path}: give each output its own path")
        seen[path] = what


def check_output_dir(out: str | os.PathLike, force: bool, inputs: Iterable[Path] = (), what: str = "OUT") -> Path:
    """Checks for a folder relufy is about to write (and, with ``force``, replace); returns it resolved."""
    target = user_path(out, what)
    for inp in inputs:
        if _related(target, inp):
            rel = "is" if target == inp else "is inside" if target.is_relative_to(inp) else "contains"
            raise RelufyError(f"{what} {out} {rel} the input {inp}: choose another output folder")
    refuse_special(target, out, what)
    refuse_planted_lock(target)
    if target.exists() or target.is_symlink():
        if not target.is_dir():
            raise RelufyError(f"{what} {out} exists and is not a folder")
        if not force:
            raise RelufyError(f"{what} {out} exists (use --force to replace it)")
    _writable_parent(target, what)
    return target


def check_output_file(path: str | os.PathLike, inputs: Iterable[Path] = (), what: str = "output") -> Path:
    """Checks for a file relufy is about to write (replacing exactly that file); returns it resolved."""
    target = user_path(path, what)
    for inp in inputs:
        if target == inp or target.is_relative_to(inp) or inp.is_relative_to(target):
            raise RelufyError(f"{what} {path} would overwrite the input {inp}: choose another path")
    refuse_special(target, path, what)
    refuse_planted_lock(target)
    if target.is_dir():
        raise RelufyError(f"{what} {path} is a folder; give a file path")
    _writable_parent(target, what)
    return target


def check_output_folder(path: str | os.PathLike, inputs: Iterable[Path] = (), what: str = "output folder") -> Path:
    """A folder that relufy adds files to (plots): it may exist, but not be or hold an input."""
    target = user_path(path, what)
    for inp in inputs:
        if _related(target, inp):
            raise RelufyError(f"{what} {path} would write among the input {inp}: choose another folder")
    refuse_special(target, path, what)
    if target.exists() and not target.is_dir():
        raise RelufyError(f"{what} {path} exists and is not a folder")
    _writable_parent(target, what)
    return target


def allowed_roots(folder: Path) -> tuple[Path, ...]:
    """Where links in the model folder ``folder`` may point: itself, and for a Hugging Face cache
    snapshot (``models--org--name/snapshots/<rev>``) the repository's ``blobs`` folder."""
    folder = folder.resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith(("models--", "datasets--")):
        return folder, folder.parent.parent / "blobs"
    return (folder,)


def inside(path: Path, folder: Path) -> Path:
    """``path`` (a file of the model folder ``folder``) resolved; refused if a link takes it out."""
    resolved = path.resolve()
    if not any(resolved.is_relative_to(root) for root in allowed_roots(folder)):
        raise RelufyError(
            f"{path} is a link out of the model folder; relufy does not follow such links (copy the file into the folder)"
        )
    return resolved
