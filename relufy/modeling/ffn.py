"""In-memory activation swap for transformers' gated FFN modules.

A swap changes the class of each FFN module to a subclass whose forward computes the chosen
gated activation (``relufy.activations``); parameters, their names and the state dict are
untouched, so weights load and save exactly as in the original architecture.

Three FFN layouts exist in the supported families (see ``relufy.families``):

- ``gated``: ``gate_proj``, ``up_proj``, ``down_proj`` linears (Llama, Qwen, Gemma, shared experts);
- ``fused``: one ``gate_up_proj`` linear, gate rows first, and ``down_proj`` (Phi-3);
- ``experts``: transformers 5.x fused 3D expert tensors ``gate_up_proj`` [E, 2I, H] and
  ``down_proj`` [E, H, I], dispatched by ``config._experts_implementation``.

This module imports only torch and transformers: it is copied, together with
``relufy.activations``, into the modeling code written into converted checkpoints.
"""

import contextlib

import torch
import torch.nn.functional as F

from ..activations import GATED_ACTIVATIONS, cut  # relufy-bundle: drop

# Experts implementations of transformers that compute the activation through the module's
# ``_apply_gate`` and so honour the swap. Others (e.g. "sonicmoe") fuse SwiGLU into a kernel.
GATE_AWARE_EXPERTS_IMPLEMENTATIONS = ("batched_mm", "grouped_mm", "deepgemm")


class RelufyFFN:
    """Mixin for swapped FFN modules; ``relufy_combine`` is the single place where the
    combined activation ``act(gate) * up`` (or its replacement) is computed.

    ``relufy_observer``, when set, is called as ``observer(module, combined, expert)`` and returns
    the combined activation to use (measurement reads it, top-k masking replaces it); ``expert``
    is the expert index inside an experts module on the eager path, else None. On that path
    ``relufy_rows`` holds the rows of the flattened input (token positions) routed to ``expert``.

    ``relufy_cutoff``, when set, zeroes the entries of the combined activation whose magnitude is
    below it (one value per module, every expert of an experts module alike: ``set_cutoffs``).
    """

    relufy_activation = "swiglu"
    relufy_threshold = None
    relufy_cutoff = None
    relufy_observer = None
    relufy_rows = None
    relufy_blend = None  # training only: a in [0, 1) blends (1 - a) x the original activation + a x this one

    def relufy_combine(self, gate, up, expert=None):
        if self.relufy_activation == "swiglu":  # the module's own gated activation
            act = getattr(self, "act_fn", None) or self.activation_fn
            out = act(gate) * up
        else:
            out = GATED_ACTIVATIONS[self.relufy_activation](gate, up, self.relufy_threshold)
            if self.relufy_blend is not None:
                act = getattr(self, "act_fn", None) or self.activation_fn
                out = self.relufy_blend * out + (1 - self.relufy_blend) * (act(gate) * up)
        out = cut(out, self.relufy_cutoff)
        if self.relufy_observer is not None:
            out = self.relufy_observer(self, out, expert)
        return out


class RelufyGatedMLP(RelufyFFN):
    def forward(self, x):
        return self.down_proj(self.relufy_combine(self.gate_proj(x), self.up_proj(x)))


class RelufyFusedMLP(RelufyFFN):
    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.relufy_combine(gate, up))


class RelufyExperts(RelufyFFN):
    def _apply_gate(self, gate_up_out, expert=None):
        gate, up = gate_up_out.chunk(2, dim=-1)
        return self.relufy_combine(gate, up, expert)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        impl = getattr(getattr(self, "config", None), "_experts_implementation", None) or "eager"
        if impl == "eager":
            return self.relufy_eager_forward(hidden_states, top_k_index, top_k_weights)
        if impl not in GATE_AWARE_EXPERTS_IMPLEMENTATIONS:
            raise NotImplementedError(
                f"experts implementation {impl!r} fuses its own activation and cannot compute "
                f"{self.relufy_activation}; use one of eager, {', '.join(GATE_AWARE_EXPERTS_IMPLEMENTATIONS)}"
            )
        return super().forward(hidden_states, top_k_index, top_k_weights)

    def relufy_eager_forward(self, hidden_states, top_k_index, top_k_weights):
        """transformers' eager experts loop, with the activation taken from ``_apply_gate``."""
        num_experts = self.gate_up_proj.shape[0]
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one extra class absorbs expert-parallel sentinel ids (== num_experts)
            mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            expert = expert[0]
            if expert == num_experts:
                continue
            pos, tok = torch.where(mask[expert])
            self.relufy_rows = tok
            h = self._apply_gate(F.linear(hidden_states[tok], self.gate_up_proj[expert]), int(expert))
            h = F.linear(h, self.down_proj[expert]) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, h.to(out.dtype))
        self.relufy_rows = None
        return out


FFN_LAYOUTS = {"gated": RelufyGatedMLP, "fused": RelufyFusedMLP, "experts": RelufyExperts}
_SUBCLASSES = {}


def _swapped_class(layout, cls):
    key = (layout, cls)
    if key not in _SUBCLASSES:
        _SUBCLASSES[key] = type(f"Relufy{cls.__name__}", (FFN_LAYOUTS[layout], cls), {"relufy_layout": layout})
    return _SUBCLASSES[key]


def _check_experts(module):
    problems = [
        what
        for what, bad in (
            ("transposed weights", getattr(module, "is_transposed", False)),
            ("biases", getattr(module, "has_bias", False)),
            ("interleaved gate/up", not getattr(module, "is_concatenated", True)),
            ("no gate", not getattr(module, "has_gate", True)),
        )
        if bad
    ]
    if problems:
        raise NotImplementedError(f"{type(module).__name__}: experts with {', '.join(problems)} are not supported")


def swap_ffn(model, ffn_classes, activation, threshold=None):
    """Make every FFN of ``model`` compute ``activation``; returns the number of FFN modules.

    ``ffn_classes`` maps transformers class names (``"LlamaMLP"``) to a layout of ``FFN_LAYOUTS``.
    Swapping again replaces the activation; ``"swiglu"`` computes the module's original one.
    """
    if activation not in GATED_ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(GATED_ACTIVATIONS)}")
    count = 0
    for module in model.modules():
        if not isinstance(module, RelufyFFN):
            layout = ffn_classes.get(type(module).__name__)
            if layout is None:
                continue
            if layout == "experts":
                _check_experts(module)
            module.__class__ = _swapped_class(layout, type(module))
        module.relufy_activation = activation
        module.relufy_threshold = threshold
        count += 1
    if count == 0:
        raise ValueError(f"no FFN module of {sorted(ffn_classes)} found in {type(model).__name__}")
    return count


def set_cutoffs(model, cutoffs):
    """Give each swapped FFN module of ``model`` its magnitude cutoff from ``cutoffs`` (module path
    -> cutoff, as in a checkpoint's ``relufy.cutoffs``); modules not named get none. A name that
    is not a swapped FFN module of ``model`` is an error: the cutoffs belong to another model."""
    found = set()
    for name, module in model.named_modules():
        if isinstance(module, RelufyFFN):
            module.relufy_cutoff = cutoffs.get(name) or None
            found.add(name)
    unknown = sorted(set(cutoffs) - found)
    if unknown:
        raise ValueError(f"cutoffs name {len(unknown)} module(s) that are not FFNs of this model, e.g. {unknown[0]!r}")


@contextlib.contextmanager
def activation_key_as(config, key, value):
    """Temporarily set ``config.<key>`` (the family's activation name) while modules are built.

    Converted checkpoints store a name transformers does not know (``relufy_drelu``) so that
    loading them as the original architecture fails instead of silently computing SwiGLU.
    """
    stored = getattr(config, key)
    setattr(config, key, value)
    try:
        yield config
    finally:
        setattr(config, key, stored)
