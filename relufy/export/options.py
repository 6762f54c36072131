"""Options of ``relufy export`` (field help is the documentation)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from ..io.hub import PushOptions
from ..names import DTYPES
from ..options import option_field as Field
from .registry import LAYOUTS


class ExportOptions(PushOptions):
    """How ``relufy export`` profiles, reorders, trains predictors and lays out a checkpoint."""

    layout: Literal[tuple(LAYOUTS)] = Field(
        "hf",
        description="hf: safetensors + relufy remote code + sparsity.safetensors (+ predictors in the shards); "
        "powerinfer: the folders PowerInfer's convert.py takes (dense Llama/Mistral dReLU; per expert for MoE); "
        "powerinfer-gguf: model.gguf, the file convert.py makes of them (dense Llama/Mistral dReLU), ready for "
        "PowerInfer, with activation/ beside it for its GPU/CPU neuron split.",
    )
    dtype: Literal[("keep", *DTYPES)] = Field(
        "keep",
        description="Weight dtype of OUT (keep: the model's own); with powerinfer-gguf the weights are rounded to it "
        "before --gguf-type, as convert.py reads them from the powerinfer layout.",
    )
    gguf_type: Literal["f16", "q8_0", "f32"] = Field(
        "f16",
        description="--layout powerinfer-gguf: type of the matrices, predictors included (convert.py --outtype; "
        "norms stay f32). q8_0 keeps f16 for the down projections (PowerInfer's CPU kernel for them reads f16 or q4_0 "
        "only) and for a matrix whose rows are not a multiple of 32 (a predictor rank of 48, say).",
    )
    stats: str | None = Field(None, description="Statistics from `relufy eval --stats-out` (the model's own neuron order).")
    data: str | None = Field(
        None,
        description="Calibration text (same specs as `relufy eval --data`): profiles the model "
        "when --stats is not given, and trains and scores predictors.",
    )
    seq_len: int = Field(512, ge=2, description="Tokens per calibration window.")
    max_tokens: int | None = Field(32768, ge=2, description="Calibration tokens read from --data (None: all).")
    heldout_fraction: float = Field(
        0.1, gt=0, lt=1, description="Last fraction of calibration windows held out to score predictors."
    )
    reorder: bool = Field(False, description="Permute each FFN's neurons (per expert) hottest first; the function is unchanged.")
    predictors: bool = Field(False, description="Train a predictor fc2(relu(fc1(x))) per FFN (per expert).")
    predictor_input: Literal["residual", "ffn"] = Field(
        "residual",
        description="residual: the residual stream entering the FFN's norm (PowerInfer's convention); ffn: the FFN's input.",
    )
    predictor_rank: int | None = Field(None, ge=1, description="Rank of every predictor; None: per layer from its sparsity.")
    predictor_budget: float = Field(
        0.5, gt=0, description="Automatic rank: predictor cost as a fraction of the FFN work left at the layer's sparsity."
    )
    predictor_threshold: float = Field(
        0.0,
        description="A neuron is predicted active when its score >= this (PowerInfer's sparse_threshold); "
        "used for every predictor when --predictor-recall is 0.",
    )
    predictor_recall: float = Field(
        0.95,
        ge=0,
        le=1,
        description="Per predictor, the highest threshold that keeps this fraction of the active neurons (by count or "
        "magnitude: --predictor-recall-of) on the first "
        "half of the held-out windows (the second half is scored); 0: one --predictor-threshold for all.",
    )
    predictor_recall_of: Literal["neurons", "magnitude"] = Field(
        "magnitude",
        description="What --predictor-recall counts: neurons (the share of active neurons kept) or magnitude "
        "(the share of their summed |activation| kept: small activations may go, large ones stay).",
    )
    predictor_magnitude_power: float = Field(
        1.0,
        ge=0,
        description="Weight a missed active neuron by |activation|^p in the loss (average weight unchanged); 0: count only.",
    )
    predictor_init: Literal["weights", "random"] = Field(
        "weights",
        description="weights: start each predictor from its FFN's gate and up weights (their best rank-r linear "
        "estimate from the predictor input, fitted on the calibration rows), then train; random: a random start.",
    )
    predictor_steps: int = Field(3000, ge=1, description="Adam steps per predictor.")
    predictor_lr: float = Field(1e-3, gt=0, description="Adam learning rate (cosine to a tenth).")
    predictor_batch: int = Field(1024, ge=1, description="Tokens per predictor training step.")
    predictor_pos_weight: float | None = Field(
        None, gt=0, description="Weight of active neurons in the BCE; None: negatives/positives of the layer."
    )
    predictor_tokens: int = Field(
        32768,
        ge=16,
        description="At most this many training tokens per predictor (kept on disk beside OUT, "
        "2 x hidden + FFN width bytes each; one predictor's are in memory at a time).",
    )
    min_expert_tokens: int = Field(32, ge=1, description="Experts routed fewer calibration tokens get an all-active predictor.")
    eval_json: str | None = Field(None, description="`relufy eval --json` output to quote in the model card.")
    batch_size: int = Field(1, ge=1, description="Windows per forward pass while profiling.")
    device: str = Field("auto", description="auto (cuda when available), cpu, cuda, cuda:N.")
    seed: int = Field(0, description="Seed of predictor initialisation and sampling.")
    max_shard_size: str = Field(
        "5GB",
        description="Largest safetensors shard written: a number and a unit, KB, MB, GB or TB (powers of 1000, as "
        "save_pretrained reads them), at least 1MB; a tensor larger than this gets a shard of its own.",
    )
    force: bool = Field(False, description="Replace an existing OUT (never an input: the model, or a folder around it).")
    json_out: str | None = Field(None, flag="--json", description="Write the export summary (JSON) here.")

    @field_validator("max_shard_size", mode="before")
    @classmethod
    def _shard_size(cls, value):
        """Checked now, not after profiling: ``5GB``, ``500MB``, ``1.5GB`` (normalized to upper case)."""
        m = _SIZE.fullmatch(str(value))
        if m is None:
            raise ValueError(f"{value!r} is not a size such as 500MB or 5GB (a number and KB, MB, GB or TB)")
        number, unit = m.group(1), m.group(2).upper()
        if float(number) * _UNITS[unit] < MIN_SHARD_BYTES:
            raise ValueError(f"{value!r} is below the smallest shard size, 1MB")
        return f"{number}{unit}"


_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}  # huggingface_hub's parse_size_to_int
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]B)\s*", re.IGNORECASE)
MIN_SHARD_BYTES = 10**6  # smaller shards only multiply files: one per tensor, thousands for a 7B model
