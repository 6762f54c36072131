"""``relufy info``: what a model is, from its config alone (parameters counted on the meta device)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from .io.block import RelufyBlock
from .options import Options, option_field


class InfoOptions(Options):
    """How ``relufy info`` prints."""

    json_out: bool = option_field(False, flag="--json", description="Print JSON instead of a table.")


class ModelInfo(BaseModel):
    path: str
    family: str
    activation: str
    threshold: float | None = None
    layers: int
    hidden_size: int
    ffn_size: int
    routed_experts: int = 0
    shared_experts: int = 0
    experts_per_token: int = 0
    expert_ffn_size: int = 0
    params_total: int
    params_ffn: int
    relufy: dict | None = None


def count_parameters(family, config) -> tuple[int, int]:
    """``(total, ffn)`` parameter counts of the architecture, tied weights counted once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    ffn = sum(p.numel() for m in model.modules() if type(m).__name__ in family.ffn_classes for p in m.parameters())
    return total, ffn


def info(path: str | Path) -> ModelInfo:
    from .io.source import resolve
    from .modeling.spec import base_config

    source = resolve(path)
    config = source.config_dict()
    block = RelufyBlock.read(config, str(path))
    family, cfg = base_config(config)
    total, ffn = count_parameters(family, cfg)
    moe = {}
    if family.is_moe:
        moe = dict(
            routed_experts=family.routed_experts(cfg),
            shared_experts=family.shared_experts(cfg),
            experts_per_token=family.top_k(cfg),
            expert_ffn_size=family.moe_ffn_size(cfg),
        )
    return ModelInfo(
        path=str(path),
        family=family.model_type,
        activation=block.activation if block else "swiglu",
        threshold=block.threshold if block else None,
        layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_size=cfg.intermediate_size,
        params_total=total,
        params_ffn=ffn,
        relufy=config.get("relufy"),
        **moe,
    )


def show(path: str, options: InfoOptions) -> ModelInfo:
    """``relufy info``: the model's facts as a table (or JSON) on stdout."""
    import json

    result = info(path)
    if options.json_out:
        print(json.dumps(result.model_dump(), indent=2))
        return result
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=str(path))
    rows = [
        ("family", result.family),
        ("activation", result.activation + (f" (T={result.threshold})" if result.threshold is not None else "")),
        ("layers", result.layers),
        ("hidden / FFN", f"{result.hidden_size} / {result.ffn_size}"),
    ]
    if result.routed_experts:
        rows += [
            ("experts", f"{result.routed_experts} routed, {result.shared_experts} shared, top-{result.experts_per_token}"),
            ("expert FFN", result.expert_ffn_size),
        ]
    rows += [
        ("parameters", f"{result.params_total:,}"),
        ("FFN parameters", f"{result.params_ffn:,} ({result.params_ffn / result.params_total:.1%})"),
    ]
    if result.relufy:
        rows += [(f"relufy.{k}", v) for k, v in result.relufy.items() if k not in ("activation", "threshold")]
    for k, v in rows:
        table.add_row(k, str(v))
    Console().print(table)
    return result
