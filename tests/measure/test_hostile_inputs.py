"""Reports and statistics that export and bench read (``--eval-json``, ``--stats``), and export's
options: a pipe, a device, an endless or deeply nested file, or a bad value is refused at once, in
one line, before any model loads."""

from __future__ import annotations

import json
import os
import threading

import pytest
from safety import Snapshot, assert_refused
from tiny import drelu_with_text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("hostile"))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Refusals come before any model loads (a load fails the test)."""
    import relufy.modeling.load

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(relufy.modeling.load, "load", load)


def run(cli, *args, seconds: float = 60):
    """The CLI in a thread that must finish in ``seconds``: reading a pipe blocked it for ever."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(result=cli(*args)), daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"relufy {args[0]} still blocked after {seconds} s"
    return out["result"]


def _eval_json(tmp_path, name: str) -> str:
    path = tmp_path / "eval.json"
    if name == "fifo":
        os.mkfifo(path)
    elif name == "huge":
        with open(path, "wb") as f:
            f.truncate(65 << 20)  # sparse: 65 MiB of nothing
    elif name == "deep":
        path.write_text('{"relufy_eval": 1, "models": ' + "[" * 100_000 + "]" * 100_000 + "}")
    elif name == "model-a-number":
        path.write_text(json.dumps({"relufy_eval": 1, "models": [{"model": "m", "ppl": "high"}]}))
    else:
        return name
    return str(path)


@pytest.mark.parametrize(
    "name,needle",
    [
        ("/dev/zero", "--eval-json /dev/zero is a character device, not a regular file"),
        ("fifo", "is a named pipe, not a regular file"),
        ("huge", "65 MiB is more than a relufy eval JSON ever takes (64 MiB at most)"),
        ("deep", "JSON nested deeper than 64 levels"),
        ("model-a-number", "not a relufy eval JSON (models.0.ppl: Input should be a valid number"),
    ],
)
def test_export_eval_json(model, tmp_path, cli, no_model_loads, name, needle):
    """/dev/zero grew relufy to 20.8 GB until the kernel killed it; a pipe blocked it for ever."""
    path = _eval_json(tmp_path, name)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = run(cli, "export", model, tmp_path / "out", "--data", model.parent / "text.txt", "--eval-json", path)
    assert_refused(snap, code, err, needle)


@pytest.mark.parametrize("command", ["export", "bench"])
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_stats_that_is_a_pipe_or_device(model, tmp_path, cli, no_model_loads, command, kind):
    path = tmp_path / "stats.safetensors"
    os.mkfifo(path) if kind == "fifo" else path.symlink_to("/dev/zero")
    args = {
        "export": ("export", model, tmp_path / "out", "--stats", path),
        "bench": ("bench", model, "--stats", path, "--shapes", "model", "--no-generation"),
    }[command]
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = run(cli, *args)
    assert_refused(snap, code, err, f"--stats {path} is a {'named pipe' if kind == 'fifo' else 'character device'}")


def test_stats_with_a_deeply_nested_header(model, tmp_path, cli, no_model_loads):
    import struct

    header = b'{"__metadata__": {"format": "relufy-stats"}, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    path = tmp_path / "stats.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = cli("export", model, tmp_path / "out", "--stats", path)
    assert_refused(snap, code, err, "not a readable stats file", "nested deeper than 64 levels")


@pytest.mark.parametrize(
    "value,needle",
    [
        ("abc", "--max-shard-size: 'abc' is not a size such as 500MB or 5GB"),
        ("0", "--max-shard-size: '0' is not a size"),
        ("1B", "--max-shard-size: '1B' is not a size"),
        ("0GB", "--max-shard-size: '0GB' is below the smallest shard size, 1MB"),
        ("10KB", "is below the smallest shard size, 1MB"),
    ],
)
def test_max_shard_size_checked_before_any_work(model, tmp_path, cli, no_model_loads, value, needle):
    """It was checked only when the shards were written, after profiling (a traceback)."""
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = cli("export", model, tmp_path / "out", "--data", model.parent / "text.txt", "--max-shard-size", value)
    assert_refused(snap, code, err, needle)


def test_max_shard_size_normalized():
    from relufy.export.options import ExportOptions

    assert ExportOptions.build(max_shard_size=" 1.5gb ").max_shard_size == "1.5GB"
    assert ExportOptions.build().max_shard_size == "5GB"


def test_card_quotes_an_eval_without_perplexity(model, tmp_path, cli):
    """An eval JSON of benchmarks only (no --data: ppl and sparsity null) made the card's f-string
    fail after the whole export; its rows now read "-"."""
    report = tmp_path / "eval.json"
    report.write_text(json.dumps({"relufy_eval": 1, "models": [{"model": "org/m", "ppl": None, "sparsity": None}]}))
    text = model.parent / "text.txt"
    code, err, _ = cli("export", model, tmp_path / "out", "--data", text, "--seq-len", "32", "--eval-json", report)
    assert code == 0, err
    assert "| `org/m` | - | - |  |" in (tmp_path / "out" / "README.md").read_text()
