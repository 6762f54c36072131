"""relufy train under FSDP2, run for real in 2 CPU processes (gloo) by tests/train/fsdp2_launch.py
through ``accelerate launch`` with the shipped recipes/accelerate/fsdp2.yaml.

Four runs, each against a one-process run of the same global batch (micro-batch 4 instead of
2 x 2 processes): a tiny llama and a tiny MoE (qwen2_moe) with distillation, the FFN warm start
(per FFN; on one block of both layers for the MoE) and L1, and each with LoRA (llama: top-k
distillation, gradient checkpointing and a held-out set that leaves one process a batch short;
MoE: adapters on the fused experts too). Two of them are SIGKILLed mid-run and resumed; the other
two resume from a checkpoint of the finished run, as if killed while writing the next one.
Launches are few (each costs ~5 s of start): all finished runs in one, each kill in one, all
resumes in one.

Tolerances. Loss curves and held-out perplexity: 1e-5 relative. FSDP2 averages the two
processes' gradients (reduce-scatter) where one process averages over its batch of four in one
reduction, so each step's gradient differs in the last bits (measured: 1e-7 relative, one fp32
ulp) and AdamW carries that on; over these 8 steps 1e-5 leaves two orders of margin. The warm
start: 1e-5 too (measured: identical; the teacher's all-gathered weights are the same numbers and
each layer's fit draws from its own generator). ``final/`` logits: 1e-4 absolute (measured
~4e-6 on logits of size ~4: the weights carry the curve's last-bit differences). Resume: exact.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny import save_tiny_with_tokenizer
from trainkit import recipe_dict, reseal, train_single_threaded, write_recipe

import relufy
from relufy.train import checkpoint as ckpt

ROOT = Path(__file__).parents[2]
LAUNCH = Path(__file__).with_name("fsdp2_launch.py")
STEPS, EVERY = 8, 2  # checkpoints after steps 2, 4 and 6
KD_WARM_L1 = {
    "l1": 0.01,
    "distill": {"weight": 0.5, "temperature": 2.0},  # teacher_dtype auto: bf16 when sharded
    "ffn_warmstart": {"tokens": 512, "steps": 10},
}
CUT_KD = {"sparsity": {**KD_WARM_L1, "final_cutoff": {"sparsity": 0.9, "tokens": 256}}, "log__eval_every": 4}
RUNS = {  # name: (model, recipe overrides)
    # with the final cutoff: every process calibrates on its draw, process 0's cutoffs go to all
    "llama-kd": ("llama-drelu", CUT_KD),
    # the warm start on one block of both layers: process 0 fits it, process 1 receives it
    "moe-kd": ("moe-drelu", {"sparsity": {**KD_WARM_L1, "ffn_warmstart": {"tokens": 512, "steps": 10, "block": 2}}}),
    "llama-lora": (
        "llama-drelu",
        {
            "lora": {"r": 4, "alpha": 8},
            "sparsity": {"distill": {"weight": 0.5, "top_k": 8, "teacher_dtype": "bf16"}},
            "model__gradient_checkpointing": True,
            "data__heldout_fraction": 0.015,  # 9 windows: 5 and 4, so one process runs an uncounted batch
        },
    ),
    "moe-lora": ("moe-drelu", {"lora": {"r": 4, "alpha": 8, "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}}),
}
KILLED = ("llama-kd", "moe-lora")  # SIGKILLed; the others resume from a copied checkpoint


def _raw(world, name, out, micro_batch):
    model, overrides = RUNS[name]
    raw = recipe_dict(
        world,
        out,
        budget__max_steps=STEPS,
        budget__micro_batch_size=micro_batch,
        budget__grad_accum=2,
        optim__warmup_steps=2,
        checkpoint__every=EVERY,
        checkpoint__keep_last=3,
        **{k: v for k, v in overrides.items() if k != "sparsity"},
    )
    raw["model"]["path"] = str(world / model)
    if "sparsity" in overrides:
        raw["sparsity"] = json.loads(json.dumps(overrides["sparsity"]))
    return raw


def _launch(recipes, env, log: Path, resume=False):
    """``accelerate launch`` of the harness over ``recipes``: 2 CPU processes, in a session of
    their own, output to ``log``; returns the running launcher."""
    with socket.socket() as probe:  # a free port for the rendezvous (the default one may be taken)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp2.yaml")]
    cmd += ["--num_processes", "2", "--main_process_port", str(port), str(LAUNCH), *(["--resume"] if resume else [])]
    cmd += [str(r) for r in recipes]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=f, stderr=subprocess.STDOUT)


def _finish(proc, log: Path, timeout=600) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, log.read_text()[-4000:]


def _kill(proc, pids: Path) -> None:
    """SIGKILL the run's processes: the two workers (torchrun starts each in a session of its
    own, so each is killed by its id) and the launcher's session."""
    for f in sorted(pids.iterdir()) if pids.is_dir() else []:
        try:
            os.kill(int(f.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _cut(src: Path, dst: Path) -> None:
    """``dst``: the finished run ``src`` as if killed while writing step 6's checkpoint (its
    ``.tmp`` folder half written, metrics up to step 5)."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "final")
    for name in ("summary.json", "curves.png"):
        (dst / name).unlink()
    step6 = dst / "checkpoints" / ckpt.checkpoint_name(6)
    (dst / "checkpoints" / ".tmp-step-00000006").mkdir()
    shutil.move(step6 / "pytorch_model_fsdp_0", dst / "checkpoints" / ".tmp-step-00000006")
    shutil.rmtree(step6)
    lines = (dst / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:5]))


@pytest.fixture(scope="module")
def world(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    for name in ("text.txt", "llama-drelu"):
        (root / name).symlink_to(base / name)
    save_tiny_with_tokenizer("qwen2_moe", root / "moe")
    relufy.convert(root / "moe", root / "moe-drelu")
    return root


@pytest.fixture(scope="module")
def runs(world):
    """Every run's output folders: ``ref`` (one process), ``fsdp`` (finished), ``resumed``."""

    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true", "RELUFY_TEST_FACTS": str(world / "facts")}
    env.pop("ACCELERATE_USE_FSDP", None)
    recipes = {}
    for name in RUNS:
        recipes[name] = write_recipe(world / f"{name}.yaml", _raw(world, name, world / "fsdp" / name, 2))
        ref = _raw(world, name, world / "ref" / name, 4)
        if ref.get("sparsity", {}).get("distill"):
            ref["sparsity"]["distill"]["teacher_dtype"] = "bf16"  # what auto means under FSDP2
        train_single_threaded(ref)
    log = world / "finished.log"
    _finish(_launch(recipes.values(), env, log), log)  # the finished runs, one after the other
    resumed = {}
    for name in RUNS:
        out = world / "resumed" / name
        resumed[name] = write_recipe(world / f"{name}-resumed.yaml", _raw(world, name, out, 2))
        if name not in KILLED:
            _cut(world / "fsdp" / name, out)
            continue
        pids, log = world / "pids" / name, world / f"{name}-killed.log"
        proc = _launch([resumed[name]], {**env, "RELUFY_TEST_PIDS": str(pids)}, log)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not (out / "checkpoints" / ckpt.checkpoint_name(4)).exists():
            time.sleep(0.01)
        _kill(proc, pids)
        assert (out / "checkpoints" / ckpt.checkpoint_name(4)).exists(), log.read_text()[-4000:]
        assert not (out / "final").exists(), f"{name} finished before it was killed"
    log = world / "resumed.log"
    _finish(_launch(resumed.values(), env, log, resume=True), log)
    return {name: {kind: world / kind / name for kind in ("ref", "fsdp", "resumed")} for name in RUNS}


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


@pytest.mark.parametrize("name", RUNS)
def test_loss_curve_matches_one_process(runs, name):
    fsdp, ref = rows(runs[name]["fsdp"]), rows(runs[name]["ref"])
    assert [r["step"] for r in fsdp] == [r["step"] for r in ref] == list(range(1, STEPS + 1))
    for a, b in zip(fsdp, ref, strict=True):
        assert a["tokens"] == b["tokens"] and a["lr"] == b["lr"]
        assert close(a["loss"], b["loss"], 1e-5), (a["step"], a["loss"], b["loss"])
        assert close(a["grad_norm"], b["grad_norm"], 1e-4), (a["step"], a["grad_norm"], b["grad_norm"])
        assert abs(a["sparsity"] - b["sparsity"]) < 1e-3  # zeros counted on both processes
        assert close(a.get("heldout_ppl", 1.0), b.get("heldout_ppl", 1.0), 1e-5)
    summary = [json.loads((runs[name][k] / "summary.json").read_text()) for k in ("fsdp", "ref")]
    assert summary[0]["heldout_tokens"] == summary[1]["heldout_tokens"]
    for key in ("heldout_ppl_before", "heldout_ppl"):
        assert close(summary[0][key], summary[1][key], 1e-5), (key, summary)
    if "cutoff" in summary[1]:
        cut = [s["cutoff"] for s in summary]
        assert close(cut[0]["calibration_zeros"], cut[1]["calibration_zeros"], 1e-3) and cut[0]["tokens"] == cut[1]["tokens"]
        assert close(cut[0]["before"]["heldout_ppl"], cut[1]["before"]["heldout_ppl"], 1e-5)
        assert summary[0]["heldout_sparsity"] > cut[0]["before"]["heldout_sparsity"]
    if (runs[name]["ref"] / "warmstart.json").exists():
        warm = [json.loads((runs[name][k] / "warmstart.json").read_text()) for k in ("fsdp", "ref")]
        assert warm[0]["tokens"] == warm[1]["tokens"] and len(warm[0]["layers"]) == (1 if name == "moe-kd" else 2)
        for a, b in zip(warm[0]["layers"], warm[1]["layers"], strict=True):
            assert a["layer"] == b["layer"] and a.get("layers") == b.get("layers"), (a, b)
            assert all(close(a[k], b[k], 1e-5) for k in a if k != "layers"), (a, b)
            assert a["mse_after"] < a["mse_before"]


@pytest.mark.parametrize("name", RUNS)
def test_resume_is_exact(runs, name):
    def curve(out):
        return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in rows(out)]

    assert curve(runs[name]["resumed"]) == curve(runs[name]["fsdp"])
    from safetensors.torch import load_file

    a, b = (load_file(runs[name][k] / "final" / "model.safetensors") for k in ("resumed", "fsdp"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list((runs[name]["resumed"] / "checkpoints").glob(".tmp-*"))


@pytest.mark.parametrize("name", RUNS)
def test_final_loads_with_the_one_process_logits(runs, world, name):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    final, ref = runs[name]["fsdp"] / "final", runs[name]["ref"] / "final"
    configs = [json.loads((folder / "config.json").read_text()) for folder in (final, ref)]
    cutoffs = [c["relufy"].pop("cutoffs", {}) for c in configs]
    assert configs[0] == configs[1]
    assert cutoffs[0].keys() == cutoffs[1].keys() and all(close(cutoffs[0][k], cutoffs[1][k], 1e-4) for k in cutoffs[0])
    assert bool(cutoffs[0]) == (name == "llama-kd")
    with safe_open(final / "model.safetensors", "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]  # merged
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    logits = []
    for folder in (final, ref):
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert type(model).__name__ == "RelufyForCausalLM"
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
    trained = relufy.load(final)
    start = relufy.load(world / RUNS[name][0])
    assert any((p - q).abs().max() > 0 for p, q in zip(trained.parameters(), start.parameters(), strict=True))


def test_teacher_and_student_are_sharded(runs, world):
    """Each process holds half of each model: the teacher in bf16 (teacher_dtype auto), never a
    full fp32 copy; the student's shards in fp32."""
    for name in RUNS:
        facts = [json.loads((world / "facts" / f"fsdp-{name}.{rank}.json").read_text()) for rank in (0, 1)]
        for f in facts:
            assert f["sharded"] and f["student"]["sharded"] and f["student"]["dtypes"] == ["float32"]
            assert f["student"]["local_numel"] < 0.75 * f["student"]["numel"]
        assert sum(f["student"]["local_numel"] for f in facts) == facts[0]["student"]["numel"]
        if "distill" in json.dumps(RUNS[name][1]):
            teacher = [f["teacher"] for f in facts]
            assert all(t["sharded"] and t["dtypes"] == ["bfloat16"] for t in teacher), teacher
            assert sum(t["local_numel"] for t in teacher) == teacher[0]["numel"]


def test_sharded_checkpoint_is_sealed(runs, tmp_path):
    """Both processes' DCP shards, their metadata and RNG files are in the manifest; a planted
    ``.metadata`` (resealed) is refused by the allow-list unpickler without running."""
    run = runs["llama-kd"]["fsdp"]
    folder = run / "checkpoints" / ckpt.checkpoint_name(6)
    files = set(json.loads((folder / ckpt.MANIFEST).read_text())["files"])
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert {f"{part}/.metadata", f"{part}/__0_0.distcp", f"{part}/__1_0.distcp"} <= files
    assert {"random_states_0.pkl", "random_states_1.pkl", "relufy_state.json"} <= files
    run_id = ckpt.read_run_id(run)
    assert ckpt.verify(folder, run_id).reason is None
    copy = tmp_path / "checkpoints" / folder.name
    shutil.copytree(folder, copy)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').close()",)

    (copy / "optimizer_0" / ".metadata").write_bytes(pickle.dumps(Payload()))
    reseal(copy)
    verdict = ckpt.verify(copy, run_id)
    assert ".metadata is not plain checkpoint metadata" in verdict.reason and not marker.exists()


@pytest.mark.parametrize(
    "kind,version,needle",
    [("DEEPSPEED", None, "does not run under DeepSpeed: use FSDP2"), ("FSDP", 1, "shards with FSDP2 only")],
    ids=["deepspeed", "fsdp1"],
)
def test_deepspeed_and_fsdp1_are_refused(base, tmp_path, kind, version, needle):
    """One line before anything loads or is written (DeepSpeed is not installed here: the state says it)."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from relufy.errors import RelufyError
    from relufy.train.loop import RecipeRun
    from relufy.train.recipe import validate

    state = AcceleratorState._shared_state
    kept = {k: state[k] for k in ("distributed_type", "fsdp_plugin") if k in state}

    class Run(RecipeRun):
        def make_accelerator(self, **kwargs):
            accelerator = super().make_accelerator(**kwargs)
            accelerator.state.distributed_type = DistributedType(kind)
            if version:
                accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
            return accelerator

    try:
        with pytest.raises(RelufyError, match=needle):
            Run(validate(recipe_dict(base, tmp_path / "out")), show_progress=False).run()
    finally:
        state.pop("fsdp_plugin", None)
        state.update(kept)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["llama-lora", "moe-kd"])
def test_export_step_of_a_sharded_checkpoint(runs, world, name, cli):
    """``relufy train RECIPE --export-step 6``: the FSDP2 run's sharded step-6 checkpoint and the
    one-process run's (safetensors) become model folders whose logits agree within 1e-4 (the
    curves' last-bit differences, as ``final/``), LoRA merged; both differ from the start model."""
    from transformers import AutoModelForCausalLM

    logits = []
    for kind in ("fsdp", "ref"):
        recipe = write_recipe(world / f"{name}-{kind}-export.yaml", _raw(world, name, runs[name][kind], 2))
        code, err, out = cli("train", recipe, "--export-step", "6")
        assert code == 0, err
        folder = runs[name][kind] / "exports" / ckpt.checkpoint_name(6)
        assert f"wrote {folder}" in out
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits.append(model(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=1e-4)
    start = AutoModelForCausalLM.from_pretrained(world / RUNS[name][0], trust_remote_code=True).eval()
    with torch.no_grad():
        assert (start(torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])).logits - logits[0]).abs().max() > 1e-3


def test_export_step_refusals(runs, world, cli, tmp_path):
    """A step with no checkpoint names the kept ones; an existing export is not replaced; a damaged
    checkpoint is not read. Each: one line, nothing written or changed."""
    from safety import Snapshot, assert_refused

    run = tmp_path / "run"
    shutil.copytree(runs["llama-kd"]["fsdp"], run, ignore=shutil.ignore_patterns("exports"))
    recipe = write_recipe(tmp_path / "r.yaml", _raw(world, "llama-kd", run, 2))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe, "--export-step", "5")
    assert_refused(snap, code, err, "no checkpoint of step 5", "kept: 2, 4, 6")
    (run / "exports" / ckpt.checkpoint_name(4)).mkdir(parents=True)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe, "--export-step", "4")
    assert_refused(snap, code, err, "already exists")
    shard = run / "checkpoints" / ckpt.checkpoint_name(6) / "pytorch_model_fsdp_0" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe, "--export-step", "6")
    assert_refused(snap, code, err, "not exported")
