"""Names relufy uses in more than one place, each defined once.

Plain Python (no torch import), so that reading a config or copying a checkpoint stays light.
``relufy.activations.GATED_ACTIVATIONS`` holds the functions under the same names; it cannot
import this module because its source is copied into converted checkpoints (a test keeps the
two in step).
"""

from __future__ import annotations

ACTIVATIONS = ("drelu", "reglu", "relu2", "fatrelu", "swiglu")
"""Gated activations a model can be converted to; ``swiglu`` keeps the original (a baseline)."""

ZERO_ACTIVATIONS = ("drelu", "reglu", "relu2", "fatrelu")
"""The activations that give exact zeros: what sparse engines, statistics and predictors need."""

IDENTITY = "swiglu"

SPARSE_MODES = ("off", "exact", "predictor")
"""How a model decodes on CPU: dense, sparse FFNs with the same output, or predicted neurons only."""

DTYPES = {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16")}
"""User-facing dtype name -> (safetensors dtype, torch / config.json name)."""

INDEX_FILE = "model.safetensors.index.json"
MODELING_FILE = "modeling_relufy.py"
PREDICTORS_FILE = "predictors.safetensors"
SPARSITY_FILE = "sparsity.safetensors"


def is_identity(activation: str) -> bool:
    return activation == IDENTITY


def dtype_choice(name: str, allow_keep: bool = True) -> str:
    """``name`` if it is a known dtype (or ``keep``); else a ``ValueError`` listing the choices."""
    if name in DTYPES or (allow_keep and name == "keep"):
        return name
    choices = (["keep"] if allow_keep else []) + list(DTYPES)
    raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(choices)}")


def torch_dtype(name: str):
    """The torch dtype of a user-facing name (``fp32``, ``bf16``, ``fp16``)."""
    import torch

    return getattr(torch, DTYPES[name][1])


def dtype_of_config(config: dict) -> str:
    """The user-facing name of a config.json's ``dtype`` / ``torch_dtype`` (fp32 when absent)."""
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return next((k for k, (_, t) in DTYPES.items() if t == value), "fp32")
