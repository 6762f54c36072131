"""Training data: sources tokenized and packed into fixed-length sequences, drawn as a seeded,
weighted mixture whose position is part of the training state (exact resume).

Each source's records (``relufy.text.load_texts``) are tokenized without special tokens, joined
with the EOS token between records, and cut into ``seq_len`` sequences; the last
``heldout_fraction`` of each source's sequences is held out for evaluation. Draw ``i`` picks a
source with probability proportional to its weight (from a generator seeded with ``(seed, i)``);
the ``k``-th draw from a source takes sequence ``perm_e[k mod n]`` of a permutation seeded with
``(seed, source, e = k div n)``. With ``data.chat`` (SFT) each conversation of a ``.jsonl`` file
is one sequence rendered with the tokenizer's chat template, loss on assistant tokens only. The
state is ``i`` and the per-source draw counts, so resuming costs nothing and gives the same
sequences as an uninterrupted run.

Every batch and the held-out set are a ``Batch``: ``(ids, labels)``, for plain text and chat
alike (for plain text the labels are the ids themselves), so no consumer asks which kind it has.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import RelufyError
from ..text import load_texts, record_text


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


def pack(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def open_stream(spec: str):
    """A ``datasets`` IterableDataset with a ``text`` column, from a local file or the hub."""
    from pathlib import Path

    import datasets

    path = Path(spec)
    try:
        if path.is_file():
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix.lower(), "text")
            return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        parts = spec.split(":")
        name, config = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None)
        return datasets.load_dataset(name, config, split=parts[2] if len(parts) > 2 else "train", streaming=True)
    except Exception as e:  # noqa: BLE001 - offline, unknown name: user-facing
        raise RelufyError(
            f"{spec}: cannot stream ({str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__})"
        ) from None


class StreamSource:
    """Packed sequences from a streaming dataset, in stream order. Its state (the dataset's own
    resumable position plus the tokens not yet packed) makes resuming exact without re-reading."""

    def __init__(self, spec: str, tokenizer, seq_len: int, skip_on_wrap: int = 0):
        self.spec, self.tokenizer, self.seq_len = spec, tokenizer, seq_len
        self.dataset = open_stream(spec)
        self.iterator = None
        self.buffer: list[int] = []
        self.epoch = 0
        self.skip_on_wrap = skip_on_wrap  # the held-out head of the stream is skipped on every pass
        self.to_skip = 0
        self.seen_text = False

    def _text(self) -> str:
        while True:
            if self.iterator is None:
                self.dataset.set_epoch(self.epoch)
                self.iterator = iter(self.dataset)
            try:
                record = next(self.iterator)
            except StopIteration:
                if not self.seen_text:
                    raise RelufyError(f"{self.spec}: the stream holds no text") from None
                self.iterator, self.epoch = None, self.epoch + 1
                self.buffer, self.to_skip = [], self.skip_on_wrap
                continue
            if "text" not in record:
                raise RelufyError(f"{self.spec}: records have no 'text' field (fields: {', '.join(record)})")
            text = record_text(record["text"], self.spec)
            if text:
                self.seen_text = True
            return text or ""

    def _pack(self) -> list[int]:
        while len(self.buffer) < self.seq_len:
            text = self._text()
            if text:
                self.buffer.extend(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
                if self.tokenizer.eos_token_id is not None:
                    self.buffer.append(self.tokenizer.eos_token_id)
        seq, self.buffer = self.buffer[: self.seq_len], self.buffer[self.seq_len :]
        return seq

    def next(self) -> torch.Tensor:
        seq = self._pack()
        while self.to_skip:  # a new pass began: drop the held-out head again
            self.to_skip -= 1
            seq = self._pack()
        return torch.tensor(seq, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"dataset": self.dataset.state_dict(), "buffer": list(self.buffer), "epoch": self.epoch, "to_skip": self.to_skip}

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.buffer, self.epoch, self.iterator = list(state["buffer"]), int(state["epoch"]), None
        self.to_skip = int(state.get("to_skip", 0))


class Mixture:
    """Seeded weighted mixture over packed sources (each a ``Batch`` of sequences or a
    ``StreamSource``); ``state_dict`` makes its position resumable."""

    def __init__(self, sources: list, weights: list[float], seed: int):
        if any(isinstance(s, Batch) and len(s.ids) == 0 for s in sources):
            raise RelufyError("a data source is shorter than one training sequence")
        self.sources, self.seed = sources, seed
        total = sum(weights)
        self.weights = torch.tensor([w / total for w in weights], dtype=torch.float64)
        self.position = 0
        self.draws = [0] * len(sources)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, source: int, epoch: int) -> torch.Tensor:
        key = (source, epoch)
        if key not in self._perms:
            g = torch.Generator().manual_seed(hash((self.seed, source, epoch)) & 0x7FFFFFFF)
            self._perms = {key: torch.randperm(len(self.sources[source].ids), generator=g)}
        return self._perms[key]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One sequence's ``(ids, labels)``; for plain text the labels are the ids."""
        if len(self.sources) == 1:
            s = 0
        else:
            g = torch.Generator().manual_seed(hash((self.seed, self.position)) & 0x7FFFFFFF)
            s = int(torch.multinomial(self.weights, 1, generator=g))
        k, source = self.draws[s], self.sources[s]
        if isinstance(source, StreamSource):
            ids = labels = source.next()
        else:
            n = len(source.ids)
            row = self._perm(s, k // n)[k % n]
            ids = source.ids[row]
            labels = ids if source.labels is source.ids else source.labels[row]
        self.draws[s] += 1
        self.position += 1
        return ids, labels

    def batch(self, size: int) -> Batch:
        """The next ``size`` sequences, ``[size, seq_len]`` each of ids and labels."""
        rows = [self.next() for _ in range(size)]
        ids = torch.stack([i for i, _ in rows])
        if all(labels is i for i, labels in rows):
            return Batch.text(ids)
        return Batch(ids, torch.stack([labels for _, labels in rows]))

    def state_dict(self) -> dict:
        streams = {i: s.state_dict() for i, s in enumerate(self.sources) if isinstance(s, StreamSource)}
        return {"position": self.position, "draws": list(self.draws), "streams": streams}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.draws = [int(d) for d in state["draws"]]
        for i, stream_state in (state.get("streams") or {}).items():
            self.sources[int(i)].load_state_dict(stream_state)


def build(data_spec, tokenizer, seed: int) -> tuple[Mixture, Batch]:
    """``(training mixture, held-out sequences)``; the held-out set is a ``Batch`` too."""
    train, heldout = [], []
    for src in data_spec.sources:
        if src.streaming:
            if data_spec.chat:
                raise RelufyError(f"{src.data}: streaming chat data is not supported; drop streaming")
            stream = StreamSource(src.data, tokenizer, data_spec.seq_len, skip_on_wrap=data_spec.heldout_sequences)
            held = [stream.next() for _ in range(data_spec.heldout_sequences)]
            if held:
                heldout.append(Batch.text(torch.stack(held)))
            train.append(stream)
            continue
        if data_spec.chat:
            examples = [chat_example(m, tokenizer, data_spec.seq_len) for m in load_conversations(src.data)]
            examples = [e for e in examples if (e[1] != -100).any()]  # truncation can cut every answer
            if not examples:
                raise RelufyError(f"{src.data}: no conversation keeps an assistant token within seq_len {data_spec.seq_len}")
            seqs = Batch(torch.stack([ids for ids, _ in examples]), torch.stack([labels for _, labels in examples]))
        else:
            seqs = Batch.text(pack(load_texts(src.data), tokenizer, data_spec.seq_len))
        n = len(seqs.ids)
        n_held = int(n * data_spec.heldout_fraction)
        if n - n_held < 1:
            raise RelufyError(f"{src.data}: too little text for one {data_spec.seq_len}-token training sequence")
        train.append(seqs.rows(0, n - n_held))
        heldout.append(seqs.rows(n - n_held, n))
    return Mixture(train, [s.weight for s in data_spec.sources], seed), Batch.cat(heldout, data_spec.seq_len)
