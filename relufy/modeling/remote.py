"""The ``config.json`` block and the remote code that make a converted checkpoint load anywhere.

A converted checkpoint keeps the original weights and on-disk names. Its config differs from the
original in four keys: ``model_type`` becomes ``relufy_<family>``, ``architectures`` names the
remote class, ``auto_map`` points at ``modeling_relufy.py`` (written beside the weights), and the
family's activation key (``hidden_act`` or ``hidden_activation``) holds ``relufy_<activation>``,
a name transformers does not know. Loading it without ``trust_remote_code`` therefore fails
(unknown model type; and for the original class, an unknown activation) instead of silently
computing SwiGLU or ReGLU with dReLU weights. The ``relufy`` block holds everything needed to
undo the transformation (``base_config_dict``).

The ``swiglu`` (identity) conversion keeps the original config and only adds the block.
"""

from __future__ import annotations

import ast
from pathlib import Path

from .. import __version__
from ..families import Family
from ..io.block import RelufyBlock
from ..names import MODELING_FILE, is_identity

_REMOTE_KEYS = ("auto_map",)


def relufy_config_dict(
    base: dict, family: Family, activation: str, threshold: float | None, source: str, extra: dict | None = None
) -> dict:
    """The ``config.json`` of a converted checkpoint, from the base model's config dict."""
    out = dict(base)
    if family.act_key not in out:  # left out of config.json: the config class's default applies
        import importlib

        module, name = family.config_import
        out[family.act_key] = getattr(getattr(importlib.import_module(module), name)(), family.act_key)
    out["relufy"] = RelufyBlock.create(
        activation=activation,
        threshold=threshold,
        base_model_type=family.model_type,
        base_architectures=base.get("architectures") or [],
        base_activation=out[family.act_key],
        source=source,
        relufy_version=__version__,
        **(extra or {}),
    ).to_dict()
    if not is_identity(activation):
        out["model_type"] = f"relufy_{family.model_type}"
        out["architectures"] = ["RelufyForCausalLM"]
        out["auto_map"] = {
            "AutoConfig": f"{MODELING_FILE[:-3]}.RelufyConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.RelufyForCausalLM",
        }
        out[family.act_key] = f"relufy_{activation}"
    return out


def base_config_dict(config: dict) -> dict:
    """Undo ``relufy_config_dict``: the original family's config dict (no relufy block)."""
    block = RelufyBlock.read(config)
    if block is None:
        return dict(config)
    from ..families import family_for

    family = family_for(block.base_model_type)
    out = {k: v for k, v in config.items() if k not in ("relufy", *_REMOTE_KEYS)}
    out["model_type"] = block.base_model_type
    out["architectures"] = list(block.base_architectures)
    out[family.act_key] = block.base_activation
    return out


_PACKAGE = Path(__file__).resolve().parents[1]
# Copied into every checkpoint, in this order (read as files: no torch import needed here).
BUNDLED = (_PACKAGE / "activations.py", _PACKAGE / "modeling" / "ffn.py")


def _bundled_source(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines if "relufy-bundle: drop" not in line)


_TAIL = r"""

# ---- generated for model_type {model_type!r} ----
from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping
from {config_module} import {config_class} as _BaseConfig
from {model_module} import {model_class} as _BaseForCausalLM
# the FFN classes swap_ffn replaces: a transformers release without one (DeepseekV3Experts came in 5.13)
# stops here instead of leaving those FFNs on the original activation
from {model_module} import {ffn_imports}  # noqa: F401

BASE_MODEL_TYPE = {model_type!r}
FFN_CLASSES = {ffn_classes!r}
ACTIVATION_KEY = {act_key!r}


class RelufyConfig(_BaseConfig):
    model_type = "relufy_" + BASE_MODEL_TYPE


class RelufyForCausalLM(_BaseForCausalLM):
    config_class = RelufyConfig
    # exports made before predictors left the weight index listed their tensors there
    _keys_to_ignore_on_load_unexpected = [r"\.predictor\."]

    def __init__(self, config, *args, **kwargs):
        block = config.relufy
        with activation_key_as(config, ACTIVATION_KEY, block["base_activation"]):
            super().__init__(config, *args, **kwargs)
        swap_ffn(self, FFN_CLASSES, block["activation"], block.get("threshold"))
        set_cutoffs(self, block.get("cutoffs") or {{}})

    def sparsity_predictors(self):
        '''The sparsity predictors of a relufy export, read from ``predictors.safetensors`` beside the
        weights (kept out of the weight index): ``{{FFN module path: module}}``, the path with ``.E`` for
        routed expert E. A module scores each neuron of its FFN from the layer's input (the residual
        stream); a neuron is predicted active when its score is at least the threshold
        ``sparsity.safetensors`` gives per predictor. Empty when the checkpoint has none.'''
        import torch
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        path = cached_file(self.name_or_path, "predictors.safetensors", _raise_exceptions_for_missing_entries=False)
        if path is None:
            return {{}}
        tensors, out = load_file(path), {{}}
        for name, fc1 in tensors.items():
            if not name.endswith(".predictor.fc1.weight"):
                continue
            key = name[: -len(".predictor.fc1.weight")]
            fc2 = tensors[key + ".predictor.fc2.weight"]
            module = torch.nn.Sequential(
                torch.nn.Linear(fc1.shape[1], fc1.shape[0], bias=False),
                torch.nn.ReLU(),
                torch.nn.Linear(fc2.shape[1], fc2.shape[0], bias=False),
            ).to(fc1.dtype)
            module[0].weight.data.copy_(fc1)
            module[2].weight.data.copy_(fc2)
            out[key] = module.eval().requires_grad_(False)
        return out


# The base family's checkpoint conversions (per-expert tensors on disk -> fused 3D experts in
# memory) are keyed by model_type; remote classes get them only when registered.
_conversions = get_checkpoint_conversion_mapping(BASE_MODEL_TYPE)
if _conversions:
    register_checkpoint_conversion_mapping(RelufyConfig.model_type, _conversions, overwrite=True)
"""


def render_modeling(family: Family) -> str:
    """Source of ``modeling_relufy.py`` for ``family``: imports only torch, transformers and safetensors."""
    config_module, config_class = family.config_import
    model_module, model_class = family.model_import
    header = (
        f'"""Modeling code written by relufy {__version__}: the {family.model_type} architecture of '
        "transformers with its gated FFN activation replaced (see config.json's relufy block).\n\n"
        'Load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)."""\n'
    )
    body = "\n\n".join(_bundled_source(p) for p in BUNDLED)
    tail = _TAIL.format(
        model_type=family.model_type,
        config_module=config_module,
        config_class=config_class,
        model_module=model_module,
        model_class=model_class,
        ffn_classes=dict(family.ffn_classes),
        ffn_imports=", ".join(family.ffn_classes),
        act_key=family.act_key,
    )
    source = header + "\n" + body + "\n" + tail
    ast.parse(source)
    return source


def imported_modules(source: str) -> set[str]:
    """Top-level package names imported by ``source`` (used to check the remote code)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else node.module.split(".")[0])
    return names
