"""``relufy.load``: any model relufy reads, as a transformers model, without remote code."""

from __future__ import annotations

from pathlib import Path

from ..errors import RelufyError
from ..families import family_for
from ..io.block import RelufyBlock
from ..names import is_identity
from .ffn import set_cutoffs, swap_ffn


def swap_activation(model, activation: str, threshold: float | None = None, source: str | None = None):
    """Swap the FFN activation of a loaded transformers model in place and record it in its config.

    The config's activation key is set to ``relufy_<activation>`` (unknown to transformers), so a
    plain ``save_pretrained`` of the result cannot be reloaded as SwiGLU by mistake. The block's
    magnitude cutoffs (``relufy.cutoffs``) apply when the activation is the one they were
    calibrated on; another activation drops them.
    """
    from .spec import activation_spec

    spec = activation_spec(activation, threshold)
    config = model.config
    known = RelufyBlock.read(config)
    family = family_for(known.base_model_type if known else config.model_type)
    swap_ffn(model, family.ffn_classes, spec.activation, spec.threshold)
    if known is None:
        from .. import __version__

        block = RelufyBlock.create(
            activation=spec.activation,
            threshold=spec.threshold,
            base_model_type=family.model_type,
            base_architectures=list(config.architectures or []),
            base_activation=getattr(config, family.act_key),
            source=source or getattr(config, "_name_or_path", ""),
            relufy_version=__version__,
        )
    elif (known.activation, known.threshold) != (spec.activation, spec.threshold):
        # cutoffs were calibrated on the other activation's values
        block = known.without("cutoffs").with_updates(activation=spec.activation, threshold=spec.threshold)
    else:
        block = known.with_updates(activation=spec.activation, threshold=spec.threshold)
    try:
        set_cutoffs(model, block.cutoffs)
    except ValueError as e:
        raise RelufyError(f"config.json: the relufy block's {e}") from None
    config.relufy = block.to_dict()
    setattr(config, family.act_key, block.base_activation if is_identity(spec.activation) else f"relufy_{spec.activation}")
    return model


def load(
    path: str | Path,
    activation: str | None = None,
    threshold: float | None = None,
    **kwargs,
):
    """Load a model folder, ``.gguf`` file or hub id as a transformers ``*ForCausalLM``.

    A relufy checkpoint comes back with its recorded activation, a ReLU-family model relufy did
    not write (``relufy.modeling.formats``) with the relufy activation that computes it, any other
    with its own (SwiGLU) unless ``activation`` asks for another, which is then swapped in memory. Extra
    keyword arguments go to ``from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    from transformers import AutoModelForCausalLM

    from ..io.source import resolve
    from .spec import activation_spec, base_config

    source = resolve(path)
    from .weights import checked_config

    # config against the weights' headers (a mismatch is one line, before loading); a ReLU-family
    # model relufy did not write comes back as the relufy config of its function
    config = checked_config(source, activation)
    block = RelufyBlock.read(config, str(path))
    family, base = base_config(config)
    if activation is None and block:
        activation, threshold = block.activation, block.threshold
    spec = activation_spec(activation or "swiglu", threshold)
    try:
        if source.gguf_file:
            model, info = AutoModelForCausalLM.from_pretrained(
                source.folder, gguf_file=source.gguf_file, output_loading_info=True, **kwargs
            )
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(source.folder, config=base, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as e:
        raise RelufyError(f"{path}: cannot load the model ({str(e).splitlines()[0]})") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would run these randomly initialised
        raise RelufyError(
            f"{path}: the weights lack {len(missing)} tensor(s) that config.json implies (e.g. {missing[0]}); "
            "config and weights do not belong together"
        )
    if block:
        model.config.relufy = block.to_dict()
    return swap_activation(model, spec.activation, spec.threshold, source=source.label)


def skeleton(config: dict):
    """The model of a relufy config dict on the meta device (no weights), activation swapped:
    enough to list its FFN sites and shapes."""
    import torch
    from transformers import AutoModelForCausalLM

    from .spec import base_config

    _, base = base_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base)
    block = RelufyBlock.read(config)
    if block:
        model.config.relufy = block.to_dict()
    return swap_activation(model, block.activation if block else "swiglu", block.threshold if block else None)


__all__ = ["load", "skeleton", "swap_activation"]
