"""The model card (README.md) and plots of an exported checkpoint, and the ``relufy eval --json``
report it may quote (``read_eval``: checked when export starts, so a bad one fails at once)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from .. import __version__
from ..io.block import RelufyBlock
from ..io.hub import public_name
from ..modeling.card import card_data, render


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=True)


class _Point(_Row):
    sparsity: float
    ppl: float | None = None


class _Sparsity(_Row):
    overall: float


class _Model(_Row):
    model: str
    ppl: float | None = None
    sparsity: _Sparsity | None = None
    topk: list[_Point] = []


class _Report(_Row):
    relufy_eval: Literal[1]
    models: list[_Model]


def read_eval(path: str | Path) -> list[dict]:
    """The models of a ``relufy eval --json`` report (``--eval-json``): a regular file within
    ``REPORT_BYTES``, JSON nested within bounds, the fields the card quotes of the right types."""
    from ..errors import RelufyError
    from ..io.read import REPORT_BYTES, read_json
    from ..options import first_error

    data = read_json(path, REPORT_BYTES, "relufy eval JSON", what="--eval-json")
    if not isinstance(data, dict) or data.get("relufy_eval") != 1 or not isinstance(data.get("models"), list):
        raise RelufyError(f"{path}: not a relufy eval JSON (relufy eval --json FILE)")
    try:
        return [m.model_dump() for m in _Report.model_validate(data).models]
    except ValidationError as e:
        loc, msg = first_error(e)
        raise RelufyError(f"{path}: not a relufy eval JSON ({'.'.join(loc)}: {msg})") from None


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _plots(tmp: Path, result) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    per_layer = result.sparsity["per_layer"]
    fig, ax = plt.subplots(figsize=(max(6, len(per_layer) * 0.25), 3.5))
    ax.bar(range(len(per_layer)), [100 * s for s in per_layer], color="tab:blue", label="zeros (measured)")
    if result.predictors:
        layers = sorted({p.layer for p in result.predictors})
        pred = [_mean([p.predicted_sparsity for p in result.predictors if p.layer == L]) for L in layers]
        recall = [_mean([p.recall for p in result.predictors if p.layer == L]) for L in layers]
        ax.plot(layers, [100 * v for v in pred], "o-", color="tab:orange", label="predicted sparsity")
        ax.plot(layers, [100 * v for v in recall], "s-", color="tab:green", label="predictor recall")
    ax.set(xlabel="layer", ylabel="%", ylim=(0, 100), title=f"FFN activation sparsity (overall {result.sparsity['overall']:.1%})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(tmp / "sparsity.png", dpi=120)
    plt.close(fig)
    names.append("sparsity.png")
    return names


def _or_nan(value):
    return float("nan") if value is None else value


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


_LAYER_COLUMNS = (
    ("threshold", "threshold", "{:.2f}"),
    ("recall", "recall", "{:.3f}"),
    ("precision", "precision", "{:.3f}"),
    ("computed", "neurons computed", "{:.1%}"),
    ("missed", "active missed", "{:.1%}"),
    ("computed_in_situ", "computed (predicted-only run)", "{:.1%}"),
    ("missed_in_situ", "missed (predicted-only run)", "{:.1%}"),
)


def _layer_table(result) -> str:
    """Per layer: zeros, and with predictors their rank, threshold and held-out figures (the mean
    over a layer's predictors: its experts for MoE)."""
    columns = _LAYER_COLUMNS if result.predictors else ()
    head = ["layer", "zeros", *(["predictor rank"] if columns else []), *(title for _, title, _ in columns)]
    rows = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for layer, s in enumerate(result.sparsity["per_layer"]):
        preds = [p for p in result.predictors if p.layer == layer]
        cells = [str(layer), f"{s:.1%}"]
        if columns and preds:
            cells.append("/".join(sorted({str(p.rank) for p in preds}, key=int)))
            for key, _, fmt in columns:
                v = _mean([getattr(p, key) for p in preds])
                cells.append(fmt.format(v) if v == v else "-")
        elif columns:
            cells += ["-"] * (1 + len(columns))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_card(tmp: Path, config: dict, family, options, result, layout) -> None:
    """README.md (and the plots) in ``tmp``; ``layout``: the ``relufy.export.registry`` layout written."""
    plots = _plots(tmp, result)
    block = RelufyBlock.read(config)
    order = "in their original order"
    if result.reordered:
        experts = " and expert" if family.is_moe else ""
        order = f"reordered hottest first per FFN{experts} (permutation in sparsity.safetensors); the function is unchanged"
    data = card_data(block, family, library=layout.library, tags=layout.tags)
    lines = [
        f"# Sparsity-ready {block.activation} export of `{public_name(block.source)}`",
        "",
        f"Exported by relufy {__version__} (Turbo Sparse, arXiv 2406.05955), layout `{layout.name}`, "
        f"family `{family.model_type}`.",
        "",
        "## What was done",
        f"- Activation statistics from `{public_name(options.stats or options.data)}`: "
        f"{result.sparsity['overall']:.1%} of FFN neurons are exactly zero per token "
        f"(mean over layers {result.sparsity['mean']:.1%}).",
        f"- Neurons {order}.",
    ]
    if result.predictors:
        folded = ""
        if layout.folds_thresholds:
            folded = "; folded into the predictor weights for PowerInfer's one `sparse_threshold`"
        if result.predictor_recall:
            of = "the active neurons' summed |activation|" if options.predictor_recall_of == "magnitude" else "the active neurons"
            rule = (
                f"a neuron is computed when its score >= its predictor's threshold, set per predictor to keep "
                f"{result.predictor_recall:.0%} of {of} on {result.tune_tokens} held-out tokens "
                f"(`.predictor_threshold` in sparsity.safetensors{folded})"
            )
        else:
            rule = f"a neuron is computed when its score >= {options.predictor_threshold}"
        cost = ""
        if result.predictor_cost:
            cost = f" The predictors cost {result.predictor_cost:.1%} of the dense FFN's multiply-adds."
        lines += [
            f"- Predictors `fc2(relu(fc1(x)))` per FFN{' and expert' if family.is_moe else ''}, input: "
            f"{'the residual stream entering the FFN norm' if options.predictor_input == 'residual' else 'the FFN input'}; "
            f"{rule}.{cost}",
            f"- Held-out ({result.heldout_tokens} other tokens): recall mean {_or_nan(result.mean_recall):.3f}, lowest "
            f"{_or_nan(result.min_recall):.3f}; the model computes "
            f"{result.predicted_kept:.1%} of neurons and drops {result.missed_active:.1%} of the active ones; "
            f"perplexity {result.ppl_dense:.2f} dense -> {result.ppl_predicted:.2f} with predicted neurons only; "
            f"the next-token argmax agrees with dense at {result.top1_agreement:.1%} of positions.",
        ]
    if block.cutoffs:
        lines.append(
            f"- Magnitude cutoffs on {len(block.cutoffs)} FFN(s) (`relufy.cutoffs` in config.json): activations below "
            "them are zero in the figures above"
            + (
                "; PowerInfer has no such cutoff, so they act there only through the predictors, and a neuron it "
                "computes is computed in full."
                if layout.engine
                else "."
            )
        )
    if options.eval_json:
        models = read_eval(options.eval_json)
        lines += ["", "## Evaluation (`relufy eval`)", "", "| model | ppl | FFN zeros | top-k ppl |", "|---|---:|---:|---|"]
        for m in models:
            topk = ", ".join(f"{p['sparsity']:.0%}: {_number(p['ppl'], '.2f')}" for p in m["topk"])
            zeros = _number((m["sparsity"] or {}).get("overall"), ".1%")
            lines.append(f"| `{public_name(m['model'])}` | {_number(m['ppl'], '.2f')} | {zeros} | {topk} |")
    lines += [
        "",
        "## Sparsity per layer",
        "",
        *(f"![{p}]({p})" for p in plots),
        "",
        _layer_table(result),
        "",
        "## How to load",
        "",
        layout.card_snippet(options, family, block.activation),
        "",
    ]
    (tmp / "README.md").write_text(render(data, "\n".join(lines)))
