"""What relufy lets out: no token in any output (``-v`` included), no local path in the statistics
it writes (they are shared and pushed), and no output wider in permissions than the weights it
was made from."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import drelu_with_text

SECRET = "secret-xyz-0123456789"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return drelu_with_text(tmp_path_factory.mktemp("privacy"))


def _all_files_text(*folders: Path) -> str:
    return "".join(p.read_bytes().decode("latin-1") for f in folders for p in Path(f).rglob("*") if p.is_file())


@pytest.mark.parametrize("spelling", [["--token", SECRET], [f"--token={SECRET}"]])
def test_verbose_never_prints_the_token(model, spelling):
    """``-v`` logs the command line; the token is shown as ``***`` however it was spelled."""
    proc = subprocess.run(
        [sys.executable, "-m", "relufy", "-v", "info", str(model), *spelling],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "command:" in proc.stderr and "***" in proc.stderr  # the debug line is there, redacted
    assert SECRET not in proc.stderr + proc.stdout


def test_a_token_in_hf_token_and_hf_prefixed_strings_are_redacted():
    from relufy.cli import _redact, _redacted

    assert _redacted(["info", "m", "--token", SECRET]) == "info m --token ***"
    assert _redacted(["x", "--token=" + SECRET]) == "x --token=***"
    assert _redact("auth hf_abcdefghijKLMNOP done", []) == "auth hf_*** done"


def test_verbose_convert_with_a_token_keeps_it_out_of_output_and_files(model, tmp_path):
    src = model.parent / "llama"
    proc = subprocess.run(
        [sys.executable, "-m", "relufy", "-v", "convert", str(src), str(tmp_path / "out"), "--token", SECRET],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stderr + proc.stdout
    assert SECRET not in _all_files_text(tmp_path)


def test_statistics_name_local_inputs_by_their_last_name(model, tmp_path, cli):
    """``sparsity.safetensors`` and ``--stats-out`` travel (``--push-to-hub``): no absolute path in them."""
    from safetensors import safe_open

    text = model.parent / "text.txt"
    code, err, _ = cli("eval", model, "--data", text, "--seq-len", "16", "--max-tokens", "64", "--stats-out", tmp_path / "s.st")
    assert code == 0, err
    code, err, _ = cli("export", model, tmp_path / "exp", "--data", text, "--max-tokens", "64", "--seq-len", "16")
    assert code == 0, err
    for path in (tmp_path / "s.st", tmp_path / "exp" / "sparsity.safetensors"):
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["model"] == "drelu" and meta["data"] == "text.txt", meta
        assert not any(str(tmp_path) in v or str(model.parent) in v for v in meta.values()), meta


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_owner_only_weights_give_owner_only_outputs(model, tmp_path, cli, umask_022):
    """A 0600 model exported: its weights and statistics 0600, not the umask's 0644; eval's
    --stats-out likewise. Files relufy writes itself (config, card) keep the umask's mode."""
    import shutil

    private = tmp_path / "private"
    shutil.copytree(model, private)
    (private / "model.safetensors").chmod(0o600)
    text = model.parent / "text.txt"
    code, err, _ = cli("export", private, tmp_path / "exp", "--data", text, "--max-tokens", "64", "--seq-len", "16")
    assert code == 0, err
    weights = [p for p in (tmp_path / "exp").iterdir() if p.suffix == ".safetensors"]
    assert {p.name for p in weights} >= {"model.safetensors", "sparsity.safetensors"}
    assert {p.name: _mode(p) for p in weights} == {p.name: 0o600 for p in weights}
    assert _mode(tmp_path / "exp" / "config.json") == 0o644
    code, err, _ = cli("eval", private, "--data", text, "--seq-len", "16", "--max-tokens", "64", "--stats-out", tmp_path / "s.st")
    assert code == 0, err
    assert _mode(tmp_path / "s.st") == 0o600
    # the same model readable by all: the umask's mode, as before
    code, err, _ = cli("eval", model, "--data", text, "--seq-len", "16", "--max-tokens", "64", "--stats-out", tmp_path / "t.st")
    assert code == 0, err
    assert _mode(tmp_path / "t.st") == 0o644 & _mode(model / "model.safetensors")
