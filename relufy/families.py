"""Supported model families: one table entry each, naming where the gated FFN weights live.

In memory (transformers 5.x modules) an entry names the FFN classes and their layout
(``relufy.modeling.ffn.FFN_LAYOUTS``). On disk it names the FFN containers (module paths, as
regexes) and the config field that gives each container's intermediate size; the tensor
names inside a container are common to all families (``FFN_LEAVES``). Nothing else in relufy
branches on the family.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import RelufyError


def _key(name: str) -> Callable:
    return lambda cfg: getattr(cfg, name)


@dataclass(frozen=True)
class Container:
    """An FFN on disk: ``pattern`` matches its module path; ``size`` gives its intermediate size."""

    pattern: str
    size: Callable
    kind: str = "dense"  # dense | expert | shared


@dataclass(frozen=True)
class Family:
    model_type: str
    prefix: str  # transformers class-name prefix: {prefix}Config, {prefix}ForCausalLM
    ffn_classes: dict[str, str]
    containers: tuple[Container, ...]
    act_key: str = "hidden_act"
    module: str = ""  # transformers.models.<module>; defaults to model_type
    config_class: str = ""  # defaults to {prefix}Config
    routed_experts: Callable | None = None
    shared_experts: Callable = field(default=lambda cfg: 0)
    top_k: Callable | None = None
    moe_ffn_size: Callable | None = None
    shared_attr: str | None = None  # in memory: the MoE block's attribute holding the shared expert(s)
    # in memory: the decoder layer's norm in front of the FFN; its input is the residual stream
    # that sparsity predictors read (relufy.export.calibration)
    ffn_norm: str = "post_attention_layernorm"
    # a dense model of this family has PowerInfer layouts (relufy export --layout powerinfer):
    # ``powerinfer_arch`` says which architecture its activation becomes there
    powerinfer: bool = False

    @property
    def is_moe(self) -> bool:
        return self.routed_experts is not None

    @property
    def config_import(self) -> tuple[str, str]:
        """(module, class) of the transformers config, named without importing transformers."""
        module = self.module or self.model_type
        return f"transformers.models.{module}.configuration_{module}", self.config_class or f"{self.prefix}Config"

    @property
    def model_import(self) -> tuple[str, str]:
        module = self.module or self.model_type
        return f"transformers.models.{module}.modeling_{module}", f"{self.prefix}ForCausalLM"


# Tensor names inside an FFN container -> (role, expected shape from (I, H, E)).
FFN_LEAVES: dict[str, tuple[str, Callable]] = {
    "gate_proj.weight": ("gate", lambda i, h, e: (i, h)),
    "w1.weight": ("gate", lambda i, h, e: (i, h)),
    "up_proj.weight": ("up", lambda i, h, e: (i, h)),
    "w3.weight": ("up", lambda i, h, e: (i, h)),
    "down_proj.weight": ("down", lambda i, h, e: (h, i)),
    "w2.weight": ("down", lambda i, h, e: (h, i)),
    "gate_up_proj.weight": ("gate_up", lambda i, h, e: (2 * i, h)),
    "gate_up_proj": ("gate_up", lambda i, h, e: (e, 2 * i, h)),
    "down_proj": ("down", lambda i, h, e: (e, h, i)),
}

_I = _key("intermediate_size")
_MOE_I = _key("moe_intermediate_size")
_DENSE = (Container(r"layers\.\d+\.mlp", _I),)


def _dense(model_type: str, prefix: str, layout: str = "gated", **kw) -> Family:
    return Family(model_type, prefix, {f"{prefix}MLP": layout}, _DENSE, **kw)


def _experts(prefix: str, size: Callable) -> tuple[Container, ...]:
    # per-expert tensors (the hub layout transformers 5 saves) or fused 3D tensors
    return (Container(prefix + r"\.\d+", size, "expert"), Container(prefix, size, "expert"))


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        _dense("llama", "Llama", powerinfer=True),
        _dense("mistral", "Mistral", powerinfer=True),
        _dense("qwen2", "Qwen2"),
        _dense("qwen3", "Qwen3"),
        _dense("gemma", "Gemma"),
        _dense("gemma2", "Gemma2", act_key="hidden_activation", ffn_norm="pre_feedforward_layernorm"),
        _dense(
            "gemma3_text",
            "Gemma3",
            act_key="hidden_activation",
            module="gemma3",
            config_class="Gemma3TextConfig",
            ffn_norm="pre_feedforward_layernorm",
        ),
        _dense("phi3", "Phi3", layout="fused"),
        Family(
            "mixtral",
            "Mixtral",
            {"MixtralExperts": "experts"},
            _experts(r"layers\.\d+\.block_sparse_moe\.experts", _I) + _experts(r"layers\.\d+\.mlp\.experts", _I),
            routed_experts=_key("num_local_experts"),
            top_k=_key("num_experts_per_tok"),
            moe_ffn_size=_I,
        ),
        Family(
            "qwen2_moe",
            "Qwen2Moe",
            {"Qwen2MoeMLP": "gated", "Qwen2MoeExperts": "experts"},
            _experts(r"layers\.\d+\.mlp\.experts", _MOE_I)
            + (Container(r"layers\.\d+\.mlp\.shared_expert", _key("shared_expert_intermediate_size"), "shared"),)
            + _DENSE,
            routed_experts=_key("num_experts"),
            shared_experts=lambda cfg: int(cfg.shared_expert_intermediate_size > 0),
            top_k=_key("num_experts_per_tok"),
            moe_ffn_size=_MOE_I,
            shared_attr="shared_expert",
        ),
        Family(
            "qwen3_moe",
            "Qwen3Moe",
            {"Qwen3MoeMLP": "gated", "Qwen3MoeExperts": "experts"},
            _experts(r"layers\.\d+\.mlp\.experts", _MOE_I) + _DENSE,
            routed_experts=_key("num_experts"),
            top_k=_key("num_experts_per_tok"),
            moe_ffn_size=_MOE_I,
        ),
        Family(
            "deepseek_v3",
            "DeepseekV3",
            {"DeepseekV3MLP": "gated", "DeepseekV3Experts": "experts"},
            _experts(r"layers\.\d+\.mlp\.experts", _MOE_I)
            + (
                Container(
                    r"layers\.\d+\.mlp\.shared_experts",
                    lambda cfg: cfg.moe_intermediate_size * cfg.n_shared_experts,
                    "shared",
                ),
            )
            + _DENSE,
            routed_experts=_key("n_routed_experts"),
            shared_experts=_key("n_shared_experts"),
            top_k=_key("num_experts_per_tok"),
            moe_ffn_size=_MOE_I,
            shared_attr="shared_experts",
        ),
        Family(
            "olmoe",
            "Olmoe",
            {"OlmoeExperts": "experts"},
            _experts(r"layers\.\d+\.mlp\.experts", _I),
            routed_experts=_key("num_experts"),
            top_k=_key("num_experts_per_tok"),
            moe_ffn_size=_I,
        ),
    )
}

SUPPORTED = ", ".join(FAMILIES)

# PowerInfer's architecture for a dense model's gated activation (its sparse FFN, llama.cpp of
# SJTU-IPADS/PowerInfer: ``LLM_FFN_SYM`` relu(gate) * relu(up) for bamboo, ``LLM_FFN_PAR``
# relu(gate) * up for llama). FATReLU runs as ReGLU there: PowerInfer applies no threshold.
POWERINFER_ARCH = {"drelu": "bamboo", "reglu": "llama", "fatrelu": "llama"}


def powerinfer_arch(family: Family, activation: str) -> str | None:
    """The PowerInfer architecture a ``family`` model with ``activation`` exports to; None: none."""
    if not family.powerinfer or family.is_moe:
        return None
    return POWERINFER_ARCH.get(activation)


def family_for(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise RelufyError(f"unsupported model family {model_type!r}: relufy converts gated-FFN models of {SUPPORTED}")
    return FAMILIES[model_type]


def _leaf_regex(family: Family) -> list[tuple[re.Pattern, Container]]:
    leaves = "|".join(re.escape(leaf) for leaf in FFN_LEAVES)
    return [(re.compile(rf"(?:.*\.)?({c.pattern})\.({leaves})"), c) for c in family.containers]


def ffn_tensor(family: Family, name: str, config) -> tuple[str, tuple[int, ...]] | None:
    """``(role, expected shape)`` when ``name`` is an FFN weight of ``family`` on disk, else None."""
    for regex, container in _leaf_regex(family):
        m = regex.fullmatch(name)
        if m:
            role, shape = FFN_LEAVES[m.group(2)]
            experts = family.routed_experts(config) if family.routed_experts else 0
            return role, tuple(shape(container.size(config), config.hidden_size, experts))
    return None
