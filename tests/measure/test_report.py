"""relufy eval from the command line: outputs, and one clear line for each bad input."""

from __future__ import annotations

import json

import pytest
from tiny import corpus, save_tiny_with_tokenizer

import relufy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    (root / "text.txt").write_text(corpus()[:8000])
    (root / "text.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in corpus()[:8000].split("\n\n")))
    save_tiny_with_tokenizer("qwen2_moe", root / "moe")
    relufy.convert(root / "moe", root / "moe-drelu")
    return root


def test_outputs(models, tmp_path, cli):
    code, err, out = cli(
        "eval",
        models / "moe",
        models / "moe-drelu",
        "--data",
        models / "text.txt",
        "--seq-len",
        32,
        "--max-tokens",
        300,
        "--topk",
        "0,0.5,0.9",
        "--json",
        tmp_path / "r.json",
        "--plot",
        tmp_path / "plots",
        "--stats-out",
        tmp_path / "stats.safetensors",
    )
    assert code == 0, err
    assert "relufy eval" in out and "drelu" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["relufy_eval"] == 1 and len(data["models"]) == 2
    for m in data["models"]:
        assert {"ppl", "tokens", "sparsity", "topk", "moe", "active_ffn_param_fraction"} <= m.keys()
        assert {"mean", "overall", "per_layer"} <= m["sparsity"].keys()
        assert [p["sparsity"] for p in m["topk"]] == [0, 0.5, 0.9]
        assert {"per_expert", "router_share", "shared"} <= m["moe"].keys()
    pngs = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert pngs == ["experts_0.png", "experts_1.png", "ppl_vs_sparsity.png", "sparsity_0.png", "sparsity_1.png"]
    assert all((tmp_path / "plots" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (tmp_path / "stats.0.safetensors").exists() and (tmp_path / "stats.1.safetensors").exists()


def test_jsonl_equals_text_join(models, tmp_path, cli):
    """.jsonl records joined with blank lines are the same text as the .txt file."""
    results = []
    for data in ("text.txt", "text.jsonl"):
        code, err, _ = cli(
            "eval",
            models / "moe-drelu",
            "--data",
            models / data,
            "--seq-len",
            32,
            "--max-tokens",
            200,
            "--json",
            tmp_path / f"{data}.json",
        )
        assert code == 0, err
        results.append(json.loads((tmp_path / f"{data}.json").read_text())["models"][0]["ppl"])
    assert results[0] == pytest.approx(results[1])


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--data", "missing.txt"), "missing.txt not found"),
        (("--data", "{empty}"), "no text"),
        (("--data", "{text}", "--seq-len", "100000"), "exceeds the model's context of 64"),
        (("--data", "{text}", "--topk", "0.5,1.0"), "[0, 1)"),
        (("--data", "{text}", "--topk", "-0.1"), "[0, 1)"),
        (("--data", "{text}", "--topk", "a,b"), "--topk: Input should be a valid number"),
        ((), "give --data (perplexity) and/or --tasks"),
        (("--data", "{text}", "--threshold-sparsity", "1"), "threshold sparsity levels must be in [0, 1)"),
        (("--data", "{text}", "--threshold-calibration-tokens", "50"), "applies to --threshold-sparsity"),
        (("--data", "{text}", "--limit", "5"), "--limit applies to --tasks"),
        (("--data", "{text}", "--num-fewshot", "0"), "--num-fewshot applies to --tasks"),
        (("--tasks", "x", "--threshold-sparsity", "0.5"), "--threshold-sparsity applies to the perplexity text: give --data"),
        (("--tasks", "x", "--tasks-at-levels"), "--tasks-at-levels needs --topk and/or --threshold-sparsity"),
        (
            (
                "--data",
                "{text}",
                "--seq-len",
                "32",
                "--max-tokens",
                "300",
                "--threshold-sparsity",
                "0.5",
                "--threshold-calibration-tokens",
                "300",
            ),
            "leaves 0 to score",
        ),
    ],
)
def test_bad_input(models, tmp_path, cli, args, needle):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    args = [a.format(text=models / "text.txt", empty=tmp_path / "empty.txt") for a in args]
    code, err, _ = cli("eval", models / "moe-drelu", *args, "--json", tmp_path / "r.json")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not (tmp_path / "r.json").exists()


def test_threshold_rows_in_table_and_json(models, tmp_path, cli):
    """--threshold-sparsity beside the top-k curve: perplexity and realized zeros per level."""
    code, err, out = cli(
        "eval", models / "moe", models / "moe-drelu", "--data", models / "text.txt", "--seq-len", 32, "--max-tokens", 300,
        "--topk", "0,0.5", "--threshold-sparsity", "0.5,0.8", "--threshold-calibration-tokens", 64, "--json", tmp_path / "r.json",
    )  # fmt: skip
    assert code == 0, err
    assert "perplexity vs FFN sparsity" in out and "threshold" in out and "top-k" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["options"]["threshold_sparsity"] == [0.5, 0.8]
    for m in data["models"]:
        assert m["calibration"]["tokens"] == 64 and m["tokens"] == 300 - 64 - 1
        assert "thresholds" not in m
        assert [p["sparsity"] for p in m["threshold"]] == [0.5, 0.8]
        for p in m["threshold"]:
            assert {"ppl", "realized", "active_ffn_param_fraction", "calibration_below"} <= p.keys()
            assert 0 <= p["realized"]["mean"] <= 1 and p["realized"]["overall"] >= m["sparsity"]["overall"] - 1e-12
        for p in m["topk"]:  # the top-k rows realize at least s (more where the model has its own zeros)
            assert p["realized"]["overall"] >= max(p["sparsity"], m["sparsity"]["overall"]) - 0.05
    swiglu = data["models"][0]["threshold"]
    assert swiglu[0]["realized"]["mean"] == pytest.approx(0.5, abs=0.1)
    assert swiglu[1]["realized"]["mean"] == pytest.approx(0.8, abs=0.1)


def test_unreadable_model(models, tmp_path, cli):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    code, err, _ = cli("eval", tmp_path / "broken", "--data", models / "text.txt")
    assert code == 2 and len(err.splitlines()) == 1 and "config.json" in err, err
