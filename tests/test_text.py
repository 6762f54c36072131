"""Evaluation and calibration text: malformed records are one line, never a traceback."""

from __future__ import annotations

import json

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny_with_tokenizer

import relufy
from relufy.errors import RelufyError
from relufy.text import dataset_parts, load_texts, source_kind


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


def test_text_column_of_jsonl_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _jsonl(tmp_path / "d.jsonl", [{"content": "one", "id": 1}, {"content": None}, {"content": "two"}])
    assert load_texts(str(path), text_column="content") == ["one", "two"]
    with pytest.raises(RelufyError) as e:
        load_texts(str(path))
    assert str(e.value) == f"{path}:1: no 'text' field (fields: content, id)"
    pq.write_table(pa.table({"content": ["a", "", "b"], "id": [1, 2, 3]}), tmp_path / "d.parquet")
    assert load_texts(str(tmp_path / "d.parquet"), text_column="content") == ["a", "b"]
    with pytest.raises(RelufyError) as e:
        load_texts(str(tmp_path / "d.parquet"), text_column="body")
    assert str(e.value).endswith("d.parquet: no 'body' column (columns: content, id)")


def test_a_dataset_folder_reads_like_the_hub(tmp_path):
    """A local dataset folder loads through datasets.load_dataset, as a hub id does, with its
    data_dir, data_files, split and column (evaluation's split defaults to test)."""
    root = tmp_path / "repo"
    (root / "python").mkdir(parents=True)
    (root / "go").mkdir()
    _jsonl(root / "python" / "train.jsonl", [{"content": "py train"}])
    _jsonl(root / "python" / "test.jsonl", [{"content": "py test"}, {"content": None}])
    _jsonl(root / "go" / "test.jsonl", [{"content": "go test"}])
    assert source_kind(str(root)) == "dataset"
    assert load_texts(str(root), text_column="content", data_dir="python") == ["py test"]
    assert load_texts(str(root), text_column="content", data_dir="python", split="train") == ["py train"]
    assert load_texts(str(root), text_column="content", data_files="go/test.jsonl", split="train") == ["go test"]
    with pytest.raises(RelufyError) as e:
        load_texts(str(root), data_dir="python")
    assert str(e.value) == f"{root}: no 'text' column (columns: content)"
    with pytest.raises(RelufyError) as e:
        load_texts(str(root), text_column="content", data_dir="python", split="validation")
    assert str(e.value).startswith(f"{root}: cannot load dataset (") and "\n" not in str(e.value)


def test_source_kinds_and_dataset_specs(tmp_path):
    (tmp_path / "d.txt").write_text("x")
    assert source_kind(str(tmp_path / "d.txt")) == "file" and source_kind("builtin:pydoc") == "builtin"
    for spec in ("wikitext:wikitext-2-raw-v1:test", "bigcode/starcoderdata", "allenai/peS2o::train", "json"):
        assert source_kind(spec) == "dataset"
    for spec in ("data/train.jsonl", "./missing", str(tmp_path / "missing.txt"), "notes"):
        with pytest.raises(RelufyError, match="not found"):
            source_kind(spec)
    assert dataset_parts("manu/project_gutenberg::en") == ("manu/project_gutenberg", None, "en")
    assert dataset_parts("bigcode/starcoderdata", split="train") == ("bigcode/starcoderdata", None, "train")
    assert dataset_parts("wikitext:wikitext-2-raw-v1", default_split="test") == ("wikitext", "wikitext-2-raw-v1", "test")
    assert dataset_parts("a:b:test", split="test") == ("a", "b", "test")
    with pytest.raises(RelufyError) as e:
        load_texts("json:x:test", split="train")  # refused before anything loads
    assert str(e.value) == "json:x:test: split 'train' disagrees with the split 'test' in the spec; give it once"


@pytest.mark.parametrize("field", ["split", "data_dir", "data_files", "revision"])
def test_dataset_options_are_refused_for_local_files(tmp_path, field):
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "one"}])
    with pytest.raises(RelufyError) as e:
        load_texts(str(path), **{field: "x"})
    assert str(e.value) == f"{path}: {field} apply to datasets read with datasets.load_dataset, not to a local file"
    (tmp_path / "d.txt").write_text("one")
    with pytest.raises(RelufyError, match="text_column applies to .jsonl, .parquet and datasets"):
        load_texts(str(tmp_path / "d.txt"), text_column="content")
