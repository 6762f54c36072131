"""FFN sites of a loaded model and the observers that read or mask their combined activation.

A site is one swapped FFN module (``relufy.modeling.ffn.RelufyFFN``): a dense FFN, a shared
expert, or an experts module whose experts are told apart by the ``expert`` argument the eager
experts path passes to the observer.

``InputTap`` keeps what a sparsity predictor reads for each site: by the engines' convention the
residual stream entering the FFN's norm (``input="residual"``: the decoder layer's
``Family.ffn_norm`` input), or the FFN's own (normalized) input (``input="ffn"``).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass

import torch

from ..families import family_for
from ..io.block import RelufyBlock
from ..modeling.ffn import RelufyFFN
from ..modeling.layouts import layout_of

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
PREDICTOR_INPUTS = ("residual", "ffn")
_LAYER_PATH = re.compile(r"^(.*\blayers\.\d+)\.")


@dataclass(frozen=True)
class Site:
    name: str  # module path, e.g. model.layers.3.mlp.experts
    layer: int
    kind: str  # dense | shared | experts
    width: int  # FFN neurons (per expert)
    experts: int  # 1 unless kind == experts
    params_per_neuron: int  # gate row + up row + down column = 3 * hidden

    @property
    def routed(self) -> bool:
        """Routed experts (one per ``expert`` index), as opposed to a dense FFN or shared expert."""
        return self.kind == "experts"


def ffn_sites(model) -> list[tuple[Site, torch.nn.Module]]:
    config = model.config
    block = RelufyBlock.read(config)
    family = family_for(block.base_model_type if block else config.model_type)
    sites = []
    for name, module in model.named_modules():
        if not isinstance(module, RelufyFFN):
            continue
        m = _LAYER.search(name + ".")
        layer = int(m.group(1)) if m else -1
        layout = layout_of(module)
        experts, hidden, width = layout.shape(module)
        if layout.routed:
            kind = "experts"
        else:
            kind = "shared" if family.shared_attr and name.endswith("." + family.shared_attr) else "dense"
        sites.append((Site(name, layer, kind, width, experts, 3 * hidden), module))
    if not sites:
        raise ValueError("no swapped FFN modules: load the model with relufy.load")
    return sites


@contextlib.contextmanager
def observing(model, make_observer):
    """Install ``make_observer(sites)`` on every FFN site and yield it; experts run on the eager
    path, which tells the observer which expert it sees."""
    sites = ffn_sites(model)
    observer = make_observer(sites)
    previous_impl = getattr(model.config, "_experts_implementation", None)
    if any(s.routed for s, _ in sites):
        model.config._experts_implementation = "eager"
    for _, module in sites:
        module.relufy_observer = observer
    try:
        yield observer
    finally:
        for _, module in sites:
            module.relufy_observer = None
        if previous_impl is not None:
            model.config._experts_implementation = previous_impl


class ActivationCounter:
    """Per site and expert: how many tokens it saw and how often each neuron was non-zero."""

    def __init__(self, sites):
        self.sites = [site for site, _ in sites]
        self.index = {id(module): site for site, module in sites}
        self.counts: dict[str, torch.Tensor] = {}  # site name -> [experts, width], on the model's device
        self.tokens: dict[str, torch.Tensor] = {}  # site name -> [experts]

    def __call__(self, module, combined, expert):
        site = self.index[id(module)]
        if site.name not in self.counts:
            self.counts[site.name] = torch.zeros(site.experts, site.width, dtype=torch.long, device=combined.device)
            self.tokens[site.name] = torch.zeros(site.experts, dtype=torch.long, device=combined.device)
        flat = combined.detach().reshape(-1, combined.shape[-1])
        e = expert or 0
        self.counts[site.name][e] += (flat != 0).sum(0)
        self.tokens[site.name][e] += flat.shape[0]
        return combined

    def result(self) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
        """``site -> (counts [experts, width], tokens [experts])`` on the CPU; unseen sites are zeros."""
        out = {}
        for site in self.sites:
            counts = self.counts.get(site.name)
            if counts is None:
                out[site] = (torch.zeros(site.experts, site.width, dtype=torch.long), torch.zeros(site.experts, dtype=torch.long))
            else:
                out[site] = (counts.cpu(), self.tokens[site.name].cpu())
        return out


class TopKMask:
    """Paper Eq. 3/4: per token, keep the ``ceil((1 - sparsity) * width)`` largest ``|combined|``."""

    def __init__(self, sparsity: float):
        self.sparsity = sparsity

    def __call__(self, module, combined, expert):
        width = combined.shape[-1]
        keep = max(1, math.ceil(round((1 - self.sparsity) * width, 6)))
        if keep >= width:
            return combined
        idx = combined.abs().topk(keep, dim=-1).indices
        mask = torch.zeros_like(combined, dtype=torch.bool).scatter_(-1, idx, True)
        return combined * mask


def ffn_norm_of(model, site: Site, modules: dict | None = None) -> torch.nn.Module:
    """The norm in front of ``site``'s FFN (its layer's ``Family.ffn_norm``), whose input is the
    residual stream a ``"residual"`` predictor reads."""
    family = family_for(RelufyBlock.read(model.config).base_model_type)
    modules = modules if modules is not None else dict(model.named_modules())
    m = _LAYER_PATH.match(site.name)
    norm = modules.get(f"{m.group(1)}.{family.ffn_norm}") if m else None
    if norm is None:
        raise ValueError(f"{site.name}: no {family.ffn_norm} in front of this FFN to read the residual stream from")
    return norm


def preactivations(model, site: Site, module, expert: int, input: str = "residual", device=None):
    """``rows -> (gate, up)``: the float32 gate and up pre-activations ``[rows, width]`` that
    ``site``'s FFN (its ``expert``) computes from predictor-input rows (``input`` as ``InputTap``
    reads them), each row's times a positive factor that makes them linear in the rows: for
    ``"residual"`` rows pass the FFN's norm and the factor is the row's RMS (an RMSNorm's
    ``x / rms(x) * w`` becomes ``x * w``), for ``"ffn"`` rows it is 1. Signs are unchanged."""
    gate, up, _ = layout_of(module).weights(module, expert)
    device = torch.device(device) if device is not None else gate.device
    gate, up = gate.detach().to(device), up.detach().to(device)  # no copy when already there
    norm = ffn_norm_of(model, site) if input == "residual" else None

    def preact(rows: torch.Tensor):
        with torch.no_grad():
            factor = None
            if norm is not None:
                factor = rows.to(device, torch.float32).pow(2).mean(-1, keepdim=True).sqrt()
                weight = next(norm.parameters(), rows)
                rows = norm(rows.to(weight.device, weight.dtype))
            rows = rows.to(device, gate.dtype)
            g, u = (rows @ gate.T).float(), (rows @ up.T).float()
            return (g, u) if factor is None else (g * factor, u * factor)

    return preact


class InputTap:
    """Forward pre-hooks that keep, per FFN site, the current batch's predictor input ``[tokens, hidden]``."""

    def __init__(self, model, sites: list[tuple[Site, torch.nn.Module]], input: str = "residual"):
        if input not in PREDICTOR_INPUTS:
            raise ValueError(f"predictor input must be one of {', '.join(PREDICTOR_INPUTS)}, got {input!r}")
        self.current: dict[int, torch.Tensor] = {}  # id(site module) -> [tokens, hidden]
        self.handles = []
        modules = dict(model.named_modules())
        by_layer: dict[torch.nn.Module, list[torch.nn.Module]] = {}
        for site, module in sites:
            if input == "ffn":
                self.handles.append(module.register_forward_pre_hook(self._keep([module])))
                continue
            norm = ffn_norm_of(model, site, modules)
            by_layer.setdefault(norm, []).append(module)
        for norm, users in by_layer.items():
            self.handles.append(norm.register_forward_pre_hook(self._keep(users)))

    def _keep(self, users):
        def hook(_module, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            for user in users:
                self.current[id(user)] = x

        return hook

    def rows(self, module, expert) -> torch.Tensor:
        """The predictor input of the tokens this call of ``module`` computes."""
        x = self.current[id(module)]
        if expert is not None and module.relufy_rows is not None:
            return x[module.relufy_rows]
        return x

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        self.current = {}


@contextlib.contextmanager
def tapped(model, sites, input: str):
    tap = InputTap(model, sites, input)
    try:
        yield tap
    finally:
        tap.close()
