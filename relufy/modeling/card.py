"""The model card (README.md) of a converted or trained checkpoint, through ``huggingface_hub.ModelCard``.

The card's metadata comes from the ``relufy`` block of ``config.json`` (so a trained checkpoint,
saved from memory, gets the same card as a converted one): ``base_model`` (the hub id of the
source weights, when known), ``license`` (copied from the source's own card), tags, the pipeline
and library. No local path ever appears in it: a local source is named by its folder name.
"""

from __future__ import annotations

from pathlib import Path

from ..families import Family
from ..io.block import RelufyBlock
from ..io.hub import HUB_ID, public_name
from ..names import is_identity
from .spec import ActivationSpec

# base_model_relation: the Hub knows four relations, "adapter", "merge", "quantized" and
# "finetune". A conversion keeps the weights bit for bit and changes the activation (the
# architecture): none of the four says that, so a converted model names its base_model and leaves
# the relation out (the card body says what was done). A trained model's weights were trained
# further from the base weights: that is "finetune". An export of a trained model stays one.
TRAINED_RELATION = "finetune"


def base_model_of(block: RelufyBlock) -> str | None:
    """The hub id the block's weights come from: its ``base_model``; else its ``source`` when that is
    a hub id (``org/name``) and no local path (a checkpoint from before ``base_model`` was recorded,
    or a model loaded from the Hub and trained)."""
    extra = block.to_dict()  # the fields as written
    base = extra.get("base_model")
    if isinstance(base, str) and HUB_ID.match(base):
        return base
    source = block.source
    if source and HUB_ID.match(source) and not Path(source).expanduser().exists():
        return source
    return None


def card_data(block: RelufyBlock, family: Family, library: str = "transformers", tags: tuple[str, ...] = ()):
    """``huggingface_hub.ModelCardData`` of a relufy checkpoint."""
    from huggingface_hub import ModelCardData

    extra = block.to_dict()  # the fields as written
    sparse = () if is_identity(block.activation) else ("sparse", "turbo-sparse")
    fields: dict = dict(
        library_name=library,
        pipeline_tag="text-generation",
        tags=list(dict.fromkeys(("relufy", block.activation, *sparse, family.model_type, *tags))),
    )
    base = base_model_of(block)
    if base:
        fields["base_model"] = base
        if extra.get("trained"):
            fields["base_model_relation"] = TRAINED_RELATION
    for key in ("license", "license_name", "license_link"):
        if isinstance(extra.get(key), str):
            fields[key] = extra[key]
    return ModelCardData(**fields)


def render(data, body: str) -> str:
    """The card text: ``data`` as YAML front matter, then ``body`` (checked to parse back)."""
    from huggingface_hub import ModelCard

    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


def model_card(config: dict, family: Family, spec: ActivationSpec, source: str, found: int, kept: bool = False) -> str:
    """The README of a converted checkpoint. ``kept``: the source computed this function already
    (a ReLU-family source read as it is)."""
    block = RelufyBlock.read(config)
    formula = {
        "drelu": "down(relu(x W_gate) * relu(x W_up))",
        "reglu": "down(relu(x W_gate) * (x W_up))",
        "relu2": "down(relu(x W_gate)^2 * (x W_up))",
        "fatrelu": f"down(fatrelu_T(x W_gate) * (x W_up)), T = {spec.threshold}",
        "swiglu": "unchanged (identity conversion, a baseline)",
    }[spec.activation]
    load = (
        "AutoModelForCausalLM.from_pretrained(path)"
        if is_identity(spec.activation)
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or relufy.load(path)"
    )
    name = public_name(source)
    extra = block.to_dict()  # the fields as written
    trained = extra.get("trained")
    base = base_model_of(block)
    revision = extra.get("source_revision")
    origin = f"`{name}`" + (f" (revision `{revision}`)" if revision else "")
    if trained:
        title = f"# {spec.activation} model trained from `{name}`"
        weights = "- Weights: the original weights, trained further with `relufy train` (see below)"
        status = (
            "Trained after conversion, so the activation and the weights fit together again; the numbers "
            "below are measured on held-out text of the training recipe."
        )
    elif kept:
        title = f"# {spec.activation} model `{name}`, read by relufy"
        weights = "- Weights: the original weights, unchanged; the function they compute too"
        status = (
            f"The source is {block.source_format or 'a relufy checkpoint'}: relufy kept the function it computes, so\n"
            "its outputs are the source's. `relufy export --predictors` trains sparsity predictors for it."
        )
    else:
        title = f"# {spec.activation} conversion of `{name}`"
        dtype = f" (dtype {config.get('dtype')})" if config.get("dtype") else ""
        weights = f"- Weights: the original weights, unchanged{dtype}"
        status = (
            "A freshly converted model is not yet useful: the activation changed under weights trained for\n"
            "SwiGLU, so perplexity is very high until the model is trained further (`relufy train`)."
        )
    lines = [
        title,
        "",
        f"Made by relufy {block.relufy_version} (Turbo Sparse, arXiv 2406.05955) from {origin}"
        + (f", [on the Hub](https://huggingface.co/{base})" if base else "")
        + ".",
        "",
        f"- Family: `{family.model_type}`{f', {found} FFN weight tensors' if found else ''}",
        f"- FFN: {formula}",
        weights,
    ]
    if isinstance(trained, dict) and trained:
        facts = ", ".join(f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in trained.items())
        lines.append(f"- Training: {facts}")
    lines += [
        "",
        status,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        f"model = {load}",
        "```",
        "",
        "Loading without `trust_remote_code` fails on purpose: the original architecture would compute",
        "SwiGLU with these weights. The `relufy` block of `config.json` records the conversion.",
        "",
    ]
    return render(card_data(block, family), "\n".join(lines))
