"""A config against its weights: what ``config.json`` describes must be what the weights hold.

Checked from the safetensors headers (or a GGUF's tensor table; ``relufy.io.gguf``) before any
model is built or loaded, so that a config and weights that do not belong together are one line
naming the mismatch, never a model run on part of its weights (transformers loads what matches
and prints a warning table) nor minutes spent building the skeleton of a config that claims
100,000 layers over a 36 KB file:

1. the counts that size the skeleton, from tensor names alone: the config's layers must each have
   tensors (``layers.N.``), and a MoE config's routed experts too. Counted as distinct indices
   present, so a name such as ``layers.999999999.x`` cannot buy a huge skeleton either;
2. then the model is built on the meta device (no memory; cheap once those counts hold) and the
   tensors transformers saves for it (``revert_weight_conversion``, tied weights left out, as
   ``save_pretrained`` writes them) are compared with the weights: missing, unexpected and
   misshapen tensors are refused, naming the first few.

Not refused, because transformers loads them correctly: an ``lm_head`` left out when the
embeddings are tied (or present anyway), buffers transformers no longer keeps (``inv_freq``,
``position_ids``), tensors a model class ignores on load (DeepSeek-V3's multi-token-prediction
layer), predictors in an older export's shards, a checkpoint saved without the base model's
prefix, and the expert layouts transformers converts on load (per-expert or fused
``gate_up_proj``/``down_proj`` tensors; Mixtral's ``block_sparse_moe`` and ``w1``/``w2``/``w3``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import RelufyError
from ..io.tensor_names import SAFETENSORS_LAYER, VERDICT, check_layer_count, names_shown, natural

_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_FUSED = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)")
_RENAMES = (
    (re.compile(r"\.block_sparse_moe\."), ".mlp."),
    (re.compile(r"(\.experts\.\d+)\.w1\.weight$"), r"\1.gate_proj.weight"),
    (re.compile(r"(\.experts\.\d+)\.w3\.weight$"), r"\1.up_proj.weight"),
    (re.compile(r"(\.experts\.\d+)\.w2\.weight$"), r"\1.down_proj.weight"),
)
_MAX_FUSED_EXPERTS = 1 << 16  # a fused tensor claiming more experts is left whole (and then refused)


def check_expert_count(declared, tensors: Mapping[str, tuple[int, ...]], where: str) -> None:
    """A MoE config's ``declared`` routed experts per layer must be in the weights: per-expert
    tensors (distinct indices) or fused ones (their first dimension, when they hold data)."""
    if not isinstance(declared, int) or isinstance(declared, bool) or declared < 1:
        return
    present = {int(m.group(1)) for m in map(_EXPERT.search, tensors) if m}
    found = len(present)
    for name, shape in tensors.items():
        if _FUSED.fullmatch(name) and len(shape) == 3 and all(shape):
            found = max(found, shape[0])
    if found and declared > found:
        raise RelufyError(
            f"{where}: config.json says {declared:,} routed experts per layer but the weights hold {found:,}; {VERDICT}"
        )


def check_counts(config: dict, tensors: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Step 1 alone, both ways, without torch or transformers (``relufy convert`` copies shards
    without either): the config's layers and routed experts must all be in the weights, and the
    weights may hold no layer or expert past them (a multi-token-prediction layer counted by
    ``num_nextn_predict_layers`` aside). Shapes of the FFNs and embeddings are the caller's
    (``relufy.conversion.validate_checkpoint``)."""
    from ..families import family_for
    from .remote import base_config_dict
    from .spec import ConfigView

    base = base_config_dict(config)
    family = family_for(base.get("model_type"))
    view = ConfigView(config)
    layers = view.num_hidden_layers
    check_layer_count(layers, tensors, where)
    beyond = []
    if isinstance(layers, int):
        extra = base.get("num_nextn_predict_layers")
        limit = layers + (extra if isinstance(extra, int) and extra > 0 else 0)
        beyond = [n for n in tensors if (m := SAFETENSORS_LAYER.search(n)) and int(m.group(1)) >= limit]
    if family.is_moe:
        experts = family.routed_experts(view)
        check_expert_count(experts, tensors, where)
        if isinstance(experts, int):
            beyond += [n for n in tensors if (m := _EXPERT.search(n)) and int(m.group(1)) >= experts and n not in beyond]
    if beyond:
        raise RelufyError(
            f"{where}: the weights hold {len(beyond)} tensor(s) that config.json does not describe "
            f"({names_shown(beyond)}); {VERDICT}"
        )


def _canonical(tensors: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """Tensor names and shapes in one layout: per-expert tensors named ``gate_proj``/``up_proj``/
    ``down_proj`` under ``mlp`` (fused experts split, Mixtral's names renamed); and for each such
    name the name it has in ``tensors`` (what messages show)."""
    out: dict[str, tuple[int, ...]] = {}
    origin: dict[str, str] = {}
    for stored, shape in tensors.items():
        name = stored
        for pattern, repl in _RENAMES:
            name = pattern.sub(repl, name)
        m = _FUSED.fullmatch(name)
        if m and len(shape) == 3 and 0 < shape[0] <= _MAX_FUSED_EXPERTS:
            experts, leaf = m.groups()
            if leaf == "gate_up_proj" and shape[1] % 2 == 0:
                for e in range(shape[0]):
                    for part in ("gate_proj", "up_proj"):
                        out[f"{experts}.{e}.{part}.weight"] = (shape[1] // 2, shape[2])
                        origin[f"{experts}.{e}.{part}.weight"] = stored
                continue
            if leaf == "down_proj":
                for e in range(shape[0]):
                    out[f"{experts}.{e}.down_proj.weight"] = (shape[1], shape[2])
                    origin[f"{experts}.{e}.down_proj.weight"] = stored
                continue
        out[name] = tuple(shape)
        origin[name] = stored
    return out, origin


def expected_tensors(config: dict):
    """``(required, optional, ignore_missing, ignore_unexpected, prefix, names)`` for a config dict:
    the tensors (name -> shape, canonical layout) ``save_pretrained`` writes for its model, the tied
    ones it leaves out, the patterns of keys transformers does not miss or does not mind, the base
    model's prefix, and the names ``save_pretrained`` gives the required tensors. Built on the meta
    device."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    from ..io.block import RelufyBlock
    from .spec import base_config

    _, base = base_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base)
    model.tie_weights()  # as from_pretrained ties them (a model built on meta is left untied)
    state = model.state_dict()
    kept = remove_tied_weights_from_state_dict(dict(state), model)
    tied = {k: v for k, v in state.items() if k not in kept}
    required, names = _canonical({k: tuple(v.shape) for k, v in revert_weight_conversion(model, dict(kept)).items()})
    optional = _canonical({k: tuple(v.shape) for k, v in revert_weight_conversion(model, tied).items()})[0] if tied else {}
    unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {r"rotary_emb\.inv_freq$", r"(^|\.)position_ids$"}
    if RelufyBlock.read(config) is not None:
        unexpected.add(r"\.predictor\.")  # exports made before predictors left the weight index
    missing = set(model._keys_to_ignore_on_load_missing or ())
    return required, optional, _regex(missing), _regex(unexpected), model.base_model_prefix, names


def _regex(patterns: set[str]) -> re.Pattern | None:
    return re.compile("|".join(f"(?:{p})" for p in sorted(patterns))) if patterns else None


def check_weights(config: dict, tensors: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Refuse, in one line naming the first few keys, a ``config`` (a config dict, relufy's
    included) that does not describe ``tensors`` (name -> shape, as stored in the weights)."""
    from .spec import base_config

    family, base = base_config(config)  # the config object: its attribute map and defaults apply
    check_layer_count(base.num_hidden_layers, tensors, where)
    if family.is_moe:
        check_expert_count(family.routed_experts(base), tensors, where)
    required, optional, ignore_missing, ignore_unexpected, prefix, names = expected_tensors(config)
    canonical, stored = _canonical(tensors)
    actual = {}
    for name, shape in canonical.items():
        if name not in required and name not in optional and f"{prefix}.{name}" in required:
            stored[f"{prefix}.{name}"] = stored[name]
            name = f"{prefix}.{name}"  # saved from the base model: transformers adds the prefix
        actual[name] = shape
    missing = {names[k] for k in required if k not in actual and not (ignore_missing and ignore_missing.search(k))}
    if missing:
        raise RelufyError(
            f"{where}: the weights lack {len(missing)} tensor(s) that config.json implies ({names_shown(missing)}); {VERDICT}"
        )
    unexpected = {
        stored[k]
        for k in actual
        if k not in required and k not in optional and not (ignore_unexpected and ignore_unexpected.search(k))
    }
    if unexpected:
        raise RelufyError(
            f"{where}: the weights hold {len(unexpected)} tensor(s) that config.json does not describe "
            f"({names_shown(unexpected)}); {VERDICT}"
        )
    wrong = sorted((k for k in actual if k in required or k in optional), key=natural)
    wrong = [k for k in wrong if actual[k] != required.get(k, optional.get(k))]
    if wrong:
        k = wrong[0]
        others = f" (and {len(wrong) - 1} more tensor(s))" if len(wrong) > 1 else ""
        part = f" (part of {stored[k]})" if stored[k] != k else ""
        raise RelufyError(
            f"{where}: tensor {k}{part} has shape {list(actual[k])} in the weights, but config.json implies "
            f"{list(required.get(k, optional.get(k)))}{others}; {VERDICT}"
        )


def _stored_tensors(source) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of the weights a folder source holds (safetensors headers); None for a GGUF
    (checked through its tensor table) or a folder without safetensors weights."""
    if source.gguf_file:
        return None
    from ..io.safetensors_index import Checkpoint
    from ..names import INDEX_FILE

    folder = Path(source.folder)
    index = folder / INDEX_FILE
    if not any(folder.glob("*.safetensors")) and not (index.exists() or index.is_symlink()):
        return None
    return {n: t.shape for n, t in Checkpoint(folder).loaded_tensors().items()}


def check_source(source, config: dict, tensors: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """``check_weights`` for a resolved ``relufy.io.source.Source``: a GGUF through its tensor table
    (``relufy.io.gguf.check_gguf``), a folder through its safetensors headers (``tensors``, when
    already read). A folder without safetensors weights (a config alone, which ``relufy info``
    reads; PyTorch ``.bin`` weights, which transformers reads) is left as it is."""
    if source.gguf_file:
        from ..io.gguf import check_gguf

        check_gguf(source.folder / source.gguf_file)
        return
    tensors = _stored_tensors(source) if tensors is None else tensors
    if tensors is not None:
        check_weights(config, tensors, source.where)


def checked_config(source, activation: str | None = None) -> dict:
    """``source.config_dict()`` once checked against the weights the source holds (safetensors
    headers or GGUF tensor infos, nothing loaded): sizes the weights do not have, and missing,
    unexpected or misshapen tensors, are refused in one line before any model is built. A
    ReLU-family model relufy did not write comes back as the relufy config that computes its
    function (``relufy.modeling.formats``); one whose function relufy cannot compute is refused
    unless ``activation`` names the function to read it as. Checked once per ``Source`` (the result
    rides on it)."""
    from .formats import describe, recognise

    cached = source.__dict__.get("_checked_config")
    if cached is None:
        raw = source.config_dict()
        tensors = _stored_tensors(source)
        found = None if source.gguf_file else recognise(raw, tensors, source.where)
        cached = raw if found is None else found.config(source.label)
        check_source(source, cached, tensors)
        source.__dict__["_checked_config"] = cached
        source.__dict__["_recognised"] = found
    found = source.__dict__.get("_recognised")
    if found is not None and not found.exact and activation is None:
        raise RelufyError(
            f"{source.where}: {found.why}; relufy convert --activation {found.activation} reads it as the dense "
            f"{describe(found.activation, None)} model those predictors approximate"
        )
    return dict(cached)
