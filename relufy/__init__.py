"""relufy: turn SwiGLU language models (dense and MoE) into sparse-activation dReLU models.

Public API::

    relufy.convert(src, out, activation="drelu")   # checkpoint -> checkpoint
    relufy.load(path, activation=None)              # -> transformers model, activation swapped
    relufy.info(path)                               # -> ModelInfo

Attributes are imported on first use, so that ``relufy convert`` of an unchanged checkpoint
never imports torch or transformers.
"""

__version__ = "0.1.0"

_LAZY = {
    "convert": ("relufy.conversion", "convert"),
    "load": ("relufy.modeling.load", "load"),
    "swap_activation": ("relufy.modeling.load", "swap_activation"),
    "info": ("relufy.model_info", "info"),
    "RelufyError": ("relufy.errors", "RelufyError"),
    "GATED_ACTIVATIONS": ("relufy.activations", "GATED_ACTIVATIONS"),
}
__all__ = [*_LAZY, "__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'relufy' has no attribute {name!r}")
