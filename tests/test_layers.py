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
    return imports_of_source(name, path.name == "__init__.py", path.read_text(), modules)


def imports_of_source(name: str, is_package: bool, source: str, modules: dict[str, Path]) -> set[str]:
    """Every relufy module the source text of module ``name`` imports: ``import`` and ``from``
    statements, and calls of ``importlib.import_module`` / ``__import__`` with a literal name (so
    an upward import cannot hide in a string)."""
    package = name if is_package else name.rpartition(".")[0]

    def relative(level: int, module: str | None) -> str:
        base = package.split(".")[: len(package.split(".")) - level + 1]
        return ".".join(base + ([module] if module else []))

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            target = relative(node.level, node.module) if node.level else node.module or ""
            if target.split(".")[0] != "relufy":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "relufy")
        elif isinstance(node, ast.Call):
            found.update(t for t in _dynamic_imports(node, relative) if t.split(".")[0] == "relufy")
    return found - {name}


def _literal(node):
    """The value of a literal argument (a string, or a list / tuple of strings), else None."""
    try:
        return ast.literal_eval(node) if node is not None else None
    except (ValueError, TypeError, SyntaxError):
        return None


def _dynamic_imports(call: ast.Call, relative) -> list[str]:
    """The modules an ``importlib.import_module("...")`` or ``__import__("...")`` call imports,
    when its name is a literal string (a name only known at run time cannot be checked)."""
    func = call.func
    called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if called not in ("import_module", "__import__") or not call.args:
        return []
    target = _literal(call.args[0])
    if not isinstance(target, str):
        return []
    keywords = {k.arg: k.value for k in call.keywords}
    if called == "import_module":
        if target.startswith("."):  # relative to the package it is called from (package=__package__)
            level = len(target) - len(target.lstrip("."))
            target = relative(level, target[level:] or None)
        return [target]
    # __import__(name, globals, locals, fromlist, level)
    fromlist = _literal(call.args[3] if len(call.args) > 3 else keywords.get("fromlist")) or ()
    level = _literal(call.args[4] if len(call.args) > 4 else keywords.get("level")) or 0
    if isinstance(level, int) and level > 0:
        target = relative(level, target or None)
    if isinstance(fromlist, str):
        fromlist = (fromlist,)
    return [target] + [f"{target}.{f}" for f in fromlist if isinstance(f, str) and f != "*"]


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


def test_dynamic_imports_are_seen():
    """An upward import through importlib or ``__import__`` is caught like an import statement."""
    modules = _modules()
    planted = {
        'import importlib\n\ndef f():\n    return importlib.import_module("relufy.cli")\n': "relufy.cli",
        'from importlib import import_module\nimport_module("relufy.export.pipeline")\n': "relufy.export.pipeline",
        'import importlib\nimportlib.import_module("..cli", package=__package__)\n': "relufy.cli",
        '__import__("relufy.cli")\n': "relufy.cli",
        '__import__("relufy", fromlist=["cli"])\n': "relufy.cli",
    }
    for source, target in planted.items():
        found = imports_of_source("relufy.io.gguf", False, source, modules)
        assert target in found, source
        upward = [t for t in found if _layer(t) > _layer("relufy.io.gguf")]
        assert upward, source
    # a name known only at run time, or outside relufy, is no import of a relufy module
    assert not imports_of_source("relufy.io.gguf", False, "import importlib\nimportlib.import_module(name)\n", modules)
    assert not imports_of_source("relufy.io.gguf", False, 'import importlib\nimportlib.import_module("gguf")\n', modules)
