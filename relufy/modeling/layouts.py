"""One adapter per FFN layout: where a swapped FFN keeps its gate, up and down weights.

``relufy.modeling.ffn`` computes each layout; everything that reads or rewrites the weights
(sparsity sites, neuron reordering, the sparse CPU FFNs) goes through ``layout_of(module)``, so a
new layout is one class here plus its forward in ``ffn.py``.

Every adapter answers, for expert ``e`` (0 for a dense FFN):

- ``weights(module, e)``: ``(gate [I, H], up [I, H], down [H, I])``, views of the parameters;
- ``shape(module)``: ``(experts, hidden, width)``;
- ``routed``: whether the module holds routed experts (told apart by ``expert``);
- ``permute_(module, perm)``: reorder the neurons of each expert in place by ``perm [E, I]``
  (new neuron j = old neuron ``perm[e, j]``), which leaves the function unchanged.
"""

from __future__ import annotations

import torch


def _shape(param) -> tuple[int, ...]:
    """The full shape, also of a DeepSpeed ZeRO-3 partitioned parameter (whose .shape is (0,))."""
    return tuple(getattr(param, "ds_shape", None) or param.shape)


def _take_(param: torch.Tensor, index: torch.Tensor, dim: int) -> None:
    with torch.no_grad():
        param.copy_(param.index_select(dim, index.to(param.device)))


class Gated:
    """``gate_proj``, ``up_proj``, ``down_proj`` linears (Llama, Qwen, Gemma, shared experts)."""

    routed = False

    @staticmethod
    def weights(module, expert: int = 0):
        return module.gate_proj.weight, module.up_proj.weight, module.down_proj.weight

    @staticmethod
    def shape(module) -> tuple[int, int, int]:
        hidden, width = _shape(module.down_proj.weight)
        return 1, hidden, width

    @staticmethod
    def permute_(module, perm: torch.Tensor) -> None:
        _take_(module.gate_proj.weight, perm[0], 0)
        _take_(module.up_proj.weight, perm[0], 0)
        _take_(module.down_proj.weight, perm[0], 1)


class Fused:
    """One ``gate_up_proj`` linear, gate rows first, and ``down_proj`` (Phi-3)."""

    routed = False

    @staticmethod
    def weights(module, expert: int = 0):
        gate, up = module.gate_up_proj.weight.chunk(2, dim=0)
        return gate, up, module.down_proj.weight

    shape = Gated.shape

    @staticmethod
    def permute_(module, perm: torch.Tensor) -> None:
        p = perm[0]
        _take_(module.gate_up_proj.weight, torch.cat([p, p + p.numel()]), 0)
        _take_(module.down_proj.weight, p, 1)


class Experts:
    """transformers' fused 3D expert tensors: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]."""

    routed = True

    @staticmethod
    def weights(module, expert: int = 0):
        gate, up = module.gate_up_proj[expert].chunk(2, dim=0)
        return gate, up, module.down_proj[expert]

    @staticmethod
    def shape(module) -> tuple[int, int, int]:
        return _shape(module.down_proj)

    @staticmethod
    def permute_(module, perm: torch.Tensor) -> None:
        with torch.no_grad():
            for e in range(perm.shape[0]):
                p = perm[e].to(module.down_proj.device)
                module.gate_up_proj[e].copy_(module.gate_up_proj[e].index_select(0, torch.cat([p, p + p.numel()])))
                module.down_proj[e].copy_(module.down_proj[e].index_select(1, p))


LAYOUTS = {"gated": Gated, "fused": Fused, "experts": Experts}


def layout_of(module):
    """The adapter of a swapped FFN module (``relufy.modeling.ffn.RelufyFFN``)."""
    return LAYOUTS[module.relufy_layout]
