"""Training-time measurements: the zero fraction (and L1 term) of every FFN during steps, and the
held-out perplexity and sparsity of a model between them.

Used by ``relufy train`` and its FFN warm start; they live here, beside ``relufy eval``'s counters,
so that both read activations the same way.
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


def heldout_eval(model, heldout, device, batch_size: int = 4) -> tuple[float | None, float | None]:
    """Held-out perplexity and mean per-layer FFN sparsity (the counters of relufy eval) on
    ``heldout = (ids, labels)``, both ``[n, seq_len]`` (what ``relufy.train.mixture.build`` gives):
    labels as the model's loss takes them (shifted inside; -100 where not scored; for plain text
    the ids themselves). Leaves every FFN without an observer: callers reinstall theirs."""
    ids, labels = heldout
    if len(ids) == 0:
        return None, None
    from ..text import Window
    from .evaluate import score
    from .sites import ActivationCounter, observing
    from .stats import Stats

    wins = [Window(seq, target) for seq, target in zip(ids, labels, strict=True)]
    was_training = model.training
    model.eval()
    with observing(model, ActivationCounter) as counter:
        nll, count = score(model, wins, batch_size, device)
    model.train(was_training)
    per_layer = Stats(counter.result(), 0, {}).layer_sparsity()
    return math.exp(nll / count), sum(per_layer) / len(per_layer)
