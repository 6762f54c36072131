"""Save a (trained) in-memory relufy model in the exact format ``relufy convert`` writes."""

from __future__ import annotations

import json
from pathlib import Path

from ..families import family_for
from ..io.atomic import atomic_dir
from ..io.block import CORE_FIELDS, RelufyBlock
from ..names import MODELING_FILE, is_identity
from .remote import base_config_dict, relufy_config_dict, render_modeling


def save_relufy(model, out: str | Path, tokenizer=None, state_dict=None, force: bool = True, card_note: str = "") -> Path:
    """Write ``model`` (activation swapped by relufy.load / swap_activation) to ``out``:
    safetensors + relufy ``config.json`` + remote code + model card (+ tokenizer), atomically."""
    out = Path(out)
    with atomic_dir(out, force=force) as tmp:
        write_relufy(model, tmp, tokenizer, state_dict, card_note)
    return out


def write_relufy(model, tmp: Path, tokenizer=None, state_dict=None, card_note: str = "", max_shard_size="5GB") -> dict:
    """``save_relufy`` into an existing (temporary) folder; returns the written ``config.json``."""
    from .card import model_card
    from .spec import ActivationSpec

    config = model.config
    block = RelufyBlock.read(config)
    if block is None:
        raise ValueError("the model carries no relufy block: load it with relufy.load or swap_activation")
    raw = dict(config.relufy)
    family = family_for(block.base_model_type)
    tmp = Path(tmp)
    model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    written = json.loads((tmp / "config.json").read_text())
    written["relufy"] = raw
    base = base_config_dict(written)
    extra = {k: v for k, v in raw.items() if k not in CORE_FIELDS}
    new = relufy_config_dict(base, family, block.activation, block.threshold, block.source, extra)
    (tmp / "config.json").write_text(json.dumps(new, indent=2, sort_keys=True) + "\n")
    if not is_identity(block.activation):
        (tmp / MODELING_FILE).write_text(render_modeling(family))
    spec = ActivationSpec(activation=block.activation, threshold=block.threshold)
    card = model_card(new, family, spec, block.source, found=0)
    (tmp / "README.md").write_text(card + (f"\n{card_note}\n" if card_note else ""))
    return new
