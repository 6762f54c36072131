"""Gated FFN activations: one definition each.

Every function maps the two branch pre-activations of a gated FFN, ``gate = x W_gate`` and
``up = x W_up``, to the combined activation that feeds the down projection.

This module imports only torch: its source is copied verbatim into the modeling code that
``relufy convert`` writes into checkpoints, so that they load without relufy installed.
"""

import torch
import torch.nn.functional as F


def drelu(gate, up, threshold=None):
    """dReLU (Turbo Sparse): ``relu(gate) * relu(up)``."""
    return F.relu(gate) * F.relu(up)


def reglu(gate, up, threshold=None):
    """ReGLU: ``relu(gate) * up``."""
    return F.relu(gate) * up


def relu2(gate, up, threshold=None):
    """Squared ReLU on the gate: ``relu(gate) ** 2 * up``."""
    return torch.square(F.relu(gate)) * up


def fatrelu(gate, up, threshold=None):
    """FATReLU (ProSparse): gate values below ``threshold`` become 0, then ``* up``."""
    return torch.where(gate >= threshold, gate, torch.zeros_like(gate)) * up


def swiglu(gate, up, threshold=None):
    """SwiGLU, the usual starting point: ``silu(gate) * up``."""
    return F.silu(gate) * up


def cut(combined, cutoff=None):
    """A magnitude cutoff (ProSparse's final FATReLU shift, taken on the combined activation): the
    entries of ``combined`` whose magnitude is below ``cutoff`` become 0; none or 0 keeps all."""
    if not cutoff:
        return combined
    return combined.masked_fill(combined.abs() < cutoff, 0)


# name -> combine function. "swiglu" as a conversion target means: keep the model's own gated
# activation (SiLU for Llama, tanh-GELU for Gemma); it is the identity conversion for baselines.
GATED_ACTIVATIONS = {
    "drelu": drelu,
    "reglu": reglu,
    "relu2": relu2,
    "fatrelu": fatrelu,
    "swiglu": swiglu,
}
