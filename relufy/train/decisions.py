"""The choices a training run makes from its recipe and launch, in one place.

``relufy.train.loop`` acts on them and ``relufy.train.memory`` plans memory from them (``relufy
train --dry-run``): both call these functions, so the plan cannot describe a run that the loop
would set up differently. Plain values in, plain values out (no torch): the plan imports this
without building anything.
"""

from __future__ import annotations

from typing import Literal

# tokens per fit step of the FFN warm start (whole sequences for blocks of layers)
WARMSTART_BATCH_TOKENS = 1024


def teacher_dtype(choice: str | None, sharded: bool) -> Literal["bf16", "fp32"]:
    """The dtype the teacher loads in: ``choice`` is ``sparsity.distill.teacher_dtype`` (auto, fp32
    or bf16), None when the run does not distil (a teacher for the warm start alone: fp32). auto is
    bf16 when the run is sharded (FSDP2), else fp32."""
    if choice is None:
        return "fp32"
    if choice == "auto":
        return "bf16" if sharded else "fp32"
    return "bf16" if choice == "bf16" else "fp32"


def teacher_dtype_choice(sparsity) -> str | None:
    """What the recipe's ``sparsity`` asks of ``teacher_dtype``: None when it does not distil."""
    return sparsity.distill.teacher_dtype if sparsity.distill is not None else None


def loads_teacher(sparsity) -> bool:
    """Whether the run loads the teacher: to distil, or to fit the FFN warm start to it."""
    return sparsity.distill is not None or sparsity.ffn_warmstart is not None


def keeps_teacher(sparsity) -> bool:
    """Whether the teacher stays through the training steps (it distils); else it goes after the warm start."""
    return sparsity.distill is not None


def teacher_path(recipe) -> str | None:
    """Where the teacher loads from: ``sparsity.distill.teacher``, else the student's ``model.path``
    (None: from scratch without a teacher)."""
    distill = recipe.sparsity.distill
    return (distill and distill.teacher) or recipe.model.path


def gradient_checkpointing(recipe) -> bool:
    """Whether the student recomputes each layer's activations in the backward pass."""
    return bool(recipe.model.gradient_checkpointing)


def mixed_precision(recipe) -> Literal["bf16", "no"]:
    """Accelerate's ``mixed_precision``: bf16 autocast over fp32 master weights, or none."""
    return "bf16" if recipe.precision == "bf16" else "no"


def warmstart_sequences(tokens: int, seq_len: int) -> int:
    """The whole ``seq_len`` sequences the FFN warm start records (``ffn_warmstart.tokens`` rounded down, at least one)."""
    return max(1, tokens // seq_len)


def student_activation(activation: str | None, block) -> str:
    """The activation the student trains with: ``model.activation``, else the one its relufy block
    (``block``, a ``RelufyBlock`` or None) records, else the model's own (swiglu)."""
    return activation or (block.activation if block is not None else None) or "swiglu"
