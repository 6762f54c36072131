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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import RelufyError
from ..families import FAMILIES, family_for
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
    heldout_tokens: int = 0
    seconds: float = 0.0

    def summary(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def check_export(path: str, options: ExportOptions) -> tuple[dict, object]:
    """Config-level checks; returns the model's config dict and family."""
    from ..io.source import resolve

    config = resolve(path).config_dict()
    block = RelufyBlock.read(config, path)
    if block is None:
        raise RelufyError(f"{path}: not a relufy checkpoint (run relufy convert first)")
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
    if options.layout == "powerinfer":
        if not options.predictors:
            raise RelufyError(
                "layout powerinfer needs predictors (PowerInfer's converter takes a predictor folder): add --predictors"
            )
        if not family.is_moe:
            if family.powerinfer_arch is None or activation != "drelu":
                takes = "/".join(f.model_type for f in FAMILIES.values() if f.powerinfer_arch)
                raise RelufyError(
                    f"layout powerinfer takes dense dReLU models of {takes} (PowerInfer's bamboo "
                    f"architecture); this is a {activation} {family.model_type} model: use --layout hf"
                )
            rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
            rope_type = rope.get("rope_type") or rope.get("type") or "default"
            if rope_type not in POWERINFER_ROPE:
                raise RelufyError(
                    f"layout powerinfer: PowerInfer's converter cannot take rope type {rope_type!r} "
                    f"(only {', '.join(POWERINFER_ROPE)})"
                )
    hidden = config.get("hidden_size")
    if options.predictors and options.predictor_rank and isinstance(hidden, int) and options.predictor_rank > hidden:
        raise RelufyError(
            f"--predictor-rank {options.predictor_rank} exceeds the model's hidden size {hidden} (no cheaper than the FFN's gate)"
        )
    if options.eval_json is not None:
        _read_eval(options.eval_json)
    return config, family


def _read_eval(path: str) -> list[dict]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RelufyError(f"{path}: not a readable relufy eval JSON ({e})") from None
    if not isinstance(data, dict) or data.get("relufy_eval") != 1 or not isinstance(data.get("models"), list):
        raise RelufyError(f"{path}: not a relufy eval JSON (relufy eval --json FILE)")
    return data["models"]


def _site_sparsity(counts: torch.Tensor, tokens: torch.Tensor) -> list[float]:
    width = counts.shape[1]
    return [1 - int(counts[e].sum()) / (int(tokens[e]) * width) if tokens[e] else float("nan") for e in range(counts.shape[0])]


def export(path: str, out: str | Path, options: ExportOptions, show_progress: bool = True) -> ExportResult:
    """``relufy export``: MODEL at ``path`` exported to ``out`` as ``options`` say (see the module
    docstring for the steps); the summary also goes to ``options.json_out`` when given."""
    from ..io.atomic import atomic_dir
    from ..io.paths import check_output_dir, check_output_file
    from ..io.source import local_inputs, resolve
    from ..measure.evaluate import EvalOptions, _device_dtype, score
    from ..measure.sites import ActivationCounter, ffn_sites, observing, tapped
    from ..measure.stats import Stats
    from ..modeling.load import load, skeleton
    from ..modeling.predictor import Predictor, auto_rank
    from ..modeling.tokenizer import load_tokenizer
    from ..text import load_texts, tokenize, windows
    from .calibration import Collector, PredictedOnly
    from .layouts import write_layout
    from .predictors import predictor_metrics, train_predictor
    from .reorder import reorder_

    start = time.perf_counter()
    config, family = check_export(path, options)
    inputs = resolve(path).inputs() + local_inputs(options.stats, options.data, options.eval_json)
    force = options.force
    out = check_output_dir(out, force, inputs)
    report = options.json_out and check_output_file(options.json_out, inputs + [out], "--json")
    device, _ = _device_dtype(EvalOptions(data=options.data or "-", device=options.device))
    stats = Stats.load(Path(options.stats)) if options.stats else None
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
    with stack:
        wins = []
        if texts is not None:
            ids = tokenize(texts, tokenizer, options.max_tokens)
            wins = windows(ids, options.seq_len)
            if options.predictors and len(wins) < 2:
                raise RelufyError(
                    f"{options.data}: too little text to hold out predictor data (need 2 windows of {options.seq_len} tokens)"
                )

        def task(name, windows_):
            if progress is None:
                return None
            t = progress.add_task(name, total=sum(len(w.input_ids) for w in windows_))
            return lambda n: progress.advance(t, n)

        # 2. statistics
        if stats is not None:
            counts = stats.match(sites, options.stats)
            positions = stats.positions
        else:
            with observing(model, ActivationCounter) as counter:
                score(model, wins, options.batch_size, device, task("profile", wins))
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

        # 4. predictors
        predictors: dict = {}
        if options.predictors:
            n_held = max(1, round(len(wins) * options.heldout_fraction))
            train_wins, held_wins = wins[:-n_held], wins[-n_held:]
            with tapped(model, sites, options.predictor_input) as tap:
                with observing(model, lambda s: Collector(s, tap, options.predictor_tokens)) as collector:
                    score(model, train_wins, options.batch_size, device, task("calibrate", train_wins))
            data = collector.data()
            hidden = model.config.hidden_size
            keys = [(site, e) for site, _ in sites for e in range(site.experts)]
            t = progress.add_task("predictors", total=len(keys)) if progress else None
            for site, e in keys:
                x, y = data.pop((site, e), (None, None))
                sparsity = _site_sparsity(*counts[site])[e]
                rank = options.predictor_rank or auto_rank(hidden, site.width, sparsity, options.predictor_budget)
                if x is None or x.shape[0] < options.min_expert_tokens:
                    predictor = Predictor(hidden, site.width, rank)  # all zeros: every neuron active
                    torch.nn.init.zeros_(predictor.fc1.weight)
                    torch.nn.init.zeros_(predictor.fc2.weight)
                    predictor = predictor.to(device).eval().requires_grad_(False)
                else:
                    predictor = train_predictor(
                        x,
                        y,
                        rank,
                        options.predictor_steps,
                        options.predictor_lr,
                        options.predictor_batch,
                        options.predictor_pos_weight,
                        options.seed,
                    )
                predictors[(site, e)] = predictor
                if progress:
                    progress.advance(t, 1)
            del data
            # held-out: predictor metrics, dense and predicted-only perplexity
            with tapped(model, sites, options.predictor_input) as tap:
                dense_top1, predicted_top1 = [], []
                with observing(model, lambda s: Collector(s, tap, options.predictor_tokens)) as collector:
                    nll, count = score(
                        model, held_wins, options.batch_size, device, task("held-out dense", held_wins), dense_top1
                    )
                held = collector.data()
                with observing(model, lambda s: PredictedOnly(s, tap, predictors, options.predictor_threshold)) as masked:
                    nll_p, _ = score(
                        model, held_wins, options.batch_size, device, task("held-out predicted", held_wins), predicted_top1
                    )
            same = sum(int((a == b).sum()) for a, b in zip(dense_top1, predicted_top1, strict=True))
            result.top1_agreement = same / sum(a.numel() for a in dense_top1)
            result.ppl_dense, result.ppl_predicted = math.exp(nll / count), math.exp(nll_p / count)
            result.predicted_kept = masked.kept / max(masked.total, 1)
            result.missed_active = masked.missed / max(masked.active, 1)
            result.heldout_tokens = count
            for (site, e), predictor in predictors.items():
                row = {
                    "layer": site.layer,
                    "kind": site.kind,
                    "expert": e if site.routed else None,
                    "rank": predictor.fc1.weight.shape[0],
                }
                if (site, e) in held:
                    row.update(predictor_metrics(predictor, *held[(site, e)], options.predictor_threshold).as_dict())
                result.predictors.append(row)

    # 5. layout
    with atomic_dir(out, force=force, inputs=inputs) as tmp:
        write_layout(tmp, model, tokenizer, family, options, result, result_stats, perms, predictors, config)
    result.seconds = time.perf_counter() - start
    if report:
        from ..io.atomic import atomic_file

        with atomic_file(report) as tmp:
            tmp.write_text(json.dumps(result.summary(), indent=2) + "\n")
    return result
