"""Evaluation text: where it comes from, how it is joined, tokenized and cut into windows.

``--data SPEC`` is one of

- a local ``.txt`` (or any non-JSON, non-Parquet) file: its bytes decoded as UTF-8, as one text;
- a local ``.jsonl`` file: the ``text`` field of every line;
- a local ``.parquet`` file: its ``text`` column;
- a hub dataset ``NAME[:CONFIG][:SPLIT]`` (split defaults to ``test``), its ``text`` column,
  loaded with ``datasets`` (needs network), e.g. ``wikitext:wikitext-2-raw-v1:test``;
- ``builtin:pydoc``: the English help topics of Python's own ``pydoc_data`` (about 0.5 MB, on
  every machine; sorted by topic name), the default text of the demo and the tests.

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

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import RelufyError

JOIN = "\n\n"


BUILTIN = "builtin:pydoc"


def builtin_texts() -> list[str]:
    import pydoc_data.topics

    return [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]


def load_texts(spec: str) -> list[str]:
    if spec == BUILTIN:
        return builtin_texts()
    try:
        return _load_texts(spec)
    except OSError as e:  # unreadable file, I/O error: name the file
        raise RelufyError(f"{spec}: cannot read ({e.strerror or e})") from None


def _load_texts(spec: str) -> list[str]:
    path = Path(spec).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _jsonl(path)
        if suffix == ".parquet":
            return _parquet(path)
        try:
            return [path.read_text(encoding="utf-8")]
        except UnicodeDecodeError:
            raise RelufyError(f"{path}: not UTF-8 text") from None
    if path.exists():
        raise RelufyError(f"{spec}: not a file")
    if ":" in spec and not spec.startswith((".", "/", "~")):
        return _hub(spec)
    raise RelufyError(f"data file {spec} not found")


def _jsonl(path: Path) -> list[str]:
    texts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise RelufyError(f"{path}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise RelufyError(f"{path}:{n}: not JSON") from None
        if not isinstance(record, dict) or "text" not in record:
            raise RelufyError(f"{path}:{n}: no 'text' field")
        texts.append(record_text(record["text"], f"{path}:{n}"))
    return [t for t in texts if t]


def record_text(value, where: str) -> str | None:
    """A record's text: a string, or null for an empty record; anything else is refused."""
    if value is None or isinstance(value, str):
        return value
    raise RelufyError(f"{where}: 'text' is a {type(value).__name__}, not a string")


def _parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=None)
    except (pa.ArrowException, OSError) as e:
        raise RelufyError(
            f"{path}: not a readable Parquet file ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from None
    if "text" not in table.column_names:
        raise RelufyError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
    column = table.column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type) or pa.types.is_null(column.type)):
        raise RelufyError(f"{path}: the 'text' column holds {column.type}, not strings")
    return [t for t in column.to_pylist() if t]


def _hub(spec: str) -> list[str]:
    parts = spec.split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: all user-facing
        raise RelufyError(
            f"{spec}: cannot load hub dataset ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from None
    if "text" not in ds.column_names:
        raise RelufyError(f"{spec}: no 'text' column")
    return [t for t in (record_text(v, spec) for v in ds["text"]) if t]


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
