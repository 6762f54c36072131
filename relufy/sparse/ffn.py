"""A gated FFN (or one expert) prepared for sparse decoding on CPU.

``exact`` is exact for activations whose zeros are decided by the gate (dReLU, ReGLU, ReLU²,
FATReLU): compute the gate for every neuron, keep the neurons whose gate activation is non-zero
(for any token of the small batch), compute the up projection only for those, and the down
projection only for neurons whose combined activation is non-zero. ``predicted`` computes only
the neurons a predictor selects (score >= threshold): gate, up and down for those alone. A
model's magnitude cutoff (``relufy.cutoffs``) zeroes small combined activations in every mode, and
``exact`` then skips their down rows too.

The down projection is stored neuron-major (``down.T``, ``[neurons, hidden]``) as engines do, so
every selected neuron's three weight rows are contiguous; ``relufy.sparse.kernels`` reads them in
place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..activations import GATED_ACTIVATIONS, cut
from ..names import ZERO_ACTIVATIONS
from . import kernels


def _gate_active(gate: torch.Tensor, activation: str, threshold: float | None) -> torch.Tensor:
    if activation == "fatrelu":
        return gate > threshold
    return gate > 0


class SparseFFN:
    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        activation: str,
        threshold: float | None = None,
        predictor=None,
        predictor_threshold: float = 0.0,
        cutoff: float | None = None,
    ):
        if activation not in ZERO_ACTIVATIONS:
            raise ValueError(
                f"sparse decoding needs exact zeros: {activation} has none (use one of {', '.join(ZERO_ACTIVATIONS)})"
            )
        self.gate = gate.detach().contiguous()  # [I, H]
        self.up = up.detach().contiguous()  # [I, H]
        self.down_t = down.detach().t().contiguous()  # [I, H], neuron-major
        self.activation = activation
        self.threshold = threshold
        combine = GATED_ACTIVATIONS[activation]
        self.cutoff = cutoff  # the model's magnitude cutoff on the combined activation (relufy.cutoffs)
        self.combine = (lambda gate, up, t: cut(combine(gate, up, t), cutoff)) if cutoff else combine
        self.predictor = predictor
        self.predictor_threshold = predictor_threshold
        self._all_rows = None
        self._pred_rows = None

    @property
    def width(self) -> int:
        return self.gate.shape[0]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """The plain dense FFN, in the weights' dtype (the baseline)."""
        xw = x.to(self.gate.dtype)
        h = self.combine(F.linear(xw, self.gate), F.linear(xw, self.up), self.threshold)
        return F.linear(h, self.down_t.t()).float()

    def _gate_all(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate.dtype == torch.float32:
            return F.linear(x, self.gate)
        if kernels.extension() is not None:  # bf16: relufy's kernel reads it faster than F.linear on CPU
            if self._all_rows is None:
                self._all_rows = torch.arange(self.width)
            return kernels.rows_dot(self.gate, x, self._all_rows)
        return F.linear(x.to(self.gate.dtype), self.gate).float()

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: float32 ``[batch, hidden]``; returns float32 ``[batch, hidden]``."""
        if kernels.extension() is not None:  # one pass: gate everywhere, up right after active gates
            gate, up = kernels.gate_up(self.gate, self.up, x, self.threshold if self.activation == "fatrelu" else 0.0)
            combined = self.combine(gate, up, self.threshold)
            idx = (combined != 0).any(0).nonzero().squeeze(1)
            return kernels.rows_axpy(self.down_t, combined[:, idx].contiguous(), idx)
        gate = self._gate_all(x)
        idx = _gate_active(gate, self.activation, self.threshold).any(0).nonzero().squeeze(1)
        up = kernels.rows_dot(self.up, x, idx)
        combined = self.combine(gate[:, idx], up, self.threshold)
        keep = (combined != 0).any(0)
        return kernels.rows_axpy(self.down_t, combined[:, keep].contiguous(), idx[keep].contiguous())

    def select(self, x_pred: torch.Tensor) -> torch.Tensor:
        p = self.predictor
        with torch.no_grad():
            if p.fc1.weight.dtype == torch.float32 or kernels.extension() is None:
                scores = p(x_pred.to(p.fc1.weight.dtype))
            else:  # bf16 predictor: relufy's kernel reads it faster than F.linear on CPU
                if self._pred_rows is None:
                    self._pred_rows = (torch.arange(p.fc1.weight.shape[0]), torch.arange(p.fc2.weight.shape[0]))
                h = torch.relu(kernels.rows_dot(p.fc1.weight, x_pred.float().contiguous(), self._pred_rows[0]))
                scores = kernels.rows_dot(p.fc2.weight, h, self._pred_rows[1])
        return (scores >= self.predictor_threshold).any(0).nonzero().squeeze(1)

    def predicted(self, x: torch.Tensor, x_pred: torch.Tensor) -> torch.Tensor:
        """Only the neurons the predictor selects from ``x_pred`` (the predictor's input)."""
        idx = self.select(x_pred)
        return self.on(x, idx)

    def on(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The FFN computed on neurons ``idx`` only (the others taken as zero)."""
        gate = kernels.rows_dot(self.gate, x, idx)
        up = kernels.rows_dot(self.up, x, idx)
        return kernels.rows_axpy(self.down_t, self.combine(gate, up, self.threshold).contiguous(), idx)
