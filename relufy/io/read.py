"""Reading the files relufy reads itself: regular files only, within a size bound suited to what
each one is, JSON nesting bounded, text line by line.

Every read site of relufy goes through here (configs, indexes, safetensors headers, the GGUF magic,
eval reports, stats files, text and ``.jsonl`` data, model cards). A path given on the command
line may name anything, and a model folder may hold anything under a familiar name, so:

- ``open_regular`` opens with ``O_NONBLOCK`` and checks the open descriptor with ``fstat``: a named
  pipe, socket, device or folder is refused at once, never waited on (a plain ``open`` of a FIFO
  blocks until a writer comes) and never read (``/dev/zero`` never ends). The mode is looked at
  with ``stat`` first, so a device is not even opened (opening some has effects), and checked again
  on the descriptor that is then read, so a path swapped in between gains nothing.
- every read is bounded (``*_BYTES`` below): a file larger than what its kind ever is, or one that
  grows while read, is refused with its size, not read until memory runs out.
- ``loads_json`` bounds nesting (``JSON_DEPTH``): ``json.loads`` recurses once per level, so
  ``[[[[...`` 100,000 deep is a ``RecursionError`` (a traceback) without it.
- ``lines`` reads text one line at a time, each at most ``LINE_BYTES``.

Written by hand with the standard library: ``pathlib`` and ``open`` have no notion of "regular
files only, without blocking", and no JSON parser in relufy's dependencies bounds depth. Every
refusal is a ``RelufyError`` naming the file: one line, exit status 2.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from typing import IO, Any

from ..errors import RelufyError

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# Bounds, by kind of file: far above what such a file is in practice, far below what hurts a machine.
CONFIG_BYTES = 16 * MiB  # config.json, generation_config.json, a model card (configs are a few KB)
INDEX_BYTES = 64 * MiB  # model.safetensors.index.json (DeepSeek-V3's, 91k tensors, is 9 MB)
REPORT_BYTES = 64 * MiB  # a `relufy eval --json` report (a few KB; per-expert figures of a large MoE: a few MB)
TOKENIZER_BYTES = 256 * MiB  # tokenizer.json and its kin (Gemma 3's tokenizer.json is 33 MB)
HEADER_BYTES = 100 * MiB  # a safetensors header (the limit of safetensors itself)
STATS_BYTES = 8 * GiB  # a stats file read whole (DeepSeek-V3's per-expert counts are about 250 MB)
LINE_BYTES = 64 * MiB  # one line of a text or .jsonl data file, one record
JSON_DEPTH = 64  # nesting of any JSON relufy reads (a config nests 3 or 4 levels deep)


class JSONError(RelufyError):
    """Text that is not JSON (callers may word it their own way); deep nesting is a plain RelufyError."""


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``64 MiB``, ``20.8 GiB``, ``512 bytes``."""
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} bytes"


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, for a message."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _not_regular(path, mode: int, what: str) -> RelufyError:
    label = f"{what} {path}" if what else str(path)
    return RelufyError(f"{label} is {file_kind(mode)}, not a regular file; relufy reads only regular files")


def _cannot_read(path, e: OSError, what: str) -> RelufyError:
    label = f"{what} {path}" if what else str(path)
    return RelufyError(f"{label}: cannot read ({e.strerror or e})")


def check_regular(path: str | os.PathLike, what: str = "") -> int:
    """Refuse ``path`` unless it is a regular file (links followed); returns its size. For files a
    library then opens itself (Parquet, datasets, memory-mapped weights)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise _cannot_read(path, e, what) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode, what)
    return st.st_size


def open_regular(path: str | os.PathLike, what: str = "") -> IO[bytes]:
    """``path`` open for binary reading, if it is a regular file (links followed): a pipe, socket,
    device or folder is refused without blocking. ``what`` names it in messages (``--stats``)."""
    check_regular(path, what)  # a device is refused before it is opened
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise _cannot_read(path, e, what) from None
    try:
        mode = os.fstat(fd).st_mode  # the file actually opened, whatever the path names now
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _too_large(path, size: int | None, limit: int, kind: str, what: str) -> RelufyError:
    label = f"{what} {path}" if what else str(path)
    has = f"{size_text(size)}" if size is not None else "grew while read, past"
    return RelufyError(f"{label}: {has} is more than a {kind} ever takes ({size_text(limit)} at most); not read")


def read_bytes(path: str | os.PathLike, limit: int, kind: str = "file", what: str = "") -> bytes:
    """The bytes of the regular file ``path``, refused when over ``limit`` (``kind`` says what such a
    file is, for the message)."""
    with open_regular(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise _too_large(path, size, limit, kind, what)
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise _cannot_read(path, e, what) from None
    if len(data) > limit:
        raise _too_large(path, None, limit, kind, what)
    return data


def read_text(path: str | os.PathLike, limit: int, kind: str = "file", what: str = "") -> str:
    """``read_bytes`` decoded as UTF-8."""
    try:
        return read_bytes(path, limit, kind, what).decode("utf-8")
    except UnicodeDecodeError:
        raise RelufyError(f"{path}: not UTF-8 text") from None


def read_json(path: str | os.PathLike, limit: int, kind: str = "JSON file", what: str = "") -> Any:
    """The JSON value of the regular file ``path`` (at most ``limit`` bytes, ``JSON_DEPTH`` deep)."""
    return loads_json(read_bytes(path, limit, kind, what), str(path))


def loads_json(text: str | bytes, where: str, depth: int = JSON_DEPTH) -> Any:
    """``json.loads`` with nesting bounded to ``depth``: deeper is refused, never a RecursionError.
    Text that is not JSON raises ``JSONError`` (``{where}: not valid JSON (...)``)."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise RelufyError(f"{where}: JSON nested deeper than {depth} levels; not read") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONError(f"{where}: not valid JSON ({e})") from None
    if _opening_brackets(text) > depth and _depth(value, depth) > depth:
        raise RelufyError(f"{where}: JSON nested deeper than {depth} levels; not read")
    return value


def _opening_brackets(text: str | bytes) -> int:
    """An upper bound of the nesting (strings' brackets counted too): most text needs no walk."""
    if isinstance(text, bytes):
        return text.count(b"[") + text.count(b"{")
    return text.count("[") + text.count("{")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, walked without recursion; stops past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            break
        stack.extend((child, level + 1) for child in children)
    return deepest


def lines(path: str | os.PathLike, limit: int | None = None, what: str = "") -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of the UTF-8 text file ``path``, one line in memory at a time, line
    endings kept (so ``"".join`` of the lines is the file's text); a line over ``limit`` bytes
    (default ``LINE_BYTES``; a file of one endless line) is refused."""
    limit = LINE_BYTES if limit is None else limit
    with open_regular(path, what) as f:
        number = 0
        while True:
            try:
                raw = f.readline(limit + 1)
            except OSError as e:
                raise _cannot_read(path, e, what) from None
            if not raw:
                return
            number += 1
            if len(raw) > limit:
                raise RelufyError(
                    f"{path}:{number}: a line longer than {size_text(limit)}; relufy reads text a line at a time "
                    f"(a .jsonl record or a paragraph per line)"
                )
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise RelufyError(f"{path}:{number}: not UTF-8 text") from None
            yield number, line


def read_lines_text(path: str | os.PathLike, limit: int | None = None, what: str = "") -> str:
    """The whole text of ``path`` read with ``lines`` (so with its per-line bound)."""
    return "".join(line for _, line in lines(path, limit, what))


__all__ = [
    "CONFIG_BYTES",
    "HEADER_BYTES",
    "INDEX_BYTES",
    "JSON_DEPTH",
    "LINE_BYTES",
    "REPORT_BYTES",
    "STATS_BYTES",
    "TOKENIZER_BYTES",
    "JSONError",
    "check_regular",
    "file_kind",
    "lines",
    "loads_json",
    "open_regular",
    "read_bytes",
    "read_json",
    "read_lines_text",
    "read_text",
    "size_text",
]
