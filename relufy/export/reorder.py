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


def hottest_first(counts: torch.Tensor) -> torch.Tensor:
    """Per expert, the permutation that sorts neurons by activation count, descending
    (ties keep their original order). ``counts`` is ``[experts, width]``."""
    return torch.sort(counts, dim=-1, descending=True, stable=True).indices


def _permute_rows_(param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        param.copy_(param.index_select(dim, index.to(param.device)))


def permute_ffn_(module, perm: torch.Tensor) -> None:
    """Permute the neurons of one swapped FFN module in place; ``perm`` is ``[experts, width]``."""
    layout = module.relufy_layout
    if layout == "gated":
        p = perm[0]
        _permute_rows_(module.gate_proj.weight, p, 0)
        _permute_rows_(module.up_proj.weight, p, 0)
        _permute_rows_(module.down_proj.weight, p, 1)
    elif layout == "fused":
        p = perm[0]
        width = p.numel()
        _permute_rows_(module.gate_up_proj.weight, torch.cat([p, p + width]), 0)
        _permute_rows_(module.down_proj.weight, p, 1)
    elif layout == "experts":
        with torch.no_grad():
            for e in range(perm.shape[0]):
                p = perm[e].to(module.down_proj.device)
                width = p.numel()
                module.gate_up_proj[e].copy_(module.gate_up_proj[e].index_select(0, torch.cat([p, p + width])))
                module.down_proj[e].copy_(module.down_proj[e].index_select(1, p))
    else:  # pragma: no cover - FFN_LAYOUTS has exactly these
        raise ValueError(f"unknown FFN layout {layout!r}")


def reorder_(sites: list[tuple[Site, object]], counts: dict[Site, torch.Tensor]) -> dict[Site, torch.Tensor]:
    """Permute every site hottest first; returns each site's permutation ``[experts, width]``."""
    perms = {}
    for site, module in sites:
        perm = hottest_first(counts[site])
        permute_ffn_(module, perm)
        perms[site] = perm
    return perms
