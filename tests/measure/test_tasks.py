"""relufy eval --tasks: lm-evaluation-harness on relufy's loaded models, offline, over a local task
(tests/data/lm_eval_tasks), checked against log-likelihoods computed by hand."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference import apply_reference
from tiny import save_tiny_with_tokenizer, tiny_model
from transformers import AutoTokenizer

import relufy

TASKS = Path(__file__).parent.parent / "data" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    save_tiny_with_tokenizer("llama", root / "llama")
    relufy.convert(root / "llama", root / "llama-drelu")
    shutil.copytree(TASKS, root / "tasks")
    return root


@pytest.fixture
def offline(models, monkeypatch):
    """No network for the datasets library, and the task folder as working directory: the task's
    ``data_files`` is a path relative to where relufy runs."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(models / "tasks")
    return models


def hand_scores(root, activation: str, post=None) -> tuple[list[list[float]], float, float]:
    """Per doc, the log-likelihood of each choice (sum of the log-probs of the choice's tokens after
    the prompt, float64), and acc / acc_norm (length-normalized by characters) over the docs: the
    original transformers model with only the activation swapped, no relufy, no harness."""
    tok = AutoTokenizer.from_pretrained(root / "llama")
    model = tiny_model("llama")
    apply_reference(model, activation, post=post)
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()]
    lls, hits, hits_norm = [], 0, 0
    for doc in docs:
        context = f"Question: {doc['question']}\nAnswer:"
        row = []
        for choice in doc["choices"]:
            ctx = tok(context)["input_ids"]
            whole = tok(context + " " + choice)["input_ids"]
            assert whole[: len(ctx)] == ctx
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
            row.append(sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))))
        lls.append(row)
        hits += int(np.argmax(row)) == doc["label"]
        hits_norm += int(np.argmax(np.array(row) / [len(c) for c in doc["choices"]])) == doc["label"]
    return lls, hits / len(docs), hits_norm / len(docs)


def test_tasks_side_by_side_match_hand_loglikelihoods(offline, tmp_path, cli):
    pytest.importorskip("lm_eval")
    root = offline
    code, err, out = cli(
        "eval",
        root / "llama",
        root / "llama-drelu",
        "--tasks",
        "tiny_mc",
        "--tasks-path",
        root / "tasks",
        "--json",
        tmp_path / "r.json",
    )
    assert code == 0, err
    assert "tiny_mc" in out and "llama-drelu (drelu)" in out and "llama (swiglu)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert [m["activation"] for m in data["models"]] == ["swiglu", "drelu"]
    assert data["options"]["tasks"] == ["tiny_mc"]
    for m, activation in zip(data["models"], ["swiglu", "drelu"], strict=True):
        assert m["ppl"] is None and m["topk"] == []  # no --data: benchmarks only
        task = m["tasks"]["tiny_mc"]
        assert task["samples"] == 6
        for metric in ("acc", "acc_norm"):
            value, stderr = task["metrics"][metric]["value"], task["metrics"][metric]["stderr"]
            assert 0 <= value <= 1 and stderr is not None and stderr >= 0
            assert stderr == pytest.approx(math.sqrt(value * (1 - value) / 5))  # the sample stderr of a mean over 6
        _, acc, acc_norm = hand_scores(root, activation)
        assert task["metrics"]["acc"]["value"] == acc
        assert task["metrics"]["acc_norm"]["value"] == acc_norm


def test_harness_loglikelihoods_equal_hand_ones(offline):
    """Per doc and choice, the harness's log-likelihood on relufy's converted model equals the hand one."""
    pytest.importorskip("lm_eval")
    from relufy.measure.options import EvalOptions
    from relufy.measure.tasks import run_tasks, task_manager
    from relufy.modeling.tokenizer import load_tokenizer

    root = offline
    options = EvalOptions(tasks=("tiny_mc",), tasks_path=str(root / "tasks"), batch_size=3)
    path = root / "llama-drelu"
    model = relufy.load(path).eval()
    results = run_tasks(model, load_tokenizer(path), options, task_manager(options), log_samples=True)
    samples = sorted(results["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
    lls, _, _ = hand_scores(root, "drelu")
    assert len(samples) == len(lls) == 6
    for sample, row in zip(samples, lls, strict=True):
        harness = [r[0] for r in sample["filtered_resps"]]
        assert harness == pytest.approx(row, rel=1e-5, abs=1e-4)


def test_tasks_at_topk_level(offline, tmp_path, cli):
    """--tasks-at-levels: the harness runs under relufy's top-k mask (checked against a hand top-k)."""
    pytest.importorskip("lm_eval")
    root = offline
    level = 0.5

    def topk(module, h, expert):
        keep = math.ceil(round((1 - level) * h.shape[-1], 6))
        thr = h.abs().sort(dim=-1, descending=True).values[..., keep - 1 : keep]
        return h * (h.abs() >= thr)

    code, err, _ = cli(
        "eval", root / "llama", "--tasks", "tiny_mc", "--tasks-path", root / "tasks", "--topk", f"0,{level}",
        "--tasks-at-levels", "--limit", "4", "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    m = json.loads((tmp_path / "r.json").read_text())["models"][0]
    rows = {p["sparsity"]: p for p in m["topk"]}
    assert rows[0.0]["tasks"] == m["tasks"] and "ppl" not in rows[level]
    assert m["tasks"]["tiny_mc"]["samples"] == 4  # --limit
    lls, _, _ = hand_scores(root, "swiglu", post=topk)
    docs = [json.loads(line) for line in (TASKS / "tiny_mc.jsonl").read_text().splitlines()][:4]
    acc = sum(int(np.argmax(row)) == d["label"] for row, d in zip(lls, docs, strict=False)) / 4
    assert rows[level]["tasks"]["tiny_mc"]["metrics"]["acc"]["value"] == acc


def test_without_lm_eval_one_line(models, monkeypatch, cli):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    code, err, _ = cli("eval", models / "llama", "--tasks", "hellaswag")
    assert code == 2
    assert err == 'relufy: error: --tasks needs lm-eval: pip install "relufy[eval]"'


def test_unknown_task_one_line(models, cli):
    pytest.importorskip("lm_eval")
    code, err, _ = cli("eval", models / "llama", "--tasks", "hellaswg", "--tasks-path", models / "tasks")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--tasks hellaswg: not an lm-eval task" in err and "hellaswag" in err, err
