"""The relufy block of config.json is checked when read: values the modeling code reads raw
(``threshold``, ``cutoffs``) must be JSON numbers; a malformed block is one line in every command."""

from __future__ import annotations

import json

import pytest
from safety import Snapshot, assert_refused
from tiny import drelu_with_text

from relufy.errors import RelufyError
from relufy.io.block import RelufyBlock


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("block"))


def _with_block(model, tmp_path, **block):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["relufy"].update(block)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


COMMANDS = {
    "info": lambda m, t: ("info", m),
    "generate": lambda m, t: ("generate", m, "--max-new-tokens", "1"),
    "eval": lambda m, t: ("eval", m, "--data", t, "--seq-len", "32"),
}


@pytest.mark.parametrize(
    "cutoffs,needle",
    [
        ({"model.layers.0.mlp": "0.5"}, "the relufy block's cutoffs.model.layers.0.mlp: Input should be a valid number"),
        ({"model.layers.0.mlp": True}, "the relufy block's cutoffs.model.layers.0.mlp: Input should be a valid number"),
        ("model.layers.0.mlp", "the relufy block's cutoffs: Input should be a valid dictionary"),
        ([0.1, 0.2], "the relufy block's cutoffs: Input should be a valid dictionary"),
        ({"model.layers.9.mlp": 0.1}, "cutoffs name 1 module(s) that are not FFNs of this model, e.g. 'model.layers.9.mlp'"),
    ],
)
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cutoffs_that_are_not_numbers_per_ffn(model, tmp_path, cli, command, cutoffs, needle):
    """A cutoff of "0.5" passed the check (pydantic read it as 0.5) while the modeling code compared
    tensors with the string: a traceback in generate and eval, and info's summary failed too."""
    folder = _with_block(model, tmp_path, cutoffs=cutoffs)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = cli(*COMMANDS[command](folder, model.parent / "text.txt"))
    assert_refused(snap, code, err, needle)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_threshold_that_is_not_a_number(model, tmp_path, cli, command):
    folder = _with_block(model, tmp_path, activation="fatrelu", threshold="0.1")
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = cli(*COMMANDS[command](folder, model.parent / "text.txt"))
    assert_refused(snap, code, err, "the relufy block's threshold: Input should be a valid number")


def test_numbers_and_null_cutoffs_still_read():
    base = {"activation": "drelu", "base_model_type": "llama", "base_activation": "silu"}
    assert RelufyBlock.read({"relufy": {**base, "cutoffs": {"model.layers.0.mlp": 1}}}).cutoffs == {"model.layers.0.mlp": 1.0}
    assert RelufyBlock.read({"relufy": {**base, "cutoffs": None}}).cutoffs == {}
    with pytest.raises(RelufyError, match="cutoffs.a: Input should be greater than or equal to 0"):
        RelufyBlock.read({"relufy": {**base, "cutoffs": {"a": -1}}})
