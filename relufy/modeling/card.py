"""The model card (README.md) of a converted or trained checkpoint."""

from __future__ import annotations

from ..families import Family
from ..io.block import RelufyBlock
from ..names import is_identity
from .spec import ActivationSpec


def model_card(config: dict, family: Family, spec: ActivationSpec, source: str, found: int) -> str:
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
    return f"""---
library_name: transformers
tags: [relufy, {spec.activation}, sparse-activation]
---
# {spec.activation} conversion of `{source}`

Converted by relufy {RelufyBlock.read(config).relufy_version} (Turbo Sparse, arXiv 2406.05955).

- Family: `{family.model_type}`{f", {found} FFN weight tensors" if found else ""}
- FFN: {formula}
- Weights: the original weights, unchanged{" (dtype " + str(config.get("dtype")) + ")" if config.get("dtype") else ""}

A freshly converted model is not yet useful: the activation changed under weights trained for
SwiGLU, so perplexity is very high until the model is trained further (`relufy train`).

```python
from transformers import AutoModelForCausalLM
model = {load}
```

Loading without `trust_remote_code` fails on purpose: the original architecture would compute
SwiGLU with these weights. The `relufy` block of `config.json` records the conversion.
"""
