"""The ``relufy`` block of a converted checkpoint's ``config.json``, as a typed model.

The block records the conversion (the activation, its threshold, the original architecture and
activation, where it came from) and, after ``relufy export``, the export (layout, sparsity,
predictors). It is read in one place, ``RelufyBlock.read``, which checks it: a malformed block
becomes one line naming the field instead of a traceback somewhere later. Numbers the modeling
code reads (``threshold``, ``cutoffs``) must be JSON numbers, not strings or booleans: that code
reads the raw dict, and a cutoff of ``"0.5"`` would fail deep in a forward pass. Unknown keys are
kept (a newer relufy may add some). In memory the block stays a plain dict on ``model.config.relufy``:
the modeling code written into checkpoints reads it there without relufy installed.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import RelufyError
from ..names import ACTIVATIONS, SPARSITY_FILE
from ..options import first_error

CORE_FIELDS = ("activation", "threshold", "base_model_type", "base_architectures", "base_activation", "source", "relufy_version")


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True, allow_inf_nan=False)


class PredictorsInfo(_Block):
    input: Literal["residual", "ffn"] = Field(
        "residual", description="What the predictors read (see relufy.measure.sites.InputTap)."
    )
    threshold: float = Field(0.0, strict=True, description="A neuron is computed when its predictor score is at least this.")


class ExportInfo(_Block):
    layout: Literal["hf", "powerinfer", "powerinfer-gguf"] = "hf"
    reordered: bool = False
    sparsity: dict = Field(default_factory=dict, description="overall and per-layer zero fraction measured at export.")
    sparsity_file: str = SPARSITY_FILE
    predictors: PredictorsInfo | None = None


class RelufyBlock(_Block):
    activation: Literal[ACTIVATIONS]
    threshold: float | None = Field(None, strict=True)
    base_model_type: str
    base_architectures: list[str] = Field(default_factory=list)
    base_activation: str
    source: str = ""
    relufy_version: str = ""
    source_format: str | None = Field(
        None,
        description="The published ReLU-family format the source was read from (relufy.modeling.formats), "
        "e.g. a ProSparse model; none for a SwiGLU source or relufy's own checkpoint.",
    )
    cutoffs: dict[str, Annotated[float, Field(ge=0, strict=True)]] = Field(
        default_factory=dict,
        description="FFN module path -> magnitude cutoff: entries of the combined activation act(gate) * up below it "
        "are zero (ProSparse's final FATReLU shift, `sparsity.final_cutoff` of relufy train); none: no cutoff.",
    )
    export: ExportInfo | None = None

    @field_validator("cutoffs", mode="before")
    @classmethod
    def _no_cutoffs(cls, value):
        return {} if value is None else value  # null: none, as the modeling code reads it

    @classmethod
    def read(cls, config, where: str = "config.json") -> RelufyBlock | None:
        """The block of a config dict or a transformers config; None for a model relufy did not write."""
        block = config.get("relufy") if isinstance(config, dict) else getattr(config, "relufy", None)
        if block is None:
            return None
        if not isinstance(block, dict):
            raise RelufyError(f"{where}: the relufy block is not a JSON object")
        try:
            return cls.model_validate(block)
        except ValidationError as e:
            loc, msg = first_error(e)
            raise RelufyError(f"{where}: the relufy block's {'.'.join(loc) or '(block)'}: {msg}") from None
