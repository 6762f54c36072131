"""The Makefile pipelines: the cluster dry runs, the model organism in miniature, a shrunken demo, and the
recovery -> export -> bench chain on a tiny model, run through make itself, each producing its
report from real outputs; every target's dry run and the documented commands it prints."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hang import bound, run_watched
from tiny import save_tiny_with_tokenizer

from relufy.pipelines import cluster
from relufy.train import recipes

ROOT = Path(__file__).resolve().parents[2]


def make(*args, **env):
    """``make ARGS`` in the repository, stopped only after 15 minutes without output (tests/hang.py)."""
    env = {**os.environ, "MAKEFLAGS": "", **env}
    return run_watched(["make", "--no-print-directory", "-C", str(ROOT), *args], env=env)


def dry(*args) -> list[str]:
    """The commands ``make -n`` prints, one per line (continuations joined, spaces collapsed)."""
    proc = make("-n", *args)
    assert proc.returncode == 0, proc.stderr
    return [" ".join(line.split()) for line in proc.stdout.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.parametrize("name", sorted(cluster.PIPELINES))
def test_cluster_dry_run_through_make(name):
    proc = make(f"turbosparse-{name}", "DRY_RUN=1", "NPROC=64", "ACCELERATE_CONFIG=recipes/accelerate/fsdp2-multinode.yaml")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "ok: recipe turbosparse-" in out and "FSDP, 64 processes on 8 machine(s)" in out
    steps = [line.split(":", 1)[0] for line in out.splitlines() if re.match(r"^(convert|train|eval|export): ", line)]
    assert steps == ["convert", "train", "eval", "export"]
    assert "accelerate launch --config_file recipes/accelerate/fsdp2-multinode.yaml --num_processes 64 -m relufy train" in out
    assert f"model.path=runs/turbosparse-{name}/drelu" in out


def test_cluster_dry_run_catches_problems(tmp_path, capsys):
    assert cluster.main(["mistral", "--dry-run", "--accelerate-config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: TPU\n")
    assert cluster.main(["mistral", "--dry-run", "--accelerate-config", str(bad)]) == 2
    assert "distributed_type 'TPU'" in capsys.readouterr().err
    for text, needle in (
        ("distributed_type: DEEPSPEED\n", "does not run under DeepSpeed"),
        ("distributed_type: FSDP\nfsdp_config:\n  fsdp_version: 1\n", "FSDP2 only"),
    ):
        bad.write_text(text)
        assert cluster.main(["mistral", "--dry-run", "--accelerate-config", str(bad)]) == 2
        assert needle in capsys.readouterr().err
    # 64 processes need more than one machine's config
    assert cluster.main(["mistral", "--dry-run", "--nproc", "64"]) == 2
    assert "64 processes on 1 machine(s) of 8 GPUs: use a config for more machines" in capsys.readouterr().err
    # distillation, the warm start and LoRA run under FSDP2 as under DDP
    recipe = yaml.safe_load(recipes.find(cluster.PIPELINES["mistral"].recipe).path.read_text())
    recipe["sparsity"] = {"distill": {"weight": 1.0}, "ffn_warmstart": {"tokens": 4096}}
    recipe["lora"] = {"r": 8}
    path = tmp_path / "kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    steps = cluster.plan("mistral", tmp_path / "out", 8, str(ROOT / "recipes/accelerate/fsdp2.yaml"), "x")
    steps[1].argv[steps[1].argv.index("train") + 1] = str(path)
    for config in ("fsdp2.yaml", "ddp.yaml"):
        assert cluster.check(steps, str(ROOT / "recipes/accelerate" / config), 8)
    with pytest.raises(SystemExit):
        cluster.main(["gpt2", "--dry-run"])


def test_organism_through_make(tmp_path):
    """make organism's whole chain at micro scale: pretraining (the SwiGLU organism and its dReLU /
    ReGLU twins), conversions, the recovery grid, every eval, the table, the plot and the twins'
    report; a second make reruns nothing. The corpus and tokenizer steps are laid in place from
    Python's help text by the corpus module (make would build them from the Debian packages)."""
    from corpus_kit import package_roots

    from relufy.pipelines import corpus

    org = tmp_path / "runs" / "organism"
    corpus.build(org / "corpus", roots=package_roots(tmp_path / "pkgs"))
    corpus.fit_tokenizer(org / "corpus" / "train.jsonl", org / "tokenizer", vocab=512)
    args = [
        "organism",
        f"RUNS={tmp_path / 'runs'}",
        "ORG_BUDGETS=20",
        "ORG_EVAL_TOKENS=1024",
        "ORG_CALIBRATION_TOKENS=256",
        "ORGANISM_ARGS=budget.max_steps=12 budget.micro_batch_size=4 data.seq_len=64 optim.warmup_steps=2 log.every=4 "
        "log.eval_every=0 checkpoint.every=0 model.config.vocab_size=512 model.config.hidden_size=32 "
        "model.config.intermediate_size=64 model.config.num_hidden_layers=2 model.config.num_attention_heads=2 "
        "model.config.num_key_value_heads=2",
        "ORG_RECOVERY_ARGS=data.seq_len=64 budget.micro_batch_size=2 optim.warmup_steps=1 sparsity.ffn_warmstart.tokens=256 "
        "sparsity.ffn_warmstart.steps=2 sparsity.final_cutoff.tokens=256 log.every=1",
    ]
    proc = make(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    base = org / "base"
    # every model is whole afterwards (make deletes the files it treats as intermediate)
    finals = sorted(base.glob("*/*/final")) + sorted(base.glob("recover/*/*/final"))
    assert len(finals) == 3 + 2 + 4 and all((f / "config.json").is_file() for f in finals), finals
    pre = json.loads((base / "pretrain" / "swiglu" / "summary.json").read_text())
    assert pre["steps"] == 12 and pre["tokens"] == 12 * 4 * 64
    table = json.loads((base / "table.json").read_text())
    grid = {(r["method"], r["percent"]): r["tokens"] for r in table["rows"] if r["kind"] == "recovered"}
    # each method at the budget, its tokens that share of the organism's pretraining (within a step)
    assert set(grid) == {(m, 20) for m in ("prosparse", "relufy", "relufy-reglu", "turbosparse")}
    assert all(abs(tokens - 0.2 * 3072) < 2 * 64 for tokens in grid.values()), grid
    kinds = [r["kind"] for r in table["rows"]]
    assert kinds.count("scratch") == 2 and kinds.count("converted") == 2 and kinds.count("training-free") == 2
    for r in table["rows"]:  # ratios to the organism on the same windows (the thresholds: on their own windows)
        for text in ("heldout", "ood"):
            dense = json.loads((base / "pretrain" / "swiglu" / f"thresholds-{text}.json").read_text())["models"][0]
            denominator = dense if r["kind"] == "training-free" else table["rows"][0][text]
            assert r[text]["ratio"] == pytest.approx(r[text]["ppl"] / denominator["ppl"])
    relufy_rows = [r for r in table["rows"] if r["method"] == "relufy"]
    assert all(r["heldout"]["zeros"] > 0.85 for r in relufy_rows)  # the final cutoff holds
    assert all(r["seconds"] is not None for r in relufy_rows)
    md = (base / "table.md").read_text()
    assert "| SwiGLU organism |" in md and "@ 20%" in md and "TEAL/CATS threshold 90%" in md
    assert (base / "recovery.png").stat().st_size > 10_000
    report = (base / "pretrain" / "report.md").read_text()
    assert "| drelu (paper, 300M) | 28.45 | 28.45 | 28.45 | 28.65 | 29.19 |" in report
    again = make(*args)
    assert again.returncode == 0 and "relufy train" not in again.stdout and "relufy eval" not in again.stdout


def test_demo_pipeline_shrunk(tmp_path):
    """make demo's whole chain on the embedded SmolLM2, with every budget cut to seconds."""
    runs = tmp_path / "runs"
    args = [
        f"RUNS={runs}",
        "DEMO_STEPS=2",
        "DEMO_EVAL_TOKENS=600",
        "DEMO_TRAIN_ARGS=sparsity.ffn_warmstart.steps=2 sparsity.ffn_warmstart.tokens=512 data.heldout_fraction=0.01 "
        "log.every=1 optim.warmup_steps=1",
        "DEMO_EXPORT_ARGS=--max-tokens 1024 --predictor-steps 5",
        "DEMO_BENCH_ARGS=--shapes model --threads 1 --repeats 2 --new-tokens 4 --sparsities 0.9",
    ]
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


# The recovery runs behind docs/results.md: each run's overrides, exactly as documented.
RECOVERY_ARGS = (
    "budget.max_steps=60 checkpoint.every=0 data.heldout_fraction=0.02 log.eval_every=0 sparsity.ffn_warmstart.steps=60 "
    "sparsity.ffn_warmstart.tokens=8192 sparsity.ffn_warmstart.l1=0 sparsity.l1=0"
)
RECOVERY_RUNS = {
    "recovery/plain": f"{RECOVERY_ARGS} sparsity.distill=null sparsity.ffn_warmstart=null",
    "recovery/warmstart": f"{RECOVERY_ARGS} sparsity.distill=null",
    "recovery/warmstart-kd": RECOVERY_ARGS,
    "recovery-hour/full": "",
    "recovery-hour/plain": "sparsity.distill=null sparsity.ffn_warmstart=null sparsity.l1=0",
    "recovery-hour/warmstart-l1": "sparsity.distill=null",
}


def recovery_command(runs: Path, run: str) -> str:
    return " ".join(
        f".venv/bin/relufy train recipes/smollm2-recovery-cpu.yaml output_dir={runs}/{run} "
        f"model.path={runs}/demo/drelu {RECOVERY_RUNS[run]}".split()
    )


def test_every_target_dry_runs(tmp_path):
    """make -n of every target works and writes nothing; the recovery commands are the documented
    ones; bench-sparse makes what it benchmarks first; each pipeline keeps its eval flags."""
    runs = tmp_path / "runs"
    database = make("-pq", f"RUNS={runs}").stdout
    phony = next(line for line in database.splitlines() if line.startswith(".PHONY:")).split()[1:]
    targets = [t for t in phony if "/" not in t]
    assert {"demo", "ablation", "recovery-smollm2", "recovery-smollm2-hour", "export-smollm2", "bench-sparse"} <= set(targets)
    for target in targets:
        proc = make("-n", target, f"RUNS={runs}")
        assert proc.returncode == 0, (target, proc.stderr)
    assert make("-n", "ablation", "ABLATION=300m", f"RUNS={runs}").returncode == 0
    assert not runs.exists()

    trains = [line for line in dry("recovery-smollm2", "recovery-smollm2-hour", f"RUNS={runs}") if "relufy train" in line]
    assert trains == [recovery_command(runs, run) for run in RECOVERY_RUNS]

    # recovery judged outside the training text: the teacher's corpus first, then the run on it
    # scored on pydoc and WikiText-2, then its budget curve
    budget = dry("recovery-budget", f"RUNS={runs}")
    corpus = f"{runs}/data/teacher-smollm2.jsonl"
    sample = budget.index(f".venv/bin/python benchmarks/teacher_corpus.py {corpus} --tokens 131072")
    train_line = next(line for line in budget if line.startswith(".venv/bin/relufy train "))
    assert budget.index(train_line) > sample and f"'data.sources=[{{data: {corpus}}}]'" in train_line
    assert "'data.eval_sources=[{data: builtin:pydoc, max_tokens: 8192}, {data: wikitext:" in train_line
    curve = f".venv/bin/python benchmarks/budget_curve.py {runs}/recovery-budget --fit-from 40960"
    assert budget[-1] == curve + " --plot docs/img/budget_curve.png"
    methods = dry("recovery-methods", f"RUNS={runs}", "SHAKESPEARE=input.txt")
    variants = "base,stages,hidden,anneal,lr1e-3,l1-10,block5,block5-lr1e-3,ffn-block5"
    assert f"--variants {variants} --shakespeare input.txt" in methods[-1]

    chain = dry("bench-sparse", f"RUNS={runs}")
    assert [line.split()[1] for line in chain if line.startswith(".venv/bin/relufy ")] == ["convert", "train", "export", "bench"]
    assert recovery_command(runs, "recovery/warmstart-kd") in chain
    assert (
        f".venv/bin/relufy export {runs}/recovery/warmstart-kd/final {runs}/export/smollm2 --data "
        f"wikitext:wikitext-2-raw-v1:validation --reorder --predictors --json {runs}/export/smollm2.json --force"
    ) in chain
    # another model is exported as given, nothing trained for it
    other = dry("export-smollm2", f"RUNS={runs}", "EXPORT_MODEL=elsewhere/model")
    assert [line.split()[1] for line in other if line.startswith(".venv/bin/relufy ")] == ["export"]

    evals = [
        line for target in ("demo", "eval-smollm2", "ablation") for line in dry(target, f"RUNS={runs}") if "relufy eval" in line
    ]
    assert len(evals) == 4
    for line in evals[:2]:
        assert "--data builtin:pydoc --seq-len 512 --max-tokens 4096 --topk 0,0.5,0.8,0.9 --batch-size 4 --json" in line
    assert (
        "--data wikitext:wikitext-2-raw-v1:validation --seq-len 512 --max-tokens 16384 "
        "--topk 0,0.5,0.8,0.85,0.9 --batch-size 4 --json"
    ) in evals[2]
    assert (
        "--data wikitext:wikitext-2-raw-v1:validation --seq-len 512 --max-tokens 65536 --topk 0,0.5,0.8,0.85,0.9 "
        "--batch-size 8 --json"
    ) in evals[3]

    # the organism: corpus, tokenizer, pretraining, conversions, the grid, every eval, the table
    org = dry("organism", f"RUNS={runs}", "ORG_BUDGETS=1")
    steps = [" ".join(line.split()[:3]) for line in org if line.startswith(".venv/bin/")]
    assert steps[:3] == [
        ".venv/bin/python -m relufy.pipelines.corpus",
        ".venv/bin/python -m relufy.pipelines.corpus",
        ".venv/bin/relufy train organism-pretrain-cpu",
    ]
    assert steps.count(".venv/bin/relufy train small-recovery-cpu") == 4
    assert steps.count(".venv/bin/relufy train organism-pretrain-cpu") == 3  # the organism and its twins
    assert steps[-1] == ".venv/bin/python -m relufy.pipelines.report"
    assert (
        f".venv/bin/python -m relufy.pipelines.organism table {runs}/organism/base --plot {runs}/organism/base/recovery.png"
        in org
    )
    small = dry("organism", f"RUNS={runs}", "ORGANISM=small", "ORG_BUDGETS=1")
    assert any(line.startswith(".venv/bin/relufy train organism-small-pretrain-cpu") for line in small)
    assert not any("relufy.pipelines.report" in line for line in small)  # no twins for the small organism


@pytest.fixture(scope="module")
def tiny_drelu(tmp_path_factory):
    """A tiny dReLU conversion with its tokenizer, trained by the recovery targets (RECOVERY_MODEL)."""
    base = tmp_path_factory.mktemp("recovery-model")
    save_tiny_with_tokenizer("llama", base / "swiglu")
    subprocess.run(
        [sys.executable, "-m", "relufy", "convert", str(base / "swiglu"), str(base / "drelu")], check=True, capture_output=True
    )
    return base / "drelu"


# the recipe shrunk to the tiny model: its context, Python's help text, a short warm start; one
# thread per process (a tiny model on a busy machine crawls with more)
TINY_ENV = {"OMP_NUM_THREADS": "1"}
TINY_TRAIN = (
    "data.seq_len=64 'data.sources=[{data: \"builtin:pydoc\"}]' data.eval_sources=[] data.heldout_fraction=0.05 log.every=1 "
    "optim.warmup_steps=1 sparsity.ffn_warmstart.steps=2 sparsity.ffn_warmstart.tokens=512"
)


def trained(stdout: str) -> list[str]:
    return re.findall(r"relufy train \S+ output_dir=(\S+)", stdout)


def test_recovery_export_bench_chain(tmp_path, tiny_drelu):
    """Recovery runs, export and bench as file targets: each made once, in order, on demand."""
    runs = tmp_path / "runs"
    args = [
        f"RUNS={runs}",
        f"RECOVERY_MODEL={tiny_drelu}",
        "WIKITEXT=builtin:pydoc",
        f"RECOVERY_ARGS=budget.max_steps=2 checkpoint.every=0 {TINY_TRAIN}",
        "EXPORT_ARGS=--seq-len 32 --max-tokens 1024 --predictor-steps 5",
        "BENCH_SPARSE_ARGS=--shapes model --threads 1 --repeats 2 --new-tokens 4 --sparsities 0.9 --dtypes fp32",
    ]
    # bench-sparse makes what it benchmarks: the warm start + distillation run, then its export
    proc = make("bench-sparse", *args, **TINY_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert trained(proc.stdout) == [str(runs / "recovery" / "warmstart-kd")] and "relufy convert" not in proc.stdout
    assert f"relufy export {runs}/recovery/warmstart-kd/final {runs}/export/smollm2 " in proc.stdout
    assert json.loads((runs / "export" / "smollm2.json").read_text())["ppl_predicted"] > 1
    assert json.loads((runs / "bench" / "sparse.json").read_text())["ffn"]
    # recovery-smollm2 trains the two runs still missing
    proc = make("recovery-smollm2", *args, **TINY_ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert trained(proc.stdout) == [str(runs / "recovery" / run) for run in ("plain", "warmstart")]
    for run in ("plain", "warmstart", "warmstart-kd"):
        assert json.loads((runs / "recovery" / run / "summary.json").read_text())["steps"] == 2
    # a second make does nothing
    again = make("recovery-smollm2", "export-smollm2", *args)
    assert again.returncode == 0 and "relufy train" not in again.stdout and "relufy export" not in again.stdout
    # another EXPORT_MODEL is exported anew, and the default again after it
    plain = make("export-smollm2", *args, f"EXPORT_MODEL={runs}/recovery/plain/final", **TINY_ENV)
    assert plain.returncode == 0, plain.stdout[-3000:] + plain.stderr[-3000:]
    assert f"relufy export {runs}/recovery/plain/final " in plain.stdout and not trained(plain.stdout)
    back = dry("export-smollm2", *args)
    assert [line.split()[1:3] for line in back if line.startswith(".venv/bin/relufy ")] == [
        ["export", f"{runs}/recovery/warmstart-kd/final"]
    ]


def test_killed_run_continues(tmp_path, tiny_drelu):
    """A recovery run killed mid-way: the next make continues it with --resume from its newest
    checkpoint; a finished run is left alone."""
    runs = tmp_path / "runs"
    run = runs / "recovery-hour" / "full"
    target = str(run / "summary.json")
    args = [
        f"RUNS={runs}",
        f"RECOVERY_MODEL={tiny_drelu}",
        f"RECOVERY_HOUR_ARGS=budget.max_steps=30 checkpoint.every=2 {TINY_TRAIN}",
    ]
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "-C", str(ROOT), target, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MAKEFLAGS": "", **TINY_ENV},
        start_new_session=True,
    )
    deadline = time.time() + bound(60)  # a hang guard, not a time limit
    while time.time() < deadline and not (run / "checkpoints" / "step-00000002").exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # make and relufy train
    proc.wait()
    assert (run / "run.json").exists() and not (run / "summary.json").exists(), "the run finished before it was killed"
    resumed = make(target, *args, **TINY_ENV)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert trained(resumed.stdout) == [str(run)] and resumed.stdout.rstrip().endswith(f"wrote {run}/final")
    assert " --resume\n" in resumed.stdout and "resuming from" in resumed.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 30
    again = make(target, *args)
    assert again.returncode == 0 and not trained(again.stdout)
