"""Evaluation and calibration text: malformed records are one line, never a traceback."""

from __future__ import annotations

import json

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny_with_tokenizer

import relufy
from relufy.text import load_texts


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    save_tiny_with_tokenizer("llama", root / "llama")
    return relufy.convert(root / "llama", root / "drelu")


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_null_text_records_are_empty_records(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one"}, {"text": None}, {"text": ""}, {"text": "two"}])
    assert load_texts(str(path)) == ["one", "two"]


@pytest.mark.parametrize("value,kind", [(7, "int"), ([1, 2], "list"), ({"a": 1}, "dict")])
def test_text_that_is_not_a_string(tmp_path, model, cli, value, kind):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, {"text": value}])
    snap = Snapshot(tmp_path)
    code, err, _ = cli("eval", model, "--data", path, "--seq-len", "32")
    assert_refused(snap, code, err, "d.jsonl:2", f"'text' is a {kind}, not a string")


def test_jsonl_that_is_not_utf8(tmp_path, model, cli):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "\xff\xfe"}\n')
    snap = Snapshot(tmp_path)
    code, err, _ = cli("eval", model, "--data", tmp_path / "d.jsonl", "--seq-len", "32")
    assert_refused(snap, code, err, "not UTF-8")


@pytest.mark.parametrize("content", [b"", b"PAR1 not really parquet", b"\x00" * 64])
def test_corrupt_parquet(tmp_path, model, cli, content):
    (tmp_path / "d.parquet").write_bytes(content)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("export", model, tmp_path / "out", "--data", tmp_path / "d.parquet")
    assert_refused(snap, code, err, "d.parquet", "not a readable Parquet file")


def test_parquet_text_column_of_numbers(tmp_path, model, cli):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "d.parquet")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("eval", model, "--data", tmp_path / "d.parquet", "--seq-len", "32")
    assert_refused(snap, code, err, "'text' column holds int64, not strings")


def test_data_that_cannot_be_read(tmp_path, model, cli):
    """A file that opens but fails to read (an I/O error) is named, not a traceback."""
    snap = Snapshot(tmp_path)
    code, err, _ = cli("eval", model, "--data", "/proc/self/mem", "--seq-len", "32")
    assert_refused(snap, code, err, "/proc/self/mem: cannot read (Input/output error)")
