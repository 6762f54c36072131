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


# a measured figure, written as measured: an int stays an int (no 1 -> 1.0 on a rewrite), an overflowed
# perplexity stays inf (JSON Infinity, as json.dumps writes it)
Number = int | Annotated[float, Field(allow_inf_nan=True)]


class PredictorsInfo(_Block):
    input: Literal["residual", "ffn"] = Field(
        "residual", description="What the predictors read (see relufy.measure.sites.InputTap)."
    )
    threshold: float = Field(0.0, strict=True, description="A neuron is computed when its predictor score is at least this.")
    # the record of ``relufy export`` (relufy.export.layouts.export_block); nothing reads them back
    thresholds: str | None = Field(None, description='"one", or per predictor (in sparsity.safetensors).')
    recall_target: Number | None = None
    recall_of: str | None = None
    mean_recall: Number | None = None
    min_recall: Number | None = None
    heldout_computed: Number | None = Field(None, description="Fraction of neurons computed with the predictors.")
    heldout_missed_active: Number | None = Field(None, description="Fraction of active neurons the predictors dropped.")
    predictor_cost: Number | None = Field(None, description="Predictor multiply-adds per token / the dense FFN's.")
    heldout_ppl_dense: Number | None = None
    heldout_ppl_predicted: Number | None = None
    heldout_top1_agreement: Number | None = None


class ExportInfo(_Block):
    layout: Literal["hf", "powerinfer", "powerinfer-gguf"] = "hf"
    reordered: bool = False
    sparsity: dict = Field(default_factory=dict, description="overall and per-layer zero fraction measured at export.")
    sparsity_file: str = SPARSITY_FILE
    predictors: PredictorsInfo | None = None


class TrainedInfo(_Block):
    """What ``relufy train`` recorded: the model's weights were trained further (a "finetune")."""

    recipe: str = ""
    steps: int | None = None
    tokens: int | None = None


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
    trained: TrainedInfo | None = None
    # where the weights came from (relufy.io.source.Source.provenance): never a local path
    base_model: str | None = Field(None, description="The hub id of the weights, when known.")
    source_revision: str | None = Field(None, description="The hub commit read.")
    license: str | None = Field(None, description="The source card's license.")
    license_name: str | None = None
    license_link: str | None = None
    export: ExportInfo | None = None

    @field_validator("cutoffs", mode="before")
    @classmethod
    def _no_cutoffs(cls, value):
        return {} if value is None else value  # null: none, as the modeling code reads it

    @classmethod
    def create(cls, where: str = "config.json", **fields) -> RelufyBlock:
        """A new block of ``fields`` (declared or not), checked: the one way relufy builds a block."""
        return cls._checked(fields, where)

    def with_updates(self, **changes) -> RelufyBlock:
        """This block with ``changes`` applied, checked again."""
        return self._checked({**self.to_dict(), **changes}, "config.json")

    def without(self, *keys: str) -> RelufyBlock:
        """This block with ``keys`` left out (a declared field back to its default, unwritten)."""
        return self._checked({k: v for k, v in self.to_dict().items() if k not in keys}, "config.json")

    def to_dict(self) -> dict:
        """The plain JSON-able dict that config.json and ``model.config.relufy`` hold: the keys that were given."""
        return self.model_dump(mode="json", exclude_unset=True)

    @classmethod
    def _checked(cls, block: dict, where: str) -> RelufyBlock:
        try:
            return cls.model_validate(block)
        except ValidationError as e:
            loc, msg = first_error(e)
            raise RelufyError(f"{where}: the relufy block's {'.'.join(loc) or '(block)'}: {msg}") from None

    @classmethod
    def read(cls, config, where: str = "config.json") -> RelufyBlock | None:
        """The block of a config dict or a transformers config; None for a model relufy did not write."""
        block = config.get("relufy") if isinstance(config, dict) else getattr(config, "relufy", None)
        if block is None:
            return None
        if not isinstance(block, dict):
            raise RelufyError(f"{where}: the relufy block is not a JSON object")
        return cls._checked(block, where)
