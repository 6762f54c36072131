"""``relufy export``: sparsity statistics, neuron reordering, predictors and engine layouts."""

from __future__ import annotations

import re
from pathlib import Path

_NAME = re.compile(r"^(?P<ffn>.+?)(?:\.(?P<expert>\d+))?\.predictor\.(?P<fc>fc[12])\.weight$")


def load_predictors(path: str | Path) -> dict[tuple[str, int | None], "torch.nn.Module"]:  # noqa: F821
    """Predictors of an ``hf`` export: ``{(ffn module path, expert or None): Predictor}``."""
    from safetensors.torch import load_file

    from .predictors import Predictor

    tensors = load_file(str(Path(path) / "predictors.safetensors"))
    found: dict[tuple[str, int | None], dict] = {}
    for name, t in tensors.items():
        m = _NAME.match(name)
        if m is None:
            continue
        key = (m["ffn"], int(m["expert"]) if m["expert"] is not None else None)
        found.setdefault(key, {})[m["fc"]] = t
    out = {}
    for key, w in found.items():
        p = Predictor(w["fc1"].shape[1], w["fc2"].shape[0], w["fc1"].shape[0]).to(w["fc1"].dtype)
        p.load_state_dict({"fc1.weight": w["fc1"], "fc2.weight": w["fc2"]})
        out[key] = p.eval().requires_grad_(False)
    return out
