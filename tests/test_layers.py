"""The package reads top-down: each module imports only from its own layer or the layers above,
and no import cycle exists (imports inside functions included).

The layer list below is the one place the plan is written; a new module that does not fit it
fails here until it is placed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "relufy"

LAYERS = [
    (
        *("relufy", "relufy.errors", "relufy.names", "relufy.options", "relufy.activations", "relufy.progress"),
        *("relufy.embedded", "relufy.extras"),
    ),
    ("relufy.families",),  # the architecture table
    ("relufy.io",),  # bytes on disk: safetensors, GGUF, atomic outputs, path rules
    ("relufy.modeling",),  # the activation swap, remote code, load/save, tokenizer, predictor module
    ("relufy.text", "relufy.measure"),  # evaluation text; sites, observers, stats, eval
    ("relufy.conversion", "relufy.model_info"),
    ("relufy.train",),
    ("relufy.export",),
    ("relufy.sparse",),  # reads export's files, not its code
    ("relufy.generate", "relufy.bench", "relufy.cli", "relufy.__main__", "relufy.pipelines"),  # commands
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every relufy module ``name`` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "relufy":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "relufy")
    return found - {name}


def _layer(name: str) -> int:
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if name == prefix or (prefix != "relufy" and name.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer of tests/test_layers.py: place it"
    return best[0]


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_upward_import():
    upward = [
        f"{name} (layer {_layer(name)}) imports {target} (layer {_layer(target)})"
        for name, targets in _graph().items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_every_module_is_placed():
    for name in _modules():
        _layer(name)
