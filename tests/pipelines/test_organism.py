"""The model organism's road at micro scale, in this process: a corpus built by the corpus module's
own readers and split rule (from a copy of Python's help text laid out as the packages lay out
their files), a tokenizer fitted to it, a SwiGLU organism pretrained from scratch, its dReLU
conversion, then relufy's recovery recipe against plain LM recovery (Turbo Sparse's) on the same
steps, judged on the held-out documents; and the table over the result."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from corpus_kit import package_roots

from relufy.errors import RelufyError
from relufy.pipelines import corpus, organism
from relufy.train import recipes

ROOT = Path(__file__).resolve().parents[2]


def test_corpus_split_is_fixed_and_by_document(tmp_path):
    roots = package_roots(tmp_path / "pkgs")
    one = corpus.build(tmp_path / "a", roots=roots)
    two = corpus.build(tmp_path / "b", roots=roots)
    assert one["corpus"] == two["corpus"] and one["sha256"] == two["sha256"]
    assert set(one["versions"].values()) == {"local"}
    sources = {}
    for split in ("train", "heldout", "ood"):
        lines = (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()
        sources[split] = [json.loads(x)["source"] for x in lines]
    assert sources["heldout"] and sources["ood"] and len(sources["train"]) > 10 * len(sources["heldout"])
    assert not set(sources["train"]) & set(sources["heldout"])
    for source in sources["heldout"]:
        package, rel = source.split("/", 1)
        assert corpus.bucket(package, rel) < corpus.HELDOUT_PER_MILLE
    assert all(s.startswith("dict-gcide/entry-") for s in sources["ood"])
    perl = [s for s in sources["train"] + sources["heldout"] if s.startswith("perl-doc/")]
    assert len(perl) == len(set(perl)) and all(s.startswith("perl-doc/5.36.0/") for s in perl)
    assert not any("translations/" in s for s in sources["train"])
    assert (tmp_path / "a" / "manifest.json").is_file()
    with pytest.raises(RelufyError, match="--force"):
        corpus.build(tmp_path / "a", roots=roots)


def test_corpus_refuses_missing_packages_naming_the_install(tmp_path):
    missing = corpus.Package("relufy-no-such-package", str(tmp_path), ("*.txt",))
    with pytest.raises(
        RelufyError, match=r"needs relufy-no-such-package(, dict-gcide)?: install with `apt-get install .*dict-gcide`"
    ):
        corpus.build(tmp_path / "out", packages=(missing,))
    assert not (tmp_path / "out").exists()


def test_corpus_cli_refuses_in_one_line(tmp_path, capsys):
    assert corpus.main(["tokenizer", str(tmp_path / "none.jsonl"), str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a file" in err


def _recipe(name: str, out: Path, **over) -> dict:
    import yaml

    raw = yaml.safe_load(recipes.find(name).path.read_text())
    raw["output_dir"] = str(out)
    for key, value in over.items():
        node = raw
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def _train(raw: dict):
    from relufy.train.loop import train
    from relufy.train.recipe import validate

    train(validate(raw), show_progress=False)
    return json.loads((Path(raw["output_dir"]) / "summary.json").read_text())


MICRO_CONFIG = {"hidden_size": 32, "intermediate_size": 96, "num_hidden_layers": 2}
MICRO_CONFIG |= {"num_attention_heads": 2, "num_key_value_heads": 2}


def _micro_road(tmp_path: Path) -> dict:
    """Corpus, tokenizer, a pretrained micro organism and its dReLU conversion; their paths."""
    from relufy.conversion import convert

    data = tmp_path / "corpus"
    corpus.build(data, roots=package_roots(tmp_path / "pkgs"))
    tok = corpus.fit_tokenizer(data / "train.jsonl", tmp_path / "tokenizer", vocab=512)
    evals = [
        {"data": str(data / "heldout.jsonl"), "name": "heldout", "max_tokens": 2048},
        {"data": str(data / "ood.jsonl"), "name": "ood", "max_tokens": 2048},
    ]
    config = _recipe("organism-pretrain-cpu", tmp_path)["model"]["config"]
    pre = _recipe(
        "organism-pretrain-cpu",
        tmp_path / "pretrain",
        **{
            "model.tokenizer": str(tok),
            "model.config": {**config, **MICRO_CONFIG, "vocab_size": 512, "max_position_embeddings": 64},
            "data.sources": [{"data": str(data / "train.jsonl")}],
            "data.eval_sources": evals,
            "data.seq_len": 64,
            "budget": {"max_steps": 600, "micro_batch_size": 8},
            "optim.warmup_steps": 30,
            "log": {"every": 200},
            "checkpoint": {"every": 0},
        },
    )
    summary = _train(pre)
    drelu = convert(tmp_path / "pretrain" / "final", tmp_path / "drelu")
    return {"data": data, "evals": evals, "pretrain": summary, "drelu": drelu, "tokenizer": tok}


def _recover(road: dict, out: Path, method: list[str] | dict) -> dict:
    over = {
        "model.path": str(road["drelu"]),
        "data.sources": [{"data": str(road["data"] / "train.jsonl")}],
        "data.eval_sources": road["evals"],
        "data.seq_len": 64,
        "budget": {"max_steps": 20, "micro_batch_size": 8},
        "sparsity.ffn_warmstart.tokens": 2048,
        "sparsity.ffn_warmstart.steps": 40,
        "sparsity.final_cutoff.tokens": 2048,
        # the L1 coefficients act on the activations' own scale: the recipe's warm-start L1 (tuned on
        # the organism, hidden 128) alone takes this hidden-32 model to 96% zeros at 7x its perplexity
        "sparsity.ffn_warmstart.l1": 0.0,
        "sparsity.l1": 5.0,
        "log": {"every": 20},
        "checkpoint": {"every": 0},
        **method,
    }
    return _train(_recipe("small-recovery-cpu", out, **over))


PLAIN = {"sparsity.distill": None, "sparsity.ffn_warmstart": None, "sparsity.l1": 0.0, "sparsity.final_cutoff": None}


def test_micro_organism_recovers_ahead_of_plain_lm(tmp_path, cli):
    """relufy's recipe ends below plain LM recovery (Turbo Sparse's) on the held-out documents
    after the same steps, at 90% zeros where plain LM holds about 75%; below the same recipe
    without its teacher; and its L1 term raises the zeros while it trains. A flipped L1 sign or
    distillation switched off in the loop breaks this (docs/results.md: measured on planted defects)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    road = _micro_road(tmp_path)
    # stock transformers loads the organism and its tokenizer
    AutoTokenizer.from_pretrained(road["tokenizer"])
    AutoModelForCausalLM.from_pretrained(tmp_path / "pretrain" / "final")
    ppl0 = road["pretrain"]["eval"]["heldout"]["ppl"]
    assert ppl0 < 0.25 * road["pretrain"]["eval"]["heldout"]["ppl_before"]  # it learned

    mine = _recover(road, tmp_path / "relufy", {})
    plain = _recover(road, tmp_path / "plain", PLAIN)
    alone = _recover(road, tmp_path / "no-teacher", {"sparsity.distill": None})
    m, p, a = mine["eval"]["heldout"], plain["eval"]["heldout"], alone["eval"]["heldout"]
    assert m["ppl"] < 0.97 * p["ppl"], (m, p)
    assert m["sparsity"] >= 0.88 and p["sparsity"] < 0.8
    assert m["ppl"] < 0.995 * a["ppl"], (m, a)  # the teacher helps
    # the L1 term raises the zeros the warm start left (before the final cutoff)
    assert mine["cutoff"]["before"]["eval"]["heldout"]["sparsity"] > m["sparsity_before"] + 0.01
    assert m["ppl"] / ppl0 == pytest.approx(m["ratio"])  # the teacher is the organism: ratio to it

    # the table reads the folders make organism writes
    org = tmp_path / "org"
    for name, src in (("pretrain/swiglu", tmp_path / "pretrain"), ("recover/relufy/1", tmp_path / "relufy")):
        (org / name).parent.mkdir(parents=True, exist_ok=True)
        (org / name).symlink_to(src)
    flags = ["--seq-len", "64", "--max-tokens", "2048", "--topk", "0.9"]
    thresholds = ["--threshold-sparsity", "0.5,0.9", "--threshold-calibration-tokens", "256"]
    for name, extra, out in (
        ("pretrain/swiglu", [], "eval"),
        ("recover/relufy/1", [], "eval"),
        ("pretrain/swiglu", thresholds, "thresholds"),
    ):
        for text in ("heldout", "ood"):
            data = road["data"] / f"{text}.jsonl"
            code, err, _ = cli(
                "eval", org / name / "final", "--data", data, *flags, *extra, "--json", org / name / f"{out}-{text}.json"
            )
            assert code == 0, err
    assert organism.main(["table", str(org), "--plot", str(org / "recovery.png")]) == 0
    table = json.loads((org / "table.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert rows["SwiGLU organism"]["heldout"]["ratio"] == 1.0
    last = table["rows"][-1]
    assert last["method"] == "relufy" and last["percent"] == 1.0 and last["tokens"] == 20 * 8 * 64
    assert last["heldout"]["ratio"] == pytest.approx(m["ppl"] / ppl0, rel=0.05)  # relufy eval's windows, not the run's
    teal = rows["TEAL/CATS threshold 90%"]["heldout"]
    assert teal["zeros"] > 0.8 and teal["ratio"] > 1.0
    assert "| relufy (staged warm start + distillation + L1 + final cutoff) @ 1% |" in (org / "table.md").read_text()
    assert (org / "recovery.png").stat().st_size > 10_000


def test_a_compressed_document_is_read_within_a_bound(tmp_path):
    """A .gz document that inflates past the bound (a gzip bomb, 64 KB on disk) is one line, not
    64 MiB in memory; a FIFO among the documents is refused without blocking."""
    import gzip
    import os

    bomb = tmp_path / "bomb.txt.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (corpus.DOCUMENT_BYTES + 1)))
    with pytest.raises(RelufyError, match="a document larger than 64 MiB"):
        corpus._read(bomb)
    ok = tmp_path / "ok.txt.gz"
    ok.write_bytes(gzip.compress(b"line one\r\nline two\n"))
    assert corpus._read(ok) == "line one\nline two\n"
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(RelufyError, match="named pipe|not a regular file"):
        corpus._read(tmp_path / "pipe.txt")


def test_a_deep_record_in_the_corpus_is_one_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(RelufyError, match=r"train.jsonl:2: JSON nested deeper"):
        list(corpus.jsonl_texts(path))
