"""Activation statistics: per FFN site and expert, how often each neuron fired, and the summaries
(sparsity per layer / expert, router shares, active FFN parameters) derived from those counts.

File format (``relufy eval --stats-out FILE.safetensors``), one pair of tensors per FFN site:

- ``layers.{L}.{kind}.counts``: int64 ``[experts, width]``, tokens on which each neuron's
  combined activation was non-zero (``kind`` = dense | shared | experts; ``experts`` = 1
  unless ``kind`` is ``experts``; for experts only tokens routed to that expert count);
- ``layers.{L}.{kind}.tokens``: int64 ``[experts]``, tokens seen.

Metadata: ``format = relufy-stats``, ``version = 1``, ``positions`` (token positions the model
processed), ``params_per_neuron`` (JSON, per site), plus the model and data it came from. Files
of the same model merge by adding tensors (``merge``); frequencies are ``counts / tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import RelufyError
from ..io.read import loads_json
from .sites import Site

FORMAT = "relufy-stats"


@dataclass
class Stats:
    sites: dict[Site, tuple[torch.Tensor, torch.Tensor]]  # site -> (counts [E, I], tokens [E])
    positions: int  # token positions processed (every layer sees each once)
    meta: dict

    # ---- derived figures -------------------------------------------------------------------
    def layers(self) -> list[int]:
        return sorted({s.layer for s in self.sites})

    def layer_sparsity(self) -> list[float]:
        out = []
        for layer in self.layers():
            active = total = 0
            for site, (counts, tokens) in self.sites.items():
                if site.layer == layer:
                    active += int(counts.sum())
                    total += int(tokens.sum()) * site.width
            out.append(1 - active / total if total else float("nan"))
        return out

    def overall_sparsity(self) -> float:
        active = sum(int(c.sum()) for c, _ in self.sites.values())
        total = sum(int(t.sum()) * s.width for s, (_, t) in self.sites.items())
        return 1 - active / total if total else float("nan")

    def active_param_fraction(self) -> tuple[float, list[float]]:
        """Fraction of FFN parameters one token uses: routed top-k experts times their neuron
        density, plus shared experts and dense FFNs; overall and per layer."""
        per_layer, used_all, total_all = [], 0.0, 0
        for layer in self.layers():
            used = total = 0
            for site, (counts, _) in self.sites.items():
                if site.layer == layer:
                    used += site.params_per_neuron * int(counts.sum())
                    total += site.params_per_neuron * site.width * site.experts
            used /= max(self.positions, 1)
            per_layer.append(used / total if total else float("nan"))
            used_all += used
            total_all += total
        return (used_all / total_all if total_all else float("nan")), per_layer

    def experts(self) -> dict | None:
        """Per MoE layer: sparsity of each expert over its routed tokens, router share, shared sparsity."""
        routed = {s.layer: (s, c, t) for s, (c, t) in self.sites.items() if s.routed}
        if not routed:
            return None
        shared = {s.layer: (s, c, t) for s, (c, t) in self.sites.items() if s.kind == "shared"}
        layers = sorted(routed)
        per_expert, share, shared_sparsity = [], [], []
        for layer in layers:
            site, counts, tokens = routed[layer]
            per_expert.append(
                [1 - int(counts[e].sum()) / (int(tokens[e]) * site.width) if tokens[e] else None for e in range(site.experts)]
            )
            share.append((tokens.double() / max(int(tokens.sum()), 1)).tolist())
            if layer in shared:
                s, c, t = shared[layer]
                shared_sparsity.append(1 - int(c.sum()) / (int(t.sum()) * s.width) if t.sum() else None)
            else:
                shared_sparsity.append(None)
        return {"layers": layers, "per_expert": per_expert, "router_share": share, "shared": shared_sparsity}

    # ---- file ------------------------------------------------------------------------------
    def save(self, path: Path, extra_tensors: dict | None = None, extra_meta: dict | None = None, allowed: int = 0o666) -> None:
        """Write the stats file; ``extra_tensors`` / ``extra_meta`` ride along (export's
        ``sparsity.safetensors`` adds frequencies, permutations and predictor figures). The model
        and the text are named as in a model card: a local path by its last name only."""
        from safetensors.torch import save_file

        from ..io.atomic import atomic_file

        tensors, ppn = dict(extra_tensors or {}), {}
        for site, (counts, tokens) in self.sites.items():
            key = f"layers.{site.layer}.{site.kind}"
            tensors[f"{key}.counts"] = counts.contiguous()
            tensors[f"{key}.tokens"] = tokens.contiguous()
            ppn[key] = site.params_per_neuron
        from ..io.hub import public_name

        meta = {k: str(v) for k, v in {**self.meta, **(extra_meta or {})}.items()}
        for key in ("model", "data"):  # the file is shared and pushed: a local path by its last name only
            if key in meta:
                meta[key] = public_name(meta[key])
        meta.update(format=FORMAT, version="1", positions=str(self.positions), params_per_neuron=json.dumps(ppn))
        with atomic_file(Path(path), allowed) as tmp:  # allowed: at most the inputs' permissions
            save_file(tensors, tmp, metadata=meta)

    @classmethod
    def load(cls, path: Path, what: str = "") -> Stats:
        """Read and check a stats file; a malformed or empty one is refused with one line. Only a
        regular file is read, whole, within ``relufy.io.read.STATS_BYTES`` (a pipe or device is
        refused at once), its header checked before any tensor is made. ``what`` names the file in
        messages (``--stats``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load as load_tensors

        from ..io.read import STATS_BYTES, read_bytes
        from ..io.safetensors_index import header_of_bytes

        path = Path(path)
        if path.is_dir():
            raise RelufyError(f"{path}: is a folder, not a stats file")
        data = read_bytes(path, STATS_BYTES, "relufy stats file", what)
        try:
            _, meta, _ = header_of_bytes(data, path)
            tensors = load_tensors(data)
        except RelufyError as e:
            raise RelufyError(f"{path}: not a readable stats file ({str(e).removeprefix(f'{path}: ')})") from None
        except (SafetensorError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RelufyError(f"{path}: not a readable stats file ({first})") from None
        del data
        if meta.get("format") != FORMAT:
            raise RelufyError(f"{path}: not a relufy stats file")
        try:
            try:
                ppn = loads_json(meta.pop("params_per_neuron"), str(path))
            except RelufyError:  # not JSON, or nested past any sense
                raise ValueError from None
            positions = int(meta.pop("positions"))
            if not isinstance(ppn, dict) or positions < 0:
                raise ValueError
            sites = {}
            for key, p in ppn.items():
                _, layer, kind = key.split(".")
                counts, tokens = tensors[f"{key}.counts"], tensors[f"{key}.tokens"]
                if (counts.dim(), tokens.dim()) != (2, 1) or tokens.shape[0] != counts.shape[0] or counts.dtype.is_floating_point:
                    raise ValueError
                if not isinstance(p, int) or p < 1 or bool((tokens < 0).any()) or bool((counts < 0).any()):
                    raise ValueError
                sites[Site(key, int(layer), kind, counts.shape[1], counts.shape[0], p)] = (counts, tokens)
        except (KeyError, ValueError, TypeError, AttributeError):
            raise RelufyError(f"{path}: malformed relufy stats file (metadata or tensors do not match)") from None
        if not sites or all(int(t.sum()) == 0 for _, t in sites.values()):
            raise RelufyError(f"{path}: the stats file holds no tokens")
        return cls(sites, positions, {k: v for k, v in meta.items() if k not in ("format", "version")})

    def match(self, sites: list[tuple[Site, object]], source: str) -> dict[Site, tuple[torch.Tensor, torch.Tensor]]:
        """These statistics keyed by the model's own FFN sites (same layers, kinds and shapes)."""
        by_key = {(s.layer, s.kind): (s, c, t) for s, (c, t) in self.sites.items()}
        out = {}
        for site, _ in sites:
            found = by_key.pop((site.layer, site.kind), None)
            if found is None:
                raise RelufyError(f"{source}: no statistics for layer {site.layer} ({site.kind}): not this model's stats")
            s, counts, tokens = found
            if (s.experts, s.width) != (site.experts, site.width):
                raise RelufyError(
                    f"{source}: layer {site.layer} ({site.kind}) has {s.experts} x {s.width} neurons in the stats "
                    f"but {site.experts} x {site.width} in the model"
                )
            out[site] = (counts, tokens)
        if by_key:
            (layer, kind), *_ = by_key
            raise RelufyError(f"{source}: statistics for layer {layer} ({kind}), which the model does not have")
        return out


def merge(stats: list[Stats]) -> Stats:
    """Add up statistics of the same model over different data."""
    first = stats[0]
    keys = {(s.layer, s.kind, s.width, s.experts) for s in first.sites}
    for other in stats[1:]:
        if {(s.layer, s.kind, s.width, s.experts) for s in other.sites} != keys:
            raise RelufyError("stats files describe different models and cannot be merged")
    by_key = {(s.layer, s.kind): s for s in first.sites}
    sites = {s: (c.clone(), t.clone()) for s, (c, t) in first.sites.items()}
    for other in stats[1:]:
        for s, (c, t) in other.sites.items():
            counts, tokens = sites[by_key[(s.layer, s.kind)]]
            counts += c
            tokens += t
    return Stats(sites, sum(s.positions for s in stats), dict(first.meta))
