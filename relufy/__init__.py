"""relufy: turn SwiGLU language models (dense and MoE) into sparse-activation dReLU models.

Public API::

    relufy.convert(src, out, activation="drelu")   # checkpoint -> checkpoint
    relufy.load(path, activation=None)              # -> transformers model, activation swapped
    relufy.info(path)                               # -> ModelInfo
"""

__version__ = "0.1.0"

from .activations import GATED_ACTIVATIONS  # noqa: E402
from .convert import convert  # noqa: E402
from .errors import RelufyError  # noqa: E402
from .info import info  # noqa: E402
from .modeling.load import load  # noqa: E402

__all__ = ["convert", "load", "info", "RelufyError", "GATED_ACTIVATIONS", "__version__"]
