"""Sparse models trained elsewhere: which function a checkpoint relufy did not write computes.

Many users already hold a ReLU-family model: ReluLLaMA (a Llama with ``hidden_act: relu``),
ProSparse (FATReLU with a threshold), Bamboo (dReLU, with its own modeling code), or their own
ReLU fine-tune. relufy reads such a checkpoint as the relufy checkpoint that computes the same
function (a relufy ``config.json`` in memory, the weights untouched), so ``convert`` keeps its
function by default and ``export``, ``eval``, ``generate`` and ``info`` take it directly.

Hand-written: no library maps these formats onto gated activations. What each computes, from its
published config and modeling code:

- a supported family with its activation key set to ``relu``: ``act(gate) * up`` is ReGLU
  (ReluLLaMA; ProSparse's ``-llama-format`` releases; a user's ReLU fine-tune); ``relu2``
  (transformers' squared ReLU) is relufy's ``relu2``;
- ``model_type: sparsellama`` (ProSparse-Llama-2, ``SparseLlamaForCausalLM``): a Llama whose
  ``hidden_act: fatrelu`` keeps gate values ``>= hidden_act_param`` (its ``fat_relu``:
  ``torch.ge(x, t)``), times up: relufy's ``fatrelu`` with that threshold (ReGLU when it is 0);
- ``model_type: bamboo`` (Bamboo-base / -DPO, ``BambooForCausalLM``): a Mistral whose FFN is
  ``down(relu(gate) * relu(up))``: dReLU.

Recognised and refused, since their function needs code relufy does not have:

- a ``bamboo`` checkpoint with predictor tensors inside its FFNs (TurboSparse-Mistral): its
  modeling code feeds them in the FFN's forward pass; ``--activation drelu`` reads it as the dense
  dReLU model those predictors approximate (their tensors are then ignored);
- ``turbosparsemixtral``: each expert's output is multiplied by its predictor's rounded mask;
- ``minicpm`` (ProSparse-MiniCPM, MiniCPM-S): MiniCPM's embedding, residual and logit scalings;
- a ReLU FFN with a gate and a down projection but no up projection (SparseLLM's relu / relu2
  ablation models): not gated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection
from dataclasses import dataclass

from ..errors import RelufyError
from ..families import FAMILIES, Family
from ..io.block import RelufyBlock
from .remote import relufy_config_dict

# a supported family's activation key -> the relufy activation its gated FFN then computes
STOCK_ACTIVATIONS = {"relu": "reglu", "relu2": "relu2"}
# ReLU variants relufy has no activation for
_NO_EQUIVALENT = {"relu6": "ReLU capped at 6", "fatrelu": "FATReLU without its model's threshold"}
# the model types of the published formats (recognise): read before a family is asked for
FORMAT_TYPES = ("sparsellama", "bamboo", "turbosparsemixtral", "minicpm")
_NAMES = {"reglu": "ReGLU", "relu2": "ReLU²-gated", "fatrelu": "FATReLU", "drelu": "dReLU"}
_FFN_PREDICTOR = re.compile(r"(?:^|\.)layers\.\d+\.mlp\.predictor\.")
_GATE = re.compile(r"^(.*\.mlp)\.gate_proj\.weight$")


@dataclass(frozen=True)
class Recognised:
    """A ReLU-family source read as relufy would have converted it."""

    format: str  # what messages and model cards call it
    activation: str  # the relufy activation that computes its FFN
    threshold: float | None
    family: Family
    base: dict  # the stock family config dict (the source's own keys, its format's removed)
    exact: bool = True  # False: relufy computes another function; ``why`` says which
    why: str = ""

    def config(self, source: str) -> dict:
        """The relufy ``config.json`` (dict) that computes this source's function."""
        extra = {"source_format": self.format}
        return relufy_config_dict(self.base, self.family, self.activation, self.threshold, source, extra)


def recognise(config: dict, names: Collection[str] | None = None, where: str = "the model") -> Recognised | None:
    """The ReLU-family format of a config dict (``names``: the tensor names its weights hold, when
    known); None for a model relufy converts as usual (SwiGLU and kin) or a relufy checkpoint.
    A recognised format whose function relufy cannot compute is refused in one line."""
    if not isinstance(config, dict) or RelufyBlock.read(config, where) is not None:
        return None
    model_type = config.get("model_type")
    act = config.get("hidden_act")
    names = set(names or ())
    if model_type == "sparsellama":
        return _sparsellama(config, act, names, where)
    if model_type == "bamboo":
        return _bamboo(config, act, names, where)
    if model_type == "turbosparsemixtral":
        raise RelufyError(
            f"{where}: a TurboSparse-Mixtral model (TurboSparseMixtralForCausalLM): its experts multiply their output by "
            "their predictors' rounded masks inside the forward pass, which no relufy family computes; not read"
        )
    if model_type == "minicpm" and act in (*STOCK_ACTIVATIONS, "fatrelu"):
        raise RelufyError(
            f"{where}: a MiniCPM {act} model (ProSparse-MiniCPM, MiniCPM-S): its embedding, residual and logit scalings "
            "need MiniCPM's own modeling code, which relufy does not have; a '-llama-format' release of it loads as Llama"
        )
    family = FAMILIES.get(model_type)
    if family is None:
        return None
    value = config.get(family.act_key)
    if value in _NO_EQUIVALENT:
        raise RelufyError(
            f"{where}: {family.act_key} {value!r} ({_NO_EQUIVALENT[value]}) has no relufy activation; "
            f"relufy reads ReLU-family {family.model_type} models with {family.act_key} relu or relu2"
        )
    activation = STOCK_ACTIVATIONS.get(value)
    if activation is None:
        return None
    _check_gated(names, where)
    base = {k: v for k, v in config.items() if k != "auto_map"}
    label = f"a {_NAMES[activation]} {family.model_type} model ({family.act_key}: {value})"
    return Recognised(label, activation, None, family, base)


def as_relufy(config: dict, source: str = "", where: str = "the model") -> dict:
    """A config dict as relufy reads it: a ReLU-family model's as the relufy config of its function
    (its weights' tensor names unseen: ``relufy.modeling.weights.checked_config`` checks those)."""
    found = recognise(config, None, where)
    return config if found is None else found.config(source)


def read_config(source) -> dict:
    """``as_relufy`` of a resolved source's ``config.json`` (a GGUF's config as it is)."""
    config = source.config_dict()
    return config if source.gguf_file else as_relufy(config, source.label, source.where)


def _stock(config: dict, family: Family, act: str) -> dict:
    """The source's config as its stock family's: model type, class and a transformers activation."""
    out = {k: v for k, v in config.items() if k not in ("auto_map", "hidden_act_param")}
    out.update(model_type=family.model_type, architectures=[f"{family.prefix}ForCausalLM"], hidden_act=act)
    return out


def _sparsellama(config: dict, act, names: set[str], where: str) -> Recognised:
    family = FAMILIES["llama"]
    _check_gated(names, where)
    if act in STOCK_ACTIVATIONS:
        label = f"a ProSparse {act} model (SparseLlamaForCausalLM)"
        return Recognised(label, STOCK_ACTIVATIONS[act], None, family, _stock(config, family, act))
    threshold = config.get("hidden_act_param")
    if act != "fatrelu" or not _number(threshold) or threshold < 0:
        raise RelufyError(
            f"{where}: a ProSparse model (SparseLlamaForCausalLM) with hidden_act {act!r} and hidden_act_param "
            f"{threshold!r}: relufy reads hidden_act fatrelu with a threshold >= 0, relu or relu2"
        )
    base = _stock(config, family, "relu")
    if threshold == 0:  # FATReLU at 0 is ReLU
        return Recognised("a ProSparse model (SparseLlamaForCausalLM, FATReLU threshold 0)", "reglu", None, family, base)
    label = f"a ProSparse model (SparseLlamaForCausalLM, FATReLU threshold {threshold:g})"
    return Recognised(label, "fatrelu", float(threshold), family, base)


def _bamboo(config: dict, act, names: set[str], where: str) -> Recognised:
    family = FAMILIES["mistral"]
    if act != "relu":
        raise RelufyError(f"{where}: a Bamboo model (BambooForCausalLM) with hidden_act {act!r}: relufy reads relu (dReLU)")
    _check_gated(names, where)
    base = _stock(config, family, "relu")
    predictors = sorted(n for n in names if _FFN_PREDICTOR.search(n))
    if not predictors:
        return Recognised("a Bamboo dReLU model (BambooForCausalLM)", "drelu", None, family, base)
    why = (
        f"a TurboSparse-Mistral model (BambooForCausalLM with {len(predictors)} predictor tensors in its FFNs, e.g. "
        f"{predictors[0]}): its modeling code applies those predictors inside the FFN, which relufy does not compute"
    )
    return Recognised("a TurboSparse-Mistral model (BambooForCausalLM)", "drelu", None, family, base, exact=False, why=why)


def _check_gated(names: set[str], where: str) -> None:
    for name in sorted(names):
        m = _GATE.match(name)
        if m and f"{m.group(1)}.up_proj.weight" not in names:
            raise RelufyError(
                f"{where}: {m.group(1)} has a gate and a down projection but no up projection: a non-gated ReLU FFN "
                "(as in SparseLLM's relu and relu2 ablation models), which relufy's gated families do not describe"
            )


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def describe(activation: str, threshold: float | None) -> str:
    """How a message names an activation: ``FATReLU (threshold 0.01)``, ``ReGLU``."""
    name = _NAMES.get(activation, activation)
    return f"{name} (threshold {threshold:g})" if threshold is not None else name
