"""The run folder relufy train writes (relufy.train.rundir): links among its entries refused,
nothing relufy did not write replaced, permissions never wider than the inputs', a full disk
while checkpointing stopped on one line with a resumable folder. Each case was reproduced by a
hostile tester against an earlier relufy."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys

import pytest
from safety import Snapshot, assert_refused
from trainkit import curve, recipe_dict, reseal, write_recipe

CKPT = "checkpoints/step-{:08d}"


# ---- links ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    ["checkpoints", "final", "metrics.jsonl", "run.json", "recipe.yaml", "summary.json", "curves.png", "warmstart.json"],
)
@pytest.mark.parametrize("dry_run", [False, True], ids=["resume", "dry-run"])
def test_a_linked_run_entry_is_refused(copy_run, cli, entry, dry_run):
    """checkpoints/ linked elsewhere: --resume deleted the .tmp-step-* folders at the link's
    target and wrote its checkpoints there. Any entry relufy manages that is a link: one line."""
    out, recipe = copy_run()
    elsewhere = out.parent / "elsewhere"
    elsewhere.mkdir()
    source = out / entry
    target = elsewhere / entry
    if source.exists():
        shutil.move(source, target)
    elif entry == "final":
        target.mkdir()
    else:
        target.write_text("{}\n")
    if entry == "checkpoints":
        (target / ".tmp-step-00000009").mkdir()  # what a resume removes as a leftover: not at the link's target
        (target / ".tmp-step-00000009" / "keep").write_text("mine")
    source.symlink_to(target, target_is_directory=target.is_dir())
    snap = Snapshot(out.parent)
    code, err, _ = cli("train", recipe, "--resume", *(["--dry-run"] if dry_run else []))
    assert_refused(snap, code, err, f"{out / entry} is a symbolic link")


def test_dry_run_sees_the_run_folder_as_the_run_will(copy_run, cli):
    """A dry run into a run's folder is refused as the run is (without --resume), and passes with it."""
    out, recipe = copy_run()
    snap = Snapshot(out.parent)
    code, err, _ = cli("train", recipe, "--dry-run")
    assert_refused(snap, code, err, "already holds a run", "--resume")
    code, err, _ = cli("train", recipe, "--dry-run", "--resume")
    assert code == 0, err
    snap.assert_unchanged()


def test_a_linked_exports_folder_is_refused(copy_run, cli):
    out, recipe = copy_run()
    (out.parent / "elsewhere").mkdir()
    (out / "exports").symlink_to(out.parent / "elsewhere", target_is_directory=True)
    snap = Snapshot(out.parent)
    code, err, _ = cli("train", recipe, "--export-step", "4")
    assert_refused(snap, code, err, f"{out / 'exports'} is a symbolic link")


def test_a_linked_tracker_folder_is_refused(base, tmp_path, cli):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (out / "t").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # TensorBoard's OUTPUT_DIR/<name>
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out, log__trackers=["tensorboard"]))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, f"{out / 't'} is a symbolic link")


def test_a_run_entry_of_the_wrong_kind_is_refused(base, tmp_path, cli):
    out = tmp_path / "out"
    (out / "curves.png").mkdir(parents=True)
    path = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out))
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path)
    assert_refused(snap, code, err, f"{out / 'curves.png'} is not a regular file")


# ---- files relufy did not write --------------------------------------------------------------


USER_RECIPE = "# my notes: why these numbers\n"


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_the_users_recipe_in_output_dir_is_not_overwritten(base, tmp_path, cli, dry_run):
    """A recipe kept as OUTPUT_DIR/recipe.yaml was replaced by the resolved dump, its comments lost."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "recipe.yaml"
    path.write_text(USER_RECIPE + open(write_recipe(tmp_path / "r.yaml", recipe_dict(base, out))).read())
    (tmp_path / "r.yaml").unlink()
    snap = Snapshot(tmp_path)
    code, err, _ = cli("train", path, *(["--dry-run"] if dry_run else []))
    assert_refused(snap, code, err, f"{path} was not written by relufy for this run", "move it away")


@pytest.mark.parametrize("resume", [False, True], ids=["fresh", "resume"])
def test_a_foreign_curves_png_is_not_overwritten(copy_run, cli, resume):
    out, recipe = copy_run()
    if not resume:
        shutil.rmtree(out)
        out.mkdir()
    (out / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"my own plot")
    snap = Snapshot(out.parent)
    code, err, _ = cli("train", recipe, *(["--resume"] if resume else []))
    assert_refused(snap, code, err, f"{out / 'curves.png'} was not written by relufy for this run")


def test_relufy_replaces_its_own_files(copy_run, reference, cli):
    """A resume of the run updates its own recipe.yaml and curves.png (marked with the run's id);
    the recipe.yaml of an earlier relufy (a plain dump, no header) counts as relufy's too."""
    out, recipe = copy_run()
    run_id = json.loads((out / "run.json").read_text())["run_id"]
    assert (out / "recipe.yaml").read_text().startswith(f"# relufy train run {run_id}: ")
    from relufy.train.recipe import dump, load_recipe

    (out / "recipe.yaml").write_text(dump(load_recipe(recipe)))  # what an earlier relufy wrote
    shutil.copy(reference[0] / "curves.png", out / "curves.png")
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert (out / "recipe.yaml").read_text().startswith(f"# relufy train run {run_id}: ")
    from relufy.train import rundir

    assert any(t.endswith(rundir.mark(run_id)) for t in rundir._png_texts(out / "curves.png"))


# ---- permissions ---------------------------------------------------------------------------------


def _modes(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("private", [True, False], ids=["0600-model", "0644-model"])
def test_outputs_are_never_wider_than_the_inputs(base, tmp_path, cli, private):
    """The model's weights 0600: final/, the checkpoints (optimizer.bin...), the metrics and an
    --export-step were written 0644 regardless. Now nothing gets group or other access."""
    model = tmp_path / "model"
    shutil.copytree(base / "llama-drelu", model)
    text = tmp_path / "text.txt"
    shutil.copy(base / "text.txt", text)
    for path in [*model.iterdir(), text]:
        path.chmod(0o644)
    if private:
        (model / "model.safetensors").chmod(0o600)
    out = tmp_path / "out"
    raw = recipe_dict(base, out, budget__max_steps=2, checkpoint__keep_last=2)
    raw["model"]["path"], raw["data"]["sources"] = str(model), [{"data": str(text)}]
    recipe = write_recipe(tmp_path / "r.yaml", raw)
    umask = os.umask(0o022)
    try:
        code, err, _ = cli("-q", "train", recipe)
        assert code == 0, err
        code, err, _ = cli("-q", "train", recipe, "--export-step", "1")
        assert code == 0, err
        assert os.umask(0o022) == 0o022  # the run's narrower umask did not outlive it
    finally:
        os.umask(umask)
    modes = _modes(out)
    assert {"final/model.safetensors", CKPT.format(1) + "/optimizer.bin", "exports/step-00000001/model.safetensors"} <= set(modes)
    if private:
        wide = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
        assert not wide, wide
    else:  # as before: the usual umask-based modes
        assert modes["final/model.safetensors"] == 0o644 and modes["final"] == 0o755, modes


# ---- the checkpoint's own state --------------------------------------------------------------------


@pytest.mark.parametrize(
    "tamper",
    [
        {"optimizer": None},
        {"last_epoch": "4"},
        {"base_lrs": ["x"]},
        {"_step_count": True},
        {"lr_lambdas": [{"code": 1}]},
    ],
    ids=["extra-key", "string-epoch", "string-lr", "bool-count", "lambda-state"],
)
def test_tampered_scheduler_state_is_skipped_not_run(copy_run, reference, cli, tamper):
    """relufy_state.json's scheduler edited, manifest resealed: LambdaLR.load_state_dict copies
    every key into the scheduler, and the first step crashed with a traceback. Now the checkpoint
    is skipped on one line, like other damage, and the run resumes from the one before."""
    out, recipe = copy_run()
    newest = out / CKPT.format(4)
    state = json.loads((newest / "relufy_state.json").read_text())
    state["scheduler"].update(tamper)
    (newest / "relufy_state.json").write_text(json.dumps(state))
    reseal(newest)
    code, err, _ = cli("train", recipe, "--resume")
    assert code == 0, err
    assert "Traceback" not in err
    skipped = [ln for ln in err.splitlines() if ln.startswith("relufy: skipped")]
    assert len(skipped) == 1 and "the scheduler state is damaged" in skipped[0], err
    assert f"resuming from {out / CKPT.format(3)}" in err
    assert curve(out) == reference[1]


def test_tampered_data_position_is_one_line():
    from relufy.errors import RelufyError
    from relufy.train.mixture import Mixture

    mixture = Mixture([], [], seed=0)
    for bad in ({"position": 3, "draws": []}, {"position": -1, "draws": []}, {"position": 0, "draws": [True]}):
        with pytest.raises(RelufyError, match="the data position is damaged"):
            mixture.load_state_dict(bad)


@pytest.mark.parametrize("damage", ["truncated", "header-length", "header-junk"])
def test_export_step_of_an_unreadable_checkpoint_is_one_line(copy_run, cli, damage):
    """model.safetensors damaged and the manifest rewritten to match: the verification passes, the
    reader failed with a traceback. Now one line, and no exports/ folder."""
    out, recipe = copy_run()
    path = out / CKPT.format(4) / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header-length":
        data = (2**62).to_bytes(8, "little") + data[8:]
    else:
        n = int.from_bytes(data[:8], "little")
        data = data[:8] + b"{" * n + data[8 + n :]
    path.write_bytes(data)
    reseal(out / CKPT.format(4))
    snap = Snapshot(out.parent)
    code, err, _ = cli("train", recipe, "--export-step", "4")
    assert_refused(snap, code, err, f"{path}: not a readable safetensors file", "not exported")


# ---- a full disk -----------------------------------------------------------------------------------


def test_disk_full_while_checkpointing_is_one_line_and_resumable(base, tmp_path, reference):
    """On a real small filesystem: the second checkpoint does not fit. torch's RuntimeError was a
    traceback; now one line naming the last whole checkpoint, no partial folder left, and after
    space is freed --resume finishes the run exactly as the uninterrupted one."""
    from safety import run_on_tmpfs

    step = reference[0] / CKPT.format(4)
    checkpoint_kb = sum(p.stat().st_size for p in step.iterdir()) // 1024
    mnt = tmp_path / "mnt"
    out = mnt / "out"
    recipe = write_recipe(tmp_path / "r.yaml", recipe_dict(base, out, checkpoint__keep_last=1))
    resume = " ".join([sys.executable, "-m", "relufy", "-q", "train", str(recipe), "--resume"])
    proc = run_on_tmpfs(
        mnt,
        ["-q", "train", recipe],
        size_kb=checkpoint_kb * 3 // 2 + 64,
        after=(
            "ls -A {mnt}/out/checkpoints; echo ==; mount -o remount,size=8m {mnt}; "
            f"{resume} >/dev/null 2>{tmp_path / 'resume.err'}; echo rc=$?; echo ==; cat {{mnt}}/out/metrics.jsonl"
        ),
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"relufy: error: no space left on device writing checkpoint {out / CKPT.format(2)}"), err
    assert f"{out / CKPT.format(1)} is the last whole checkpoint" in err and "--resume" in err
    listing, rc, metrics = proc.stdout.split("==\n")
    assert listing.split() == ["step-00000001"], listing  # no .tmp-step-00000002 left
    assert rc.strip() == "rc=0", (tmp_path / "resume.err").read_text()
    assert f"resuming from {out / CKPT.format(1)}" in (tmp_path / "resume.err").read_text()
    rows = [json.loads(line) for line in metrics.splitlines()]
    assert [(r["step"], r["loss"], r["lr"]) for r in rows] == reference[1]


def test_a_planted_link_at_a_temporary_name_is_not_followed(tmp_path):
    """relufy's JSON writes go through .NAME.relufy-tmp: a link planted there is replaced, never written through."""
    from relufy.train import checkpoint as ckpt

    (tmp_path / "victim").write_text("keep")
    (tmp_path / ".summary.json.relufy-tmp").symlink_to(tmp_path / "victim")
    ckpt.write_json(tmp_path / "summary.json", {"a": 1})
    assert (tmp_path / "victim").read_text() == "keep"
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
