"""relufy export: reordering keeps the function, predictors reach a recall, layouts have the
documented names and shapes, bad input fails cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import corpus, save_tiny_with_tokenizer, tiny_model

import relufy
from relufy.conversion import convert
from relufy.export.calibration import Collector, PredictedOnly
from relufy.export.predictors import predictor_metrics, train_predictor
from relufy.export.reorder import hottest_first, reorder_
from relufy.measure.sites import ActivationCounter, ffn_sites, observing, tapped
from relufy.measure.stats import Stats
from relufy.modeling.predictor import Predictor, auto_rank, load_predictors

REORDER_FAMILIES = ["llama", "phi3", "gemma2", "mixtral", "qwen2_moe", "deepseek_v3"]


def _ids(vocab=96, n=2, length=24, seed=1):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _counts(model, ids):
    with observing(model, ActivationCounter) as counter, torch.no_grad():
        model(ids)
    return counter.result()


@pytest.mark.parametrize("family", REORDER_FAMILIES)
def test_reorder_keeps_logits_and_sorts_neurons(family):
    model = relufy.swap_activation(tiny_model(family), "drelu")
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    counts = _counts(model, ids)
    sites = ffn_sites(model)
    perms = reorder_(sites, {s: c for s, (c, _) in counts.items()})
    assert any(not torch.equal(p, torch.arange(p.shape[1]).expand_as(p)) for p in perms.values())  # not vacuous
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # measured again, every site's counts are the old ones permuted, hottest first
    again = _counts(model, ids)
    for site, (c, t) in counts.items():
        new = again[site][0]
        assert torch.equal(new, torch.gather(c, 1, perms[site]))
        assert (new[:, :-1] >= new[:, 1:]).all()
        assert torch.equal(again[site][1], t)


def test_hottest_first_is_stable():
    counts = torch.tensor([[3, 5, 5, 0, 3]])
    assert hottest_first(counts).tolist() == [[1, 2, 0, 4, 3]]


def test_auto_rank_follows_sparsity():
    dense, sparse = auto_rank(4096, 14336, 0.5), auto_rank(4096, 14336, 0.9)
    assert dense > sparse >= 16 and dense % 16 == 0 and sparse % 16 == 0
    assert auto_rank(32, 48, 0.0) == 32  # capped at min(hidden, width)


def test_predictor_recall_on_a_constructed_sparse_model():
    """up = gate makes dReLU's active set a half-space of the FFN input: a rank-2H predictor can
    represent it exactly, so training must reach a high held-out recall and precision."""
    model = relufy.swap_activation(tiny_model("llama"), "drelu")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.copy_(layer.mlp.gate_proj.weight)
    ids = _ids(n=32, length=64, seed=3)
    sites = ffn_sites(model)
    with tapped(model, sites, "ffn") as tap:
        with observing(model, lambda s: Collector(s, tap, 10**6)) as collector, torch.no_grad():
            model(ids)
    for (site, _), (x, y) in collector.data().items():
        assert x.shape == (32 * 64, 32) and y.shape == (32 * 64, site.width)
        n = 1536
        untrained = predictor_metrics(Predictor(32, site.width, 64), x[n:], y[n:], 0.0)
        assert untrained.recall < 0.8 or untrained.precision < 0.8  # the bar below is not free
        predictor = train_predictor(x[:n], y[:n], rank=64, steps=1000, lr=1e-2, seed=0)
        m = predictor_metrics(predictor, x[n:], y[n:], 0.0)
        assert 0.3 < m.sparsity < 0.7
        assert m.recall >= 0.93, m
        assert m.precision >= 0.9, m


def test_predicted_only_with_all_active_predictors_is_dense():
    model = relufy.swap_activation(tiny_model("qwen2_moe"), "drelu")
    ids = _ids()
    with torch.no_grad():
        dense = model(ids).logits
    sites = ffn_sites(model)
    zeros = {}
    for site, _ in sites:
        for e in range(site.experts):
            p = Predictor(32, site.width, 4)
            torch.nn.init.zeros_(p.fc1.weight)
            torch.nn.init.zeros_(p.fc2.weight)
            zeros[(site, e)] = p
    with tapped(model, sites, "residual") as tap:
        with observing(model, lambda s: PredictedOnly(s, tap, zeros, 0.0)) as masked, torch.no_grad():
            out = model(ids).logits
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)
    assert masked.kept == masked.total and masked.missed == 0
    # a threshold above every score keeps nothing: the FFNs contribute nothing
    with tapped(model, sites, "residual") as tap:
        with observing(model, lambda s: PredictedOnly(s, tap, zeros, 1.0)) as masked, torch.no_grad():
            model(ids)
    assert masked.kept == 0 and masked.missed == masked.active > 0


# ---- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    out = {}
    for family, kw in (("llama", {"tie_word_embeddings": True}), ("qwen2_moe", {}), ("qwen2", {})):
        save_tiny_with_tokenizer(family, root / family, **kw)
        convert(root / family, root / f"{family}-drelu")
        out[family] = root / f"{family}-drelu"
    convert(root / "llama", root / "llama-swiglu", activation="swiglu")
    out["swiglu"] = root / "llama-swiglu"
    save_tiny_with_tokenizer("llama", root / "llama-wide", intermediate_size=64)
    convert(root / "llama-wide", root / "llama-wide-drelu")
    out["wide"] = root / "llama-wide-drelu"
    (root / "corpus.txt").write_text(corpus()[:40000])
    out["data"] = root / "corpus.txt"
    return out


FAST = ("--seq-len", "64", "--max-tokens", "2048", "--predictor-steps", "30")


def _remote_results(tmp_path, paths, ids, predictors=False):
    """What a user without relufy gets from each checkpoint (tests/remote_logits.py)."""
    jobs = [
        {"path": str(p), "out": str(tmp_path / f"logits{i}.pt"), "ids": ids.tolist(), "predictors": predictors}
        for i, p in enumerate(paths)
    ]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).parents[1] / "remote_logits.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.json")], check=True)
    results = [torch.load(j["out"], weights_only=True) for j in jobs]
    for r in results:
        assert "error" not in r, r.get("error")
    return results


def _remote_logits(tmp_path, paths, ids):
    return [r["logits"] for r in _remote_results(tmp_path, paths, ids)]


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_hf_export_layout_and_function(cli, tmp_path, converted, family):
    out = tmp_path / "out"
    code, err, stdout = cli(
        "export",
        converted[family],
        out,
        "--data",
        converted["data"],
        "--reorder",
        "--predictors",
        *FAST,
        "--json",
        tmp_path / "report.json",
    )
    assert code == 0, err
    assert "with predicted neurons" in stdout
    # without a terminal: one progress line per layer, with the layer's predictor figures
    lines = [line for line in err.splitlines() if line.startswith("predictors: layer ")]
    assert [line.split()[2] for line in lines] == ["0", "1"], err
    assert all("held-out recall" in line and "computed" in line for line in lines)
    # the exported checkpoint loads without relufy and computes what the source computes
    ids = _ids()
    source, exported = _remote_results(tmp_path, [converted[family], out], ids, predictors=True)
    torch.testing.assert_close(exported["logits"], source["logits"], rtol=1e-4, atol=1e-4)
    # the predictors live outside the weight index: the loader sees exactly the model's weights
    assert exported["unexpected_keys"] == [] and exported["missing_keys"] == []

    config = json.loads((out / "config.json").read_text())
    block = config["relufy"]["export"]
    assert block["layout"] == "hf" and block["reordered"] is True and len(block["sparsity"]["per_layer"]) == 2
    assert block["predictors"]["input"] == "residual"
    # predictors: names, shapes, outside the index, loadable by relufy and by the remote code
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())["weight_map"] if index_path.exists() else {}
    assert "predictors.safetensors" not in set(index.values())
    assert not index_path.exists() or not (out / "model.safetensors").exists()  # no index made for one shard
    with safe_open(out / "predictors.safetensors", "pt") as f:
        names = set(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in names}
    model = relufy.load(out)
    expected = set()
    for site, _ in ffn_sites(model):
        prefixes = [f"{site.name}.{e}" for e in range(site.experts)] if site.kind == "experts" else [site.name]
        for prefix in prefixes:
            fc1, fc2 = f"{prefix}.predictor.fc1.weight", f"{prefix}.predictor.fc2.weight"
            expected |= {fc1, fc2}
            rank = shapes[fc1][0]
            assert shapes[fc1] == (rank, 32) and shapes[fc2] == (site.width, rank)
    assert names == expected
    assert not names & set(index)
    if family == "qwen2_moe":
        assert "model.layers.1.mlp.experts.3.predictor.fc2.weight" in names
        assert "model.layers.0.mlp.shared_expert.predictor.fc1.weight" in names
    else:
        assert "model.layers.1.mlp.predictor.fc1.weight" in names
    loaded = load_predictors(out)
    assert len(loaded) == len(names) // 2
    remote = exported["predictors"]
    assert len(remote) == len(names)
    for (ffn, expert), p in loaded.items():
        prefix = ffn if expert is None else f"{ffn}.{expert}"
        assert torch.equal(remote[f"{prefix}.0"], p.fc1.weight) and torch.equal(remote[f"{prefix}.2"], p.fc2.weight)
    # sparsity file: a stats file plus frequency, permutation and ranks, hottest first
    stats = Stats.load(out / "sparsity.safetensors")
    with safe_open(out / "sparsity.safetensors", "pt") as f:
        for site, (counts, tokens) in stats.sites.items():
            key = f"layers.{site.layer}.{site.kind}"
            perm, freq = f.get_tensor(f"{key}.permutation"), f.get_tensor(f"{key}.frequency")
            assert perm.shape == freq.shape == counts.shape
            assert torch.equal(perm.sort(dim=1).values, torch.arange(site.width).expand_as(perm))
            assert (counts[:, :-1] >= counts[:, 1:]).all()
            torch.testing.assert_close(freq, (counts.double() / tokens.clamp_min(1)[:, None]).float())
            assert f.get_tensor(f"{key}.predictor_rank").shape == (site.experts,)
            thresholds = f.get_tensor(f"{key}.predictor_threshold")
            assert thresholds.shape == (site.experts,) and torch.isfinite(thresholds).all()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["ppl_dense"] > 1 and report["ppl_predicted"] > 1 and 0 < report["top1_agreement"] <= 1
    assert all(0 <= p["recall"] <= 1 for p in report["predictors"] if "recall" in p)
    old = os.umask(0o022)
    os.umask(old)
    if old == 0o022:  # relufy's files get the usual mode, not the writers' owner-only one; weights and
        # statistics at most the input weights' (save_pretrained writes 0600 shards)
        cap = 0o644
        for shard in Path(converted[family]).glob("*.safetensors"):
            cap &= shard.stat().st_mode
        want = {p.name: oct(cap if p.suffix == ".safetensors" else 0o644) for p in out.iterdir()}
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == want
    card = (out / "README.md").read_text()
    assert "| layer | zeros |" in card and "sparsity.png" in card and (out / "sparsity.png").stat().st_size > 1000


def test_powerinfer_dense_layout(cli, tmp_path, converted):
    out = tmp_path / "new" / "pi"  # a parent that does not exist yet is made
    code, err, _ = cli(
        "export", converted["llama"], out, "--data", converted["data"], "--predictors", "--layout", "powerinfer", *FAST
    )
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bamboo" and config["architectures"] == ["BambooForCausalLM"]
    assert config["hidden_act"] == "relu" and config["tie_word_embeddings"] is False
    assert isinstance(config["rope_theta"], float) and "auto_map" not in config
    assert not (out / "modeling_relufy.py").exists()
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))  # untied copy
    assert "model.layers.1.mlp.down_proj.weight" in names
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["<s>"] == 1 and (out / "merges.txt").read_text().startswith("#version")
    # per-predictor recall thresholds folded into the weights under PowerInfer's one threshold
    # (fold_thresholds: exactness in test_predictor_calibration), which the export block records
    threshold = json.loads((out / "predictor" / "config.json").read_text())["sparse_threshold"]
    with safe_open(out / "sparsity.safetensors", "pt") as f:
        kept = {float(f.get_tensor(f"layers.{i}.dense.predictor_threshold")[0]) for i in range(2)}
    assert kept == {threshold} and threshold in (-1.0, 1.0) + tuple(kept)
    for i in range(2):
        state = torch.load(out / "predictor" / f"model_{i}.pt", weights_only=True)
        assert set(state) == {"fc1.weight", "fc2.weight"}
        rank = state["fc1.weight"].shape[0]
        assert state["fc1.weight"].shape == (rank, 32) and state["fc2.weight"].shape == (48, rank)
        assert state["fc1.weight"].dtype == state["fc2.weight"].dtype == torch.float16
        act = torch.load(out / "activation" / f"activation_{i}.pt", weights_only=True)
        assert act.shape == (48,) and act.sum() > 0
    assert sorted(p.name for p in (out / "predictor").iterdir()) == ["config.json", "model_0.pt", "model_1.pt"]
    # still a dReLU llama for relufy, with the same function as the source
    ids = _ids()
    with torch.no_grad():
        expected = relufy.load(converted["llama"])(ids).logits
        got = relufy.load(out)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # relufy's own predictor decoding reads the hf layout, and says so instead of "make them"
    code, err, _ = cli("generate", out, "--sparse", "predictor", "--max-new-tokens", "2")
    assert code == 2 and len(err.splitlines()) == 1 and "powerinfer-layout export" in err and "--layout hf" in err, err


@pytest.mark.parametrize("layout", ["hf", "powerinfer"])
def test_export_keeps_the_cutoffs(cli, tmp_path, converted, layout):
    """A model with magnitude cutoffs (relufy train's final_cutoff) exports with them: the same
    function, the statistics counted with them, the card saying where they act."""
    import shutil

    source = tmp_path / "cut"
    shutil.copytree(converted["llama"], source)
    config = json.loads((source / "config.json").read_text())
    cutoffs = {"model.layers.0.mlp": 0.1, "model.layers.1.mlp": 0.15}
    config["relufy"]["cutoffs"] = cutoffs
    (source / "config.json").write_text(json.dumps(config))
    outs = {}
    for name, model in (("cut", source), ("uncut", converted["llama"])):
        outs[name] = tmp_path / f"out-{name}"
        predictors = ("--predictors",) if layout == "powerinfer" else ()
        code, err, _ = cli("export", model, outs[name], "--data", converted["data"], "--layout", layout, *predictors, *FAST)
        assert code == 0, err
    exported = json.loads((outs["cut"] / "config.json").read_text())["relufy"]
    assert exported["cutoffs"] == cutoffs
    zeros = {k: json.loads((o / "config.json").read_text())["relufy"]["export"]["sparsity"]["overall"] for k, o in outs.items()}
    assert zeros["cut"] > zeros["uncut"] + 0.05, zeros
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(relufy.load(outs["cut"])(ids).logits, relufy.load(source)(ids).logits, rtol=1e-5, atol=1e-5)
    card = (outs["cut"] / "README.md").read_text()
    assert "Magnitude cutoffs on 2 FFN(s)" in card
    assert ("PowerInfer has no such cutoff" in card) == (layout == "powerinfer")
    assert "Magnitude cutoffs" not in (outs["uncut"] / "README.md").read_text()


def test_powerinfer_moe_layout_per_expert(cli, tmp_path, converted):
    out = tmp_path / "pi-moe"
    code, err, _ = cli(
        "export", converted["qwen2_moe"], out, "--data", converted["data"], "--predictors", "--layout", "powerinfer", *FAST
    )
    assert code == 0, err
    files = sorted(p.name for p in (out / "predictor").iterdir())
    expected = sorted(
        ["config.json"]
        + [f"model_{i}.expert_{e}.pt" for i in range(2) for e in range(4)]
        + [f"model_{i}.shared.pt" for i in range(2)]
    )
    assert files == expected
    state = torch.load(out / "predictor" / "model_1.shared.pt", weights_only=True)
    assert state["fc2.weight"].shape[0] == 40  # shared expert width
    act = torch.load(out / "activation" / "activation_0.expert_2.pt", weights_only=True)
    assert act.shape == (24,)
    assert (out / "modeling_relufy.py").exists()  # the model folder stays the hf layout


def test_export_from_stats_file(cli, tmp_path, converted):
    stats = tmp_path / "stats.safetensors"
    code, err, _ = cli(
        "eval", converted["llama"], "--data", "builtin:pydoc", "--seq-len", "64", "--max-tokens", "1024", "--stats-out", stats
    )
    assert code == 0, err
    code, err, _ = cli("export", converted["llama"], tmp_path / "out", "--stats", stats, "--reorder", "--dtype", "fp16")
    assert code == 0, err
    exported = Stats.load(tmp_path / "out" / "sparsity.safetensors")
    source = Stats.load(stats)
    assert exported.overall_sparsity() == pytest.approx(source.overall_sparsity())
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == torch.float16
    assert not (tmp_path / "out" / "predictors.safetensors").exists()


@pytest.mark.parametrize(
    "case, needle",
    [
        ("swiglu", "gives no exact zeros"),
        ("stats-mismatch", "neurons in the stats"),
        ("powerinfer-family", "ReGLU or FATReLU models (its llama architecture) of llama/mistral; this is a drelu qwen2"),
        ("powerinfer-no-predictors", "needs predictors"),
        ("powerinfer-ffn-input", "PowerInfer feeds its predictors the residual stream"),
        ("no-stats", "give --stats FILE or --data SPEC"),
        ("predictors-no-data", "--predictors needs calibration text"),
        ("not-relufy", "a llama model with activation silu, which gives no exact zeros: convert it first"),
        ("bad-stats", "not a readable stats file"),
    ],
)
def test_export_bad_input(cli, tmp_path, converted, case, needle):
    data = ("--data", converted["data"])
    if case == "stats-mismatch":
        stats = tmp_path / "wide.safetensors"
        assert cli("eval", converted["wide"], *data, "--seq-len", "32", "--max-tokens", "256", "--stats-out", stats)[0] == 0
    args = {
        "swiglu": (converted["swiglu"], *data),
        "stats-mismatch": (converted["llama"], "--stats", tmp_path / "wide.safetensors"),
        "powerinfer-family": (converted["qwen2"], *data, "--predictors", "--layout", "powerinfer"),
        "powerinfer-no-predictors": (converted["llama"], *data, "--layout", "powerinfer"),
        "powerinfer-ffn-input": (converted["llama"], *data, "--predictors", "--layout", "powerinfer", "--predictor-input", "ffn"),
        "no-stats": (converted["llama"],),
        "predictors-no-data": (converted["llama"], "--stats", tmp_path / "x", "--predictors"),
        "not-relufy": (converted["llama"].parent / "llama", *data),
        "bad-stats": (converted["llama"], "--stats", converted["data"]),
    }[case]
    out = tmp_path / "out"
    code, err, _ = cli("export", args[0], out, *args[1:])
    assert code == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_powerinfer_config_yarn_has_what_its_converter_reads(converted):
    from relufy.export.layouts import _powerinfer_config
    from relufy.families import FAMILIES

    written = json.loads((Path(converted["llama"]) / "config.json").read_text())
    written["rope_parameters"] = {
        "rope_type": "yarn",
        "rope_theta": 500000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = _powerinfer_config(written, FAMILIES["llama"])
    # PowerInfer's convert.py reads type, factor, original_max_position_embeddings and finetuned, no defaults
    assert config["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192, "finetuned": False}
    assert config["rope_theta"] == 500000.0 and config["model_type"] == "bamboo"
