"""The training data at scale (relufy.train.mixture): datasets read by name or folder with their
column, data_dir, data_files and split; streaming chosen automatically; node-split streams with an
exact, JSON-serialisable per-process position; tokenization through datasets.map; the dry run's
probe of every source. Real ``datasets`` objects over local files: a local dataset folder stands in
for the hub (never the network)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import corpus, tiny_tokenizer

from relufy.errors import RelufyError
from relufy.train import mixture as mx
from relufy.train.recipe import DataSpec, SourceSpec, validate

SEQ = 8  # tokens per sequence in the word-level tests: every record is exactly one sequence


@pytest.fixture(scope="module")
def bpe():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def words():
    """A real word-level tokenizer: word ``w{i}`` is token ``i`` (``</s>`` is 0), so every token
    names the record it came from."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, 50_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def record(i: int) -> str:
    """Record ``i``: ``SEQ - 1`` words (with its EOS: one sequence), all its own tokens."""
    return " ".join(f"w{100 + i * SEQ + j}" for j in range(SEQ - 1))


def record_of(seq: torch.Tensor) -> int:
    return (int(seq[0]) - 100) // SEQ


def write_jsonl(path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def folder(tmp_path, files: int, per_file: int, name="repo"):
    """A local dataset folder (what the hub's repositories look like): ``python/train-K.jsonl``
    with the ``content`` of records 0, 1, ... in order, plus a ``go/`` folder and ``test`` files
    that only data_dir and split select."""
    root = tmp_path / name
    for k in range(files):
        write_jsonl(
            root / "python" / f"train-{k}.jsonl", [{"content": record(k * per_file + i), "id": i} for i in range(per_file)]
        )
    write_jsonl(root / "python" / "test-0.jsonl", [{"content": record(900 + i), "id": i} for i in range(3)])
    write_jsonl(root / "go" / "train-0.jsonl", [{"content": record(800 + i), "id": i} for i in range(3)])
    return root


def data(*sources, **fields) -> DataSpec:
    return DataSpec(sources=list(sources), **{"seq_len": SEQ, "heldout_sequences": 0, **fields})


def former_pack(texts, tokenizer, seq_len):
    """The packing of relufy before datasets.map: one tokenizer call per text."""
    ids = []
    for text in texts:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
            ids.append(tokenizer.eos_token_id)
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# -- columns, data_dir, data_files, split ------------------------------------------------------


def test_text_column_of_local_files(tmp_path, words):
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "c.jsonl", [{"content": record(i), "text": 7} for i in range(6)])
    pq.write_table(pa.table({"content": [record(i) for i in range(6)], "n": list(range(6))}), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        src = {"data": str(tmp_path / name), "text_column": "content"}
        mixture, held = mx.build(data(src, heldout_fraction=0.2), words, seed=0)
        assert not mixture.per_rank and isinstance(mixture.sources[0], mx.Batch)  # local files: in memory
        got = torch.cat([mixture.sources[0].ids, held.ids])
        assert sorted(record_of(s) for s in got) == list(range(6)) and len(held.ids) == 1
        with pytest.raises(RelufyError) as e:
            mx.build(data({"data": str(tmp_path / name), "text_column": "body"}), words, seed=0)
        assert "no 'body'" in one_line(e) and "content" in str(e.value)


def test_data_dir_data_files_and_split_of_a_dataset_folder(tmp_path, words):
    root = folder(tmp_path, files=2, per_file=3)

    def texts(**fields):
        src = {"data": str(root), "text_column": "content", "streaming": False, **fields}
        mixture, _ = mx.build(data(src, heldout_fraction=0), words, seed=0)
        return sorted(record_of(s) for s in mixture.sources[0].ids)

    assert texts(data_dir="python") == list(range(6))  # split: train by default
    assert texts(data_dir="python", split="test") == [900, 901, 902]
    assert texts(data_dir="go") == [800, 801, 802]
    assert texts(data_files="python/train-1.jsonl") == [3, 4, 5]
    assert texts(data_files=["python/train-0.jsonl", "go/train-0.jsonl"]) == [0, 1, 2, 800, 801, 802]
    with pytest.raises(RelufyError) as e:
        texts(data_dir="python", split="validation")
    assert str(root) in one_line(e) and "validation" in str(e.value)
    with pytest.raises(RelufyError) as e:
        texts(data_dir="python", text_column="text")
    assert "no 'text' column (columns: content, id)" in one_line(e)


def test_streamed_dataset_folder_honours_the_same_fields(tmp_path, words):
    root = folder(tmp_path, files=2, per_file=3)
    src = {"data": str(root), "text_column": "content", "data_dir": "python", "split": "test"}
    mixture, _ = mx.build(data(src), words, seed=0)
    assert isinstance(mixture.sources[0], mx.StreamSource)
    assert [record_of(s) for s in mixture.batch(4).ids] == [900, 901, 902, 900]  # and around again


def test_a_split_given_twice_must_agree(tmp_path):
    from trainkit import recipe_dict

    raw = recipe_dict(tmp_path, tmp_path / "out")  # validation alone: no file is opened
    raw["data"]["sources"] = [{"data": "bigcode/starcoderdata:python:train", "split": "test"}]
    with pytest.raises(RelufyError) as e:
        validate(raw)
    assert "data.sources.0: split 'test' disagrees with the split 'train'" in one_line(e)
    raw["data"]["sources"] = [{"data": "bigcode/starcoderdata:python:train", "split": "train", "text_column": "content"}]
    assert validate(raw).data.sources[0].split == "train"  # agreeing is fine


def test_dataset_fields_are_refused_for_local_files(tmp_path, words):
    write_jsonl(tmp_path / "d.jsonl", [{"text": record(0)}])
    for field, value in [("data_dir", "python"), ("split", "test"), ("revision", "main"), ("data_files", "x.jsonl")]:
        with pytest.raises(RelufyError) as e:
            mx.build(data({"data": str(tmp_path / "d.jsonl"), field: value}), words, seed=0)
        assert f"{field} apply to datasets" in one_line(e)


# -- streaming: auto ---------------------------------------------------------------------------


def test_streaming_is_automatic(tmp_path, words):
    root = folder(tmp_path, files=1, per_file=4)
    write_jsonl(tmp_path / "d.jsonl", [{"text": record(i)} for i in range(4)])
    (tmp_path / "d.txt").write_text(record(0))
    assert mx.streams(SourceSpec(data="HuggingFaceFW/fineweb-edu:sample-10BT:train"))  # a hub id (not opened)
    assert mx.streams(SourceSpec(data="bigcode/starcoderdata", data_dir="python"))
    assert mx.streams(SourceSpec(data=str(root)))  # a dataset folder reads like the hub
    assert not mx.streams(SourceSpec(data=str(tmp_path / "d.jsonl")))
    assert not mx.streams(SourceSpec(data=str(tmp_path / "d.txt")))
    assert not mx.streams(SourceSpec(data="builtin:pydoc"))
    assert not mx.streams(SourceSpec(data=str(root)), chat=True)  # chat data is never streamed unasked
    assert mx.streams(SourceSpec(data=str(tmp_path / "d.jsonl"), streaming=True))  # explicit wins
    assert not mx.streams(SourceSpec(data=str(root), streaming=False))
    mixture, _ = mx.build(
        data({"data": str(root), "text_column": "content"}, {"data": str(tmp_path / "d.jsonl")}, heldout_fraction=0.25),
        words,
        seed=0,
    )
    assert isinstance(mixture.sources[0], mx.StreamSource) and isinstance(mixture.sources[1], mx.Batch)


# -- node-split streams ------------------------------------------------------------------------


@pytest.mark.parametrize("files", [4, 3], ids=["shards", "examples"])  # 4 shards divide among 2; 3 do not
def test_two_ranks_read_disjoint_shares_covering_the_stream(tmp_path, words, files):
    per_file, n_held = 5, 2
    root = folder(tmp_path, files=files, per_file=per_file)
    spec = data({"data": str(root), "text_column": "content", "data_dir": "python"}, heldout_sequences=n_held)
    seen, helds = [], []
    for rank in range(2):
        mixture, held = mx.build(spec, words, seed=0, rank=rank, world=2)
        assert mixture.per_rank and isinstance(mixture.sources[0], mx.StreamSource)
        helds.append([record_of(s) for s in held.ids])
        stream = mixture.sources[0]
        mine = []
        while stream.epoch == 0:
            mine.append(record_of(mixture.local_batch(1).ids[0]))
        seen.append(mine[:-1])  # the last one began the next pass
        assert mine[-1] in mine[:-1]
    assert helds[0] == helds[1] == [0, 1]  # the whole stream's head, the same on both ranks
    assert not set(seen[0]) & set(seen[1]) and len(set(seen[0])) == len(seen[0]) and len(set(seen[1])) == len(seen[1])
    assert sorted(seen[0] + seen[1] + helds[0]) == list(range(files * per_file))  # everything once
    assert seen[0] and seen[1]


@pytest.mark.parametrize("before", [6, 18], ids=["first-pass", "second-pass"])
def test_node_split_state_round_trips_through_json_and_resumes_exactly(tmp_path, words, before):
    root = folder(tmp_path, files=4, per_file=6)
    write_jsonl(tmp_path / "mem.jsonl", [{"text": record(5000 + i)} for i in range(40)])
    spec = data(
        {"data": str(root), "text_column": "content", "data_dir": "python"},
        {"data": str(tmp_path / "mem.jsonl")},
        heldout_sequences=2,
        heldout_fraction=0.1,
    )

    def ranks():
        return [mx.build(spec, words, seed=5, rank=r, world=2)[0] for r in range(2)]

    first = ranks()
    for _ in range(before):
        for m in first:
            m.local_batch(2)
    assert [m.sources[0].epoch for m in first] == [before > 6] * 2  # saved in the first pass, or the second

    def gather(objs):  # what accelerate.utils.gather_object gives every process: every process's objects
        return [m.state_dict() for m in first]

    saved = json.loads(json.dumps(first[0].checkpoint_state(gather)))  # relufy_state.json keeps JSON only
    assert len(saved["ranks"]) == 2 and saved["ranks"][1]["rank"] == 1
    expected = [[m.local_batch(2) for m in first] for _ in range(12)]  # wraps the streams' shares too
    assert all(m.sources[0].epoch > (before > 6) for m in first)  # a pass ends among the batches compared
    second = ranks()
    for m in second:
        m.load_state_dict(saved)
    for want in expected:
        for m, w in zip(second, want, strict=True):
            got = m.local_batch(2)
            assert torch.equal(got.ids, w.ids) and got.labels is got.ids
    rows = [record_of(s) for w in expected for b in w for s in b.ids]
    assert any(r >= 5000 for r in rows) and any(r < 5000 for r in rows)  # both sources drawn
    one = mx.build(spec, words, seed=5)[0]
    with pytest.raises(RelufyError) as e:
        one.load_state_dict(saved)
    assert "saved by 2 processes" in one_line(e)
    with pytest.raises(RelufyError) as e:
        first[0].load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert "resume only with the number of processes" in one_line(e)


def test_in_memory_sources_are_the_global_draw_sliced(tmp_path, words):
    """Without node-split streams every process keeps its rows of the one global draw, as before:
    the batches (and a run's loss curve) do not depend on the process count."""
    write_jsonl(tmp_path / "a.jsonl", [{"text": record(i)} for i in range(30)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": record(1000 + i)} for i in range(20)])
    spec = data({"data": str(tmp_path / "a.jsonl")}, {"data": str(tmp_path / "b.jsonl"), "weight": 0.5})
    single, held = mx.build(spec, words, seed=1)
    parts = [mx.build(spec, words, seed=1, rank=r, world=3) for r in range(3)]
    assert all(torch.equal(h.ids, held.ids) for _, h in parts)  # the same held-out set everywhere
    for _ in range(25):
        whole = single.batch(2 * 3)
        for r, (m, _) in enumerate(parts):
            assert not m.per_rank and torch.equal(m.local_batch(2).ids, whole.rows(2 * r, 2 * r + 2).ids)
    assert all(m.state_dict() == single.state_dict() for m, _ in parts)  # one state, whatever the rank


# -- tokenization through datasets.map ---------------------------------------------------------


def test_datasets_map_gives_the_former_ids(tmp_path, bpe):
    texts = [t for t in corpus()[:40_000].split("\n\n")]
    texts[3:3] = ["", None]  # empty records
    want = former_pack(texts, bpe, 64)
    assert len(want) > 100
    assert torch.equal(mx.pack(texts, bpe, 64), want)
    assert torch.equal(mx.pack(texts, bpe, 64, num_proc=2), want)
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    root = tmp_path / "repo"
    write_jsonl(root / "train.jsonl", [{"body": t} for t in texts])
    for src in ({"data": str(tmp_path / "d.jsonl")}, {"data": str(root), "text_column": "body", "streaming": False}):
        mixture, held = mx.build(DataSpec(sources=[src], seq_len=64, heldout_fraction=0.1, num_proc=2), bpe, seed=0)
        assert torch.equal(torch.cat([mixture.sources[0].ids, held.ids]), want)
    (tmp_path / "p.txt").write_text(corpus()[:5000])
    mixture, held = mx.build(DataSpec(sources=[{"data": str(tmp_path / "p.txt")}], seq_len=32), bpe, seed=0)
    assert torch.equal(torch.cat([mixture.sources[0].ids, held.ids]), former_pack([corpus()[:5000]], bpe, 32))


def test_a_non_string_column_is_refused(tmp_path, words):
    root = tmp_path / "repo"
    write_jsonl(root / "train.jsonl", [{"content": i} for i in range(4)])
    with pytest.raises(RelufyError) as e:
        mx.build(data({"data": str(root), "text_column": "content", "streaming": False}), words, seed=0)
    assert "'content' column holds int64, not strings" in one_line(e)
    with pytest.raises(RelufyError) as e:
        mx.build(data({"data": str(root), "text_column": "content"}, heldout_sequences=1), words, seed=0)
    assert "'content' is a int, not a string" in one_line(e)


# -- the dry run's probe -----------------------------------------------------------------------


def test_probe_previews_every_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = folder(tmp_path, files=1, per_file=2)
    write_jsonl(tmp_path / "d.jsonl", [{"body": "first record\nof the jsonl file"}, {"body": "second"}])
    pq.write_table(pa.table({"text": ["a parquet record"], "n": [1]}), tmp_path / "d.parquet")
    (tmp_path / "d.txt").write_text("a text file\nwith lines")
    spec = data(
        {"data": str(root), "text_column": "content", "data_dir": "python"},
        {"data": str(tmp_path / "d.jsonl"), "text_column": "body"},
        {"data": str(tmp_path / "d.parquet")},
        {"data": str(tmp_path / "d.txt")},
        {"data": "builtin:pydoc"},
    )
    lines = mx.probe_sources(spec)
    assert len(lines) == 5 and all("\n" not in line for line in lines)
    assert lines[0].startswith(f"data.sources.0 {root} (streamed): reads column 'content': \"{record(0)[:20]}")
    assert "(in memory): reads field 'body': \"first record\\nof the jsonl file\"" in lines[1]
    assert "(in memory): reads column 'text': \"a parquet record\"" in lines[2]
    assert '(in memory): reads the whole file: "a text file\\nwith lines"' in lines[3]
    assert lines[4].startswith("data.sources.4 builtin:pydoc (in memory): reads column 'text': ") and lines[4].endswith('"...')


@pytest.mark.parametrize("kind", ["folder", "jsonl", "parquet"])
def test_probe_refuses_a_missing_column(tmp_path, kind):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if kind == "folder":
        src = {"data": str(folder(tmp_path, files=1, per_file=2)), "data_dir": "python"}
    elif kind == "jsonl":
        src = {"data": str(write_jsonl(tmp_path / "d.jsonl", [{"content": "x", "id": 1}]))}
    else:
        pq.write_table(pa.table({"content": ["x"], "id": [1]}), tmp_path / "d.parquet")
        src = {"data": str(tmp_path / "d.parquet")}
    with pytest.raises(RelufyError) as e:
        mx.probe_sources(data(src))
    assert "no 'text'" in one_line(e) and "content, id" in str(e.value)


def test_dry_run_prints_each_source_column(base, tmp_path, cli):
    """``relufy train RECIPE --dry-run``: the resolved recipe, then one comment line per source
    naming the column it reads; a source without that column stops it with one line, nothing written."""
    import yaml
    from safety import Snapshot, assert_refused
    from trainkit import recipe_dict, write_recipe

    write_jsonl(tmp_path / "d.jsonl", [{"body": "a record", "id": 1}])
    raw = recipe_dict(base, tmp_path / "out")
    raw["data"]["sources"] = [{"data": str(tmp_path / "d.jsonl"), "text_column": "body"}, {"data": str(base / "text.txt")}]
    code, err, out = cli("train", write_recipe(tmp_path / "r.yaml", raw), "--dry-run")
    assert code == 0, err
    probes = [line for line in out.splitlines() if line.startswith("# data.sources.")]
    assert len(probes) == 2 and "reads field 'body': \"a record\"" in probes[0], out
    assert yaml.safe_load(out)["data"]["sources"][0]["text_column"] == "body"  # the rest is the recipe
    raw["data"]["sources"][0]["text_column"] = "text"
    path = write_recipe(tmp_path / "r.yaml", raw)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, "--dry-run")
    assert_refused(snap, code, err, "no 'text'", "body, id")
