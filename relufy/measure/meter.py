"""Training-time measurements: the zero fraction (and L1 term) of every FFN during steps, and the
held-out perplexity and sparsity of a model between them.

Used by ``relufy train`` and its FFN warm start; they live here, beside ``relufy eval``'s counters,
so that both read activations the same way. Both work across processes: the meter's tallies and
the held-out eval's sums are added over the default ``torch.distributed`` process group when the
caller says there are several processes.
"""

from __future__ import annotations

import math

import torch


class SparsityMeter:
    """Training-time observer: zero fraction per FFN site (no host sync until read) and, when
    asked, the L1 norm of the combined activation (kept in the graph)."""

    def __init__(self, sites, l1: bool):
        self.names = {id(m): s.layer for s, m in sites}
        self.layers = sorted(set(self.names.values()))
        self.l1 = l1
        self.reset()

    def reset(self):
        self.zeros = {}
        self.total = {}
        self.l1_terms = []

    def __call__(self, module, combined, expert):
        layer = self.names[id(module)]
        with torch.no_grad():
            z = (combined == 0).sum()
            self.zeros[layer] = self.zeros.get(layer, 0) + z
            self.total[layer] = self.total.get(layer, 0) + combined.numel()
        if self.l1:
            self.l1_terms.append(combined.abs().mean())
        return combined

    def fraction(self, layer: int) -> float:
        """Zero fraction of ``layer`` since the last reset (nan if it ran no FFN)."""
        return float(self.zeros[layer]) / self.total[layer] if self.total.get(layer) else float("nan")

    def per_layer(self) -> list[float]:
        return [self.fraction(layer) for layer in self.layers]

    def tallies(self, device) -> torch.Tensor:
        """``[layers, 2]`` float64 on ``device``: the zeros and the values counted per layer since the
        last reset (what processes add up before taking fractions: ``fractions``)."""
        rows = [[float(self.zeros.get(layer, 0)), float(self.total.get(layer, 0))] for layer in self.layers]
        return torch.tensor(rows, dtype=torch.float64, device=device).reshape(-1, 2)

    @staticmethod
    def fractions(tallies: torch.Tensor) -> list[float]:
        """Zero fraction per layer from (summed) ``tallies``; nan for a layer that ran no FFN."""
        return [z / t if t else float("nan") for z, t in tallies.tolist()]


def heldout_eval(model, heldout, device, batch_size: int = 4, rank: int = 0, world: int = 1) -> tuple[float | None, float | None]:
    """Held-out perplexity and mean per-layer FFN sparsity (the counters of relufy eval) on
    ``heldout = (ids, labels)``, both ``[n, seq_len]`` (what ``relufy.train.mixture.build`` gives):
    labels as the model's loss takes them (shifted inside; -100 where not scored; for plain text
    the ids themselves). Leaves every FFN without an observer: callers reinstall theirs.

    With ``world > 1`` every process of the default process group must call it at once (it is a
    collective): process ``rank`` scores windows ``rank, rank + world, ...``, all processes run
    the same number of forward passes (one with fewer windows runs a batch again, uncounted, so
    that a sharded model's all-gathers pair up), and the NLL, token and activation
    counts are summed over the processes; every process gets the same figures. The figures equal
    a one-process eval's up to float summation order."""
    ids, labels = heldout
    if len(ids) == 0:
        return None, None
    from ..text import Window
    from .evaluate import score
    from .sites import ActivationCounter, observing
    from .stats import Stats

    mine = [Window(ids[i], labels[i]) for i in range(rank, len(ids), world)]
    share = -(-len(ids) // world)  # the largest share of windows
    spare = -(-share // batch_size) - -(-len(mine) // batch_size)  # batches the largest share runs more than this one
    was_training = model.training
    model.eval()
    with observing(model, ActivationCounter) as counter:
        nll, count = score(model, mine, batch_size, device)
    with torch.no_grad():  # uncounted (no observers now): a sharded model's all-gathers pair up with the others'
        for _ in range(spare):
            model(input_ids=ids[:batch_size].to(device))
    sums = torch.tensor([nll, count], dtype=torch.float64, device=device)
    model.train(was_training)
    result = counter.result()
    if world > 1:
        import torch.distributed as dist

        flat = torch.cat([sums] + [t.to(device, torch.float64).flatten() for pair in result.values() for t in pair])
        dist.all_reduce(flat)
        sums, offset = flat[:2], 2
        for site, (counts, tokens) in result.items():
            n, m = counts.numel(), tokens.numel()
            result[site] = (
                flat[offset : offset + n].reshape(counts.shape).round().long().cpu(),
                flat[offset + n : offset + n + m].round().long().cpu(),
            )
            offset += n + m
    nll, count = sums.tolist()
    per_layer = Stats(result, 0, {}).layer_sparsity()
    return (math.exp(nll / count) if count else None), sum(per_layer) / len(per_layer)
