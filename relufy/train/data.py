"""Training data: sources tokenized and packed into fixed-length sequences, drawn as a seeded,
weighted mixture whose position is part of the training state (exact resume).

Each source's records (``relufy.data.load_texts``) are tokenized without special tokens, joined
with the EOS token between records, and cut into ``seq_len`` sequences; the last
``heldout_fraction`` of each source's sequences is held out for evaluation. Draw ``i`` picks a
source with probability proportional to its weight (from a generator seeded with ``(seed, i)``);
the ``k``-th draw from a source takes sequence ``perm_e[k mod n]`` of a permutation seeded with
``(seed, source, e = k div n)``. The state is ``i`` and the per-source draw counts, so resuming
costs nothing and gives the same sequences as an uninterrupted run.
"""

from __future__ import annotations

import torch

from ..data import load_texts
from ..errors import RelufyError


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


class Mixture:
    """Seeded weighted mixture over packed sources; ``state_dict`` makes its position resumable."""

    def __init__(self, sources: list[torch.Tensor], weights: list[float], seed: int):
        if any(len(s) == 0 for s in sources):
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
            self._perms = {key: torch.randperm(len(self.sources[source]), generator=g)}
        return self._perms[key]

    def next(self) -> torch.Tensor:
        if len(self.sources) == 1:
            s = 0
        else:
            g = torch.Generator().manual_seed(hash((self.seed, self.position)) & 0x7FFFFFFF)
            s = int(torch.multinomial(self.weights, 1, generator=g))
        k = self.draws[s]
        n = len(self.sources[s])
        seq = self.sources[s][self._perm(s, k // n)[k % n]]
        self.draws[s] += 1
        self.position += 1
        return seq

    def batch(self, size: int) -> torch.Tensor:
        return torch.stack([self.next() for _ in range(size)])

    def state_dict(self) -> dict:
        return {"position": self.position, "draws": list(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
        self.draws = [int(d) for d in state["draws"]]


def build(data_spec, tokenizer, seed: int) -> tuple[Mixture, torch.Tensor]:
    """``(training mixture, held-out sequences)``."""
    train, heldout = [], []
    for src in data_spec.sources:
        seqs = pack(load_texts(src.data), tokenizer, data_spec.seq_len)
        n_held = int(len(seqs) * data_spec.heldout_fraction)
        if len(seqs) - n_held < 1:
            raise RelufyError(f"{src.data}: too little text for one {data_spec.seq_len}-token training sequence")
        train.append(seqs[: len(seqs) - n_held])
        heldout.append(seqs[len(seqs) - n_held :])
    return Mixture(train, [s.weight for s in data_spec.sources], seed), torch.cat(heldout)
