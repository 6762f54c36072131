"""Calibration data for sparsity predictors, and the observer that runs a model on predicted
neurons only.

A predictor reads one vector per token and scores each neuron of one FFN (one expert for MoE).
Its input is, by the engines' convention, the residual stream entering the FFN's norm
(``input="residual"``: the decoder layer's ``Family.ffn_norm`` input); ``input="ffn"`` reads the
FFN's own (normalized) input instead. Labels are "the neuron's combined activation is non-zero",
exactly the neurons a sparse FFN must compute.
"""

from __future__ import annotations

import torch

from ..measure.sites import InputTap, Site


class Collector:
    """Observer: keeps up to ``max_rows`` (input, active-mask) pairs per site and expert, on the CPU."""

    def __init__(self, sites, tap: InputTap, max_rows: int):
        self.index = {id(module): site for site, module in sites}
        self.tap = tap
        self.max_rows = max_rows
        self.inputs: dict[tuple[Site, int], list[torch.Tensor]] = {}
        self.labels: dict[tuple[Site, int], list[torch.Tensor]] = {}
        self.count: dict[tuple[Site, int], int] = {}

    def __call__(self, module, combined, expert):
        key = (self.index[id(module)], expert or 0)
        have = self.count.get(key, 0)
        if have < self.max_rows:
            x = self.tap.rows(module, expert)
            y = combined.detach().reshape(-1, combined.shape[-1]) != 0
            take = min(self.max_rows - have, x.shape[0])
            self.inputs.setdefault(key, []).append(x[:take].float().cpu())
            self.labels.setdefault(key, []).append(y[:take].cpu())
            self.count[key] = have + take
        return combined

    def data(self) -> dict[tuple[Site, int], tuple[torch.Tensor, torch.Tensor]]:
        return {k: (torch.cat(self.inputs[k]), torch.cat(self.labels[k])) for k in self.inputs}


class PredictedOnly:
    """Observer: compute only the neurons the predictors select (score >= threshold); the rest
    are zeroed. Also tallies how many neurons were kept and how many active ones were missed."""

    def __init__(self, sites, tap: InputTap, predictors: dict[tuple[Site, int], torch.nn.Module], threshold: float):
        self.index = {id(module): site for site, module in sites}
        self.tap = tap
        self.predictors = predictors
        self.threshold = threshold
        self.kept = 0
        self.total = 0
        self.missed = 0
        self.active = 0

    def __call__(self, module, combined, expert):
        site = self.index[id(module)]
        predictor = self.predictors[(site, expert or 0)]
        x = self.tap.rows(module, expert)
        with torch.no_grad():
            keep = predictor(x.to(predictor.fc1.weight.dtype)) >= self.threshold
        keep = keep.reshape(combined.shape)
        active = combined != 0
        self.kept += int(keep.sum())
        self.total += keep.numel()
        self.active += int(active.sum())
        self.missed += int((active & ~keep).sum())
        return combined * keep
