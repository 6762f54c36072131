"""The ``relufy`` block of config.json has one writer: ``relufy.io.block.RelufyBlock``
(``create`` / ``with_updates`` / ``without``, then ``to_dict``). A second writer (a dict literal
with the block's keys, or a dict stored or changed in place as ``.relufy`` / ``["relufy"]``) would
write keys the model does not declare or check; this test finds one in relufy's source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from relufy.io.block import RelufyBlock

PACKAGE = Path(__file__).resolve().parents[1] / "relufy"
WRITER = "io/block.py"
# keys that only the block holds: a dict with two of them is a block
IDENTIFYING = frozenset({"activation", "base_activation", "base_model_type", "base_architectures", "relufy_version"})
_MUTATORS = frozenset({"update", "pop", "setdefault", "clear", "popitem", "__setitem__"})
# second writers not yet moved to RelufyBlock, in files this change does not own (path -> why)
ALLOWED: dict[str, str] = {}  # path under relufy/ -> why it may write a block of its own


def _is_block(node: ast.AST) -> bool:
    """``X.relufy`` or ``X["relufy"]``."""
    if isinstance(node, ast.Attribute):
        return node.attr == "relufy"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "relufy"
    return False


def _is_new_dict(node: ast.AST) -> bool:
    return isinstance(node, (ast.Dict, ast.DictComp)) or (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args
    )


def block_writers(source: str) -> list[tuple[int, str]]:
    """Where ``source`` writes a relufy block other than through ``RelufyBlock``: (line, what)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Dict):
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if len(IDENTIFYING & keys) >= 2:
                found.append((node.lineno, "a dict literal with the block's keys"))
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id == "dict" and len(IDENTIFYING & {k.arg for k in node.keywords}) >= 2:
                found.append((node.lineno, "a dict(...) with the block's keys"))
            elif isinstance(func, ast.Attribute) and func.attr in _MUTATORS and _is_block(func.value):
                found.append((node.lineno, f"the block changed in place (.{func.attr})"))
        elif isinstance(node, ast.AugAssign) and _is_block(node.target):
            found.append((node.lineno, "the block merged in place (|=)"))
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if _is_block(target) and node.value is not None and _is_new_dict(node.value):
                    found.append((node.lineno, "a dict built in place stored as the block"))
                elif isinstance(target, ast.Subscript) and _is_block(target.value):
                    found.append((node.lineno, "a key of the block set in place"))
    return sorted(found)


def tree_writers(root: Path = PACKAGE) -> dict[str, list[tuple[int, str]]]:
    """``block_writers`` of every module under ``root`` but the writer itself, by path."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        name = path.relative_to(root).as_posix()
        if name != WRITER and (hits := block_writers(path.read_text())):
            out[name] = hits
    return out


PLANTED = """
def save(model, family):
    model.config.relufy = {"activation": "drelu", "threshold": None, "base_activation": "silu", "trained": {}}
"""


@pytest.mark.parametrize(
    "source,lines",
    [
        (PLANTED, [3, 3]),  # the literal, and storing it
        ("block = dict(activation='drelu', base_activation='silu', base_model_type='llama')\n", [1]),
        ("config['relufy'] = {**config['relufy'], 'export': {}}\n", [1]),
        ("model.config.relufy['cutoffs'] = cutoffs\n", [1]),
        ("model.config.relufy.update(cutoffs=cutoffs)\n", [1]),
        ("config.relufy |= {'trained': {}}\n", [1]),
        # through the model: not a second writer
        ("model.config.relufy = RelufyBlock.create(activation='drelu', base_activation='silu').to_dict()\n", []),
        ("model.config.relufy = block.with_updates(cutoffs={}).to_dict()\n", []),
        # reading the block, or an unrelated dict
        ("act = config.relufy['activation']\nrow = {'activation': 'drelu', 'ppl': 3.0}\n", []),
    ],
)
def test_block_writers_finds_a_second_writer(source, lines):
    assert [line for line, _ in block_writers(source)] == lines


def test_a_planted_second_writer_in_a_tree_is_found(tmp_path):
    (tmp_path / "io").mkdir()
    (tmp_path / "io" / "block.py").write_text(PLANTED)  # the writer itself may build dicts
    (tmp_path / "ok.py").write_text("x = {'activation': 'drelu'}\n")
    (tmp_path / "second.py").write_text(PLANTED)
    assert list(tree_writers(tmp_path)) == ["second.py"]


def test_relufy_writes_the_block_only_through_the_model():
    rest = {path: hits for path, hits in tree_writers().items() if path not in ALLOWED}
    assert not rest, f"relufy blocks written outside relufy/io/block.py (use RelufyBlock): {rest}"


def test_every_written_key_is_declared():
    """The keys relufy's writers put in the block are fields of the model, not unknown extras."""
    block = RelufyBlock.create(
        activation="fatrelu",
        threshold=0.1,
        base_model_type="llama",
        base_architectures=["LlamaForCausalLM"],
        base_activation="silu",
        source="org/base",
        relufy_version="0",
        source_format="ProSparse",
        cutoffs={"model.layers.0.mlp": 1},
        trained={"recipe": "r", "steps": 1, "tokens": 2},
        base_model="org/base",
        source_revision="abc",
        license="mit",
        license_name="x",
        license_link="LICENSE",
    ).with_updates(export={"layout": "hf", "predictors": {"threshold": 0.5, "mean_recall": 0.9, "predictor_cost": 0.1}})
    assert block.__pydantic_extra__ == {}
    assert block.export.predictors.__pydantic_extra__ == {}
    written = block.to_dict()
    assert written["cutoffs"] == {"model.layers.0.mlp": 1.0} and "predictors" in written["export"]
    assert "sparsity" not in written["export"]  # a field not given stays out of config.json
    assert RelufyBlock.read({"relufy": written}).to_dict() == written
    # what relufy.modeling.card reads, as written
    assert written["trained"] == {"recipe": "r", "steps": 1, "tokens": 2} and written["license"] == "mit"
    assert "base_model" not in block.without("base_model").to_dict()
    # a measured figure is kept as measured: an int stays an int, an overflowed perplexity inf
    figures = {"min_recall": 1, "heldout_ppl_predicted": float("inf")}
    rewritten = block.with_updates(export={"predictors": figures}).to_dict()
    assert rewritten["export"]["predictors"] == figures and type(rewritten["export"]["predictors"]["min_recall"]) is int


def test_a_bad_write_is_refused_in_one_line():
    from relufy.errors import RelufyError

    with pytest.raises(RelufyError, match="the relufy block's threshold: Input should be a valid number"):
        RelufyBlock.create(activation="fatrelu", threshold="0.1", base_model_type="llama", base_activation="silu")
