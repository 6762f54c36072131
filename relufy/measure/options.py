"""Options of ``relufy eval`` (field help is the documentation); no torch import, so the command
line is built without loading the model stack."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from ..options import Options, option_field


class EvalOptions(Options):
    """How ``relufy eval`` reads data, scores models and where it writes the results."""

    data: str = option_field(
        description="Text file, .jsonl (text field), .parquet (text column), hub NAME:CONFIG:SPLIT or builtin:pydoc."
    )
    seq_len: int = option_field(512, ge=2, description="Tokens per window (BOS included).")
    stride: int | None = option_field(None, ge=1, description="New tokens scored per window (default: seq-len - 1).")
    windowing: Literal["sliding", "second-half"] = option_field(
        "sliding",
        description="sliding: every token once, with up to seq-len of context (--stride); second-half: back-to-back "
        "windows each scoring its second half, as llama.cpp's and PowerInfer's perplexity do (compare with them).",
    )
    max_tokens: int | None = option_field(None, ge=2, description="Use only the first N tokens of the data.")
    bos: bool = option_field(False, description="Start every window with the tokenizer's BOS token.")
    topk: tuple[float, ...] = option_field((), description="Top-k sparsity levels s in [0, 1) to score, e.g. 0,0.5,0.8,0.85,0.9.")
    batch_size: int = option_field(1, ge=1, description="Windows per forward pass.")
    device: str = option_field("auto", description="auto (cuda when available), cpu, cuda, cuda:N, mps.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option_field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    json_out: str | None = option_field(None, flag="--json", description="Write the results as JSON here.")
    plot: str | None = option_field(None, description="Write PNG plots into this folder.")
    stats_out: str | None = option_field(
        None, description="Write activation counts here (.safetensors; with several models, NAME.i.safetensors each)."
    )

    @field_validator("topk")
    @classmethod
    def _levels(cls, v):
        for s in v:
            if not 0 <= s < 1:
                raise ValueError(f"top-k levels must be in [0, 1), got {s}")
        return tuple(sorted(set(v)))

    @model_validator(mode="after")
    def _stride_slides(self):
        if self.windowing == "second-half" and self.stride is not None:
            raise ValueError("--stride is for --windowing sliding (second-half windows do not overlap)")
        return self

    def scoring(self) -> dict:
        """The options that decide the numbers (outputs left out): what the eval JSON records."""
        return self.model_dump(exclude={"json_out", "plot", "stats_out"})
