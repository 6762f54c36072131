"""Checkpoints of relufy train: never unpickled, only ever finite, verified by a manifest,
only this run's. Each case was reproduced by a hostile tester against an earlier relufy."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safety import Snapshot, assert_one_line, assert_refused
from trainkit import curve, plain_pickle, plant, recipe_dict, reseal, write_recipe

from relufy.train import checkpoint as ckpt

CKPT = "checkpoints/step-{:08d}"


def test_payload_would_run_if_unpickled(tmp_path):
    """The planted files are real exploits: an unpickling loader runs them."""
    marker = tmp_path / "ran"
    plant(tmp_path / "p.bin", marker)
    torch.load(tmp_path / "p.bin", weights_only=False)
    assert marker.exists()


def test_checkpoint_format(reference):
    """Manifest written last (sizes, sha256, run id), relufy's state as JSON, no pickles of relufy's."""
    out, _ = reference
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step-00000002", "step-00000003", "step-00000004"]
    folder = out / CKPT.format(4)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["run_id"] == run_id and manifest["step"] == 4
    assert set(manifest["files"]) == {"model.safetensors", "optimizer.bin", "random_states_0.pkl", "relufy_state.json"}
    assert not list(folder.glob("custom_checkpoint_*"))
    state = json.loads((folder / "relufy_state.json").read_text())
    assert state["step"] == 4 and state["scheduler"]["last_epoch"] == 4 and state["mixture"]["position"] == 8
    assert ckpt.verify(folder, run_id).reason is None


def test_planted_pickles_never_run_on_resume(copy_run, reference, cli):
    """Payloads where the earlier relufy unpickled: Accelerate's custom state in step 4 (a file the
    manifest does not list) and the RNG file of step 3 (manifest resealed, so only the loader
    stands between the file and its code). Resume skips both, one line each, and goes on from
    step 2 exactly as the uninterrupted run did."""
    out, recipe = copy_run()
    marker = out.parent / "ran"
    plain_pickle(out / CKPT.format(4) / "custom_checkpoint_0.pkl", marker)
    plant(out / CKPT.format(3) / "random_states_0.pkl", marker)
    reseal(out / CKPT.format(3))
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert not marker.exists()
    skipped = [ln for ln in err.splitlines() if ln.startswith("relufy: skipped checkpoint")]
    assert len(skipped) == 2, err
    assert CKPT.format(4) in skipped[0] and "custom_checkpoint_0.pkl" in skipped[0]
    assert CKPT.format(3) in skipped[1] and "random_states_0.pkl cannot be read" in skipped[1]
    assert curve(out) == reference[1]  # resumed from step 2, exactly
    assert (out / "checkpoints" / "rejected-step-00000004").is_dir()


def test_planted_optimizer_is_refused_not_run(copy_run, cli):
    """The optimizer file (read by Accelerate itself) swapped for a payload, manifest resealed:
    Accelerate's weights_only load refuses it; one line, no code ran."""
    out, recipe = copy_run()
    marker = out.parent / "ran"
    plant(out / CKPT.format(4) / "optimizer.bin", marker)
    reseal(out / CKPT.format(4))
    code, err, _ = cli("train", recipe, "--resume")
    assert not marker.exists()
    assert_one_line(code, err, "cannot resume from", CKPT.format(4), "refused")


@pytest.mark.parametrize("with_run_file", [False, True])
def test_old_format_checkpoints_are_refused_unpickled(base, tmp_path, cli, with_run_file):
    """Checkpoints of the earlier relufy (custom_checkpoint_*.pkl, no manifest): one line, never loaded."""
    out = tmp_path / "old"
    folder = out / CKPT.format(30)
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin"):
        plant(folder / name, marker)
    (folder / "model.safetensors").write_bytes(b"x" * 64)
    (out / "metrics.jsonl").write_text('{"step": 30}\n')
    if with_run_file:
        ckpt.write_run(out, "abc", "t")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe, "--resume")
    assert_refused(snap, code, err, "earlier relufy", "another output_dir")
    assert not marker.exists()


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("truncate_model", "model.safetensors has"),
        ("corrupt_rng", "random_states_0.pkl cannot be read"),
        ("no_manifest", "no manifest.json"),
        ("flip_byte", "does not match its SHA-256"),
    ],
)
def test_resume_falls_back_past_damaged_checkpoints(copy_run, reference, cli, damage, reason):
    out, recipe = copy_run()
    newest = out / CKPT.format(4)
    if damage == "truncate_model":
        path = newest / "model.safetensors"
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "corrupt_rng":  # garbage of the right size, manifest resealed: the load itself must fail
        path = newest / "random_states_0.pkl"
        path.write_bytes(os.urandom(path.stat().st_size))
        reseal(newest)
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        path = newest / "optimizer.bin"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    skipped = [ln for ln in err.splitlines() if ln.startswith("relufy: skipped")]
    assert len(skipped) == 1 and CKPT.format(4) in skipped[0] and reason in skipped[0], err
    assert f"resuming from {out / CKPT.format(3)}" in err
    assert curve(out) == reference[1]
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["rejected-step-00000004", "step-00000002", "step-00000003", "step-00000004"]
    assert ckpt.verify(out / CKPT.format(4), json.loads((out / "run.json").read_text())["run_id"]).reason is None


def test_resume_never_takes_another_runs_checkpoint(copy_run, reference, cli):
    """A newer checkpoint of another run in the folder (intact in itself) is skipped, not resumed from."""
    out, recipe = copy_run()
    foreign = out / CKPT.format(9)
    shutil.copytree(out / CKPT.format(4), foreign)
    manifest = json.loads((foreign / "manifest.json").read_text())
    (foreign / "manifest.json").write_text(json.dumps({**manifest, "run_id": "0" * 32, "step": 9}))
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "belongs to another run" in err and f"resuming from {out / CKPT.format(4)}" in err
    assert curve(out) == reference[1]


def test_sigkill_in_the_first_checkpoint_is_not_a_dead_end(base, tmp_path, reference, cli):
    """Killed while writing its first checkpoint: a plain run is refused (the folder holds a run),
    --resume starts again from step 0 and says so; the leftover .tmp-step folder goes."""
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out, checkpoint__every=2))
    script = (
        "import os, signal, sys\n"
        "import relufy.train.checkpoint as c\n"
        "c.finish = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from relufy.cli import main\n"
        f"sys.argv = ['relufy', 'train', {str(recipe)!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (out / "checkpoints" / ".tmp-step-00000002").is_dir() and not (out / CKPT.format(2)).exists()
    assert len(curve(out)) == 2

    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe)
    assert_refused(snap, code, err, "already holds a run", "--resume")

    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "no intact checkpoint" in err and "starting again from step 0" in err
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert curve(out) == reference[1]  # same schedule and data as the reference: the same curve


@pytest.mark.parametrize("marker", ["metrics.jsonl", "checkpoints", "final", "summary.json"])
def test_fresh_run_into_a_run_folder_is_refused(base, tmp_path, cli, marker):
    out = tmp_path / "run"
    out.mkdir()
    (out / marker).mkdir() if marker in ("checkpoints", "final") else (out / marker).write_text("{}\n")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", recipe)
    assert_refused(snap, code, err, "already holds a run", marker, "--resume")


def test_two_runs_cannot_write_one_folder(base, tmp_path, cli):
    from relufy.io.atomic import target_lock

    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out))
    with target_lock(out):  # what a running relufy train holds
        snap = Snapshot(tmp_path)
        code, err, _ = cli("train", recipe)
        assert_refused(snap, code, err, "being written by another relufy process")


def test_divergence_keeps_the_real_last_good_checkpoint(base, tmp_path, cli):
    """optim.lr=1e4: the step whose update turns the weights into NaN is never saved; the
    checkpoint the message names exists, is finite, verifies and is the newest."""
    out = tmp_path / "run"
    raw = recipe_dict(base, out, optim__lr=1e4, optim__warmup_steps=0, checkpoint__keep_last=1, budget__max_steps=20)
    code, err, _ = cli("train", write_recipe(tmp_path / "r.yaml", raw))
    line = err.splitlines()[-1]
    assert code == 2 and line.startswith("relufy: error:") and "Traceback" not in err, err
    kept = sorted((out / "checkpoints").glob("step-*"))
    assert kept and f"last good checkpoint: {kept[-1]})" in line, (line, kept)
    from safetensors.torch import load_file

    for folder in kept:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())
        optim = torch.load(folder / "optimizer.bin", weights_only=True)
        assert all(torch.isfinite(v).all() for s in optim["state"].values() for v in s.values() if torch.is_tensor(v))
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert ckpt.verify(kept[-1], run_id).reason is None
    for row in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()):
        assert all(v is None or not isinstance(v, float) or math.isfinite(v) for v in row.values())


def test_state_check_sees_nan_in_parameters_and_optimizer():
    from relufy.train.loop import _state_finite

    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    assert _state_finite([p], opt)
    opt.state[p]["exp_avg_sq"][1] = float("inf")
    assert not _state_finite([p], opt)
    opt.state[p]["exp_avg_sq"][1] = 0
    with torch.no_grad():
        p[0] = float("nan")
    assert not _state_finite([p], opt)


def test_partial_metrics_line_on_resume_is_dropped(copy_run, reference, cli):
    """SIGKILL while appending leaves half a line: resume drops it, the curves plot skips such lines."""
    out, recipe = copy_run()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 320, "lo')
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert curve(out) == reference[1]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_skips_partial_lines_and_nulls(tmp_path):
    from relufy.train.plots import plot_curves

    rows = [{"step": 1, "loss": 3.0, "lr": 1e-3, "sparsity": None}, {"step": 2, "loss": None, "lr": 1e-3, "sparsity": 0.5}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 3, "lo')
    assert plot_curves(tmp_path / "m.jsonl", tmp_path / "c.png") == tmp_path / "c.png"
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_nan_values_are_written_as_null(base, tmp_path):
    """log.sparsity off makes the sparsity NaN: metrics.jsonl and summary.json stay standard JSON."""
    from trainkit import strict_json

    from relufy.train.loop import train
    from relufy.train.recipe import validate

    out = tmp_path / "run"
    train(validate(recipe_dict(base, out, budget__max_steps=2, checkpoint__every=0, log__sparsity=False)), show_progress=False)
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparsity"] for r in rows] == [None, None]
    strict_json((out / "summary.json").read_text())


def test_dcp_metadata_is_read_with_an_allowlist(tmp_path):
    """FSDP's sharded checkpoints carry a pickled .metadata that PyTorch unpickles: relufy reads it
    first admitting only checkpoint-metadata classes."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(2, 3), "step": 3}, storage_writer=dcp.FileSystemWriter(tmp_path / "sharded"), no_dist=True)
    assert ckpt._dcp_metadata_ok(tmp_path / "sharded" / ".metadata") is None
    marker = tmp_path / "ran"
    plain_pickle(tmp_path / "sharded" / ".metadata", marker)
    assert "not allowed" in ckpt._dcp_metadata_ok(tmp_path / "sharded" / ".metadata")
    assert not marker.exists()
