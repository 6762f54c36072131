"""Names relufy uses in more than one place, each defined once.

Plain Python (no torch import), so that reading a config or copying a checkpoint stays light.
``relufy.activations.GATED_ACTIVATIONS`` holds the functions under the same names; it cannot
import this module because its source is copied into converted checkpoints (a test keeps the
two in step).
"""

from __future__ import annotations

from typing import NamedTuple

ACTIVATIONS = ("drelu", "reglu", "relu2", "fatrelu", "swiglu")
"""Gated activations a model can be converted to; ``swiglu`` keeps the original (a baseline)."""

ZERO_ACTIVATIONS = ("drelu", "reglu", "relu2", "fatrelu")
"""The activations that give exact zeros: what sparse engines, statistics and predictors need."""

IDENTITY = "swiglu"

SPARSE_MODES = ("off", "exact", "predictor")
"""How a model decodes on CPU: dense, sparse FFNs with the same output, or predicted neurons only."""


class StDtype(NamedTuple):
    """One safetensors dtype: its element size, whether it is a plain float, its torch name."""

    nbytes: int
    is_float: bool  # a plain float: what a --dtype change re-encodes (FP8 kinds are scaled formats, kept as they are)
    torch: str  # the torch attribute, and config.json's ``dtype`` name


ST_DTYPES: dict[str, StDtype] = {
    "F64": StDtype(8, True, "float64"),
    "F32": StDtype(4, True, "float32"),
    "F16": StDtype(2, True, "float16"),
    "BF16": StDtype(2, True, "bfloat16"),
    "I64": StDtype(8, False, "int64"),
    "I32": StDtype(4, False, "int32"),
    "I16": StDtype(2, False, "int16"),
    "I8": StDtype(1, False, "int8"),
    "U8": StDtype(1, False, "uint8"),
    "BOOL": StDtype(1, False, "bool"),
    "F8_E4M3": StDtype(1, False, "float8_e4m3fn"),
    "F8_E5M2": StDtype(1, False, "float8_e5m2"),
    "U16": StDtype(2, False, "uint16"),
    "U32": StDtype(4, False, "uint32"),
    "U64": StDtype(8, False, "uint64"),
}
"""The dtype table: every safetensors dtype relufy reads. Every other dtype map derives from it."""

USER_DTYPES: dict[str, str] = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
"""User-facing dtype name (``--dtype``) -> its safetensors dtype in ``ST_DTYPES``."""

FLOAT_ST_DTYPES = frozenset(st for st, d in ST_DTYPES.items() if d.is_float)
"""The safetensors dtypes a ``--dtype`` change re-encodes."""

_FLOAT_ST_OF_TORCH = {ST_DTYPES[st].torch: st for st in FLOAT_ST_DTYPES}

DTYPES = {name: (st, ST_DTYPES[st].torch) for name, st in USER_DTYPES.items()}
"""User-facing dtype name -> (safetensors dtype, torch / config.json name): derived from ``USER_DTYPES``."""

INDEX_FILE = "model.safetensors.index.json"
MODELING_FILE = "modeling_relufy.py"
PREDICTORS_FILE = "predictors.safetensors"
SPARSITY_FILE = "sparsity.safetensors"


def is_identity(activation: str) -> bool:
    return activation == IDENTITY


def dtype_choice(name: str, allow_keep: bool = True) -> str:
    """``name`` if it is a known dtype (or ``keep``); else a ``ValueError`` listing the choices."""
    if name in USER_DTYPES or (allow_keep and name == "keep"):
        return name
    choices = (["keep"] if allow_keep else []) + list(USER_DTYPES)
    raise ValueError(f"unknown dtype {name!r}; choose from {', '.join(choices)}")


def torch_dtype_of_name(name: str):
    """The torch dtype of a user-facing name (``fp32``, ``bf16``, ``fp16``)."""
    return torch_dtype_of_st(USER_DTYPES[name])


def torch_dtype_of_st(st_dtype: str):
    """The torch dtype of a safetensors dtype (``F32``, ``BF16``, ``I64``, ...)."""
    import torch

    return getattr(torch, ST_DTYPES[st_dtype].torch)


torch_dtype = torch_dtype_of_name
"""The old name of ``torch_dtype_of_name``, kept for its callers."""


def st_dtype_of_torch(dtype) -> str:
    """The safetensors dtype of a float torch dtype (``torch.bfloat16`` or ``"bfloat16"``)."""
    return _FLOAT_ST_OF_TORCH[str(dtype).removeprefix("torch.")]


def dtype_of_config(config: dict) -> str:
    """The user-facing name of a config.json's ``dtype`` / ``torch_dtype`` (fp32 when absent)."""
    value = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return next((k for k, st in USER_DTYPES.items() if ST_DTYPES[st].torch == value), "fp32")
