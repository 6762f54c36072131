"""Outputs are regular files (or folders) or absent: a device node, a pipe, a planted link or one
path named for two outputs is refused in one line, and nothing that existed is touched."""

from __future__ import annotations

import os
import stat

import pytest
from safety import Snapshot, assert_refused
from tiny import drelu_with_text


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("outputs"))


def _device(path):
    """A character device like /dev/null (root only), else skip."""
    try:
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return path


def _eval(cli, model, *args):
    return cli("eval", model, "--data", model.parent / "text.txt", "--seq-len", "16", "--max-tokens", "64", *args)


@pytest.mark.parametrize("kind", ["device", "fifo"])
@pytest.mark.parametrize("flag", ["--json", "--stats-out"])
def test_eval_refuses_a_special_file_as_output(model, tmp_path, cli, kind, flag):
    target = tmp_path / "nul"
    _device(target) if kind == "device" else os.mkfifo(target)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, flag, target)
    assert_refused(snap, code, err, f"{flag} {target} is a {'character device' if kind == 'device' else 'named pipe'}")
    assert (stat.S_ISCHR if kind == "device" else stat.S_ISFIFO)(os.lstat(target).st_mode)


def test_a_link_to_a_device_is_refused_too(model, tmp_path, cli):
    """``--json out.json`` where out.json links to /dev/null: the link's target is what would be replaced."""
    device = _device(tmp_path / "nul")
    (tmp_path / "out.json").symlink_to(device)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, "--json", tmp_path / "out.json")
    assert_refused(snap, code, err, "is a character device")


def test_export_json_and_recipe_copy_refuse_a_device(model, tmp_path, cli):
    device = _device(tmp_path / "nul")
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = cli("export", model, tmp_path / "out", "--data", model.parent / "text.txt", "--json", device)
    assert_refused(snap, code, err, "--json")
    pytest.importorskip("yaml")
    code, err, _ = cli("recipes", "copy", "demo-smollm2-cpu", device, "--force")
    assert_refused(snap, code, err, "is a character device")


def test_one_path_for_two_outputs_is_refused(model, tmp_path, cli):
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, "--json", tmp_path / "same", "--stats-out", tmp_path / "same")
    assert_refused(snap, code, err, "--json and --stats-out are the same file")
    # spelled differently, the same place
    (tmp_path / "sub").mkdir()
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, "--json", tmp_path / "same", "--stats-out", tmp_path / "sub" / ".." / "same")
    assert_refused(snap, code, err, "are the same file")


def test_bench_json_and_plot_at_one_path_are_refused(tmp_path, cli):
    snap = Snapshot(tmp_path)
    code, err, _ = cli("bench", "--shapes", "8x16", "--no-generation", "--json", tmp_path / "b", "--plot", tmp_path / "b")
    assert_refused(snap, code, err, "--json and --plot are the same file")


def test_a_planted_lock_link_is_not_followed(model, tmp_path, cli):
    """A link named like relufy's lock, pointing outside: refused; the file it points to is untouched."""
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".out.json.relufy-lock").symlink_to(victim)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, "--json", run / "out.json")
    assert_refused(snap, code, err, "is a link; relufy does not follow it")
    assert victim.read_text() == "keep me"


def test_a_link_in_a_plot_folder_is_not_replaced(model, tmp_path, cli):
    """Files relufy names itself inside a folder it was given: a link there is refused, not replaced."""
    plots = tmp_path / "plots"
    plots.mkdir()
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(b"not a plot")
    pytest.importorskip("matplotlib")
    (plots / "sparsity_0.png").symlink_to(elsewhere)
    snap = Snapshot(tmp_path, model.parent)
    code, err, _ = _eval(cli, model, "--plot", plots)
    assert_refused(snap, code, err, "is a link; relufy does not replace links")  # before the model runs
    assert elsewhere.read_bytes() == b"not a plot" and (plots / "sparsity_0.png").is_symlink()


def test_writing_a_regular_file_still_works(model, tmp_path, cli):
    """The rules above refuse only what they name: an existing regular --json is replaced as asked."""
    out = tmp_path / "out.json"
    out.write_text("old")
    code, err, _ = _eval(cli, model, "--json", out)
    assert code == 0, err
    assert out.read_text().startswith("{") and not out.is_symlink()
