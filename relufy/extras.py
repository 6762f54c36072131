"""Optional features and the pip extra that installs each.

A plain ``pip install relufy`` runs ``convert``, ``info``, ``generate`` and ``eval`` on local text;
training, exporting, plots, hub datasets and benchmark tasks need an extra. Their packages are
imported where they are used, through ``need`` or after ``require``, so that a missing one is a
one-line ``RelufyError`` naming the extra to install, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util

from .errors import RelufyError

# extra -> the modules a feature of it imports (ninja is optional: the PyTorch kernels stand in)
EXTRAS: dict[str, tuple[str, ...]] = {
    "train": ("datasets", "matplotlib", "peft"),
    "export": ("matplotlib",),
    "eval": ("lm_eval", "datasets"),
    "plot": ("matplotlib",),
    "tensorboard": ("tensorboard",),
    "wandb": ("wandb",),
}


def install_hint(extra: str) -> str:
    return f"pip install 'relufy[{extra}]'"


def missing(modules: tuple[str, ...] | list[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported here (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            out.append(name)
    return out


def require(extra: str, feature: str, modules: tuple[str, ...] | None = None) -> None:
    """Refuse ``feature`` in one line when a module of ``extra`` (or of ``modules``) is missing."""
    absent = missing(EXTRAS[extra] if modules is None else modules)
    if absent:
        raise RelufyError(f"{feature} needs {', '.join(absent)}: {install_hint(extra)}")


def need(module: str, extra: str, feature: str):
    """``importlib.import_module(module)``, or a one-line refusal of ``feature`` naming ``extra``
    when the module (or a package it imports) is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        name = (e.name or module).partition(".")[0]
        raise RelufyError(f"{feature} needs {name}: {install_hint(extra)}") from None
