"""Layer indices in tensor names, checked against the count a config or GGUF header declares, with
no model built and neither torch nor transformers imported (``relufy convert`` copies shards
without either). Shape checks against a built model are ``relufy.modeling.weights``'."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..errors import RelufyError

SAFETENSORS_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
GGUF_LAYER = re.compile(r"^blk\.(\d+)\.")
SHOWN = 3
VERDICT = "config and weights do not belong together"


def natural(name: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def names_shown(names: Iterable[str]) -> str:
    names = sorted(names, key=natural)
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


def check_layer_count(
    declared,
    names: Iterable[str],
    where: str,
    pattern: re.Pattern = SAFETENSORS_LAYER,
    spelled: str = "model.layers.{}.",
    claimed_by: str = "config.json",
) -> None:
    """Every one of the ``declared`` layers must have tensors among ``names`` (``pattern`` captures a
    name's layer index; ``spelled`` is how a layer's names start and ``claimed_by`` what declares
    the count, for the message)."""
    if not isinstance(declared, int) or isinstance(declared, bool):
        return  # not a size: the config check names it
    present = {int(m.group(1)) for m in map(pattern.search, names) if m}
    if declared <= len(present) and all(i in present for i in range(declared)):
        return
    first = next(i for i in range(len(present) + 1) if i not in present)
    raise RelufyError(
        f"{where}: {claimed_by} says {declared:,} layers (num_hidden_layers) but the weights hold {len(present):,}: "
        f"no tensor {spelled.format(first)}*; {VERDICT}"
    )
