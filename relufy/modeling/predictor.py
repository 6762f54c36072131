"""Sparsity predictors: the module engines run, ``fc2(relu(fc1(x)))`` per FFN (per expert for
MoE), no biases, and reading them back from an ``hf`` export's ``predictors.safetensors``.

A predictor scores every neuron of its FFN from the token's predictor input
(``relufy.measure.sites.InputTap``); a neuron is predicted active when its score is at least the
threshold (PowerInfer's rule). Training them is ``relufy.export.predictors``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from ..names import PREDICTORS_FILE


class Predictor(nn.Module):
    def __init__(self, hidden: int, width: int, rank: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, rank, bias=False)
        self.fc2 = nn.Linear(rank, width, bias=False)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def auto_rank(hidden: int, width: int, sparsity: float, budget: float = 0.5, multiple: int = 16) -> int:
    """A rank whose predictor costs ``budget`` times the FFN work left at ``sparsity``:
    ``rank * (hidden + width) ~= budget * (1 - sparsity) * 3 * hidden * width``, rounded up to a
    multiple of 16 and kept within [16, min(hidden, width)]. Denser layers get larger predictors."""
    density = 1.0 - sparsity if math.isfinite(sparsity) else 1.0
    rank = budget * density * 3 * hidden * width / (hidden + width)
    rank = multiple * math.ceil(rank / multiple)
    return int(max(multiple, min(rank, min(hidden, width))))


_NAME = re.compile(r"^(?P<ffn>.+?)(?:\.(?P<expert>\d+))?\.predictor\.(?P<fc>fc[12])\.weight$")


def load_predictors(path: str | Path) -> dict[tuple[str, int | None], Predictor]:
    """Predictors of an ``hf`` export: ``{(ffn module path, expert or None): Predictor}``. The file
    must be a regular file inside the folder with a sound header (``relufy.io``), else one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..errors import RelufyError
    from ..io.paths import inside
    from ..io.safetensors_index import read_header

    file = inside(Path(path) / PREDICTORS_FILE, Path(path))
    read_header(file)  # regular file, header within bounds, data as the header describes
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RelufyError(f"{file}: not a readable predictors file ({first})") from None
    found: dict[tuple[str, int | None], dict] = {}
    for name, t in tensors.items():
        m = _NAME.match(name)
        if m is None:
            continue
        key = (m["ffn"], int(m["expert"]) if m["expert"] is not None else None)
        found.setdefault(key, {})[m["fc"]] = t
    out = {}
    for key, w in found.items():
        fc1, fc2 = w.get("fc1"), w.get("fc2")
        if fc1 is None or fc2 is None or fc1.dim() != 2 or fc2.dim() != 2 or fc2.shape[1] != fc1.shape[0]:
            raise RelufyError(f"{file}: the predictor of {key[0]} has no matching fc1 and fc2 weights")
        p = Predictor(w["fc1"].shape[1], w["fc2"].shape[0], w["fc1"].shape[0]).to(w["fc1"].dtype)
        p.load_state_dict({"fc1.weight": w["fc1"], "fc2.weight": w["fc2"]})
        out[key] = p.eval().requires_grad_(False)
    return out
