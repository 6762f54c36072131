"""Independent references: the original transformers model with only the activation changed.

Nothing here uses relufy. FFN modules are found by their structure, and the activation
formulas are written out again, so a mistake in relufy cannot hide in its own reference.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

FORMULAS = {
    "drelu": lambda m, g, u, t: F.relu(g) * F.relu(u),
    "reglu": lambda m, g, u, t: F.relu(g) * u,
    "relu2": lambda m, g, u, t: F.relu(g) ** 2 * u,
    "fatrelu": lambda m, g, u, t: g * (g >= t).to(g.dtype) * u,
    "swiglu": lambda m, g, u, t: (getattr(m, "act_fn", None) or m.activation_fn)(g) * u,
}


def _gated_forward(self, x):
    return self.down_proj(self._post(self, self._ref(self, self.gate_proj(x), self.up_proj(x)), None))


def _fused_forward(self, x):
    g, u = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self._post(self, self._ref(self, g, u), None))


def _experts_forward(self, hidden, top_k_index, top_k_weights):
    """Brute force: every (token, chosen expert) pair on its own."""
    out = torch.zeros_like(hidden)
    inter = self.down_proj.shape[-1]
    for t in range(hidden.shape[0]):
        for k in range(top_k_index.shape[1]):
            e = int(top_k_index[t, k])
            gu = self.gate_up_proj[e] @ hidden[t]
            h = self._post(self, self._ref(self, gu[:inter], gu[inter:]), e)
            out[t] += top_k_weights[t, k] * (self.down_proj[e] @ h)
    return out


def apply_reference(model, activation: str, threshold: float | None = None, post=None) -> int:
    """Patch every gated FFN of ``model`` (in place) to compute ``activation``; returns the count.

    ``post(module, combined, expert)``, if given, sees (and may replace) each combined activation;
    ``expert`` is the expert index for experts modules, else None."""
    formula = FORMULAS[activation]
    count = 0
    for m in model.modules():
        gate_up = getattr(m, "gate_up_proj", None)
        if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")):
            fwd = _gated_forward
        elif isinstance(gate_up, torch.nn.Linear):
            fwd = _fused_forward
        elif isinstance(gate_up, torch.nn.Parameter) and gate_up.dim() == 3:
            fwd = _experts_forward
        else:
            continue
        m._ref = lambda mod, g, u, f=formula: f(mod, g, u, threshold)
        m.forward = types.MethodType(fwd, m)
        m._post = post or (lambda mod, h, e: h)
        count += 1
    assert count > 0
    return count


def midpoint_cutoff(magnitudes: list[torch.Tensor]) -> float:
    """A magnitude cutoff near the median of the positive values seen, halfway between two
    neighbouring ones, so that no value lies on it (a cut that float noise cannot flip)."""
    v = torch.cat([m.flatten() for m in magnitudes])
    v = v[v > 0].sort().values
    return float((v[len(v) // 2] + v[len(v) // 2 + 1]) / 2)
