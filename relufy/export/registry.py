"""The export layouts, one class per engine layout, registered by name (``--layout NAME``).

A layout says what it needs of the model and the options (``check``), writes OUT's files
(``write``: the model, its predictors, ``activation/``, ``sparsity.safetensors`` and the card),
gives the card its "How to load" section (``card_snippet``), and says which runtimes read it:
``engine`` (an inference engine's own format), ``folds_thresholds`` (one threshold for every
predictor, folded into their weights) and ``relufy_predictors`` (``relufy generate/bench
--sparse predictor`` read its predictors). A new layout is a ``Layout`` subclass under
``@register``; its name must also be added to ``ExportInfo.layout`` (``relufy.io.block``), which
reads the name back from an export's config.json.

The files themselves are written by ``relufy.export.layouts`` (docs/formats.md). This module is
the only place that compares layout names.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from ..errors import RelufyError, notice
from ..families import FAMILIES, powerinfer_arch
from ..io.block import RelufyBlock

LAYOUTS: dict[str, Layout] = {}

# rope types PowerInfer's convert.py takes
POWERINFER_ROPE = ("default", "linear", "yarn")


def register(cls: type[Layout]) -> type[Layout]:
    """Class decorator: ``cls`` becomes the layout ``cls.name``."""
    if cls.name in LAYOUTS:
        raise ValueError(f"layout {cls.name!r} is registered twice")
    LAYOUTS[cls.name] = cls()
    return cls


def layout_names() -> tuple[str, ...]:
    return tuple(LAYOUTS)


def layout_named(name: str) -> Layout:
    """The registered layout ``name``."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise RelufyError(f"unknown export layout {name!r} (one of {', '.join(LAYOUTS)})") from None


class Layout:
    """One export layout; subclasses set the class attributes and override the hooks."""

    name: ClassVar[str]
    engine: ClassVar[bool] = False  # an inference engine's own format (PowerInfer), not transformers'
    folds_thresholds: ClassVar[bool] = False  # one engine threshold: per-predictor ones folded into the weights
    needs_predictors: ClassVar[bool] = False
    relufy_predictors: ClassVar[bool] = True  # relufy generate/bench --sparse predictor read its predictors
    takes_gguf_type: ClassVar[bool] = False
    library: ClassVar[str] = "transformers"  # the card's library_name
    tags: ClassVar[tuple[str, ...]] = ()  # the card's extra tags

    def check(self, path: str, config: dict, block, family, options) -> None:
        """Config-level checks (before any weights load); raises ``RelufyError``."""
        if options.gguf_type != "f16" and not self.takes_gguf_type:
            raise RelufyError(f"--gguf-type applies to --layout powerinfer-gguf (this export's layout is {self.name})")

    def predictors_elsewhere(self, path) -> str:
        """Why ``relufy generate/bench`` do not read this layout's predictors (``relufy_predictors`` False)."""
        return f"{path}: a {self.name}-layout export; for --sparse predictor here, export with --layout hf"

    def write(self, tmp: Path, model, tokenizer, family, options, result, stats, perms, predictors, source_config, thresholds):
        """OUT's files in ``tmp``. ``thresholds``: per (site, expert). With ``folds_thresholds`` they are
        folded into the predictor weights (``layouts.fold_thresholds``): PowerInfer reads one
        ``sparse_threshold`` for every layer; otherwise the predictors stay as trained and their
        thresholds go to ``sparsity.safetensors``."""
        from ..names import SPARSITY_FILE
        from .card import write_card
        from .layouts import export_block, fold_thresholds, target_dtype, write_activation_counts, write_sparsity

        folded, scales = None, {}
        if self.folds_thresholds and predictors:
            folded, scales = fold_thresholds(predictors, thresholds)
            thresholds = dict.fromkeys(predictors, folded)
        engine_threshold = min((float(t) for t in thresholds.values()), default=options.predictor_threshold)
        dtype = target_dtype(options.dtype, source_config)
        model.to(dtype)
        block = RelufyBlock.read(model.config).with_updates(export=export_block(options, result, engine_threshold))
        model.config.relufy = block.to_dict()
        written = self.write_model(tmp, model, tokenizer, family, options, result, predictors, scales, folded, dtype)
        if self.engine:
            write_activation_counts(tmp, stats)
        write_sparsity(tmp / SPARSITY_FILE, stats, perms, predictors, options, thresholds)
        write_card(tmp, written, family, options, result, self)

    def write_model(self, tmp, model, tokenizer, family, options, result, predictors, scales, folded, dtype) -> dict:
        """The model (and predictor) files; returns the relufy config written."""
        raise NotImplementedError

    def card_snippet(self, options, family, activation: str) -> str:
        """The card's "How to load" section."""
        raise NotImplementedError


@register
class HfLayout(Layout):
    """``relufy convert``'s format plus ``predictors.safetensors``."""

    name = "hf"

    def write_model(self, tmp, model, tokenizer, family, options, result, predictors, scales, folded, dtype) -> dict:
        from ..modeling.save import write_relufy
        from .layouts import write_hf_predictors

        written = write_relufy(model, tmp, tokenizer, max_shard_size=options.max_shard_size)
        if predictors:
            write_hf_predictors(tmp, predictors, dtype)
        return written

    def card_snippet(self, options, family, activation: str) -> str:
        return """```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or relufy.load(path)
```

Predictors (if any) are in `predictors.safetensors` (listed in the index; transformers skips them):
`relufy.modeling.predictor.load_predictors(path)`."""


class _PowerInfer(Layout):
    """What both PowerInfer layouts need: predictors, and for the engine's architectures (dense
    models; every model with ``moe_in_engine``) its rope types, predictor input, head_dim, no biases."""

    engine = True
    folds_thresholds = True
    needs_predictors = True
    relufy_predictors = False
    moe_in_engine: ClassVar[bool] = True  # False: MoE models get per-expert folders, not the engine's checks
    predictor_place = ""  # where a subclass keeps its predictors, for messages

    def predictors_elsewhere(self, path) -> str:
        return (
            f"{path}: a {self.name}-layout export; {self.predictor_place}. For --sparse predictor here, export with --layout hf"
        )

    def check(self, path: str, config: dict, block, family, options) -> None:
        super().check(path, config, block, family, options)
        layout, activation = self.name, block.activation
        if not options.predictors:
            raise RelufyError(
                f"layout {layout} needs predictors (PowerInfer's converter takes a predictor folder): add --predictors"
            )
        if family.is_moe and not self.moe_in_engine:
            return
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
                f"layout {layout}: PowerInfer's converter cannot take rope type {rope_type!r} (only {', '.join(POWERINFER_ROPE)})"
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


@register
class PowerInferLayout(_PowerInfer):
    """The folders PowerInfer's ``convert.py`` reads (per expert for MoE models)."""

    name = "powerinfer"
    tags = ("powerinfer",)
    moe_in_engine = False

    predictor_place = "its predictors (predictor/model_*.pt) are for PowerInfer's converter"

    def write_model(self, tmp, model, tokenizer, family, options, result, predictors, scales, folded, dtype) -> dict:
        from ..modeling.save import write_relufy
        from .layouts import untie, write_powerinfer_folder, write_powerinfer_predictors

        dense = not family.is_moe
        if dense:
            untie(model)
        written = write_relufy(model, tmp, tokenizer, max_shard_size=options.max_shard_size)
        if dense:
            write_powerinfer_folder(tmp, written, family)
        write_powerinfer_predictors(tmp, predictors, scales, folded)
        return written

    def card_snippet(self, options, family, activation: str) -> str:
        if family.is_moe:
            return LAYOUTS["hf"].card_snippet(options, family, activation)  # the hf model folder
        if powerinfer_arch(family, activation) == "llama":
            also = (
                "a plain transformers Llama (`hidden_act: relu`): relu(gate) * up, this model's function"
                if activation == "reglu"
                else "a plain transformers Llama (`hidden_act: relu`), without the FATReLU threshold (`relufy.load` keeps it)"
            )
        else:
            also = "a plain dReLU Llama only through relufy (`relufy.load`), since `bamboo` is not a transformers type"
        return f"""This folder is PowerInfer's converter input (checked against SJTU-IPADS/PowerInfer d3ebd7c):

```bash
python convert.py --outfile THIS_FOLDER/model.powerinfer.gguf --outtype f16 --vocabtype bpe THIS_FOLDER THIS_FOLDER/predictor
# the GGUF beside activation/: PowerInfer's GPU builds read the neuron counts there for their GPU/CPU split
```

`--vocabtype spm` when the folder holds `tokenizer.model`. It also loads in transformers as
{also}."""


@register
class PowerInferGgufLayout(_PowerInfer):
    """``model.gguf``, the file PowerInfer's ``convert.py`` makes of the ``powerinfer`` folders."""

    name = "powerinfer-gguf"
    tags = ("powerinfer", "gguf")
    library = "gguf"
    takes_gguf_type = True

    predictor_place = "its predictors are inside model.gguf, for PowerInfer"

    def write_model(self, tmp, model, tokenizer, family, options, result, predictors, scales, folded, dtype) -> dict:
        from .layouts import write_gguf

        return write_gguf(tmp, model, tokenizer, family, options, result, predictors, scales, folded)

    def card_snippet(self, options, family, activation: str) -> str:
        kept = ", down projections kept f16 for PowerInfer's CPU kernel" if options.gguf_type == "q8_0" else ""
        return f"""`model.gguf` is PowerInfer's GGUF, the predictors inside: what its `convert.py --outtype
{options.gguf_type}` writes{kept} (checked against SJTU-IPADS/PowerInfer d3ebd7c).

```bash
./build/bin/main -m THIS_FOLDER/model.gguf -n 128 -p "Once upon a time"  # GPU builds: --vram-budget GiB
```

Keep `activation/` beside `model.gguf`: PowerInfer's GPU builds read the neuron counts there for their GPU/CPU split."""
