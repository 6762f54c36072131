"""``relufy info``: what a model is, from its config alone (parameters counted on the meta device)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel


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
    ffn = sum(
        p.numel()
        for m in model.modules()
        if type(m).__name__ in family.ffn_classes
        for p in m.parameters()
    )
    return total, ffn


def info(path: str | Path) -> ModelInfo:
    from .modeling.spec import base_config
    from .io.source import resolve

    source = resolve(path)
    config = source.config_dict()
    block = config.get("relufy")
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
        activation=block["activation"] if block else "swiglu",
        threshold=block.get("threshold") if block else None,
        layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_size=cfg.intermediate_size,
        params_total=total,
        params_ffn=ffn,
        relufy=block,
        **moe,
    )
