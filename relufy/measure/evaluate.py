"""``relufy eval``: perplexity, activation sparsity and the paper's top-k curve for one or more models.

Perplexity is ``exp(mean NLL)`` over the predicted tokens (``relufy.text`` says which). Sparsity
is the fraction of exact zeros in each FFN's combined activation (after the activation, before
the down projection), counted on the unmasked pass. For each top-k level ``s`` the data is scored
again with, per token and per FFN (per expert for MoE), only the largest ``1 - s`` fraction of
``|combined activation|`` kept (paper Eq. 3/4); this works for SwiGLU originals and converted
models alike.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel

from ..errors import RelufyError
from ..io.block import RelufyBlock
from ..names import torch_dtype
from ..text import Window, load_texts, second_halves, tokenize, windows
from .options import EvalOptions
from .sites import ActivationCounter, TopKMask, observing
from .stats import Stats


class ModelEval(BaseModel):
    model: str
    family: str
    activation: str
    ppl: float
    nll: float
    tokens: int
    positions: int
    sparsity: dict
    topk: list[dict]
    active_ffn_param_fraction: float
    moe: dict | None = None
    seconds: float
    tokens_per_second: float


def parse_device(name: str) -> torch.device:
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``cuda:N``, ``mps``: one this machine has."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RelufyError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise RelufyError(
            f"--device {name}: this machine has {torch.cuda.device_count() if torch.cuda.is_available() else 'no'} CUDA GPU(s)"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RelufyError(f"--device {name}: MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RelufyError(f"--device {name}: relufy runs on cpu, cuda or mps")
    return device


def _device_dtype(options: EvalOptions) -> tuple[torch.device, torch.dtype]:
    device = parse_device(options.device)
    if options.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, torch_dtype(options.dtype)


def check_model(path: str, options: EvalOptions) -> None:
    """Config-only checks, so that a bad model or option fails before any weights load."""
    from ..io.source import resolve
    from ..modeling.spec import base_config

    _, config = base_config(resolve(path).config_dict())
    limit = getattr(config, "max_position_embeddings", None)
    if limit and options.seq_len > limit:
        raise RelufyError(f"--seq-len {options.seq_len} exceeds the model's context of {limit} tokens ({path})")


def score(model, wins: list[Window], batch_size: int, device, advance=None, top1: list | None = None) -> tuple[float, int]:
    """Sum of token NLL and number of scored tokens; ``advance(positions)`` reports progress;
    ``top1``, when given, receives each batch's next-token argmax (same order for the same windows)."""
    nll, count = 0.0, 0
    groups: dict[int, list[Window]] = {}
    for w in wins:
        groups.setdefault(len(w.input_ids), []).append(w)
    # no_grad, not inference_mode: FSDP2 updates its all-gather buffers in place, which inference
    # tensors forbid, and training's held-out eval scores sharded models through here
    with torch.no_grad():
        for group in groups.values():
            for i in range(0, len(group), batch_size):
                batch = group[i : i + batch_size]
                ids = torch.stack([w.input_ids for w in batch]).to(device)
                labels = torch.stack([w.labels for w in batch]).to(device)
                logits = model(input_ids=ids).logits[:, :-1].float()
                if top1 is not None:
                    top1.append(logits.argmax(-1).cpu())
                target = labels[:, 1:]
                nll += float(
                    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
                )
                count += int((target != -100).sum())
                if advance:
                    advance(ids.numel())
    return nll, count


def evaluate_model(path: str, options: EvalOptions, texts: list[str], progress=None) -> tuple[ModelEval, Stats]:
    from ..modeling.load import load
    from ..modeling.tokenizer import load_tokenizer

    device, dtype = _device_dtype(options)
    tokenizer = load_tokenizer(path)
    model = load(path, dtype=dtype).to(device).eval()
    bos = tokenizer.bos_token_id if options.bos else None
    if options.bos and bos is None:
        raise RelufyError(f"{path}: the tokenizer has no BOS token (drop --bos)")
    ids = tokenize(texts, tokenizer, options.max_tokens)
    if options.windowing == "second-half":
        wins = second_halves(ids, options.seq_len, bos)
    else:
        wins = windows(ids, options.seq_len, options.stride, bos)
    positions = sum(len(w.input_ids) for w in wins)
    levels = [s for s in options.topk if s > 0]
    task = progress.add_task(Path(path).name, total=positions * (1 + len(levels))) if progress else None
    advance = (lambda n: progress.advance(task, n)) if progress else None

    start = time.perf_counter()
    with observing(model, ActivationCounter) as counter:
        nll, count = score(model, wins, options.batch_size, device, advance)
    base_seconds = time.perf_counter() - start
    curve = []
    for s in levels:
        with observing(model, lambda sites, s=s: TopKMask(s)):
            n, c = score(model, wins, options.batch_size, device, advance)
        curve.append({"sparsity": s, "ppl": math.exp(n / c)})
    if 0 in options.topk:
        curve.insert(0, {"sparsity": 0.0, "ppl": math.exp(nll / count)})

    block = RelufyBlock.read(model.config)
    stats = Stats(
        counter.result(),
        positions,
        {
            "model": path,
            "data": options.data,
            "seq_len": options.seq_len,
            "family": block.base_model_type,
            "activation": block.activation,
        },
    )
    per_layer = stats.layer_sparsity()
    fraction, fraction_per_layer = stats.active_param_fraction()
    moe = stats.experts()
    if moe is not None:
        moe["active_ffn_param_fraction_per_layer"] = fraction_per_layer
    result = ModelEval(
        model=str(path),
        family=block.base_model_type,
        activation=block.activation,
        ppl=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        positions=positions,
        sparsity={"mean": sum(per_layer) / len(per_layer), "overall": stats.overall_sparsity(), "per_layer": per_layer},
        topk=curve,
        active_ffn_param_fraction=fraction,
        moe=moe,
        seconds=base_seconds,
        tokens_per_second=positions / base_seconds if base_seconds else float("inf"),
    )
    return result, stats


def evaluate(paths: list[str], options: EvalOptions, show_progress: bool = True) -> list[tuple[ModelEval, Stats]]:
    if not paths:
        raise RelufyError("no model given")
    _device_dtype(options)
    texts = load_texts(options.data)  # bad data or options fail before any model loads
    if not "".join(texts).strip():
        raise RelufyError(f"{options.data}: holds no text")
    for path in paths:
        check_model(str(path), options)
    if show_progress:
        from ..progress import token_progress

        with token_progress() as progress:
            return [evaluate_model(str(p), options, texts, progress) for p in paths]
    return [evaluate_model(str(p), options, texts) for p in paths]
