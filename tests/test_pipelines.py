"""The Makefile pipelines: the cluster dry runs, the ablation miniature and a shrunken demo, run
through make itself, each producing its report from real outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny import save_tiny_with_tokenizer

from relufy.errors import RelufyError
from relufy.pipelines import cluster

ROOT = Path(__file__).resolve().parents[1]


def make(*args, timeout=900):
    env = {**os.environ, "MAKEFLAGS": ""}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)  # fmt: skip


@pytest.mark.parametrize("name", sorted(cluster.PIPELINES))
def test_cluster_dry_run_through_make(name):
    proc = make(f"turbosparse-{name}", "DRY_RUN=1", "NPROC=64")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ok: recipe turbosparse-" in out and "FSDP, 64 processes" in out
    steps = [line.split(":", 1)[0] for line in out.splitlines() if re.match(r"^(convert|train|eval|export): ", line)]
    assert steps == ["convert", "train", "eval", "export"]
    assert "accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 64 -m relufy train" in out
    assert f"model.path=runs/turbosparse-{name}/drelu" in out


def test_cluster_dry_run_catches_problems(tmp_path, capsys):
    assert cluster.main(["mistral", "--dry-run", "--accelerate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: TPU\n")
    assert cluster.main(["mistral", "--dry-run", "--accelerate-config", str(bad)]) == 2
    assert "distributed_type 'TPU'" in capsys.readouterr().err
    # a recipe feature relufy train refuses under FSDP is caught before any GPU is booked
    recipe = yaml.safe_load((ROOT / cluster.PIPELINES["mistral"].recipe).read_text())
    recipe["sparsity"] = {"distill": {"weight": 1.0}}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    steps = cluster.plan("mistral", tmp_path / "out", 8, str(ROOT / "recipes/accelerate/fsdp2.yaml"), "x")
    steps[1].argv[steps[1].argv.index("train") + 1] = str(path)
    with pytest.raises(RelufyError, match="sparsity.distill, which relufy train refuses under FSDP"):
        cluster.check("mistral", steps, str(ROOT / "recipes/accelerate/fsdp2.yaml"), 8)
    assert cluster.check("mistral", steps, str(ROOT / "recipes/accelerate/ddp.yaml"), 8)  # DDP takes it
    with pytest.raises(SystemExit):
        cluster.main(["gpt2", "--dry-run"])


def test_ablation_miniature(tmp_path):
    save_tiny_with_tokenizer("llama", tmp_path / "tok")
    runs = tmp_path / "runs"
    proc = make("ablation", f"RUNS={runs}", "ABLATION_STEPS=12", f"ABLATION_TOKENIZER={tmp_path / 'tok'}",
                "ABLATION_DATA=builtin:pydoc", "ABLATION_EVAL=builtin:pydoc", "ABLATION_EVAL_TOKENS=1024",
                "ABLATION_ARGS=optim.warmup_steps=2 log.every=2 model.config.vocab_size=128 data.heldout_fraction=0.01")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = runs / "ablation-mini"
    evals = {m["activation"]: m for m in json.loads((folder / "eval.json").read_text())["models"]}
    assert set(evals) == {"drelu", "swiglu"}
    assert evals["drelu"]["sparsity"]["overall"] > 0.3 and evals["swiglu"]["sparsity"]["overall"] == 0
    for act in ("drelu", "swiglu"):
        summary = json.loads((folder / act / "summary.json").read_text())
        assert summary["steps"] == 12
    report = (folder / "report.md").read_text()
    # the report quotes the runs' own numbers next to the paper's
    assert f"{evals['drelu']['ppl']:,.2f}" in report and f"{evals['swiglu']['ppl']:,.2f}" in report
    assert "| drelu (paper, 300M) | 28.45 | 28.45 | 28.45 | 28.65 | 29.19 |" in report
    assert (folder / "report-img" / "loss.png").stat().st_size > 1000 and (folder / "report-img" / "topk.png").exists()
    # a second run reuses every finished step
    again = make("ablation", f"RUNS={runs}", "ABLATION_STEPS=12", f"ABLATION_TOKENIZER={tmp_path / 'tok'}",
                 "ABLATION_DATA=builtin:pydoc", "ABLATION_EVAL=builtin:pydoc", "ABLATION_EVAL_TOKENS=1024",
                "ABLATION_ARGS=optim.warmup_steps=2 log.every=2 model.config.vocab_size=128 data.heldout_fraction=0.01")  # fmt: skip
    assert again.returncode == 0 and "relufy train" not in again.stdout and "relufy eval" not in again.stdout


def test_demo_pipeline_shrunk(tmp_path):
    """make demo's whole chain on the embedded SmolLM2, with every budget cut to seconds."""
    runs = tmp_path / "runs"
    args = [
        f"RUNS={runs}", "DEMO_STEPS=2", "DEMO_EVAL_TOKENS=600",
        "DEMO_TRAIN_ARGS=sparsity.ffn_warmstart.steps=2 sparsity.ffn_warmstart.tokens=512 data.heldout_fraction=0.01 log.every=1 optim.warmup_steps=1",
        "DEMO_EXPORT_ARGS=--max-tokens 1024 --predictor-steps 5",
        "DEMO_BENCH_ARGS=--shapes model --threads 1 --repeats 2 --new-tokens 4 --sparsities 0.9",
    ]  # fmt: skip
    proc = make("demo", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 8):
        assert f"== {n}/7" in proc.stdout
    demo = runs / "demo"
    report = (demo / "report.md").read_text()
    before = json.loads((demo / "eval-before.json").read_text())["models"]
    after = json.loads((demo / "steps-2" / "eval-after.json").read_text())["models"]
    summary = json.loads((demo / "steps-2" / "train" / "summary.json").read_text())
    export = json.loads((demo / "steps-2" / "export.json").read_text())
    assert f"{before[0]['ppl']:,.2f}" in report and f"{after[0]['ppl']:,.2f}" in report
    assert f"{summary['heldout_ppl']:,.2f}" in report and f"{export['ppl_predicted']:.2f}" in report
    for png in ("ppl_vs_sparsity", "sparsity_per_layer", "training_curves", "speedup"):
        assert (demo / "report-img" / f"{png}.png").stat().st_size > 1000
    assert (demo / "steps-2" / "export" / "predictors.safetensors").exists()
    again = make("demo", *args)
    assert again.returncode == 0 and "relufy convert" not in again.stdout and "relufy train" not in again.stdout
