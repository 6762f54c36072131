"""Atomic outputs: one writer at a time, nothing replaced that appeared meanwhile, leftovers of
killed runs cleaned, copies never more readable than their source."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny, tiny_tokenizer

import relufy
from relufy.errors import RelufyError
from relufy.io.atomic import atomic_dir, target_lock


@pytest.fixture
def src(tmp_path):
    save_tiny("llama", tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    return tmp_path / "src"


def test_second_writer_of_the_same_out_is_refused(tmp_path, src, cli):
    with target_lock((tmp_path / "out").resolve()):
        snap = Snapshot(tmp_path)
        code, err, _ = cli("convert", src, tmp_path / "out")
        assert_refused(snap, code, err, "being written by another relufy process")


def test_out_that_appears_meanwhile_is_never_replaced(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RelufyError, match="appeared while relufy was writing it"):
        with atomic_dir(out) as tmp:
            (tmp / "mine").write_text("relufy's")
            out.mkdir()  # another program, which does not take relufy's lock, creates OUT (empty)
    assert list(out.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_keeps_the_old_out_when_the_new_one_cannot_be_published(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("x")
    with pytest.raises(ValueError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new").write_text("y")
            raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_two_converts_at_once_one_wins(tmp_path, src):
    """Real processes racing for one OUT without --force: exactly one writes it, the other says so."""
    cmd = [sys.executable, "-m", "relufy", "convert", str(src), str(tmp_path / "out")]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert len(loser.strip().splitlines()) == 1 and "Traceback" not in loser, loser
    assert any(s in loser for s in ("exists", "being written by another", "appeared while")), loser
    assert (tmp_path / "out" / "config.json").is_file() and (tmp_path / "out" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_leftovers_of_a_killed_conversion_are_cleaned_by_the_next(tmp_path):
    """SIGKILL a real conversion mid-write; the rerun publishes OUT and leaves no hidden folder."""
    import torch
    from safetensors.torch import save_file
    from tiny import tiny_config

    src = tmp_path / "src"
    torch.manual_seed(0)
    big = {
        f"model.layers.{i}.mlp.{p}.weight": torch.randn(1024, 1024)
        for i in range(4)
        for p in ("gate_proj", "up_proj", "down_proj")
    }
    big["model.embed_tokens.weight"] = torch.randn(96, 1024)
    tiny_config("llama", hidden_size=1024, intermediate_size=1024, num_hidden_layers=4, head_dim=256).save_pretrained(src)
    save_file(big, src / "model.safetensors", metadata={"format": "pt"})
    cmd = [sys.executable, "-m", "relufy", "convert", str(src), str(tmp_path / "out"), "--dtype", "bf16"]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".out.relufy-tmp-*/model.safetensors")):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "out").exists()
    assert any(p.name.startswith(".out.relufy-tmp-") for p in tmp_path.iterdir())  # the kill left one
    subprocess.run(cmd, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_a_private_side_file_stays_private(tmp_path, src):
    old = os.umask(0o022)
    try:
        (src / "tokenizer.json").chmod(0o600)
        (src / "tokenizer_config.json").chmod(0o640)
        out = relufy.convert(src, tmp_path / "out")
    finally:
        os.umask(old)
    assert (out / "tokenizer.json").stat().st_mode & 0o777 == 0o600
    assert (out / "tokenizer_config.json").stat().st_mode & 0o777 == 0o640
    assert (out / "config.json").stat().st_mode & 0o777 == 0o644  # relufy's own files: the umask's mode
    shard_mode = (src / "model.safetensors").stat().st_mode & 0o777  # save_pretrained's shards are 0600
    assert (out / "model.safetensors").stat().st_mode & 0o777 == shard_mode & 0o644
