"""Training data: sources tokenized and packed into fixed-length sequences, drawn as a seeded,
weighted mixture whose position is part of the training state (exact resume).

A source is read into memory (local files by default) or streamed (``datasets`` streaming; the
default for datasets read by name or folder: hub ids, dataset folders; see ``streams``).

In memory: each source's records (``relufy.text``: a local file's, or a dataset's
``text_column`` loaded with ``datasets.load_dataset``) are tokenized without special tokens with
``datasets.map`` (batched, ``data.num_proc`` processes), joined with the EOS token between
records, and cut into ``seq_len`` sequences; the last ``heldout_fraction`` of each source's
sequences is held out for evaluation. Draw ``i`` picks a source with probability proportional to
its weight (from a generator seeded with ``(seed, i)``); the ``k``-th draw from a source takes
sequence ``perm_e[k mod n]`` of a permutation seeded with ``(seed, source, e = k div n)``. With
``data.chat`` (SFT) each conversation of a ``.jsonl`` file is one sequence rendered with the
tokenizer's chat template, loss on assistant tokens only.

Streamed: records are tokenized and packed in stream order as they are drawn. The first
``heldout_sequences`` packed sequences of the whole stream are held out (every process reads
them, so the held-out set is the same on all); the records they are made of are left out of
training on every pass (recognised by their text: a record repeating one is left out too).
Under several processes each one reads only its share of the stream
(``datasets.distributed.split_dataset_by_node``: whole shards when their number divides among
the processes, else every ``world``-th record).

Under several processes every process follows the same global sequence of draws: a micro-batch
(``Mixture.local_batch``) is a process's rows of the global draw of ``micro_batch_size x world``
sequences. An in-memory source gives those rows exactly (so a run's batches, and its loss curve,
do not depend on the process count); a node-split stream gives each process its own next
sequences for its rows. The state is ``i``, the per-source draw counts and each stream's position
(the dataset's own resumable state plus the tokens not yet packed), all JSON: resuming costs
nothing and gives the same sequences as an uninterrupted run. With node-split streams the state
is per process (``Mixture.per_rank``): ``checkpoint_state`` gathers every process's into
``{"ranks": [...]}``, which ``load_state_dict`` takes back (each process its own entry) under the
same number of processes.

Every batch and the held-out set are a ``Batch``: ``(ids, labels)``, for plain text and chat
alike (for plain text the labels are the ids themselves), so no consumer asks which kind it has.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import RelufyError
from ..text import (
    builtin_texts,
    check_file_options,
    check_string_column,
    datasets_quiet,
    first_line,
    load_texts,
    open_dataset,
    record_text,
    source_kind,
)


class Batch(NamedTuple):
    """``(ids, labels)``, both ``[n, seq_len]``: labels as a causal LM's loss takes them (the
    token itself, shifted inside the model; -100 where not scored). For plain text ``labels``
    is ``ids``, the same tensor; for chat data it holds the assistant tokens only."""

    ids: torch.Tensor
    labels: torch.Tensor

    def rows(self, start: int, stop: int) -> Batch:
        ids = self.ids[start:stop]
        return Batch(ids, ids if self.labels is self.ids else self.labels[start:stop])

    def to(self, device) -> Batch:
        ids = self.ids.to(device)
        return Batch(ids, ids if self.labels is self.ids else self.labels.to(device))

    @staticmethod
    def text(ids: torch.Tensor) -> Batch:
        """Plain text: every token is a label."""
        return Batch(ids, ids)

    @staticmethod
    def cat(parts: list[Batch], seq_len: int) -> Batch:
        """``parts`` one after the other (labels stay the ids when they are in every part)."""
        if not parts:
            return Batch.text(torch.empty(0, seq_len, dtype=torch.long))
        ids = torch.cat([p.ids for p in parts])
        if all(p.labels is p.ids for p in parts):
            return Batch.text(ids)
        return Batch(ids, torch.cat([p.labels for p in parts]))


def load_conversations(spec: str) -> list[list[dict]]:
    """``messages`` lists from a .jsonl file (one conversation per line)."""
    import json
    from pathlib import Path

    path = Path(spec)
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        raise RelufyError(f"{spec}: chat data must be a .jsonl file of {{'messages': [...]}} lines")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RelufyError(f"{path}:{n}: expected a JSON object with 'messages'") from None
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise RelufyError(f"{path}:{n}: 'messages' must be a list of {{'role': str, 'content': str}} objects")
        out.append(messages)
    return out


def chat_example(messages: list[dict], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, labels)``, each ``[seq_len]``: labels on assistant tokens only (-100 elsewhere),
    right-padded. Assistant spans are found by rendering the conversation up to each assistant
    turn with and without it, so any chat template works whose rendering grows by appending."""
    if not tokenizer.chat_template:
        raise RelufyError("data.chat needs a tokenizer with a chat template")

    def render(msgs, prompt):
        return list(
            tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=prompt, return_dict=True)["input_ids"]
        )

    ids = render(messages, False)
    labels = [-100] * len(ids)
    for i, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt, turn = render(messages[:i], True), render(messages[: i + 1], False)  # up to the answer, through it
        if turn[: len(prompt)] != prompt or ids[: len(turn)] != turn:
            raise RelufyError("the chat template does not render conversations by appending turns")
        labels[len(prompt) : len(turn)] = ids[len(prompt) : len(turn)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids, labels = ids[:seq_len], labels[:seq_len]
    fill = seq_len - len(ids)
    return torch.tensor(ids + [pad] * fill, dtype=torch.long), torch.tensor(labels + [-100] * fill, dtype=torch.long)


def streams(src, chat: bool = False) -> bool:
    """Whether source ``src`` (a ``SourceSpec``) is streamed: its ``streaming``, or when that is
    null, yes for a dataset read by name or folder (``relufy.text.source_kind``) and no for a local
    file or ``builtin:pydoc`` (and no for chat data, which is read from .jsonl files)."""
    if src.streaming is not None:
        return src.streaming
    return not chat and source_kind(src.data) == "dataset"


def _dataset_options(src) -> dict:
    return {
        "text_column": src.text_column,
        "split": src.split,
        "data_dir": src.data_dir,
        "data_files": src.data_files,
        "revision": src.revision,
    }


def _tokenize_batch(batch: dict, tokenizer, column: str, eos: int | None) -> dict:
    texts = [t for t in batch[column] if t]  # nulls and empty strings are empty records
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    return {"ids": [list(x) + [eos] for x in ids] if eos is not None else [list(x) for x in ids]}


def pack_dataset(ds, column: str, tokenizer, seq_len: int, num_proc: int = 1, progress: bool = False) -> torch.Tensor:
    """``[n, seq_len]``: the records of ``column`` of the ``datasets.Dataset`` ``ds`` (strings or
    nulls), tokenized without special tokens by ``ds.map`` (batched, ``num_proc`` processes), each
    followed by the EOS token, concatenated and cut into whole sequences."""
    import numpy as np
    import pyarrow.compute as pc

    if len(ds) == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    fn = functools.partial(_tokenize_batch, tokenizer=tokenizer, column=column, eos=tokenizer.eos_token_id)
    ds = ds.select_columns([column])  # the other columns are neither read nor written
    with datasets_quiet(progress):
        tokens = ds.map(fn, batched=True, remove_columns=[column], num_proc=num_proc if num_proc > 1 else None, desc="tokenizing")
    if len(tokens) == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    flat = pc.list_flatten(tokens.with_format("arrow")[:]["ids"]).to_numpy()
    n = len(flat) // seq_len
    return torch.from_numpy(np.array(flat[: n * seq_len], dtype=np.int64)).view(n, seq_len)  # a writable copy


def pack(texts: list[str], tokenizer, seq_len: int, num_proc: int = 1, progress: bool = False) -> torch.Tensor:
    """``pack_dataset`` over a list of texts."""
    import datasets

    return pack_dataset(datasets.Dataset.from_dict({"text": list(texts)}), "text", tokenizer, seq_len, num_proc, progress)


def pack_source(src, tokenizer, seq_len: int, num_proc: int = 1, progress: bool = False) -> torch.Tensor:
    """An in-memory source (a ``SourceSpec``) packed: a dataset loaded whole and tokenized where
    it is (``datasets.map``), a local file read by ``relufy.text.load_texts`` first."""
    if source_kind(src.data) == "dataset":
        ds = open_dataset(src.data, **_dataset_options(src), streaming=False, progress=progress)
        check_string_column(ds, src.data, src.text_column)
        return pack_dataset(ds, src.text_column, tokenizer, seq_len, num_proc, progress)
    return pack(load_texts(src.data, **_dataset_options(src)), tokenizer, seq_len, num_proc, progress)


def open_stream(spec: str, text_column: str = "text", progress: bool = False, **options):
    """A ``datasets`` IterableDataset over ``spec`` (``relufy.text.open_dataset``; ``options``:
    split, data_dir, data_files, revision)."""
    return open_dataset(spec, text_column=text_column, streaming=True, progress=progress, **options)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class StreamSource:
    """Packed sequences from a streaming dataset, in stream order. Its state (the dataset's own
    resumable position plus the tokens not yet packed) makes resuming exact without re-reading.
    Records whose text is in ``exclude`` (digests: the held-out head's records) are passed over;
    with ``track`` the digests of the records read are collected in ``read``."""

    def __init__(
        self, dataset, spec: str, tokenizer, seq_len: int, column: str = "text", *, exclude=frozenset(), track=False, share=""
    ):
        self.dataset, self.spec, self.column = dataset, spec, column
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.iterator = None
        self.buffer: list[int] = []
        self.epoch = 0
        self.exclude = frozenset(exclude)
        self.read: set[bytes] | None = set() if track else None
        self.share = share  # "process r of w's share of " when node-split
        self.seen_text = False

    def _text(self) -> str:
        while True:
            if self.iterator is None:
                self.dataset.set_epoch(self.epoch)
                self.iterator = iter(self.dataset)
            try:
                record = next(self.iterator)
            except RelufyError:
                raise
            except StopIteration:
                if not self.seen_text:
                    held = " outside the held-out sequences" if self.exclude else ""
                    raise RelufyError(f"{self.spec}: {self.share}the stream holds no text{held}") from None
                self.iterator, self.epoch, self.buffer = None, self.epoch + 1, []
                continue
            except Exception as e:  # noqa: BLE001 - a damaged file, a lost connection: one line
                raise RelufyError(f"{self.spec}: reading the stream failed ({first_line(e)})") from None
            if self.column not in record:
                raise RelufyError(f"{self.spec}: records have no {self.column!r} field (fields: {', '.join(record)})")
            text = record_text(record[self.column], self.spec, self.column)
            if not text:
                continue
            if self.exclude or self.read is not None:
                digest = _digest(text)
                if digest in self.exclude:
                    continue
                if self.read is not None:
                    self.read.add(digest)
            self.seen_text = True
            return text

    def next(self) -> torch.Tensor:
        while len(self.buffer) < self.seq_len:
            text = self._text()  # first: a new pass starts with an empty buffer
            self.buffer.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            if self.tokenizer.eos_token_id is not None:
                self.buffer.append(self.tokenizer.eos_token_id)
        seq, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
        return torch.tensor(seq, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": list(self.buffer), "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer, self.epoch, self.iterator = [int(t) for t in state["buffer"]], int(state["epoch"]), None
        self.seen_text = True  # it was read before


def _stack(rows: list[tuple[torch.Tensor, torch.Tensor]], seq_len: int | None = None) -> Batch:
    if not rows:
        return Batch.cat([], seq_len or 0)
    ids = torch.stack([i for i, _ in rows])
    if all(labels is i for i, labels in rows):
        return Batch.text(ids)
    return Batch(ids, torch.stack([labels for _, labels in rows]))


class Mixture:
    """Seeded weighted mixture over packed sources (each a ``Batch`` of sequences or a
    ``StreamSource``) as seen by process ``rank`` of ``world``; ``state_dict`` makes its position
    resumable. ``per_rank``: some source is a node-split stream, so the state is per process."""

    def __init__(self, sources: list, weights: list[float], seed: int, rank: int = 0, world: int = 1):
        if any(isinstance(s, Batch) and len(s.ids) == 0 for s in sources):
            raise RelufyError("a data source is shorter than one training sequence")
        self.sources, self.seed, self.rank, self.world = sources, seed, rank, world
        total = sum(weights)
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)
        self.position = 0
        self.draws = [0] * len(sources)
        self.per_rank = world > 1 and any(isinstance(s, StreamSource) for s in sources)
        self._perms: dict[int, tuple[int, torch.Tensor]] = {}  # source -> (epoch, permutation)

    def _perm(self, source: int, epoch: int) -> torch.Tensor:
        cached = self._perms.get(source)
        if cached is None or cached[0] != epoch:
            g = torch.Generator().manual_seed(hash((self.seed, source, epoch)) & 0x7FFFFFFF)
            cached = self._perms[source] = (epoch, torch.randperm(len(self.sources[source].ids), generator=g))
        return cached[1]

    def _draw(self, take: bool = True) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Draw ``position``: its sequence's ``(ids, labels)`` when ``take``, else only counted (a
        row of another process: a node-split stream is not read for it)."""
        if len(self.sources) == 1:
            s = 0
        else:
            g = torch.Generator().manual_seed(hash((self.seed, self.position)) & 0x7FFFFFFF)
            s = int(torch.multinomial(self.weights, 1, generator=g))
        k, source = self.draws[s], self.sources[s]
        out = None
        if take and isinstance(source, StreamSource):
            ids = source.next()
            out = ids, ids
        elif take:
            n = len(source.ids)
            row = self._perm(s, k // n)[k % n]
            ids = source.ids[row]
            out = ids, ids if source.labels is source.ids else source.labels[row]
        self.draws[s] += 1
        self.position += 1
        return out

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's ``(ids, labels)``; for plain text the labels are the ids."""
        return self._draw()

    def batch(self, size: int) -> Batch:
        """The next ``size`` draws, all on this process, ``[size, seq_len]`` each of ids and labels:
        the same on every process unless ``per_rank`` (then a node-split stream gives this
        process's own sequences)."""
        return _stack([self._draw() for _ in range(size)])

    def local_batch(self, size: int) -> Batch:
        """This process's ``size`` rows of the next global batch of ``size x world`` draws (rows
        ``rank x size`` up to ``(rank + 1) x size``): for in-memory sources exactly those rows of
        ``batch(size x world)``, without building the others; a node-split stream gives this
        process's next sequences for its rows. Every process calls it once per micro-batch."""
        first = self.rank * size
        rows = [self._draw(first <= j < first + size) for j in range(size * self.world)]
        return _stack([r for r in rows if r is not None])

    def state_dict(self) -> dict:
        """This process's position, JSON-ready (with ``per_rank``: its rank and world too)."""
        streams = {i: s.state_dict() for i, s in enumerate(self.sources) if isinstance(s, StreamSource)}
        state = {"position": self.position, "draws": list(self.draws), "streams": streams}
        if self.per_rank:
            state.update(rank=self.rank, world=self.world)
        return state

    def checkpoint_state(self, gather_object=None) -> dict:
        """What a checkpoint keeps: ``state_dict()``, or with ``per_rank`` every process's as
        ``{"ranks": [state of rank 0, ...]}``, gathered with ``gather_object`` (Accelerate's
        ``accelerate.utils.gather_object``: a list of this process's objects in, every process's
        out). With ``per_rank`` every process must call it at once (a collective)."""
        if not self.per_rank:
            return self.state_dict()
        if gather_object is None:
            raise ValueError("checkpoint_state needs gather_object when the state is per process")
        return {"ranks": list(gather_object([self.state_dict()]))}

    def load_state_dict(self, state: dict) -> None:
        """A ``state_dict()``, or a ``checkpoint_state()`` (each process takes its own entry).
        Stream positions load only into the same split they were saved from (the same number of
        processes); anything else is refused on one line."""
        if "ranks" in state:
            ranks = state["ranks"]
            if not isinstance(ranks, list) or len(ranks) != self.world:
                saved = len(ranks) if isinstance(ranks, list) else "?"
                raise RelufyError(
                    f"the data position was saved by {saved} processes each reading its share of the streaming "
                    f"sources; resume with {saved} processes (this run has {self.world})"
                )
            state = ranks[self.rank]
        draws, position = state.get("draws"), state.get("position")
        counts = isinstance(draws, list) and all(_count(d) for d in draws) and _count(position)
        if not counts or position != sum(draws):
            raise RelufyError("the data position is damaged (draws and position must be counts that add up)")
        if len(draws) != len(self.sources):
            raise RelufyError(f"the data position is for {len(draws)} sources, the recipe has {len(self.sources)}")
        streams = {int(i): s for i, s in (state.get("streams") or {}).items()}
        if streams:
            saved = int(state.get("world", 1))
            if (int(state.get("rank", 0)), saved) != ((self.rank, self.world) if self.per_rank else (0, 1)):
                raise RelufyError(
                    f"the streaming sources' position was saved by {saved} process{'es' if saved > 1 else ''}, this run has "
                    f"{self.world}: streaming sources resume only with the number of processes that saved them"
                )
        if set(streams) != {i for i, s in enumerate(self.sources) if isinstance(s, StreamSource)}:
            raise RelufyError("the data position does not match the recipe's streaming sources")
        self.position, self.draws = int(state["position"]), draws
        for i, stream_state in streams.items():
            self.sources[i].load_state_dict(stream_state)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stream(src, data_spec, tokenizer, rank: int, world: int, progress: bool) -> tuple[StreamSource, torch.Tensor | None]:
    """A streamed source: ``(this process's training stream, held-out sequences or None)``."""
    seq_len, n_held = data_spec.seq_len, data_spec.heldout_sequences
    full = open_stream(src.data, progress=progress, **_dataset_options(src))
    held = None
    exclude: frozenset = frozenset()
    if n_held:
        head = StreamSource(full, src.data, tokenizer, seq_len, src.text_column, track=True)
        held = torch.stack([head.next() for _ in range(n_held)])
        exclude = frozenset(head.read)
    share = ""
    if world > 1:
        from datasets.distributed import split_dataset_by_node

        full, share = split_dataset_by_node(full, rank=rank, world_size=world), f"process {rank} of {world}'s share of "
    return StreamSource(full, src.data, tokenizer, seq_len, src.text_column, exclude=exclude, share=share), held


def build(data_spec, tokenizer, seed: int, rank: int = 0, world: int = 1, progress: bool = False) -> tuple[Mixture, Batch]:
    """``(training mixture of process rank of world, held-out sequences)``; the held-out set is a
    ``Batch`` too, the same on every process. ``progress``: show ``datasets``' progress bars."""
    train, heldout = [], []
    for src in data_spec.sources:
        if streams(src, data_spec.chat):
            if data_spec.chat:
                raise RelufyError(f"{src.data}: streaming chat data is not supported; drop streaming")
            stream, held = _stream(src, data_spec, tokenizer, rank, world, progress)
            if held is not None:
                heldout.append(Batch.text(held))
            train.append(stream)
            continue
        if data_spec.chat:
            examples = [chat_example(m, tokenizer, data_spec.seq_len) for m in load_conversations(src.data)]
            examples = [e for e in examples if (e[1] != -100).any()]  # truncation can cut every answer
            if not examples:
                raise RelufyError(f"{src.data}: no conversation keeps an assistant token within seq_len {data_spec.seq_len}")
            seqs = Batch(torch.stack([ids for ids, _ in examples]), torch.stack([labels for _, labels in examples]))
        else:
            seqs = Batch.text(pack_source(src, tokenizer, data_spec.seq_len, data_spec.num_proc, progress))
        n = len(seqs.ids)
        n_held = int(n * data_spec.heldout_fraction)
        if n - n_held < 1:
            raise RelufyError(f"{src.data}: too little text for one {data_spec.seq_len}-token training sequence")
        train.append(seqs.rows(0, n - n_held))
        heldout.append(seqs.rows(n - n_held, n))
    mixture = Mixture(train, [s.weight for s in data_spec.sources], seed, rank=rank, world=world)
    return mixture, Batch.cat(heldout, data_spec.seq_len)


def build_eval(data_spec, tokenizer, progress: bool = False) -> dict[str, Batch]:
    """``{label: Batch}``: each of ``data_spec.eval_sources`` packed as the training sources are
    (streamed ones read from their start), its first ``max_tokens // seq_len`` sequences (at
    least one; refused when the text holds less than one). The same on every process."""
    seq_len, out = data_spec.seq_len, {}
    for src in data_spec.eval_sources:
        n = max(1, src.max_tokens // seq_len)
        if streams(src):
            dataset = open_stream(src.data, progress=progress, **_dataset_options(src))
            stream = StreamSource(dataset, src.data, tokenizer, seq_len, src.text_column)
            seqs = torch.stack([stream.next() for _ in range(n)])
        else:
            seqs = pack_source(src, tokenizer, seq_len, data_spec.num_proc, progress)[:n]
        if len(seqs) < 1:
            raise RelufyError(f"data.eval_sources: {src.data}: too little text for one {seq_len}-token sequence")
        out[src.label] = Batch.text(seqs)
    return out


PREVIEW = 60


def _preview(value) -> str:
    if value is None or value == "":
        return "(empty record)"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    cut = json.dumps(text[:PREVIEW], ensure_ascii=False)
    return cut + ("..." if len(text) > PREVIEW else "")


def _first_record(src, column: str, chat: bool, streamed: bool):
    """``(what is read, the first record's value of column)``; a missing column is refused."""
    kind = source_kind(src.data)
    if kind == "builtin":
        options = _dataset_options(src)
        check_file_options(src.data, options.pop("text_column"), options)
        return f"column {column!r}", builtin_texts()[0]
    if kind == "dataset":
        ds = open_stream(src.data, **_dataset_options(src))
        try:
            with datasets_quiet():
                record = next(iter(ds), None)
        except Exception as e:  # noqa: BLE001 - offline, damaged file: user-facing
            raise RelufyError(f"{src.data}: cannot read the first record ({first_line(e)})") from None
        if record is None:
            return f"column {column!r}", None
        if column not in record:
            raise RelufyError(f"{src.data}: no {column!r} column (columns: {', '.join(record)})")
        return f"column {column!r}", record_text(record[column], src.data, column)
    path = Path(src.data).expanduser()
    suffix = path.suffix.lower()
    if chat and suffix not in (".jsonl", ".json"):
        raise RelufyError(f"{src.data}: chat data must be a .jsonl file of {{'messages': [...]}} lines")
    options = _dataset_options(src)
    check_file_options(src.data, options.pop("text_column") if not chat else "text", options)
    try:
        if suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8") as f:
                n, line = next(((n, line) for n, line in enumerate(f, 1) if line.strip()), (0, ""))
            if not n:
                return f"field {column!r}", None
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise RelufyError(f"{path}:{n}: not JSON") from None
            if not isinstance(record, dict) or column not in record:
                fields = ", ".join(record) if isinstance(record, dict) else f"a JSON {type(record).__name__}"
                raise RelufyError(f"{path}:{n}: no {column!r} field (fields: {fields})")
            value = record[column]
            if chat:
                if not isinstance(value, list) or not value or not isinstance(value[0], dict):
                    raise RelufyError(f"{path}:{n}: 'messages' must be a list of {{'role': str, 'content': str}} objects")
                return f"field {column!r}", value[0].get("content")
            return f"field {column!r}", record_text(value, f"{path}:{n}", column)
        if suffix == ".parquet":
            return f"column {column!r}", _parquet_first(path, column)
        with open(path, encoding="utf-8") as f:
            head = f.read(4 * PREVIEW if not streamed else 1 << 16)
        return ("each line" if streamed else "the whole file"), head.splitlines()[0] if streamed and head else head
    except UnicodeDecodeError:
        raise RelufyError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise RelufyError(f"{src.data}: cannot read ({e.strerror or e})") from None


def _parquet_first(path: Path, column: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if column not in names:
            raise RelufyError(f"{path}: no {column!r} column (columns: {', '.join(names)})")
        batch = next(pf.iter_batches(batch_size=1, columns=[column]), None)
    except (pa.ArrowException, OSError) as e:
        raise RelufyError(f"{path}: not a readable Parquet file ({first_line(e)})") from None
    if batch is None or batch.num_rows == 0:
        return None
    return record_text(batch.column(0)[0].as_py(), str(path), column)


def probe_sources(data_spec) -> list[str]:
    """One line per source of ``data_spec`` (a ``DataSpec``), for ``relufy train --dry-run``: how
    it is read (streamed or in memory), which column (field) and a preview of its first record's
    text. A source whose column is missing is refused on one line that lists the columns it has."""
    lines = []
    for i, src in enumerate(data_spec.sources):
        column = "messages" if data_spec.chat else src.text_column
        streamed = streams(src, data_spec.chat)
        what, value = _first_record(src, column, data_spec.chat, streamed)
        mode = "streamed" if streamed else "in memory"
        lines.append(f"data.sources.{i} {src.data} ({mode}): reads {what}: {_preview(value)}")
    for i, src in enumerate(data_spec.eval_sources):
        streamed = streams(src)
        what, value = _first_record(src, src.text_column, False, streamed)
        mode = "streamed" if streamed else "in memory"
        lines.append(f"data.eval_sources.{i} {src.data} ({mode}, scored as {src.label}): reads {what}: {_preview(value)}")
    return lines
