"""relufy.io.read: what relufy reads is a regular file, read within bounds; pipes and devices are
refused at once (never waited on, never read without end), JSON nesting and text lines bounded."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from safety import Snapshot, assert_refused
from tiny import drelu_with_text

from relufy.errors import RelufyError
from relufy.io import read


def within(seconds: float, fn, *args):
    """``fn(*args)`` in a thread that must finish within ``seconds`` (a blocked open fails the test,
    not the whole run)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            out["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.json"
    os.mkfifo(path)
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("read"))


@pytest.mark.parametrize(
    "reader",
    [
        lambda p: read.read_json(p, read.REPORT_BYTES),
        lambda p: read.read_bytes(p, read.REPORT_BYTES),
        lambda p: list(read.lines(p)),
        lambda p: read.open_regular(p),
    ],
)
def test_a_named_pipe_is_refused_without_blocking(fifo, reader):
    with pytest.raises(RelufyError, match="is a named pipe, not a regular file"):
        within(10, reader, fifo)


@pytest.mark.parametrize("path,kind", [("/dev/zero", "a character device"), ("/", "a folder")])
def test_devices_and_folders_are_refused_unread(path, kind):
    with pytest.raises(RelufyError, match=f"{path} is {kind}, not a regular file"):
        within(10, read.read_bytes, path, read.REPORT_BYTES)


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(RelufyError, match="is a socket"):
            read.read_bytes(path, 100)


def test_a_link_to_a_device_is_what_it_names(tmp_path):
    (tmp_path / "zero.json").symlink_to("/dev/zero")
    with pytest.raises(RelufyError, match="is a character device"):
        within(10, read.read_json, tmp_path / "zero.json", read.CONFIG_BYTES)


def test_a_file_over_its_bound_is_refused_by_size(tmp_path):
    path = tmp_path / "big.json"
    with open(path, "wb") as f:
        f.truncate(3 * read.MiB)  # sparse: nothing written
    with pytest.raises(RelufyError, match=r"big.json: 3 MiB is more than a report ever takes \(2 MiB at most\)"):
        read.read_bytes(path, 2 * read.MiB, "report")
    assert len(read.read_bytes(path, 3 * read.MiB)) == 3 * read.MiB


def test_json_nesting_is_bounded_never_a_recursion_error():
    deep = "[" * 100_000 + "]" * 100_000
    for text in (deep, deep.encode(), '{"a": ' * 100 + "1" + "}" * 100):
        with pytest.raises(RelufyError, match="nested deeper than 64 levels"):
            read.loads_json(text, "x.json")
    assert read.loads_json("[" * 64 + "]" * 64, "x.json") is not None
    assert read.loads_json(json.dumps({"a": "[" * 100}), "x") == {"a": "[" * 100}  # brackets in strings do not nest
    with pytest.raises(read.JSONError, match="x.json: not valid JSON"):
        read.loads_json("{", "x.json")


def test_lines_keep_the_text_and_bound_each_line(tmp_path):
    text = "one\r\ntwo\n\nthree \u2028 still three\rand\nlast"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    assert read.read_lines_text(path) == text
    assert [n for n, _ in read.lines(path)] == [1, 2, 3, 4, 5]
    path.write_bytes(b"short\n" + b"x" * 100 + b"\nshort\n")
    with pytest.raises(RelufyError, match=r"t.txt:2: a line longer than 64 bytes"):
        list(read.lines(path, limit=64))
    path.write_bytes(b"fine\n\xff\xfe\n")
    with pytest.raises(RelufyError, match="t.txt:2: not UTF-8 text"):
        list(read.lines(path))


# ---- as users meet them: one line, exit status 2, nothing written, never blocked ----------------


def test_eval_data_nested_100k_deep_is_one_line(tmp_path, model, cli):
    """json.loads raised RecursionError (a traceback) on a record 100,000 levels deep."""
    data = tmp_path / "deep.jsonl"
    data.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    snap = Snapshot(tmp_path, model)
    code, err, _ = cli("eval", model, "--data", data, "--seq-len", "32")
    assert_refused(snap, code, err, "deep.jsonl:2: JSON nested deeper than 64 levels")


@pytest.mark.parametrize("name", ["d.txt", "d.jsonl", "d.parquet"])
def test_eval_data_that_is_a_pipe_or_device(tmp_path, model, cli, name):
    os.mkfifo(tmp_path / name)
    (tmp_path / f"zero-{name}").symlink_to("/dev/zero")
    snap = Snapshot(tmp_path, model)
    for data, kind in ((tmp_path / name, "a named pipe"), (tmp_path / f"zero-{name}", "a character device")):
        code, err, _ = within(60, cli, "eval", model, "--data", data, "--seq-len", "32")
        assert_refused(snap, code, err, str(data), kind)


def test_eval_data_of_one_endless_line(tmp_path, model, cli, monkeypatch):
    """A text file is read a line at a time, each line bounded (here lowered to 1 KiB)."""
    monkeypatch.setattr(read, "LINE_BYTES", 1024)
    data = tmp_path / "one-line.txt"
    data.write_text("word " * 1000)
    snap = Snapshot(tmp_path, model)
    code, err, _ = cli("eval", model, "--data", data, "--seq-len", "32")
    assert_refused(snap, code, err, "one-line.txt:1: a line longer than 1 KiB")


def test_text_files_read_as_before(tmp_path):
    """Line by line, the text is what text mode read: newlines as \\n, nothing lost."""
    from relufy.text import load_texts

    data = tmp_path / "d.txt"
    data.write_bytes("first\r\nsecond\rthird\n\nfourth \u00e9".encode())
    assert load_texts(str(data)) == ["first\nsecond\nthird\n\nfourth \u00e9"]
    records = tmp_path / "d.jsonl"
    records.write_bytes(b'{"text": "a\\nb"}\r\n\r\n{"text": "line \xe2\x80\xa8 separator"}\n')
    assert load_texts(str(records)) == ["a\nb", "line \u2028 separator"]


@pytest.mark.parametrize("name", ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("command", ["generate", "info", "convert"])
def test_a_pipe_in_the_model_folder(tmp_path, model, cli, name, command):
    """transformers opens tokenizer and generation files itself: a pipe among them blocked it
    (generate); every command refuses such a folder alike."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)
    args = {"generate": ("--max-new-tokens", "1"), "info": (), "convert": (tmp_path / "out",)}[command]
    snap = Snapshot(tmp_path)
    code, err, _ = within(60, cli, command, folder, *args)
    assert_refused(snap, code, err, name, "is a named pipe")


def test_a_config_json_too_large(tmp_path, model, cli):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
        f.truncate(17 * read.MiB)  # trailing NULs, sparse
    snap = Snapshot(tmp_path)
    code, err, _ = cli("info", folder)
    assert_refused(snap, code, err, "config.json: 17 MiB is more than a config.json ever takes (16 MiB at most)")


def test_a_safetensors_header_nested_deep(tmp_path, model, cli):
    import shutil
    import struct

    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    header = b'{"__metadata__": {"a": "b"}, "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", folder, tmp_path / "out")
    assert_refused(snap, code, err, "model.safetensors: safetensors header: JSON nested deeper than 64 levels")


@pytest.mark.parametrize("command", ["info", "convert", "generate"])
def test_a_model_path_that_is_a_pipe_or_device(tmp_path, cli, command):
    os.mkfifo(tmp_path / "model.gguf")
    snap = Snapshot(tmp_path)
    for path, kind in ((tmp_path / "model.gguf", "a named pipe"), ("/dev/zero", "a character device")):
        args = {"info": (), "convert": (tmp_path / "out",), "generate": ("--max-new-tokens", "1")}[command]
        code, err, _ = within(60, cli, command, path, *args)
        assert_refused(snap, code, err, f"{path} is {kind}, not a model folder or a .gguf file")
