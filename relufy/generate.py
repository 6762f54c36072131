"""``relufy generate``: a short generation from any model relufy reads, with tokens/s."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from .errors import RelufyError
from .io.block import PredictorsInfo, RelufyBlock
from .io.hub import check_revision, revision_field, token_field
from .names import PREDICTORS_FILE, SPARSE_MODES, ZERO_ACTIVATIONS
from .options import Options, option_field


class GenerateOptions(Options):
    """How ``relufy generate`` decodes."""

    prompt: str = option_field("What is the capital of France?", description="The user message.")
    max_new_tokens: int = option_field(32, ge=1, description="Tokens to generate (greedy).")
    chat: bool = option_field(True, description="Wrap the prompt in the tokenizer's chat template (when it has one).")
    sparse: Literal[SPARSE_MODES] = option_field(
        "off", description="off: dense; exact: sparse CPU FFNs, same output; predictor: predicted neurons only (hf exports)."
    )
    revision: str | None = revision_field()
    token: str | None = token_field("reading gated or private models")

    @field_validator("revision")
    @classmethod
    def _revision(cls, value):
        return check_revision(value)


@dataclass(frozen=True)
class Generation:
    text: str
    new_tokens: int
    seconds: float
    token_times: tuple[float, ...] = ()  # seconds from the start at which each new token came out

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first per second of decoding (the prompt's prefill excluded)."""
        if len(self.token_times) < 2 or self.token_times[-1] <= self.token_times[0]:
            return float("nan")
        return (len(self.token_times) - 1) / (self.token_times[-1] - self.token_times[0])

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def sparse_context(model, path: str | Path, sparse: str):
    """The ``relufy.sparse.engine.sparse_decoding`` context for ``--sparse off|exact|predictor``."""
    import contextlib

    from .sparse.engine import MODES, sparse_decoding

    if sparse not in MODES:
        raise RelufyError(f"--sparse must be one of {', '.join(MODES)}, got {sparse!r}")
    if sparse == "off":
        return contextlib.nullcontext({})
    block = RelufyBlock.read(model.config)
    activation = block.activation if block else "swiglu"
    if activation not in ZERO_ACTIVATIONS:
        raise RelufyError(f"{path}: --sparse needs a ReLU-family model with exact zeros; this one computes {activation}")
    if sparse == "exact":
        return sparse_decoding(model, "exact")
    export = block.export
    if export is not None:
        from .export.registry import layout_named

        layout = layout_named(export.layout)
        if not layout.relufy_predictors:
            raise RelufyError(layout.predictors_elsewhere(path))
    if not (Path(path) / PREDICTORS_FILE).is_file():
        raise RelufyError(f"{path}: no predictors.safetensors (make them with relufy export --predictors)")
    from .modeling.predictor import load_predictors
    from .sparse.engine import predictor_thresholds

    info = (export.predictors if export else None) or PredictorsInfo()
    per_predictor = predictor_thresholds(path, model)  # None: an export with one threshold for all
    threshold = per_predictor if per_predictor is not None else info.threshold
    return sparse_decoding(model, "predictor", load_predictors(path), threshold, info.input)


def generate(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 32,
    chat: bool = True,
    model=None,
    sparse: str = "off",
    min_new_tokens: int = 0,
    revision: str | None = None,
    token: str | None = None,
) -> Generation:
    """Greedy generation; ``chat`` wraps the prompt in the tokenizer's chat template if it has one;
    ``sparse`` (off, exact, predictor) decodes new tokens through the sparse CPU FFNs. ``revision``
    and ``token`` are for hub ids (``org/name@revision`` works too)."""
    import torch

    from .io.source import resolve
    from .modeling.load import load
    from .modeling.tokenizer import load_tokenizer

    if model is None and (revision is not None or token is not None):
        source = resolve(path, revision, token)  # downloaded once; then read as a local folder
        path = source.folder / source.gguf_file if source.gguf_file else source.folder

    tokenizer = load_tokenizer(path)
    model = model if model is not None else load(path, dtype=torch.float32).eval()
    if chat and tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[-1] == 0:
        raise RelufyError("the prompt is empty: give --prompt TEXT (or keep the chat template, which adds its own tokens)")
    clock = _TokenClock()
    with torch.no_grad(), sparse_context(model, path, sparse):
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
            streamer=clock,
        )
    seconds = time.perf_counter() - clock.start
    new = out[0, ids.shape[1] :]
    return Generation(tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds, tuple(clock.times))


class _TokenClock:
    """A transformers streamer that notes when each new token comes out (the first ``put`` is the
    prompt), so decoding speed is read within one generation, prefill excluded."""

    def __init__(self):
        self.start = time.perf_counter()
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self):
        pass
