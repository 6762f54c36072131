"""Options of ``relufy eval`` (field help is the documentation); no torch import, so the command
line is built without loading the model stack."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator, model_validator

from ..options import Options, option_field


class EvalOptions(Options):
    """How ``relufy eval`` reads data, scores models and where it writes the results."""

    data: str | None = option_field(
        None,
        description="Perplexity text: a text file, .jsonl (text field), .parquet (text column), hub NAME:CONFIG:SPLIT or "
        "builtin:pydoc (needed unless --tasks is given).",
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
    threshold_sparsity: tuple[float, ...] = option_field(
        (),
        description="Training-free baseline (TEAL/CATS style), levels s in [0, 1), e.g. 0.5,0.8: per FFN (per expert) a "
        "threshold t on |act(gate) * up| calibrated so that a fraction s of the calibration tokens' entries fall below it; "
        "the scored windows are run with entries under t zeroed and the realized sparsity is reported.",
    )
    threshold_calibration_tokens: int | None = option_field(
        None,
        ge=1,
        description="With --threshold-sparsity: the first N tokens of --data calibrate the thresholds and are left out of "
        "every scored window (plain, top-k and threshold rows alike); default 4096, or a quarter of the tokens if fewer.",
    )
    tasks: tuple[str, ...] = option_field(
        (),
        description="lm-evaluation-harness tasks or groups to run on each model, e.g. hellaswag,arc_easy, or task YAML files "
        "(needs the optional lm-eval package, relufy's eval extra).",
    )
    tasks_path: str | None = option_field(None, description="Folder of extra lm-eval task YAMLs (your own tasks).")
    num_fewshot: int | None = option_field(
        None, ge=0, description="Few-shot examples per --tasks question (default: the task's own)."
    )
    limit: int | None = option_field(None, ge=1, description="Run only the first N examples of each --tasks task (a quick look).")
    tasks_at_levels: bool = option_field(
        False, description="Also run --tasks at every --topk and --threshold-sparsity level (one harness run per level)."
    )
    batch_size: int = option_field(1, ge=1, description="Windows (and --tasks requests) per forward pass.")
    device: str = option_field("auto", description="auto (cuda when available), cpu, cuda, cuda:N, mps.")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = option_field("auto", description="auto: bf16 on GPU, fp32 on CPU.")
    json_out: str | None = option_field(None, flag="--json", description="Write the results as JSON here.")
    plot: str | None = option_field(None, description="Write PNG plots into this folder.")
    stats_out: str | None = option_field(
        None, description="Write activation counts here (.safetensors; with several models, NAME.i.safetensors each)."
    )

    @field_validator("topk", "threshold_sparsity")
    @classmethod
    def _levels(cls, v, info):
        what = "top-k" if info.field_name == "topk" else "threshold sparsity"
        for s in v:
            if not 0 <= s < 1:
                raise ValueError(f"{what} levels must be in [0, 1), got {s}")
        return tuple(sorted(set(v)))

    @field_validator("tasks")
    @classmethod
    def _unique_tasks(cls, v):
        return tuple(dict.fromkeys(v))

    @model_validator(mode="after")
    def _needs(self):
        """Each option only with what it applies to (one line naming both flags)."""
        if self.data is None and not self.tasks:
            raise ValueError("give --data (perplexity) and/or --tasks (lm-eval benchmarks)")
        if self.data is None:
            for name, given in (
                ("--threshold-sparsity", self.threshold_sparsity),
                ("--stats-out", self.stats_out),
                ("--plot", self.plot),
                ("--max-tokens", self.max_tokens),
                ("--stride", self.stride),
            ):
                if given:
                    raise ValueError(f"{name} applies to the perplexity text: give --data")
            if self.topk and not self.tasks_at_levels:
                raise ValueError("--topk scores --data (or --tasks with --tasks-at-levels): give one of them")
        if self.threshold_calibration_tokens is not None and not self.threshold_sparsity:
            raise ValueError("--threshold-calibration-tokens applies to --threshold-sparsity")
        if not self.tasks:
            for name, given in (
                ("--tasks-path", self.tasks_path),
                ("--num-fewshot", self.num_fewshot is not None),
                ("--limit", self.limit),
                ("--tasks-at-levels", self.tasks_at_levels),
            ):
                if given:
                    raise ValueError(f"{name} applies to --tasks")
        if self.tasks_at_levels and not (self.topk or self.threshold_sparsity):
            raise ValueError("--tasks-at-levels needs --topk and/or --threshold-sparsity levels")
        return self

    @model_validator(mode="after")
    def _stride_slides(self):
        if self.windowing == "second-half" and self.stride is not None:
            raise ValueError("--stride is for --windowing sliding (second-half windows do not overlap)")
        return self

    def scoring(self) -> dict:
        """The options that decide the numbers (outputs left out): what the eval JSON records."""
        return self.model_dump(exclude={"json_out", "plot", "stats_out"})
