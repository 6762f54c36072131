"""What a conversion is and what a config describes, read without loading weights.

``ActivationSpec`` (the target activation, validated), ``base_config`` (the transformers config of
a config dict, relufy checkpoints included, with its sizes checked) and ``ConfigView`` (cheap
attribute access to a config dict, falling back to the config class's defaults).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import RelufyError
from ..families import Family, family_for
from ..names import ACTIVATIONS
from .remote import base_config_dict


class ActivationSpec(BaseModel):
    """The gated activation a model is converted to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    activation: str = Field(
        "drelu",
        description="drelu: relu(gate)*relu(up); reglu: relu(gate)*up; relu2: relu(gate)^2*up; "
        "fatrelu: gate below `threshold` -> 0, times up; swiglu: keep the original (identity).",
    )
    threshold: float | None = Field(None, description="FATReLU threshold T >= 0 (fatrelu only).")

    @model_validator(mode="after")
    def _check(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATIONS)}")
        if self.activation == "fatrelu" and self.threshold is None:
            raise ValueError("fatrelu needs a threshold (--threshold T)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"the fatrelu threshold must be a finite number, got {self.threshold}")
        if self.activation == "fatrelu" and self.threshold < 0:
            raise ValueError(f"fatrelu threshold must be >= 0, got {self.threshold}")
        if self.activation != "fatrelu" and self.threshold is not None:
            raise ValueError(f"--threshold applies to fatrelu only, not {self.activation}")
        return self


def activation_spec(activation: str, threshold: float | None) -> ActivationSpec:
    try:
        return ActivationSpec(activation=activation, threshold=threshold)
    except ValidationError as e:
        raise RelufyError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def base_config(config: dict):
    """``(family, transformers config)`` of a config dict, relufy checkpoints included."""
    import importlib

    base = base_config_dict(config)
    family = family_for(base.get("model_type"))
    module, name = family.config_import
    try:
        config = getattr(importlib.import_module(module), name).from_dict(base)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise RelufyError(f"config.json is not a valid {family.model_type} config: {e}") from None
    check_sizes(family, {key: getattr(config, key, None) for key in _POSITIVE})
    return family, config


def check_sizes(family: Family, config: dict) -> None:
    """The fields that size the model must be positive whole numbers (or absent)."""
    for key in _POSITIVE:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RelufyError(
                f"config.json is not a valid {family.model_type} config: {key} must be a positive whole number, got {value!r}"
            )


# config fields that size the model: a zero or negative value fails deep inside transformers
_POSITIVE = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
)


class ConfigView:
    """Attribute access to a config dict; a field the file leaves out (so its default applies)
    is read from the transformers config class. Checkpoints written by transformers list every
    field, so the common case never imports transformers (and torch): a plain copy stays fast."""

    def __init__(self, config: dict):
        self._dict = base_config_dict(config)
        self._full = None
        self._source = config

    def __getattr__(self, name):
        if name in self._dict:
            return self._dict[name]
        if self._full is None:
            self._full = base_config(self._source)[1]
        return getattr(self._full, name)
