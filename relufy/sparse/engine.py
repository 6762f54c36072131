"""Run a loaded relufy model with sparse FFNs while decoding.

``sparse_decoding(model, "exact")`` makes every FFN (every routed and shared expert) compute
through ``SparseFFN`` whenever a forward pass carries at most ``max_tokens`` tokens (decoding);
longer passes (the prompt) stay dense. ``"predictor"`` computes only the neurons that the
exported predictors select, reading their input as the export recorded it (residual stream or
FFN input), each at its own threshold when the export calibrated one per predictor
(``predictor_thresholds``: ``.predictor_threshold`` in ``sparsity.safetensors``). MoE layers run
the routed experts only, each with its own sparse FFN.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Mapping
from pathlib import Path

import torch

from ..io.block import RelufyBlock
from ..measure.sites import ffn_sites
from ..modeling.layouts import layout_of
from ..names import SPARSE_MODES as MODES
from .ffn import SparseFFN


def predictor_thresholds(path: str | Path, model) -> dict[tuple[str, int | None], float] | None:
    """Per-predictor thresholds of an export at ``path`` (``.predictor_threshold`` per site in its
    ``sparsity.safetensors``), keyed like ``load_predictors``: ``(ffn module path, expert or None)``;
    None when the export has one threshold for all (older exports, ``--predictor-recall 0``)."""
    from safetensors import safe_open

    from ..io.safetensors_index import read_header
    from ..names import SPARSITY_FILE

    file = Path(path) / SPARSITY_FILE
    if not file.exists():
        return None
    read_header(file)  # a regular file whose header is bounded and matches its size, or one line
    out = {}
    with safe_open(str(file), "pt") as f:
        names = set(f.keys())
        for site, _ in ffn_sites(model):
            name = f"layers.{site.layer}.{site.kind}.predictor_threshold"
            if name not in names:
                return None
            values = f.get_tensor(name).tolist()
            if len(values) != site.experts:
                raise ValueError(f"{file}: {name} holds {len(values)} thresholds for {site.experts} experts")
            for e, t in enumerate(values):
                out[(site.name, e if site.routed else None)] = float(t)
    return out


def build(model, predictors: dict | None = None, predictor_threshold: float | Mapping = 0.0) -> dict:
    """``{(site, expert): SparseFFN}`` for every FFN of ``model``; ``predictors`` maps
    ``(ffn module path, expert or None)`` to a predictor (``relufy.modeling.predictor.load_predictors``);
    ``predictor_threshold`` is one threshold for all or a mapping with the same keys."""
    block = RelufyBlock.read(model.config)
    out = {}
    for site, module in ffn_sites(model):
        for e in range(site.experts):
            predictor, threshold = None, 0.0
            if predictors is not None:
                key = (site.name, e if site.routed else None)
                if key not in predictors:
                    raise ValueError(f"no predictor for {site.name}" + (f" expert {e}" if site.routed else ""))
                predictor = predictors[key].float()
                if isinstance(predictor_threshold, Mapping):
                    if key not in predictor_threshold:
                        raise ValueError(f"no predictor threshold for {site.name}" + (f" expert {e}" if site.routed else ""))
                    threshold = float(predictor_threshold[key])
                else:
                    threshold = float(predictor_threshold)
            out[(site, e)] = SparseFFN(
                *layout_of(module).weights(module, e),
                block.activation,
                block.threshold,
                predictor,
                threshold,
                cutoff=module.relufy_cutoff,
            )
    return out


@contextlib.contextmanager
def sparse_decoding(
    model,
    mode: str = "exact",
    predictors: dict | None = None,
    predictor_threshold: float | Mapping = 0.0,
    predictor_input: str = "residual",
    max_tokens: int = 8,
):
    """Patch ``model``'s FFN modules for sparse decoding inside the block; yields the SparseFFNs.
    ``predictor_threshold``: one for all predictors, or per predictor (``predictor_thresholds``)."""
    if mode not in MODES:
        raise ValueError(f"sparse mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        yield {}
        return
    if mode == "predictor" and predictors is None:
        raise ValueError("sparse mode predictor needs predictors (relufy export --predictors)")
    ffns = build(model, predictors if mode == "predictor" else None, predictor_threshold)
    sites = ffn_sites(model)
    tap = None
    if mode == "predictor":
        from ..measure.sites import InputTap

        tap = InputTap(model, sites, predictor_input)

    def run(ffn, x, x_pred):
        return ffn.predicted(x, x_pred) if mode == "predictor" else ffn.exact(x)

    def dense_forward(site, module):
        original = type(module).forward

        def forward(self, x):
            flat = x.reshape(-1, x.shape[-1])
            if flat.shape[0] > max_tokens:
                return original(self, x)
            x_pred = tap.rows(self, None) if tap is not None else None
            y = run(ffns[(site, 0)], flat.float().contiguous(), x_pred)
            return y.to(x.dtype).reshape(x.shape)

        return forward

    def experts_forward(site, module):
        original = type(module).forward

        def forward(self, hidden_states, top_k_index, top_k_weights):
            if hidden_states.shape[0] > max_tokens:
                return original(self, hidden_states, top_k_index, top_k_weights)
            x_all = hidden_states.float()
            pred_all = tap.current[id(self)] if tap is not None else None
            out = torch.zeros_like(x_all)
            for t in range(hidden_states.shape[0]):
                for slot in range(top_k_index.shape[1]):
                    e = int(top_k_index[t, slot])
                    if e >= site.experts:  # expert-parallel sentinel
                        continue
                    x_pred = pred_all[t : t + 1] if pred_all is not None else None
                    y = run(ffns[(site, e)], x_all[t : t + 1].contiguous(), x_pred)
                    out[t] += top_k_weights[t, slot].float() * y[0]
            return out.to(hidden_states.dtype)

        return forward

    patched = []
    for site, module in sites:
        make = experts_forward if site.routed else dense_forward
        module.forward = types.MethodType(make(site, module), module)
        patched.append(module)
    try:
        yield ffns
    finally:
        for module in patched:
            del module.forward
        if tap is not None:
            tap.close()
