"""Hub round trip against a local stand-in of the Hugging Face Hub API (tests/io/hub_server.py):
the real huggingface_hub client talks HTTP to it; nothing here reaches the network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer  # noqa: E402
from safety import Snapshot, assert_one_line, assert_refused  # noqa: E402
from tiny import corpus, save_tiny, save_tiny_with_tokenizer, tiny_model, tiny_tokenizer  # noqa: E402

import relufy  # noqa: E402
from relufy.errors import RelufyError  # noqa: E402

TOKEN = "hf_relufyTestToken0123456789abcdef"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """The stand-in Hub, with huggingface_hub pointed at it (endpoint, online, a fresh cache, the
    token in HF_TOKEN and no stored login), progress bars off so stderr holds only relufy's lines."""
    from huggingface_hub import constants
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    server = HubServer(token=TOKEN).start()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    bars_were_off = are_progress_bars_disabled()
    disable_progress_bars()
    yield server
    if not bars_were_off:
        enable_progress_bars()
    server.stop()


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def model_files(family="llama", max_shard_size="5GB", **overrides) -> dict[str, bytes]:
    """The files of a tiny model (with its tokenizer), as a hub repository would hold them."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        tiny_model(family, **overrides).save_pretrained(d, max_shard_size=max_shard_size)
        tiny_tokenizer().save_pretrained(d)
        return folder_files(Path(d))


@pytest.fixture
def src(tmp_path):
    """A local tiny llama whose card names its hub id and license."""
    save_tiny_with_tokenizer("llama", tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny-llama\n---\n# Tiny\n")
    return tmp_path / "src"


def assert_pushed(server: HubServer, repo: str, folder: Path, private: bool = True, ref: str = "main"):
    """Every file of ``folder`` on the stand-in, byte for byte, and the repository's visibility."""
    local = folder_files(folder)
    remote = server.files(repo, ref)
    assert set(local) <= set(remote), sorted(set(local) - set(remote))
    for name, data in local.items():
        assert remote[name] == data, name
    assert server.repos[repo].private is private
    writes = [s for s in server.log if s.method == "POST" and "/commit/" in s.path]
    assert writes and all(s.authorization == f"Bearer {TOKEN}" for s in writes)


def assert_failed_after_work(code, err, *needles):
    """A failure after the work was done: progress lines may precede it, then one error line, last."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("relufy: error:")] == lines[-1:], err
    for needle in needles:
        assert needle in lines[-1], (needle, err)


# ---- push -----------------------------------------------------------------------------------------


def test_convert_push_uploads_every_file_to_a_private_repo(hub, src, tmp_path, cli):
    out = tmp_path / "drelu"
    code, err, stdout = cli("convert", src, out, "--push-to-hub", "org/tiny-drelu")
    assert code == 0, err
    assert_pushed(hub, "org/tiny-drelu", out, private=True)
    assert {"model.safetensors", "config.json", "README.md", "modeling_relufy.py", "tokenizer.json"} <= set(
        hub.files("org/tiny-drelu")
    )
    assert "org/tiny-drelu (private)" in err
    assert TOKEN not in err + stdout
    # the card went through the Hub's YAML check and names its base model
    assert any("base_model: org/tiny-llama" in card for card in hub.validated_cards)


def test_push_public_and_to_a_branch(hub, src, tmp_path, cli):
    out = tmp_path / "drelu"
    code, err, _ = cli("convert", src, out, "--push-to-hub", "org/open", "--public", "--hub-revision", "drelu-v1")
    assert code == 0, err
    assert_pushed(hub, "org/open", out, private=False, ref="drelu-v1")
    assert "config.json" not in hub.files("org/open", "main")  # main untouched: the branch holds the model


def test_push_into_an_existing_public_repo_needs_public(hub, src, tmp_path, cli):
    hub.add_repo("org/public", {"README.md": b"hello\n"}, private=False)
    out = tmp_path / "drelu"
    code, err, _ = cli("convert", src, out, "--push-to-hub", "org/public")
    assert_failed_after_work(code, err, "org/public exists and is public", "--public", f"wrote {out}")
    assert (out / "config.json").is_file()  # the local folder stays as written
    assert hub.files("org/public") == {"README.md": b"hello\n"}


def test_push_refused_by_the_hub_is_one_line_and_keeps_the_folder(hub, src, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrongTokenAbcdefghijklmnop")
    out = tmp_path / "drelu"
    code, err, stdout = cli("convert", src, out, "--push-to-hub", "org/denied")
    assert_failed_after_work(code, err, f"wrote {out}", "org/denied", "hf auth login")
    assert "hf_wrongTokenAbcdefghijklmnop" not in err + stdout
    assert relufy.info(out).activation == "drelu"  # complete and intact
    assert "org/denied" not in hub.repos


def test_explicit_token_and_no_token(hub, src, tmp_path, cli, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", src, tmp_path / "a", "--push-to-hub", "org/a")
    assert_refused(snap, code, err, "--push-to-hub org/a: no Hugging Face token")  # before any work
    code, err, stdout = cli("convert", src, tmp_path / "b", "--push-to-hub", "org/b", "--token", TOKEN)
    assert code == 0, err
    assert_pushed(hub, "org/b", tmp_path / "b")
    assert TOKEN not in err + stdout


@pytest.mark.parametrize("repo", ["not a repo", "org/name/extra", "../x"])
def test_bad_push_repo_is_refused_before_work(hub, src, tmp_path, cli, repo):
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", src, tmp_path / "out", "--push-to-hub", repo)
    assert_refused(snap, code, err, "--push-to-hub", "not a Hub repository id")
    assert not hub.log


def test_export_push(hub, src, tmp_path, cli):
    drelu = relufy.convert(src, tmp_path / "drelu")
    (tmp_path / "text.txt").write_text(corpus()[:20_000])
    out = tmp_path / "export"
    code, err, _ = cli(
        "export",
        drelu,
        out,
        "--data",
        tmp_path / "text.txt",
        "--seq-len",
        "32",
        "--max-tokens",
        "512",
        "--push-to-hub",
        "org/exp",
    )
    assert code == 0, err
    assert_pushed(hub, "org/exp", out)
    from huggingface_hub import ModelCard

    card = ModelCard(hub.files("org/exp")["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama" and card.data.license == "apache-2.0"
    assert str(tmp_path) not in card.content
    assert str(tmp_path) not in hub.files("org/exp")["config.json"].decode()


def test_train_pushes_the_final_model(hub, src, tmp_path, cli):
    sys.path.insert(0, str(Path(__file__).parents[1] / "train"))
    import yaml
    from huggingface_hub import ModelCard
    from trainkit import recipe_dict

    relufy.convert(src, tmp_path / "llama-drelu")
    (tmp_path / "text.txt").write_text(corpus()[:30_000])
    raw = recipe_dict(tmp_path, tmp_path / "run", budget__max_steps=2, checkpoint__every=0)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    code, err, _ = cli("-q", "train", tmp_path / "recipe.yaml", "--push-to-hub", "org/trained")
    assert code == 0, err
    final = tmp_path / "run" / "final"
    assert_pushed(hub, "org/trained", final)
    card = ModelCard(hub.files("org/trained")["README.md"].decode())
    assert card.data.base_model == "org/tiny-llama" and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and "text-generation" == card.data.pipeline_tag
    assert json.loads(hub.files("org/trained")["config.json"])["relufy"]["trained"]["steps"] == 2


# ---- read ---------------------------------------------------------------------------------------


@pytest.fixture
def sharded_repo(hub):
    """org/sharded: a tiny llama in 3 safetensors shards, each larger than the 100 kB huggingface_hub
    asks for first, so a header read is visibly not a shard download."""
    sizes = dict(vocab_size=1024, hidden_size=64, intermediate_size=192, num_attention_heads=4, head_dim=16)
    files = model_files(max_shard_size="400KB", **sizes)
    params = sum(p.numel() for p in tiny_model("llama", **sizes).parameters())
    shards = {k: len(v) for k, v in files.items() if k.endswith(".safetensors")}
    assert len(shards) == 3 and min(shards.values()) > 100_001, shards
    hub.add_repo("org/sharded", files)
    return shards, params


def test_info_on_a_hub_id_reads_config_and_headers_only(hub, sharded_repo, cli):
    shards, params = sharded_repo
    code, err, out = cli("info", "org/sharded", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["family"] == "llama" and data["hidden_size"] == 64 and data["params_total"] == params
    assert data["weights"]["files"] == 3 and data["weights"]["params"] == params
    assert data["weights"]["dtypes"] == {"F32": params}
    assert data["revision"] == hub.repos["org/sharded"].refs["main"]
    for name, size in shards.items():
        gets = hub.downloads(name)
        assert gets, name  # its header was read ...
        assert all(g.range and g.status == 206 for g in gets), gets
        assert sum(g.body_bytes for g in gets) < size, (name, gets)  # ... never its body
    assert not [s for s in hub.log if "/tree/" in s.path]  # no snapshot listing either
    served = sum(s.body_bytes for s in hub.downloads())
    assert served < sum(shards.values()) / 2


def test_revision_resolves_that_revision(hub, tmp_path, cli):
    repo = hub.add_repo("org/m", model_files(num_hidden_layers=2))
    v1 = repo.refs["main"]
    repo.refs["v1"] = v1
    repo.commit(model_files(num_hidden_layers=3), "main", "three layers")
    for args in (["org/m@v1"], ["org/m", "--revision", "v1"], [f"org/m@{v1}"]):
        code, err, out = cli("info", *args, "--json")
        assert code == 0, err
        assert json.loads(out)["layers"] == 2 and json.loads(out)["revision"] == v1, args
    code, err, out = cli("info", "org/m", "--json")
    assert json.loads(out)["layers"] == 3
    # convert reads the same revision, and records the commit (no path) in config.json
    out_dir = relufy.convert("org/m@v1", tmp_path / "drelu")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert config["relufy"]["source"] == "org/m" and config["relufy"]["source_revision"] == v1
    assert config["relufy"]["base_model"] == "org/m"
    code, err, _ = cli("info", "org/m@v1", "--revision", "main")
    assert_one_line(code, err, "the revision is given twice")


def test_missing_repo_missing_revision_gated_and_offline(hub, tmp_path, cli, monkeypatch):
    hub.add_repo("org/m", model_files())
    hub.add_repo("org/gated", model_files(), gated=True)
    code, err, _ = cli("info", "org/nothing")
    assert_one_line(code, err, "org/nothing", "no such model on the Hugging Face Hub")
    code, err, _ = cli("info", "org/m@nope")
    assert_one_line(code, err, "org/m", "no revision 'nope'")
    code, err, _ = cli("convert", "org/m", tmp_path / "out", "--revision", "nope")
    assert_one_line(code, err, "no revision 'nope'")
    for command in (["info", "org/gated"], ["convert", "org/gated", tmp_path / "out"]):
        code, err, _ = cli(*command)
        assert_one_line(code, err, "org/gated", "gated", "request access", f"{hub.url}/org/gated")
        assert TOKEN not in err
    assert not (tmp_path / "out").exists()
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err, _ = cli("info", "org/never-fetched")
    assert_one_line(code, err, "org/never-fetched", "offline", "HF_HUB_OFFLINE")


def test_a_local_path_with_at_wins_over_a_hub_id(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_tiny("llama", Path("org") / "model@v1")
    assert relufy.info("org/model@v1").family == "llama"
    assert not hub.log  # the Hub was never asked
    with pytest.raises(RelufyError, match="--revision is for models on the Hugging Face Hub"):
        relufy.info("org/model@v1", revision="main")


def test_convert_from_the_hub_with_revision_and_push_round_trip(hub, tmp_path, cli):
    """Pull a model from the stand-in, convert it, push it back, read the pushed model by its id."""
    files = model_files()
    files["README.md"] = b"---\nlicense: mit\n---\n# a model\n"
    hub.add_repo("org/base", files)
    out = tmp_path / "drelu"
    code, err, _ = cli("convert", "org/base@main", out, "--push-to-hub", "org/base-drelu")
    assert code == 0, err
    assert_pushed(hub, "org/base-drelu", out)
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base" and card.data.license == "mit"
    assert getattr(card.data, "base_model_relation", None) is None  # a conversion is none of the Hub's four
    written = (out / "README.md").read_text() + (out / "config.json").read_text()
    assert str(tmp_path) not in written  # no cache or output path, only the hub id and its commit
    code, err, stdout = cli("info", "org/base-drelu", "--json")
    assert code == 0, err
    assert json.loads(stdout)["activation"] == "drelu"
    assert os.environ.get("HF_TOKEN") == TOKEN
