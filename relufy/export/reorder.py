"""Neuron reordering: permute each FFN's neurons hottest first, without changing the function.

A gated FFN computes ``down(act(gate(x)) * up(x))``; permuting the rows of ``gate`` and ``up``
and the columns of ``down`` by the same permutation gives the same output, since the sum over
neurons in ``down`` does not depend on their order. Engines that split neurons between devices
or cache the hot ones want the most frequently active neurons first.

A permutation ``perm`` is stored new-index -> original-index: neuron ``j`` of the exported FFN
is neuron ``perm[j]`` of the original one.
"""

from __future__ import annotations

import torch

from ..measure.sites import Site
from ..modeling.layouts import layout_of


def hottest_first(counts: torch.Tensor) -> torch.Tensor:
    """Per expert, the permutation that sorts neurons by activation count, descending
    (ties keep their original order). ``counts`` is ``[experts, width]``."""
    return torch.sort(counts, dim=-1, descending=True, stable=True).indices


def permute_ffn_(module, perm: torch.Tensor) -> None:
    """Permute the neurons of one swapped FFN module in place; ``perm`` is ``[experts, width]``."""
    layout_of(module).permute_(module, perm)


def reorder_(sites: list[tuple[Site, object]], counts: dict[Site, torch.Tensor]) -> dict[Site, torch.Tensor]:
    """Permute every site hottest first; returns each site's permutation ``[experts, width]``."""
    perms = {}
    for site, module in sites:
        perm = hottest_first(counts[site])
        permute_ffn_(module, perm)
        perms[site] = perm
    return perms
