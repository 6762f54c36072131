"""``relufy export``: statistics, neuron reordering, predictors and an engine-ready layout.

``export`` runs the stages of an ``ExportRun``, all in memory until the final atomic write of OUT;
each stage returns what it built:

1. ``checks``: the config and options (bad input fails before weights load), with the layout's own
   checks (``relufy.export.registry``);
2. ``load_model``: the tokenizer, the float32 model and its FFN sites;
3. ``statistics``: activation statistics, from ``--stats`` or by profiling ``--data``; with
   ``--predictors`` the same pass stores the calibration rows (inputs and labels) of every window;
4. ``reorder``: with ``--reorder`` every FFN (per expert) permuted hottest first
   (``relufy.export.reorder``);
5. ``fit``: one predictor trained per FFN / expert on the first windows, its threshold picked on
   the first held-out ones (``fit_predictors``), scored on the rest;
6. ``score``: the held-out perplexity of the dense model and of the model that computes only the
   predicted neurons, and what each predictor computed and missed there;
7. ``write``: the layout, model card and plot, written to a temporary folder renamed to OUT; then
   ``publish``: the ``--json`` summary and the hub push.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..errors import RelufyError
from ..families import family_for
from ..io.block import RelufyBlock
from ..names import ZERO_ACTIVATIONS
from .options import ExportOptions
from .registry import Layout, layout_named
from .result import ExportResult, PredictorRecord

__all__ = ["ExportResult", "ExportRun", "PredictorRecord", "check_export", "export"]


def check_export(path: str, options: ExportOptions) -> tuple[dict, object, Layout]:
    """Config-level checks; returns the model's config dict, family and layout."""
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
    layout = layout_named(options.layout)
    layout.check(path, config, block, family, options)
    hidden = config.get("hidden_size")
    if options.predictors and options.predictor_rank and isinstance(hidden, int) and options.predictor_rank > hidden:
        raise RelufyError(
            f"--predictor-rank {options.predictor_rank} exceeds the model's hidden size {hidden} (no cheaper than the FFN's gate)"
        )
    if options.eval_json is not None:
        from .card import read_eval

        read_eval(options.eval_json)  # read again for the card: checked here, before any work
    return config, family, layout


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
    Returns ``(predictors, thresholds, records)``, all keyed by (site, expert); ``records`` are the
    ``PredictorRecord`` of each (layer, kind, expert, rank, threshold, held-out metrics).
    ``advance(layer_records)`` is called once per layer, when its last predictor is done."""
    from ..modeling.predictor import Predictor, auto_rank
    from .predictors import pick_threshold, predictor_metrics

    hidden = model.config.hidden_size
    predictors, thresholds, records = {}, {}, {}
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
            report = load("report", site, e)
            records[key] = PredictorRecord(
                layer=site.layer,
                kind=site.kind,
                expert=e if site.routed else None,
                rank=predictor.fc1.weight.shape[0],
                threshold=threshold,
                threshold_from=source,
                heldout=predictor_metrics(predictor, *report, threshold) if report is not None else None,
            )
            if advance and last[site.layer] is site and e == site.experts - 1:
                advance([r for r in records.values() if r.layer == site.layer])
    return predictors, thresholds, records


def _layer_done(progress, task, rows: list[PredictorRecord]) -> None:
    """Advance the predictors task by a layer's predictors, with one log line for the layer
    (``line``: printed without a terminal whatever the time since the last line)."""

    def mean(key):
        values = [getattr(r, key) for r in rows if getattr(r, key) is not None]
        return sum(values) / len(values) if values else float("nan")

    ranks = "/".join(sorted({str(r.rank) for r in rows}, key=int))
    desc = (
        f"predictors: layer {rows[0].layer} rank {ranks} threshold {mean('threshold'):.3g} "
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


@dataclass
class Plan:
    """What ``ExportRun.checks`` settled before any weights load."""

    config: dict
    family: object
    layout: Layout
    out: Path
    inputs: list
    report: Path | None  # --json
    device: torch.device
    stats: object | None  # the --stats file (relufy.measure.stats.Stats)
    texts: list[str] | None  # the --data text


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    sites: list


@dataclass
class Observed:
    """What the statistics pass found: the counts (the model's own neuron order), the windows of each
    part (``train``, ``tune``, ``report``: ``split_windows``; none without predictors) and their
    calibration rows (``stores``), and the dense model's loss and next-token argmax on ``report``."""

    counts: dict
    positions: int
    parts: dict = field(default_factory=dict)
    stores: dict = field(default_factory=dict)
    scratch: Path | None = None
    dense_nll: float = 0.0
    heldout_tokens: int = 0
    dense_top1: list = field(default_factory=list)

    def discard_rows(self) -> None:
        """Close the calibration stores and remove their scratch folder."""
        for store in self.stores.values():
            store.close()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


@dataclass
class Reordered:
    perms: dict  # site -> [experts, width] permutation; empty without --reorder
    stats: object  # Stats in the exported neuron order


@dataclass
class Fitted:
    predictors: dict = field(default_factory=dict)  # (site, expert) -> Predictor
    thresholds: dict = field(default_factory=dict)  # (site, expert) -> threshold
    records: dict = field(default_factory=dict)  # (site, expert) -> PredictorRecord


@dataclass
class Scored:
    """The held-out figures of the model computing only the predicted neurons (``ExportResult`` fields)."""

    predictors: list[PredictorRecord]
    ppl_dense: float
    ppl_predicted: float
    predicted_kept: float
    missed_active: float
    top1_agreement: float
    heldout_tokens: int
    tune_tokens: int
    predictor_recall: float | None
    predictor_cost: float


class ExportRun:
    """The stages of one ``relufy export`` (MODEL at ``path`` as ``options`` say); each returns what
    it built, and ``export`` passes it on. A stage's ``progress`` is a ``relufy.progress.token_progress``
    or None."""

    def __init__(self, path: str, options: ExportOptions):
        self.path = path
        self.options = options

    def checks(self, out: str | Path) -> Plan:
        """Config, options, outputs, device, ``--stats`` (shapes checked on a weightless model) and
        ``--data``: everything that can fail before weights load."""
        from ..io.paths import check_output_dir, check_output_file
        from ..io.source import local_inputs, resolve
        from ..measure.evaluate import parse_device
        from ..measure.sites import ffn_sites
        from ..measure.stats import Stats
        from ..modeling.load import skeleton
        from ..text import load_texts

        o = self.options
        config, family, layout = check_export(self.path, o)
        inputs = resolve(self.path).inputs() + local_inputs(o.stats, o.data, o.eval_json)
        out = check_output_dir(out, o.force, inputs)
        report = o.json_out and check_output_file(o.json_out, inputs + [out], "--json")
        device = parse_device(o.device)
        stats = Stats.load(Path(o.stats), "--stats") if o.stats else None
        if stats is not None:
            stats.match(ffn_sites(skeleton(config)), o.stats)
        texts = load_texts(o.data) if o.data else None
        if texts is not None and not "".join(texts).strip():
            raise RelufyError(f"{o.data}: holds no text")
        return Plan(config, family, layout, out, inputs, report or None, device, stats, texts)

    def load_model(self, plan: Plan) -> Loaded:
        from ..measure.sites import ffn_sites
        from ..modeling.load import load
        from ..modeling.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(self.path)
        model = load(self.path, dtype=torch.float32).to(plan.device).eval()
        return Loaded(model, tokenizer, ffn_sites(model))

    def statistics(self, plan: Plan, loaded: Loaded, progress) -> Observed:
        """Activation counts (``--stats``, or one pass over the windows) and, with ``--predictors``,
        the calibration rows of every part, stored beside OUT, in that same pass."""
        from ..io.atomic import check_free_space, scratch_dir
        from ..measure.evaluate import score
        from ..measure.sites import ActivationCounter, observing, tapped
        from ..text import tokenize, windows
        from .calibration import Collector, DiskRows

        o, model, sites = self.options, loaded.model, loaded.sites
        wins = windows(tokenize(plan.texts, loaded.tokenizer, o.max_tokens), o.seq_len) if plan.texts is not None else []
        parts = split_windows(wins, o) if o.predictors else {}
        if plan.stats is not None and not o.predictors:
            return Observed(plan.stats.match(sites, o.stats), plan.stats.positions)
        counter = ActivationCounter(sites) if plan.stats is None else None
        stores, scratch, dense_top1, nll, count = {}, None, [], 0.0, 0
        if o.predictors:
            check_free_space(plan.out, calibration_bytes(model.config, sites, parts, o.predictor_tokens))
            plan.out.parent.mkdir(parents=True, exist_ok=True)  # as atomic_dir will: OUT may be new/folder/out
            scratch = scratch_dir(plan.out, "tmp")
            stores = {part: DiskRows(scratch / part) for part in parts}
        observed = Observed({}, 0, parts, stores, scratch)
        try:
            with contextlib.ExitStack() as passes:
                observers = [counter] if counter is not None else []
                if o.predictors:
                    tap = passes.enter_context(tapped(model, sites, o.predictor_input))
                    collector = Collector(sites, tap, stores=stores, limits={"train": o.predictor_tokens})
                    observers.append(collector)
                passes.enter_context(observing(model, lambda _: Chain(observers)))
                if o.predictors:
                    for part, part_wins in parts.items():
                        collector.part = part
                        top1 = dense_top1 if part == "report" else None
                        task = _task(progress, f"calibrate ({part})", part_wins)
                        got = score(model, part_wins, o.batch_size, plan.device, task, top1)
                        if part == "report":
                            nll, count = got
                else:
                    score(model, wins, o.batch_size, plan.device, _task(progress, "profile", wins))
        except BaseException:
            observed.discard_rows()
            raise
        if plan.stats is not None:
            counts, positions = plan.stats.match(sites, o.stats), plan.stats.positions
        else:
            counts, positions = counter.result(), sum(len(w.input_ids) for w in wins)
        return replace(observed, counts=counts, positions=positions, dense_nll=nll, heldout_tokens=count, dense_top1=dense_top1)

    def reorder(self, plan: Plan, loaded: Loaded, observed: Observed) -> Reordered:
        """With ``--reorder`` the FFNs permuted hottest first; the statistics in the exported order."""
        from ..measure.stats import Stats
        from .reorder import reorder_

        o, counts, perms = self.options, observed.counts, {}
        if o.reorder:
            perms = reorder_(loaded.sites, {s: c for s, (c, _) in counts.items()})
            counts = {s: (torch.gather(c, 1, perms[s]), t) for s, (c, t) in counts.items()}
        meta = {
            "model": self.path,
            "data": o.data or o.stats,
            "family": plan.family.model_type,
            "activation": RelufyBlock.read(loaded.model.config).activation,
        }
        return Reordered(perms, Stats(counts, observed.positions, meta))

    def fit(self, plan: Plan, loaded: Loaded, observed: Observed, reordered: Reordered, progress) -> Fitted:
        """``--predictors``: one per (site, expert), from the calibration rows (``fit_predictors``)."""
        if not self.options.predictors:
            return Fitted()
        advance = None
        if progress is not None:
            task = progress.add_task("predictors", total=sum(s.experts for s, _ in loaded.sites))
            advance = lambda layer_rows: _layer_done(progress, task, layer_rows)  # noqa: E731
        counts, perms, stores = reordered.stats.sites, reordered.perms, observed.stores
        return Fitted(*fit_predictors(loaded.model, loaded.sites, counts, perms, stores, self.options, plan.device, advance))

    def score(
        self, plan: Plan, loaded: Loaded, observed: Observed, reordered: Reordered, fitted: Fitted, progress
    ) -> Scored | None:
        """The report windows again, the model computing only the predicted neurons: perplexity and
        argmax against the dense pass's, and each predictor's record completed with what it computed
        and missed there. None without predictors."""
        from ..measure.evaluate import score
        from ..measure.sites import observing, tapped
        from .calibration import PredictedOnly

        o, model, sites = self.options, loaded.model, loaded.sites
        if not o.predictors:
            return None
        report_wins, predicted_top1 = observed.parts["report"], []
        with tapped(model, sites, o.predictor_input) as tap:
            with observing(model, lambda s: PredictedOnly(s, tap, fitted.predictors, fitted.thresholds)) as masked:
                task = _task(progress, "held-out predicted", report_wins)
                nll_p, _ = score(model, report_wins, o.batch_size, plan.device, task, predicted_top1)
        dense_top1, count = observed.dense_top1, observed.heldout_tokens
        same = sum(int((a == b).sum()) for a, b in zip(dense_top1, predicted_top1, strict=True))
        records = [
            replace(record, in_situ={k: v for k, v in masked.key_metrics(key).items() if k != "tokens"})
            for key, record in fitted.records.items()
        ]
        return Scored(
            predictors=records,
            ppl_dense=math.exp(observed.dense_nll / count),
            ppl_predicted=math.exp(nll_p / count),
            predicted_kept=masked.kept / max(masked.total, 1),
            missed_active=masked.missed / max(masked.active, 1),
            top1_agreement=same / sum(a.numel() for a in dense_top1),
            heldout_tokens=count,
            tune_tokens=sum(len(w.input_ids) for w in observed.parts.get("tune", [])),
            predictor_recall=o.predictor_recall or None,
            predictor_cost=predictor_cost(fitted.predictors, reordered.stats.sites, observed.positions),
        )

    def result(self, plan: Plan, reordered: Reordered, scored: Scored | None) -> ExportResult:
        """The summary: sparsity in the exported order, and the held-out figures."""
        per_layer = reordered.stats.layer_sparsity()
        sparsity = {
            "overall": reordered.stats.overall_sparsity(),
            "mean": sum(per_layer) / len(per_layer),
            "per_layer": per_layer,
        }
        held = vars(scored) if scored is not None else {}
        return ExportResult(out=plan.out, layout=plan.layout.name, sparsity=sparsity, reordered=self.options.reorder, **held)

    def write(self, plan: Plan, loaded: Loaded, result: ExportResult, reordered: Reordered, fitted: Fitted) -> None:
        """OUT, written by the layout (``relufy.export.registry``) into a folder renamed to OUT."""
        from ..io.atomic import atomic_dir

        o = self.options
        with atomic_dir(plan.out, force=o.force, inputs=plan.inputs) as tmp:
            plan.layout.write(
                tmp,
                loaded.model,
                loaded.tokenizer,
                plan.family,
                o,
                result,
                reordered.stats,
                reordered.perms,
                fitted.predictors,
                plan.config,
                fitted.thresholds,
            )

    def publish(self, plan: Plan, result: ExportResult) -> None:
        """The ``--json`` summary, then the hub push (a failed push leaves OUT as written)."""
        from ..io.atomic import atomic_file
        from ..io.hub import HubPush, push_folder

        if plan.report:
            with atomic_file(plan.report) as tmp:
                tmp.write_text(json.dumps(result.summary(), indent=2) + "\n")
        push = HubPush.of(self.options)
        if push is not None:
            push_folder(plan.out, push, f"relufy export ({plan.layout.name} layout)")


def _task(progress, name: str, windows_: list):
    """An ``advance(n)`` for a progress task over ``windows_``' tokens; None without progress."""
    if progress is None:
        return None
    t = progress.add_task(name, total=sum(len(w.input_ids) for w in windows_))
    return lambda n: progress.advance(t, n)


def export(path: str, out: str | Path, options: ExportOptions, show_progress: bool = True) -> ExportResult:
    """``relufy export``: MODEL at ``path`` exported to ``out`` as ``options`` say (the stages of
    ``ExportRun``, in the module docstring); the summary also goes to ``options.json_out`` when given."""
    import time

    start = time.perf_counter()
    run = ExportRun(path, options)
    plan = run.checks(out)
    loaded = run.load_model(plan)
    with contextlib.ExitStack() as stack:
        progress = None
        if show_progress:
            from ..progress import token_progress

            progress = stack.enter_context(token_progress())
        observed = run.statistics(plan, loaded, progress)
        reordered = run.reorder(plan, loaded, observed)
        try:
            fitted = run.fit(plan, loaded, observed, reordered, progress)
        finally:
            observed.discard_rows()
        scored = run.score(plan, loaded, observed, reordered, fitted, progress)
    result = run.result(plan, reordered, scored)
    run.write(plan, loaded, result, reordered, fitted)
    result.seconds = time.perf_counter() - start
    run.publish(plan, result)
    return result
