"""Outputs never land on inputs: every command compares resolved paths before it writes.

Each case was reproduced against an earlier relufy, where ``--force`` deleted the source model
or an output overwrote a model's own files. Every refusal: exit 2, one line, every file as it was.
"""

from __future__ import annotations

import os

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny, save_tiny_with_tokenizer

import relufy


@pytest.fixture
def proj(tmp_path):
    """A user's project folder holding a model and an unrelated file."""
    proj = tmp_path / "proj"
    save_tiny("llama", proj / "src")
    (proj / "notes.txt").write_text("mine")
    (tmp_path / "x").mkdir()
    return proj


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training run's folder layout around a converted model with a tokenizer."""
    root = tmp_path_factory.mktemp("run")
    save_tiny_with_tokenizer("llama", root / "orig")
    relufy.convert(root / "orig", root / "run" / "final")
    (root / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "run" / "checkpoints").mkdir()
    (root / "text.txt").write_text("hello world, this is a little text. " * 200)
    return root


def test_force_out_spelled_with_dotdot_around_src(tmp_path, proj, cli):
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", proj / "src", tmp_path / "x" / ".." / "proj", "--force")
    assert_refused(snap, code, err, "contains the input")


def test_force_out_is_where_a_linked_src_points(tmp_path, proj, cli):
    (tmp_path / "link").symlink_to(proj / "src")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", tmp_path / "link", proj / "src", "--force")
    assert_refused(snap, code, err, "is the input")


def test_force_out_is_a_link_to_src(tmp_path, proj, cli):
    (tmp_path / "out").symlink_to(proj / "src")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", proj / "src", tmp_path / "out", "--force")
    assert_refused(snap, code, err, "is the input")


def test_force_out_inside_src(tmp_path, proj, cli):
    (proj / "src" / "sub").mkdir()
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", proj / "src", proj / "src" / "sub", "--force")
    assert_refused(snap, code, err, "is inside the input")


@pytest.mark.parametrize("out", ["", "  "])
def test_empty_out_is_not_the_current_folder(tmp_path, proj, cli, monkeypatch, out):
    monkeypatch.chdir(proj)
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", "src", out, "--force")
    assert_refused(snap, code, err, "empty path")


def test_out_parent_is_a_file(tmp_path, proj, cli):
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", proj / "src", proj / "notes.txt" / "out")
    assert_refused(snap, code, err, "notes.txt is not a folder")


def test_export_into_its_own_run_folder(run, cli):
    snap = Snapshot(run)
    code, err, _ = cli("export", run / "run" / "final", run / "run", "--data", run / "text.txt", "--force")
    assert_refused(snap, code, err, "contains the input")


def test_export_onto_its_model(run, cli):
    snap = Snapshot(run)
    code, err, _ = cli("export", run / "run" / "final", run / "run" / "final", "--data", run / "text.txt", "--force")
    assert_refused(snap, code, err, "is the input")


def test_export_onto_the_folder_of_its_stats(run, tmp_path, cli):
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "s.safetensors").write_bytes(b"not read before the check")
    snap = Snapshot(run, tmp_path)
    code, err, _ = cli(
        "export", run / "run" / "final", tmp_path / "stats", "--stats", tmp_path / "stats" / "s.safetensors", "--force"
    )
    assert_refused(snap, code, err, "contains the input")


def test_export_report_inside_the_model(run, tmp_path, cli):
    snap = Snapshot(run, tmp_path)
    code, err, _ = cli(
        "export",
        run / "run" / "final",
        tmp_path / "out",
        "--data",
        run / "text.txt",
        "--json",
        run / "run" / "final" / "config.json",
    )
    assert_refused(snap, code, err, "--json", "would overwrite the input")


@pytest.mark.parametrize(
    "option,target,needle",
    [
        ("--json", "final/model.safetensors", "would overwrite the input"),
        ("--stats-out", "final/config.json", "would overwrite the input"),
        ("--json", "../text.txt", "would overwrite the input"),
        ("--plot", "final", "would write among the input"),
        ("--json", "checkpoints", "is a folder"),
        ("--stats-out", "checkpoints", "is a folder"),
    ],
)
def test_eval_outputs_checked_before_the_work(run, cli, option, target, needle):
    snap = Snapshot(run)
    code, err, _ = cli("eval", run / "run" / "final", "--data", run / "text.txt", option, run / "run" / target)
    assert_refused(snap, code, err, option, needle)


def test_eval_outputs_beside_the_model_are_fine(run, tmp_path, cli):
    code, err, _ = cli(
        "eval",
        run / "run" / "final",
        "--data",
        run / "text.txt",
        "--seq-len",
        "32",
        "--max-tokens",
        "128",
        "--json",
        tmp_path / "e.json",
        "--stats-out",
        tmp_path / "s.safetensors",
    )
    assert code == 0, err
    assert (tmp_path / "e.json").is_file() and (tmp_path / "s.safetensors").is_file()


@pytest.mark.parametrize("option", ["--json", "--plot"])
def test_bench_output_is_a_folder(tmp_path, cli, option):
    (tmp_path / "d").mkdir()
    snap = Snapshot(tmp_path)
    code, err, _ = cli("bench", "--shapes", "8x16", "--no-generation", option, tmp_path / "d")
    assert_refused(snap, code, err, option, "is a folder")


def test_bench_plot_writes_exactly_the_path_given(tmp_path, cli):
    code, err, _ = cli(
        "bench",
        "--shapes",
        "8x16",
        "--sparsities",
        "0.5",
        "--dtypes",
        "fp32",
        "--threads",
        "1",
        "--repeats",
        "1",
        "--plot",
        tmp_path / "speed",
    )
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["speed"]
    assert (tmp_path / "speed").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_only_parent_is_one_line(tmp_path, proj):
    from safety import run_on_tmpfs

    proc = run_on_tmpfs(tmp_path / "mnt", ["convert", proj / "src", tmp_path / "mnt" / "out"], read_only=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"relufy: error: OUT: cannot write in {tmp_path / 'mnt'} (read-only file system)"
    ], proc.stderr


def test_no_space_left_is_one_line_and_leaves_nothing(tmp_path, proj):
    from safety import run_on_tmpfs

    size = os.path.getsize(proj / "src" / "model.safetensors")
    proc = run_on_tmpfs(
        tmp_path / "mnt", ["convert", proj / "src", tmp_path / "mnt" / "out"], size_kb=size // 2048, after="ls -A {mnt}"
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "no space left on device" in err, err
    assert proc.stdout.strip() == "", proc.stdout  # the mount held nothing afterwards


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(tmp_path, proj):
    """--link skips the up-front space check; across filesystems it copies, and the copy fails."""
    from safety import run_on_tmpfs

    size = os.path.getsize(proj / "src" / "model.safetensors")
    proc = run_on_tmpfs(
        tmp_path / "mnt", ["convert", proj / "src", tmp_path / "mnt" / "out", "--link"], size_kb=size // 2048, after="ls -A {mnt}"
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert f"no space left on device writing {tmp_path / 'mnt' / 'out'}" in err, err
    assert proc.stdout.strip() == "", proc.stdout


def test_disk_full_writing_stats_leaves_nothing(tmp_path, run):
    from safety import run_on_tmpfs

    proc = run_on_tmpfs(
        tmp_path / "mnt",
        [
            "eval",
            run / "run" / "final",
            "--data",
            run / "text.txt",
            "--seq-len",
            "32",
            "--max-tokens",
            "64",
            "--stats-out",
            tmp_path / "mnt" / "s.safetensors",
        ],
        size_kb=64,
        before="dd if=/dev/zero of={mnt}/fill bs=1k 2>/dev/null",
        after="rm {mnt}/fill; ls -A {mnt}",
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "no space left on device writing" in err[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.strip() == "", proc.stdout


@pytest.mark.parametrize("command", ["convert", "export"])
def test_out_is_an_existing_file(tmp_path, proj, run, cli, command):
    (tmp_path / "out").write_text("a file of the user's")
    args = {
        "convert": ("convert", proj / "src", tmp_path / "out", "--force"),
        "export": ("export", run / "run" / "final", tmp_path / "out", "--data", run / "text.txt", "--force"),
    }[command]
    snap = Snapshot(tmp_path, run)
    code, err, _ = cli(*args)
    assert_refused(snap, code, err, "exists and is not a folder")


def test_output_where_even_root_cannot_write(tmp_path, cli):
    """/proc says yes to access(W_OK) for root and no to every file: found before the work."""
    code, err, _ = cli("bench", "--shapes", "8x16", "--no-generation", "--json", "/proc/relufy/b.json")
    assert code == 2 and len(err.splitlines()) == 1 and "--json: cannot write in /proc" in err, err
