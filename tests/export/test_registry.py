"""The export layouts are classes registered by name (relufy.export.registry), and only that
module compares layout names."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_args

import pytest

from relufy.export.options import ExportOptions
from relufy.export.registry import LAYOUTS, Layout, layout_named, register
from relufy.io.block import ExportInfo

PACKAGE = Path(__file__).resolve().parents[2] / "relufy"
REGISTRY = PACKAGE / "export" / "registry.py"


def layout_comparisons(source: str, names=tuple(LAYOUTS)) -> list[int]:
    """Lines of ``source`` comparing something named ``*layout`` with a layout name (``==``, ``!=``,
    ``in`` / ``not in`` a literal tuple, list or set)."""

    def strings(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return set().union(*(strings(e) for e in node.elts)) if node.elts else set()
        return set()

    def is_layout(node) -> bool:
        name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
        return name.lower().endswith("layout")

    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        for op, left, right in zip(node.ops, operands[:-1], operands[1:], strict=True):
            if not isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)):
                continue
            if (is_layout(left) and strings(right) & set(names)) or (is_layout(right) and strings(left) & set(names)):
                found.append(node.lineno)
    return found


def test_registry_names_are_the_config_and_option_names():
    assert tuple(LAYOUTS) == get_args(ExportInfo.model_fields["layout"].annotation)
    assert tuple(LAYOUTS) == get_args(ExportOptions.model_fields["layout"].annotation)
    for name, layout in LAYOUTS.items():
        assert isinstance(layout, Layout) and layout.name == name and layout_named(name) is layout


def test_registry_refuses_a_second_layout_of_a_name():
    with pytest.raises(ValueError, match="registered twice"):

        @register
        class Again(Layout):
            name = "hf"

    assert type(LAYOUTS["hf"]).__name__ == "HfLayout"


def test_scan_finds_planted_layout_comparisons():
    planted = """
if options.layout == "powerinfer":
    pass
engine = layout in ("powerinfer", "powerinfer-gguf")
hf = "hf" != export.layout
other = layout not in ["hf"]
fine = layout == "experts"  # an FFN weight layout, no export layout
also_fine = kind == "powerinfer"
"""
    assert layout_comparisons(planted) == [2, 4, 5, 6]


def test_no_layout_comparison_outside_the_registry():
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != REGISTRY
        for line in layout_comparisons(path.read_text())
    ]
    assert not found, "layout names compared outside relufy/export/registry.py (use a Layout attribute): " + ", ".join(found)
