"""Evaluation and training text: where it comes from, how it is joined, tokenized and cut into windows.

``--data SPEC`` (and a training source's ``data``) is one of

- a local ``.txt`` (or any non-JSON, non-Parquet) file: its bytes decoded as UTF-8, as one text;
- a local ``.jsonl`` file: the ``text`` field (``text_column``) of every line;
- a local ``.parquet`` file: its ``text`` column (``text_column``);
- a dataset read with ``datasets.load_dataset``: a hub id ``NAME[:CONFIG][:SPLIT]`` (needs network;
  evaluation's split defaults to ``test``, training's to ``train``), e.g.
  ``wikitext:wikitext-2-raw-v1:test``; a local dataset folder (data files that ``load_dataset``
  reads as a repository); or a packaged builder (``json``, ``parquet``, ``csv``, ``text``) with
  ``data_files``. ``split``, ``data_dir``, ``data_files`` and ``revision`` go to ``load_dataset``
  (a split given both ways must agree); its ``text`` column (``text_column``) is read;
- ``builtin:pydoc``: the English help topics of Python's own ``pydoc_data`` (about 0.5 MB, on
  every machine; sorted by topic name), the default text of the demo and the tests.

A local file must be a regular file (a pipe or device is refused, never waited on or read
forever); text and ``.jsonl`` files are read a line at a time, each line at most
``relufy.io.read.LINE_BYTES``, and a ``.jsonl`` record nested deeper than
``relufy.io.read.JSON_DEPTH`` is refused (``relufy.io.read``).

Records are joined with ``"\\n\\n"`` (as in transformers' perplexity guide) and tokenized once
without special tokens. The token stream is cut to ``max_tokens`` and into windows of
``seq_len`` tokens; each window scores the ``stride`` tokens after the previous window's last
scored token (the first window scores all but its first token) and fills the rest of its
``seq_len`` with the tokens before them as context. So every token after the first is predicted
exactly once, with at least ``seq_len - stride`` tokens of context past the first window. The
default ``stride = seq_len - 1`` keeps one token of overlap (the plain non-overlapping cut would
leave the first token of each window unscored). With ``bos`` each window starts with the
tokenizer's BOS token (taking one place of ``seq_len``), which is never scored.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .errors import RelufyError
from .io.read import JSONError, check_regular, file_kind, lines, loads_json, open_regular, read_lines_text

JOIN = "\n\n"


BUILTIN = "builtin:pydoc"

# ``load_dataset``'s own builders, read by name (with data_files)
PACKAGED = ("json", "parquet", "csv", "text", "arrow")
# a hub id without ``:CONFIG``: ``owner/name`` whose name does not end like a data file
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet", ".csv", ".raw", ".md", ".gz", ".zst")


def builtin_texts() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def source_kind(spec: str) -> Literal["builtin", "file", "dataset"]:
    """``builtin`` (``builtin:pydoc``), ``file`` (a local file) or ``dataset`` (read with
    ``datasets.load_dataset``: a hub id, a local dataset folder, a packaged builder name)."""
    if spec == BUILTIN:
        return "builtin"
    path = Path(spec).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "dataset"
    if path.exists():
        raise RelufyError(f"{spec}: not a file ({file_kind(os.stat(path).st_mode)}); relufy reads only regular files")
    local = spec.startswith((".", "/", "~"))
    if not local and (":" in spec or spec in PACKAGED or (_HUB_ID.fullmatch(spec) and not spec.lower().endswith(_FILE_SUFFIXES))):
        return "dataset"
    raise RelufyError(f"data file {spec} not found")


def dataset_parts(spec: str, split: str | None = None, default_split: str = "train") -> tuple[str, str | None, str]:
    """``(name, config, split)`` of a dataset ``NAME[:CONFIG][:SPLIT]``: the split from ``split``
    or the spec (they must agree), else ``default_split``."""
    if Path(spec).expanduser().is_dir():  # a folder's name may hold a colon
        return spec, None, split or default_split
    parts = spec.split(":")
    if len(parts) > 3 or not parts[0]:
        raise RelufyError(f"{spec}: a dataset is NAME[:CONFIG][:SPLIT]")
    name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
    in_spec = parts[2] if len(parts) > 2 and parts[2] else None
    if split and in_spec and split != in_spec:
        raise RelufyError(f"{spec}: split {split!r} disagrees with the split {in_spec!r} in the spec; give it once")
    return name, config, split or in_spec or default_split


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def datasets_quiet(progress: bool = False):
    """``datasets``' progress bars off (unless ``progress``) for the duration, then as they were."""
    from datasets import utils as bars

    was_off = bars.are_progress_bars_disabled()
    if not progress:
        bars.disable_progress_bars()
    try:
        yield
    finally:
        if not was_off and not progress:
            bars.enable_progress_bars()


def check_file_options(spec: str, text_column: str, options: dict) -> None:
    """A local file or ``builtin:pydoc`` takes none of ``load_dataset``'s ``options`` (those not None
    are refused), and ``text_column`` only when it has columns (.jsonl, .parquet)."""
    given = [k for k, v in options.items() if v is not None]
    if given:
        raise RelufyError(f"{spec}: {', '.join(given)} apply to datasets read with datasets.load_dataset, not to a local file")
    if text_column != "text" and (spec == BUILTIN or Path(spec).suffix.lower() not in (".jsonl", ".json", ".parquet")):
        raise RelufyError(f"{spec}: one text, no columns: text_column applies to .jsonl, .parquet and datasets")


def open_dataset(
    spec: str,
    *,
    text_column: str = "text",
    split: str | None = None,
    data_dir: str | None = None,
    data_files: str | list[str] | None = None,
    revision: str | None = None,
    streaming: bool = False,
    default_split: str = "train",
    progress: bool = False,
):
    """``spec`` as a ``datasets.Dataset``, or with ``streaming`` an ``IterableDataset`` (a local file
    streams through the json, parquet or text builder: a .txt file's lines are its records;
    ``builtin:pydoc`` streams from memory). A known column list without ``text_column`` is refused."""
    from .extras import need

    datasets = need("datasets", "eval", f"reading {spec}")

    kind = source_kind(spec)
    options = {"split": split, "data_dir": data_dir, "data_files": data_files, "revision": revision}
    try:
        with datasets_quiet(progress):
            if kind != "dataset":
                check_file_options(spec, text_column, options)
                if kind == "builtin":
                    ds = datasets.Dataset.from_dict({"text": builtin_texts()})
                    return ds.to_iterable_dataset() if streaming else ds
                path = str(Path(spec).expanduser())
                check_regular(path)  # datasets would open a pipe and wait
                builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(Path(path).suffix.lower(), "text")
                ds = datasets.load_dataset(builder, data_files=path, split="train", streaming=streaming)
            else:
                name, config, split = dataset_parts(spec, split, default_split)
                ds = datasets.load_dataset(
                    name,
                    config,
                    split=split,
                    data_dir=data_dir,
                    data_files=data_files,
                    revision=revision,
                    streaming=streaming,
                )
    except RelufyError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split or config: all user-facing
        raise RelufyError(f"{spec}: cannot load dataset ({first_line(e)})") from None
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise RelufyError(f"{spec}: no {text_column!r} column (columns: {', '.join(columns)})")
    return ds


def check_string_column(ds, spec: str, text_column: str) -> None:
    """A loaded ``Dataset``'s ``text_column`` must hold strings (or only nulls)."""
    feature = (ds.features or {}).get(text_column)
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("string", "large_string", "null"):
        kind = dtype or type(feature).__name__
        raise RelufyError(f"{spec}: the {text_column!r} column holds {kind}, not strings")


def load_texts(
    spec: str,
    *,
    text_column: str = "text",
    split: str | None = None,
    data_dir: str | None = None,
    data_files: str | list[str] | None = None,
    revision: str | None = None,
    default_split: str = "test",
) -> list[str]:
    """The non-empty texts of ``spec`` (see the module's docstring), in order."""
    kind = source_kind(spec)
    if kind == "dataset":
        ds = open_dataset(
            spec,
            text_column=text_column,
            split=split,
            data_dir=data_dir,
            data_files=data_files,
            revision=revision,
            default_split=default_split,
        )
        check_string_column(ds, spec, text_column)
        return [t for t in (record_text(v, spec, text_column) for v in ds[text_column]) if t]
    check_file_options(spec, text_column, {"split": split, "data_dir": data_dir, "data_files": data_files, "revision": revision})
    if kind == "builtin":
        return builtin_texts()
    try:
        return _load_file(Path(spec).expanduser(), text_column)
    except OSError as e:  # unreadable file, I/O error: name the file
        raise RelufyError(f"{spec}: cannot read ({e.strerror or e})") from None


def _load_file(path: Path, text_column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return _jsonl(path, text_column)
    if suffix == ".parquet":
        return _parquet(path, text_column)
    # newlines as text mode reads them (\r\n and \r become \n): the text tokenized is the same
    return [read_lines_text(path).replace("\r\n", "\n").replace("\r", "\n")]


def _jsonl(path: Path, column: str = "text") -> list[str]:
    texts = []
    for n, line in lines(path):
        if not line.strip():
            continue
        try:
            record = loads_json(line, f"{path}:{n}")
        except JSONError:
            raise RelufyError(f"{path}:{n}: not JSON") from None
        if not isinstance(record, dict) or column not in record:
            fields = f" (fields: {', '.join(record)})" if isinstance(record, dict) else ""
            raise RelufyError(f"{path}:{n}: no {column!r} field{fields}")
        texts.append(record_text(record[column], f"{path}:{n}", column))
    return [t for t in texts if t]


def record_text(value, where: str, column: str = "text") -> str | None:
    """A record's text: a string, or null for an empty record; anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    raise RelufyError(f"{where}: {column!r} is a {type(value).__name__}, not a string")


def _parquet(path: Path, column: str = "text") -> list[str]:
    from .extras import need

    pa = need("pyarrow", "eval", f"reading {path}")
    pq = need("pyarrow.parquet", "eval", f"reading {path}")

    try:
        with open_regular(path) as f:  # a pipe is refused, never waited on
            table = pq.read_table(f, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise RelufyError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if column not in table.column_names:
        raise RelufyError(f"{path}: no {column!r} column (columns: {', '.join(table.column_names)})")
    values = table.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
        raise RelufyError(f"{path}: the {column!r} column holds {values.type}, not strings")
    return [t for t in values.to_pylist() if t]


def tokenize(texts: list[str], tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    text = JOIN.join(texts)
    if not text.strip():
        raise RelufyError("the data holds no text")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    ids = torch.tensor(ids[:max_tokens] if max_tokens else ids, dtype=torch.long)
    if ids.numel() < 2:
        raise RelufyError("the data holds fewer than 2 tokens")
    return ids


@dataclass(frozen=True)
class Window:
    input_ids: torch.Tensor  # [T]
    labels: torch.Tensor  # [T], -100 where not scored (shifted inside the model's loss)


def second_halves(ids: torch.Tensor, seq_len: int, bos_id: int | None = None) -> list[Window]:
    """Back-to-back windows of exactly ``seq_len`` tokens (a shorter tail is dropped), each scoring
    its second half: the logits at positions ``seq_len/2 .. seq_len-2`` predict the tokens after
    them, ``seq_len/2 - 1`` per window. This is how llama.cpp's and PowerInfer's ``perplexity``
    score a text, so their figures and relufy's compare on the same tokens. With ``bos_id`` the
    window's first token is replaced by BOS, as they do."""
    if seq_len < 4:
        raise RelufyError(f"seq-len {seq_len} is too small to score second halves (need at least 4)")
    n = len(ids) // seq_len
    if n == 0:
        raise RelufyError(f"the text holds {len(ids)} tokens, fewer than one window of {seq_len}")
    out = []
    for i in range(n):
        chunk = ids[i * seq_len : (i + 1) * seq_len].clone()
        if bos_id is not None:
            chunk[0] = bos_id
        labels = chunk.clone()
        labels[: seq_len // 2 + 1] = -100
        out.append(Window(chunk, labels))
    return out


def windows(ids: torch.Tensor, seq_len: int, stride: int | None = None, bos_id: int | None = None) -> list[Window]:
    """Cut ``ids`` into windows of at most ``seq_len`` tokens that each score ``stride`` new tokens."""
    body = seq_len - (bos_id is not None)  # room for text tokens
    if body < 2:
        raise RelufyError(f"seq-len {seq_len} is too small")
    stride = stride or body - 1
    if not 1 <= stride <= body - 1:
        raise RelufyError(f"stride must be in 1..{body - 1} (seq-len minus one context token), got {stride}")
    out, scored, n = [], 1, len(ids)  # token 0 has no context and is never scored
    while scored < n:
        end = min(body if not out else scored + stride, n)
        start = max(0, end - body)
        chunk = ids[start:end]
        labels = chunk.clone()
        labels[: scored - start] = -100
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
            labels = torch.cat([torch.tensor([-100]), labels])
        out.append(Window(chunk, labels))
        scored = end
    return out
