"""``relufy export``: statistics, neuron reordering, predictors and an engine-ready layout.

Steps, all in memory until the final atomic write of OUT:

1. checks on the config and options (bad input fails before weights load);
2. activation statistics, from ``--stats`` or by profiling ``--data``;
3. ``--reorder``: every FFN (per expert) permuted hottest first (``relufy.export.reorder``);
4. ``--predictors``: calibration inputs and labels collected on the first windows of ``--data``,
   one predictor trained per FFN / expert, then recall, precision and predicted sparsity read
   on the held-out windows, with the held-out perplexity of the dense model and of the model
   that computes only the predicted neurons;
5. the layout (``relufy.export.layouts``), model card and plot, written to a temporary folder
   renamed to OUT.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RelufyError, notice
from ..families import FAMILIES, family_for, powerinfer_arch
from ..io.block import RelufyBlock
from ..names import ZERO_ACTIVATIONS
from .options import ExportOptions

POWERINFER_ROPE = ("default", "linear", "yarn")


@dataclass
class ExportResult:
    out: Path
    layout: str
    sparsity: dict
    reordered: bool
    predictors: list[dict] = field(default_factory=list)  # per predictor: layer, kind, expert, rank, metrics
    ppl_dense: float | None = None
    ppl_predicted: float | None = None
    predicted_kept: float | None = None  # fraction of neurons computed with predictors
    missed_active: float | None = None  # fraction of active neurons the predictors dropped
    top1_agreement: float | None = None  # next-token argmax equal with predicted neurons only vs dense
    heldout_tokens: int = 0  # tokens of the report windows (every held-out figure is read there)
    tune_tokens: int = 0  # tokens of the windows that picked the per-predictor thresholds
    predictor_recall: float | None = None  # the recall each predictor's threshold was set to reach (None: one threshold)
    min_recall: float | None = None  # lowest held-out recall over predictors
    predictor_cost: float | None = None  # predictor multiply-adds per token / the dense FFN's
    seconds: float = 0.0

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def check_export(path: str, options: ExportOptions) -> tuple[dict, object]:
    """Config-level checks; returns the model's config dict and family."""
    from ..io.source import resolve
    from ..modeling.weights import checked_config

    config = checked_config(resolve(path))
    block = RelufyBlock.read(config, path)
    if block is None:
        raise RelufyError(
            f"{path}: a {config.get('model_type')} model with {_activation_of(config)}, which gives no exact zeros: "
            "convert it first (relufy convert)"
        )
    family = family_for(block.base_model_type)
    activation = block.activation
    if activation not in ZERO_ACTIVATIONS:
        raise RelufyError(
            f"{path}: activation {activation} gives no exact zeros; export needs a ReLU-family model "
            f"({', '.join(ZERO_ACTIVATIONS)}) for sparsity statistics and predictors"
        )
    if options.stats is None and options.data is None:
        raise RelufyError("export needs activation statistics: give --stats FILE or --data SPEC")
    if options.predictors and options.data is None:
        raise RelufyError("--predictors needs calibration text: give --data SPEC")
    if options.gguf_type != "f16" and options.layout != "powerinfer-gguf":
        raise RelufyError(f"--gguf-type applies to --layout powerinfer-gguf (this export's layout is {options.layout})")
    if options.layout in ("powerinfer", "powerinfer-gguf"):
        layout = options.layout
        if not options.predictors:
            raise RelufyError(
                f"layout {layout} needs predictors (PowerInfer's converter takes a predictor folder): add --predictors"
            )
        if not family.is_moe or layout == "powerinfer-gguf":
            arch = powerinfer_arch(family, activation)
            if arch is None:
                takes = "/".join(f.model_type for f in FAMILIES.values() if f.powerinfer)
                other = " (or --layout powerinfer: per-expert predictor folders)" if family.is_moe else ""
                raise RelufyError(
                    f"layout {layout} takes dense dReLU models (PowerInfer's bamboo architecture) and ReGLU or FATReLU "
                    f"models (its llama architecture) of {takes}; this is a {activation} {family.model_type} model: "
                    f"use --layout hf{other}"
                )
            if activation == "fatrelu":
                notice(
                    f"layout {layout}: PowerInfer's llama architecture computes relu(gate) * up with no threshold, so gate "
                    f"values below this model's FATReLU threshold {block.threshold:g} count there when a predictor selects "
                    "their neuron (--layout hf keeps the threshold)"
                )
            rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            if rope_type not in POWERINFER_ROPE:
                raise RelufyError(
                    f"layout {layout}: PowerInfer's converter cannot take rope type {rope_type!r} "
                    f"(only {', '.join(POWERINFER_ROPE)})"
                )
            if options.predictor_input != "residual":
                raise RelufyError(
                    f"layout {layout}: PowerInfer feeds its predictors the residual stream entering the FFN norm; "
                    f"drop --predictor-input {options.predictor_input}"
                )
            heads, hidden_size = config.get("num_attention_heads"), config.get("hidden_size")
            head_dim = config.get("head_dim")
            if head_dim and heads and hidden_size and head_dim * heads != hidden_size:
                raise RelufyError(
                    f"layout {layout}: PowerInfer takes head_dim = hidden_size / num_attention_heads "
                    f"({hidden_size} / {heads}); this model's head_dim is {head_dim}"
                )
            biases = [k for k in ("attention_bias", "mlp_bias") if config.get(k)]
            if biases:
                raise RelufyError(
                    f"layout {layout}: PowerInfer's {arch} architecture has no biases; this model has {' and '.join(biases)}"
                )
    hidden = config.get("hidden_size")
    if options.predictors and options.predictor_rank and isinstance(hidden, int) and options.predictor_rank > hidden:
        raise RelufyError(
            f"--predictor-rank {options.predictor_rank} exceeds the model's hidden size {hidden} (no cheaper than the FFN's gate)"
        )
    if options.eval_json is not None:
        from .card import read_eval

        read_eval(options.eval_json)  # read again for the card: checked here, before any work
    return config, family


def _activation_of(config: dict) -> str:
    act = config.get("hidden_act", config.get("hidden_activation"))
    return f"activation {act}" if isinstance(act, str) else "its default activation"


def _site_sparsity(counts: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    width = counts.shape[1]
    return [1 - int(counts[e].sum()) / (int(tokens[e]) * width) if tokens[e] else float("nan") for e in range(counts.shape[0])]


def split_windows(wins: list, options: ExportOptions) -> dict[str, list]:
    """Calibration windows for predictors: ``train`` (the first ones), then the held-out ones: with
    ``predictor_recall`` the first half of those (``tune``) picks each predictor's threshold and the
    rest (``report``) is where every held-out figure is read; else all are ``report``. A short last
    window (the text's tail, under half a window) trains rather than skewing a held-out half."""
    tuned = bool(options.predictor_recall)
    tail = []
    if len(wins) > 1 and len(wins[-1].input_ids) < len(wins[0].input_ids) // 2:
        wins, tail = wins[:-1], wins[-1:]
    n_held = max(2 if tuned else 1, round(len(wins) * options.heldout_fraction))
    if len(wins) < n_held + 1:
        raise RelufyError(
            f"{options.data}: too little text to hold out predictor data (need {n_held + 1} windows of {options.seq_len} "
            f"tokens{', two held out: one to pick thresholds, one to score them' if tuned else ''})"
        )
    train, held = wins[:-n_held] + tail, wins[-n_held:]
    if not tuned:
        return {"train": train, "report": held}
    return {"train": train, "tune": held[: n_held // 2], "report": held[n_held // 2 :]}


def calibration_bytes(config, sites, parts: dict, max_rows: int) -> int:
    """An upper bound of the disk the calibration rows take (``calibration.row_bytes`` per row)."""
    from .calibration import row_bytes

    tokens = {part: sum(len(w.input_ids) for w in ws) for part, ws in parts.items()}
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    total = 0
    for site, _ in sites:
        per_row = row_bytes(config.hidden_size, site.width)
        for part, n in tokens.items():
            rows = min(n, max_rows) if part == "train" else n
            total += per_row * (min(site.experts * rows, top_k * n) if site.routed else rows)
    return total


class Chain:
    """Observer: several observers in turn (each gets the previous one's output)."""

    def __init__(self, observers):
        self.observers = list(observers)

    def __call__(self, module, combined, expert):
        for observer in self.observers:
            combined = observer(module, combined, expert)
        return combined


def train_as(options: ExportOptions, x, y, rank: int, device, model, site, module, expert: int = 0):
    """One predictor for ``site``'s FFN (``module``, its ``expert``) trained on rows ``x``, ``y`` as
    ``options`` say (loss, steps, start)."""
    from ..measure.sites import preactivations
    from .predictors import train_predictor

    start = options.predictor_init == "weights"
    return train_predictor(
        x,
        y,
        rank,
        options.predictor_steps,
        options.predictor_lr,
        options.predictor_batch,
        options.predictor_pos_weight,
        options.seed,
        magnitude_power=options.predictor_magnitude_power,
        device=device,
        preact=preactivations(model, site, module, expert, options.predictor_input, device) if start else None,
    )


def fit_predictors(model, sites, counts, perms, stores: dict, options: ExportOptions, device, advance=None):
    """One predictor per (site, expert), trained on ``stores["train"]`` rows one key at a time; its
    threshold picked on ``stores["tune"]`` to reach ``options.predictor_recall`` (else the global
    ``predictor_threshold``); scored on ``stores["report"]``. Each key's rows are dropped once used.
    Returns ``(predictors, thresholds, rows)``, all keyed by (site, expert); ``rows`` are the
    per-predictor report rows (layer, kind, expert, rank, threshold, held-out metrics).
    ``advance(layer_rows)`` is called once per layer, when its last predictor is done."""
    from ..modeling.predictor import Predictor, auto_rank
    from .predictors import pick_threshold, predictor_metrics

    hidden = model.config.hidden_size
    predictors, thresholds, rows = {}, {}, {}
    recall = options.predictor_recall or None

    def load(part, site, e):
        store = stores.get(part)
        got = store.load((site, e)) if store is not None else None
        if got is None:
            return None
        x, codes = got
        if site in perms:
            codes = codes[:, perms[site][e].cpu()]
        store.drop((site, e))
        return x, codes

    last = {site.layer: site for site, _ in sites}  # the layer's last FFN site (shared + experts)
    for site, module in sites:
        for e in range(site.experts):
            key = (site, e)
            train = load("train", site, e)
            sparsity = _site_sparsity(*counts[site])[e]
            rank = options.predictor_rank or auto_rank(hidden, site.width, sparsity, options.predictor_budget)
            source = "global"
            if train is None or train[0].shape[0] < options.min_expert_tokens:
                predictor = Predictor(hidden, site.width, rank)  # all zeros: every neuron active at a threshold <= 0
                torch.nn.init.zeros_(predictor.fc1.weight)
                torch.nn.init.zeros_(predictor.fc2.weight)
                predictor = predictor.to(device).eval().requires_grad_(False)
                threshold = min(0.0, options.predictor_threshold)
                tune = load("tune", site, e)
            else:
                predictor = train_as(options, *train, rank, device, model, site, module, e)
                threshold = options.predictor_threshold
                tune = load("tune", site, e)
                if recall is not None:
                    magnitude = options.predictor_recall_of == "magnitude"
                    found = pick_threshold(predictor, {"tune": tune, "train": train}, recall, magnitude)
                    if found is not None:
                        threshold, source = found
            del train, tune
            predictors[key], thresholds[key] = predictor, threshold
            row = {
                "layer": site.layer,
                "kind": site.kind,
                "expert": e if site.routed else None,
                "rank": predictor.fc1.weight.shape[0],
                "threshold": threshold,
                "threshold_from": source,
            }
            report = load("report", site, e)
            if report is not None:
                row.update(predictor_metrics(predictor, *report, threshold).as_dict())
            rows[key] = row
            if advance and last[site.layer] is site and e == site.experts - 1:
                advance([r for r in rows.values() if r["layer"] == site.layer])
    return predictors, thresholds, rows


def _layer_done(progress, task, rows: list[dict]) -> None:
    """Advance the predictors task by a layer's predictors, with one log line for the layer
    (``line``: printed without a terminal whatever the time since the last line)."""

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    ranks = "/".join(sorted({str(r["rank"]) for r in rows}, key=int))
    desc = (
        f"predictors: layer {rows[0]['layer']} rank {ranks} threshold {mean('threshold'):.3g} "
        f"held-out recall {mean('recall'):.3f} computed {mean('computed'):.1%}"
    )
    progress.update(task, advance=len(rows), description=desc, line=True)


def predictor_cost(predictors: dict, counts: dict, positions: int) -> float:
    """Multiply-adds of the predictors per token over those of the dense FFNs (experts weighted by
    the share of the ``positions`` tokens routed to them)."""
    pred = ffn = 0.0
    for (site, e), p in predictors.items():
        tokens = counts[site][1]
        share = float(tokens[e]) / max(positions, 1) if site.routed else 1.0
        rank, hidden = p.fc1.weight.shape
        pred += share * rank * (hidden + site.width)
        ffn += share * site.params_per_neuron * site.width
    return pred / ffn if ffn else float("nan")


def export(path: str, out: str | Path, options: ExportOptions, show_progress: bool = True) -> ExportResult:
    """``relufy export``: MODEL at ``path`` exported to ``out`` as ``options`` say (see the module
    docstring for the steps); the summary also goes to ``options.json_out`` when given."""
    from ..io.atomic import atomic_dir, check_free_space, scratch_dir
    from ..io.paths import check_output_dir, check_output_file
    from ..io.source import local_inputs, resolve
    from ..measure.evaluate import EvalOptions, _device_dtype, score
    from ..measure.sites import ActivationCounter, ffn_sites, observing, tapped
    from ..measure.stats import Stats
    from ..modeling.load import load, skeleton
    from ..modeling.tokenizer import load_tokenizer
    from ..text import load_texts, tokenize, windows
    from .calibration import Collector, DiskRows, PredictedOnly
    from .layouts import write_layout
    from .reorder import reorder_

    start = time.perf_counter()
    config, family = check_export(path, options)
    inputs = resolve(path).inputs() + local_inputs(options.stats, options.data, options.eval_json)
    force = options.force
    out = check_output_dir(out, force, inputs)
    report = options.json_out and check_output_file(options.json_out, inputs + [out], "--json")
    device, _ = _device_dtype(EvalOptions(data=options.data or "-", device=options.device))
    stats = Stats.load(Path(options.stats), "--stats") if options.stats else None
    if stats is not None:  # shapes checked on a weightless model, before any weights load
        stats.match(ffn_sites(skeleton(config)), options.stats)
    texts = load_texts(options.data) if options.data else None
    if texts is not None and not "".join(texts).strip():
        raise RelufyError(f"{options.data}: holds no text")

    tokenizer = load_tokenizer(path)
    model = load(path, dtype=torch.float32).to(device).eval()
    sites = ffn_sites(model)
    progress = None
    stack = contextlib.ExitStack()
    if show_progress:
        from ..progress import token_progress

        progress = stack.enter_context(token_progress())
    scratch = None
    with stack:
        wins = []
        if texts is not None:
            ids = tokenize(texts, tokenizer, options.max_tokens)
            wins = windows(ids, options.seq_len)
        parts = split_windows(wins, options) if options.predictors else {}

        def task(name, windows_):
            if progress is None:
                return None
            t = progress.add_task(name, total=sum(len(w.input_ids) for w in windows_))
            return lambda n: progress.advance(t, n)

        # 2. statistics, and (--predictors) the calibration rows, in one pass over the windows
        counter = None
        stores: dict = {}
        limits = {"train": options.predictor_tokens}
        dense_top1: list = []
        nll = count = 0
        if stats is None or options.predictors:
            observers = []
            if stats is None:
                counter = ActivationCounter(sites)
                observers.append(counter)
            if options.predictors:
                check_free_space(out, calibration_bytes(model.config, sites, parts, options.predictor_tokens))
                out.parent.mkdir(parents=True, exist_ok=True)  # as atomic_dir will: OUT may be new/folder/out
                scratch = scratch_dir(out, "tmp")
                stores = {part: DiskRows(scratch / part) for part in parts}
            with contextlib.ExitStack() as passes:
                tap = passes.enter_context(tapped(model, sites, options.predictor_input)) if options.predictors else None
                collector = Collector(sites, tap, stores=stores, limits=limits) if options.predictors else None
                if collector is not None:
                    observers.append(collector)
                passes.enter_context(observing(model, lambda _: Chain(observers)))
                if options.predictors:
                    for part, part_wins in parts.items():
                        collector.part = part
                        top1 = dense_top1 if part == "report" else None
                        got = score(model, part_wins, options.batch_size, device, task(f"calibrate ({part})", part_wins), top1)
                        if part == "report":
                            nll, count = got
                else:
                    score(model, wins, options.batch_size, device, task("profile", wins))
        if stats is not None:
            counts = stats.match(sites, options.stats)
            positions = stats.positions
        else:
            counts = counter.result()
            positions = sum(len(w.input_ids) for w in wins)

        # 3. reorder
        perms = {}
        if options.reorder:
            perms = reorder_(sites, {s: c for s, (c, _) in counts.items()})
            counts = {s: (torch.gather(c, 1, perms[s]), t) for s, (c, t) in counts.items()}
        result_stats = Stats(
            counts,
            positions,
            {
                "model": path,
                "data": options.data or options.stats,
                "family": family.model_type,
                "activation": RelufyBlock.read(model.config).activation,
            },
        )
        per_layer = result_stats.layer_sparsity()
        result = ExportResult(
            out=out,
            layout=options.layout,
            sparsity={
                "overall": result_stats.overall_sparsity(),
                "mean": sum(per_layer) / len(per_layer),
                "per_layer": per_layer,
            },
            reordered=options.reorder,
        )

        # 4. predictors: trained one (site, expert) at a time from the rows on disk, thresholds
        # picked on the tune windows, everything scored on the report windows
        predictors: dict = {}
        thresholds: dict = {}
        try:
            if options.predictors:
                t = progress.add_task("predictors", total=sum(s.experts for s, _ in sites)) if progress else None
                predictors, thresholds, rows = fit_predictors(
                    model,
                    sites,
                    counts,
                    perms,
                    stores,
                    options,
                    device,
                    (lambda layer_rows: _layer_done(progress, t, layer_rows)) if progress else None,
                )
        finally:
            for store in stores.values():
                store.close()
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        if options.predictors:
            report_wins = parts["report"]
            predicted_top1: list = []
            with tapped(model, sites, options.predictor_input) as tap:
                with observing(model, lambda s: PredictedOnly(s, tap, predictors, thresholds)) as masked:
                    nll_p, _ = score(
                        model, report_wins, options.batch_size, device, task("held-out predicted", report_wins), predicted_top1
                    )
            same = sum(int((a == b).sum()) for a, b in zip(dense_top1, predicted_top1, strict=True))
            result.top1_agreement = same / sum(a.numel() for a in dense_top1)
            result.ppl_dense, result.ppl_predicted = math.exp(nll / count), math.exp(nll_p / count)
            result.predicted_kept = masked.kept / max(masked.total, 1)
            result.missed_active = masked.missed / max(masked.active, 1)
            result.heldout_tokens = count
            result.tune_tokens = sum(len(w.input_ids) for w in parts.get("tune", []))
            result.predictor_recall = options.predictor_recall or None
            for key, row in rows.items():
                row.update({f"{k}_in_situ": v for k, v in masked.key_metrics(key).items() if k != "tokens"})
                result.predictors.append(row)
            recalls = [r["recall"] for r in result.predictors if "recall" in r]
            result.min_recall = min(recalls) if recalls else None
            result.predictor_cost = predictor_cost(predictors, counts, positions)

    # 5. layout
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        write_layout(tmp, model, tokenizer, family, options, result, result_stats, perms, predictors, config, thresholds)
    result.seconds = time.perf_counter() - start
    if report:
        from ..io.atomic import atomic_file

        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(result.summary(), indent=2) + "\n")
    from ..io.hub import HubPush, push_folder

    push = HubPush.of(options)
    if push is not None:  # OUT is complete: a failed push leaves it as written
        push_folder(out, push, f"relufy export ({options.layout} layout)")
    return result
