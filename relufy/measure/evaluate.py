"""``relufy eval``: perplexity, activation sparsity and the paper's top-k curve for one or more models,
a training-free threshold baseline, and lm-evaluation-harness benchmarks.

Perplexity is ``exp(mean NLL)`` over the predicted tokens (``relufy.text`` says which). Sparsity
is the fraction of exact zeros in each FFN's combined activation (after the activation, before
the down projection), counted on the unmasked pass. For each top-k level ``s`` the data is scored
again with, per token and per FFN (per expert for MoE), only the largest ``1 - s`` fraction of
``|combined activation|`` kept (paper Eq. 3/4); this works for SwiGLU originals and converted
models alike.

``--threshold-sparsity`` levels (``relufy.measure.threshold``) score the data once more per level
with the entries of ``|combined activation|`` under a per-FFN (per-expert) threshold zeroed, the
thresholds calibrated on the first ``--threshold-calibration-tokens`` tokens of the data; those
tokens are then left out of every scored window (plain, top-k and threshold rows alike), so that
all rows score the same tokens and none of them was seen by the calibration.

``--tasks`` (``relufy.measure.tasks``) runs lm-eval benchmarks on the loaded model, as is and,
with ``--tasks-at-levels``, under each top-k and threshold mask.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from ..errors import RelufyError
from ..io.block import RelufyBlock
from ..names import torch_dtype_of_name
from ..text import Window, load_texts, second_halves, tokenize, windows
from .options import EvalOptions
from .sites import ActivationCounter, TopKMask, observing
from .stats import Stats

DEFAULT_CALIBRATION_TOKENS = 4096


class ModelEval(BaseModel):
    """One model's figures; the perplexity ones are None (and the lists empty) without ``--data``."""

    model: str
    family: str
    activation: str
    ppl: float | None = None
    nll: float | None = None
    tokens: int = 0
    positions: int = 0
    sparsity: dict | None = None
    topk: list[dict] = []
    threshold: list[dict] = []
    calibration: dict | None = None
    active_ffn_param_fraction: float | None = None
    moe: dict | None = None
    seconds: float | None = None
    tokens_per_second: float | None = None
    tasks: dict | None = None
    # per threshold level: site name -> one threshold per expert (kept off the JSON: thousands for a large MoE)
    thresholds: dict | None = Field(None, exclude=True)


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
    return device, torch_dtype_of_name(options.dtype)


def check_model(path: str, options: EvalOptions) -> None:
    """Config-only checks, so that a bad model or option fails before any weights load."""
    from ..io.source import resolve
    from ..modeling.spec import base_config
    from ..modeling.weights import checked_config

    _, config = base_config(checked_config(resolve(path)))
    limit = getattr(config, "max_position_embeddings", None)
    if options.data is not None and limit and options.seq_len > limit:
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


def evaluate_model(
    path: str, options: EvalOptions, texts: list[str] | None, progress=None, manager=None
) -> tuple[ModelEval, Stats | None]:
    """Load ``path`` and measure it: perplexity and the rest on ``texts`` (None: skipped), then
    ``options.tasks`` with the harness's task index ``manager``."""
    from ..modeling.load import load
    from ..modeling.tokenizer import load_tokenizer

    device, dtype = _device_dtype(options)
    tokenizer = load_tokenizer(path)
    model = load(path, dtype=dtype).to(device).eval()
    block = RelufyBlock.read(model.config)
    fields: dict = {"model": str(path), "family": block.base_model_type, "activation": block.activation}
    stats = calibration = None
    if texts is not None:
        stats, calibration = _perplexity(model, tokenizer, path, options, texts, fields, device, progress)
    if options.tasks:
        if progress is not None:
            progress.stop()  # the harness draws its own bars
        try:
            _benchmarks(model, tokenizer, path, options, manager, fields, calibration)
        finally:
            if progress is not None:
                progress.start()
    return ModelEval(**fields), stats


def _perplexity(model, tokenizer, path, options: EvalOptions, texts, fields: dict, device, progress):
    from .threshold import MaskedCounter, ThresholdMask, calibrate, calibration_windows

    bos = tokenizer.bos_token_id if options.bos else None
    if options.bos and bos is None:
        raise RelufyError(f"{path}: the tokenizer has no BOS token (drop --bos)")
    ids = tokenize(texts, tokenizer, options.max_tokens)
    calibration_wins: list[Window] = []
    n_calibration = 0
    if options.threshold_sparsity:
        n = n_calibration = options.threshold_calibration_tokens or min(DEFAULT_CALIBRATION_TOKENS, len(ids) // 4)
        if n < 1 or len(ids) - n < 2:
            raise RelufyError(
                f"--threshold-calibration-tokens: {n} of the {len(ids)} tokens of {options.data} calibrate, which leaves "
                f"{max(len(ids) - n, 0)} to score: give more data or fewer calibration tokens"
            )
        calibration_wins = calibration_windows(ids[:n], options.seq_len, bos)
        ids = ids[n:]
    if options.windowing == "second-half":
        wins = second_halves(ids, options.seq_len, bos)
    else:
        wins = windows(ids, options.seq_len, options.stride, bos)
    positions = sum(len(w.input_ids) for w in wins)
    levels = [s for s in options.topk if s > 0]
    total = positions * (1 + len(levels) + len(options.threshold_sparsity)) + 2 * sum(len(w.input_ids) for w in calibration_wins)
    task = progress.add_task(Path(path).name, total=total) if progress else None
    advance = (lambda n: progress.advance(task, n)) if progress else None

    start = time.perf_counter()
    with observing(model, ActivationCounter) as counter:
        nll, count = score(model, wins, options.batch_size, device, advance)
    base_seconds = time.perf_counter() - start

    def realized(counter) -> dict:
        """The zeros a masked pass left: per layer, their mean and over all layers."""
        masked = Stats(counter.result(), positions, {})
        per_layer = masked.layer_sparsity()
        return {
            "realized": {"mean": sum(per_layer) / len(per_layer), "overall": masked.overall_sparsity(), "per_layer": per_layer},
            "active_ffn_param_fraction": masked.active_param_fraction()[0],
        }

    curve = []
    for s in levels:
        with observing(model, lambda sites, s=s: MaskedCounter(sites, TopKMask(s))) as masked:
            n, c = score(model, wins, options.batch_size, device, advance)
        curve.append({"sparsity": s, "ppl": math.exp(n / c), **realized(masked)})

    calibration, rows = None, []
    if options.threshold_sparsity:
        calibration = calibrate(
            model, options.threshold_sparsity, lambda: score(model, calibration_wins, options.batch_size, device, advance)
        )
        for s in options.threshold_sparsity:
            mask = lambda sites, s=s: MaskedCounter(sites, ThresholdMask(sites, calibration.thresholds[s]))
            with observing(model, mask) as masked:
                n, c = score(model, wins, options.batch_size, device, advance)
            rows.append({"sparsity": s, "ppl": math.exp(n / c), **realized(masked), "calibration_below": calibration.below[s]})
        fields["calibration"] = {
            "tokens": n_calibration,
            "entries": calibration.entries,
            "uncalibrated_experts": calibration.uncalibrated,
        }
        fields["thresholds"] = calibration.thresholds

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
    if 0 in options.topk:  # the model as is
        curve.insert(0, {"sparsity": 0.0, "ppl": math.exp(nll / count), **realized(counter)})
    moe = stats.experts()
    if moe is not None:
        moe["active_ffn_param_fraction_per_layer"] = fraction_per_layer
    fields.update(
        ppl=math.exp(nll / count),
        nll=nll / count,
        tokens=count,
        positions=positions,
        sparsity={"mean": sum(per_layer) / len(per_layer), "overall": stats.overall_sparsity(), "per_layer": per_layer},
        topk=curve,
        threshold=rows,
        active_ffn_param_fraction=fraction,
        moe=moe,
        seconds=base_seconds,
        tokens_per_second=positions / base_seconds if base_seconds else float("inf"),
    )
    return stats, calibration


def _benchmarks(model, tokenizer, path, options: EvalOptions, manager, fields: dict, calibration) -> None:
    """The harness on the model as is and, with ``--tasks-at-levels``, under each top-k and
    threshold mask (level 0 is the model as is: its results are reused)."""
    from ..progress import console, is_quiet
    from .tasks import run_tasks, summarize
    from .threshold import ThresholdMask

    name = Path(path).name or str(path)

    def run(what: str, make_observer=None) -> dict:
        if not is_quiet():
            console.print(f"{name}: lm-eval {','.join(options.tasks)}{what}", highlight=False)
        if make_observer is None:
            return summarize(run_tasks(model, tokenizer, options, manager))
        with observing(model, make_observer):
            return summarize(run_tasks(model, tokenizer, options, manager))

    plain = fields["tasks"] = run("")
    if not options.tasks_at_levels:
        return
    rows = {p["sparsity"]: p for p in fields.get("topk", [])}
    for s in options.topk:
        row = rows.setdefault(s, {"sparsity": s})
        row["tasks"] = plain if s == 0 else run(f" at top-k {s:.0%}", lambda sites, s=s: TopKMask(s))
    fields["topk"] = [rows[s] for s in sorted(rows)]
    for row in fields.get("threshold", []):
        s = row["sparsity"]
        thresholds = calibration.thresholds[s]
        row["tasks"] = (
            plain if s == 0 else run(f" at threshold sparsity {s:.0%}", lambda sites, t=thresholds: ThresholdMask(sites, t))
        )


def evaluate(paths: list[str], options: EvalOptions, show_progress: bool = True) -> list[tuple[ModelEval, Stats | None]]:
    if not paths:
        raise RelufyError("no model given")
    _device_dtype(options)
    texts = None
    if options.data is not None:
        texts = load_texts(options.data)  # bad data or options fail before any model loads
        if not "".join(texts).strip():
            raise RelufyError(f"{options.data}: holds no text")
    for path in paths:
        check_model(str(path), options)
    manager = None
    if options.tasks:
        from .tasks import task_manager

        manager = task_manager(options)  # unknown task names, too, before any model loads
    if show_progress and texts is not None:
        from ..progress import token_progress

        with token_progress() as progress:
            return [evaluate_model(str(p), options, texts, progress, manager) for p in paths]
    return [evaluate_model(str(p), options, texts, None, manager) for p in paths]
