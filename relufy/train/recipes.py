"""The recipes that ship with relufy: training recipes and Accelerate configs, found by name.

``relufy recipes list`` prints each name with the first line of its header comment;
``relufy recipes copy NAME DEST`` writes one out to edit; ``relufy train NAME`` runs a shipped
training recipe by name (a file of that name, when there is one, wins). Training recipes are
named after their file (``demo-smollm2-cpu``), Accelerate configs ``accelerate/NAME``
(``accelerate/fsdp2``).
"""

from __future__ import annotations

import importlib.resources
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import RelufyError
from ..options import Options, option_field

ACCELERATE = "accelerate"
SUFFIXES = (".yaml", ".yml")


class RecipesListOptions(Options):
    """How ``relufy recipes list`` prints (nothing to choose)."""


class RecipesCopyOptions(Options):
    """How ``relufy recipes copy`` writes."""

    force: bool = option_field(False, description="Replace DEST if it exists.")


@dataclass(frozen=True)
class ShippedRecipe:
    name: str  # ``demo-smollm2-cpu``, ``accelerate/fsdp2``
    path: Path
    kind: Literal["train", "accelerate"]

    @property
    def summary(self) -> str:
        return header_line(self.path)


def root() -> Path:
    """The folder of the shipped recipes (inside the installed package)."""
    return Path(str(importlib.resources.files("relufy").joinpath("recipes")))


def header_line(path: Path) -> str:
    """The first line of a YAML file's leading comment, without its ``#`` ("" when it has none)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ""
    for line in lines:
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text:
            return text
    return ""


def shipped(kind: Literal["train", "accelerate"] | None = None) -> list[ShippedRecipe]:
    """Every shipped recipe (of ``kind``), training recipes first, each group sorted by name."""
    folder = root()
    out = []
    if kind in (None, "train"):
        out += [ShippedRecipe(p.stem, p, "train") for p in sorted(folder.glob("*.y*ml")) if p.suffix in SUFFIXES]
    if kind in (None, "accelerate"):
        out += [
            ShippedRecipe(f"{ACCELERATE}/{p.stem}", p, "accelerate")
            for p in sorted((folder / ACCELERATE).glob("*.y*ml"))
            if p.suffix in SUFFIXES
        ]
    return out


def find(name: str, kind: Literal["train", "accelerate"] | None = None) -> ShippedRecipe:
    """The shipped recipe called ``name`` (``.yaml`` may be added); else one line listing the names."""
    recipes = shipped(kind)
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    for recipe in recipes:
        if stem == recipe.name:
            return recipe
    what = "training recipe" if kind == "train" else "recipe"
    raise RelufyError(f"no {what} named {name!r}; shipped: {', '.join(r.name for r in recipes)}")


def resolve(spec: str | Path) -> Path:
    """What ``relufy train SPEC`` reads: the path ``spec`` when it exists, else the shipped
    training recipe of that name; a missing path that is no recipe name is refused in one line."""
    path = Path(spec).expanduser()
    if path.exists():
        return path
    try:
        return find(str(spec), "train").path
    except RelufyError:
        names = ", ".join(r.name for r in shipped("train"))
        raise RelufyError(f"recipe {spec} not found: no such file, nor a shipped recipe ({names})") from None


def copy(name: str, dest: str | Path, force: bool = False) -> Path:
    """Write the shipped recipe ``name`` to ``dest`` (into it, under the recipe's file name, when
    ``dest`` is a folder), atomically; an existing file is replaced only with ``force``."""
    from ..io.atomic import atomic_file
    from ..io.paths import check_output_file, user_path

    recipe = find(name)
    target = user_path(dest, "DEST")
    if target.is_dir():
        target = target / recipe.path.name
    target = check_output_file(target, [recipe.path.resolve()], "DEST")  # ``..`` and links resolved; no input touched
    if target.exists() and not force:
        raise RelufyError(f"{target} exists (--force replaces it)")
    with atomic_file(target) as tmp:
        shutil.copyfile(recipe.path, tmp)
    return target


def table() -> str:
    """``relufy recipes list``: one line per recipe, its name and its summary."""
    recipes = shipped()
    width = max(len(r.name) for r in recipes)
    return "\n".join(f"{r.name:<{width}}  {r.summary}".rstrip() for r in recipes)
