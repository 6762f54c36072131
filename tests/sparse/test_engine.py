"""Sparse CPU decoding: the exact sparse FFN equals the dense one, dense and MoE, both backends."""

from __future__ import annotations

import pytest
import torch
from reference import midpoint_cutoff
from tiny import tiny_model

import relufy
from relufy.measure.sites import ffn_sites
from relufy.modeling.predictor import Predictor
from relufy.sparse import kernels
from relufy.sparse.engine import sparse_decoding
from relufy.sparse.ffn import SparseFFN

FAMILIES = ["llama", "phi3", "gemma2", "qwen2_moe", "deepseek_v3", "mixtral"]


@pytest.fixture(params=["cpp", "torch"])
def backend(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setenv("RELUFY_KERNELS", "torch")
    elif kernels.extension() is None:
        pytest.skip("no C++ compiler here: the extension could not be built")
    assert kernels.backend() == request.param
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["drelu", "reglu", "relu2", "fatrelu"])
def test_kernels_match_torch(backend, dtype, activation):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 130, generator=g).to(dtype)
    x = torch.randn(3, 130, generator=g)
    idx = torch.tensor([5, 0, 299, 17, 100])
    torch.testing.assert_close(kernels.rows_dot(w, x, idx), x @ w.float()[idx].T, rtol=1e-5, atol=1e-5)
    v = torch.randn(3, 5, generator=g)
    torch.testing.assert_close(kernels.rows_axpy(w, v, idx), v @ w.float()[idx], rtol=1e-5, atol=1e-5)
    wu = torch.randn(300, 130, generator=g).to(dtype)
    gate, up = kernels.gate_up(w, wu, x, 0.1)
    torch.testing.assert_close(gate, x @ w.float().T, rtol=1e-5, atol=1e-5)
    computed = (gate > 0.1).any(0)
    assert 0 < computed.sum() < 300
    torch.testing.assert_close(up[:, computed], (x @ wu.float().T)[:, computed], rtol=1e-5, atol=1e-5)
    assert (up[:, ~computed] == 0).all()
    empty = torch.zeros(0, dtype=torch.long)
    assert kernels.rows_axpy(w, torch.zeros(3, 0), empty).abs().sum() == 0
    # one FFN, exact path against the dense one (fp32 weights: fp32 tolerance)
    if dtype == torch.float32:
        gate, up, down = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g), torch.randn(16, 64, generator=g)
        ffn = SparseFFN(gate, up, down, activation, threshold=0.3 if activation == "fatrelu" else None)
        for batch in (1, 4):
            xb = torch.randn(batch, 16, generator=g)
            torch.testing.assert_close(ffn.exact(xb), ffn.dense(xb), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_sparse_model_equals_dense(backend, family):
    model = relufy.swap_activation(tiny_model(family), "drelu")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_decoding(model, "exact", max_tokens=8) as ffns:
            sparse = model(ids).logits
        assert ffns and all(isinstance(f, SparseFFN) for f in ffns.values())
        after = model(ids).logits  # patch removed
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(after, dense, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_exact_sparse_model_with_cutoffs_equals_dense(backend, family):
    """A model's magnitude cutoffs (relufy.cutoffs) hold in the sparse engine too."""
    from relufy.measure.sites import observing
    from relufy.modeling.ffn import set_cutoffs

    model = relufy.swap_activation(tiny_model(family), "drelu")
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(2))
    seen = {}

    class Record:
        def __init__(self, sites):
            self.names = {id(m): s.name for s, m in sites}

        def __call__(self, module, h, expert):
            seen.setdefault(self.names[id(module)], []).append(h.abs().flatten())
            return h

    with torch.no_grad():
        with observing(model, Record):
            uncut = model(ids).logits
        cutoffs = {name: midpoint_cutoff(found) for name, found in seen.items()}
        set_cutoffs(model, cutoffs)
        dense = model(ids).logits
        with sparse_decoding(model, "exact", max_tokens=8) as ffns:
            sparse = model(ids).logits
    assert {f.cutoff for f in ffns.values()} <= set(cutoffs.values()) and len(ffns) >= len(cutoffs)
    assert (dense - uncut).abs().max() > 1e-3  # the cutoffs changed the model
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)


def test_exact_sparse_generation_matches_dense(backend):
    model = relufy.swap_activation(tiny_model("qwen2_moe"), "reglu")
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with sparse_decoding(model, "exact", max_tokens=1):  # prompt dense, every new token sparse
            sparse = model.generate(ids, **kw)
    assert torch.equal(sparse, dense)


def test_predictor_mode(backend):
    model = relufy.swap_activation(tiny_model("qwen2_moe"), "drelu")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    keep_all, keep_none = {}, {}
    for site, _ in ffn_sites(model):
        for e in range(site.experts):
            key = (site.name, e if site.kind == "experts" else None)
            p = Predictor(32, site.width, 4)
            torch.nn.init.zeros_(p.fc1.weight)
            torch.nn.init.zeros_(p.fc2.weight)
            keep_all[key] = p  # scores 0 >= 0: every neuron computed
            q = Predictor(32, site.width, 4)
            torch.nn.init.zeros_(q.fc1.weight)
            torch.nn.init.zeros_(q.fc2.weight)
            keep_none[key] = q
    with torch.no_grad():
        dense = model(ids).logits
        with sparse_decoding(model, "predictor", keep_all):
            got = model(ids).logits
        with sparse_decoding(model, "predictor", keep_none, predictor_threshold=1.0):
            none = model(ids).logits
        for _, module in ffn_sites(model):  # without FFNs: the model's own output with FFNs zeroed
            module.relufy_observer = lambda m, c, e: c * 0
        no_ffn = model(ids).logits
    torch.testing.assert_close(got, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(none, no_ffn, rtol=1e-4, atol=1e-4)
    assert (none - dense).abs().max() > 1e-2


def _zero_predictors(model):
    out = {}
    for site, _ in ffn_sites(model):
        for e in range(site.experts):
            p = Predictor(32, site.width, 4)
            torch.nn.init.zeros_(p.fc1.weight)
            torch.nn.init.zeros_(p.fc2.weight)
            out[(site.name, e if site.kind == "experts" else None)] = p.requires_grad_(False)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_predictor_mode_uses_a_threshold_per_predictor(family):
    """Zero predictors score 0: a threshold of 0 computes every neuron, 1 none. Per predictor, the
    last layer off and the rest on must equal the model whose last layer has no FFN."""
    model = relufy.swap_activation(tiny_model(family), "drelu")
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    predictors = _zero_predictors(model)
    last = max(s.layer for s, _ in ffn_sites(model))
    by_name = {s.name: s for s, _ in ffn_sites(model)}
    thresholds = {key: 1.0 if by_name[key[0]].layer == last else 0.0 for key in predictors}
    with torch.no_grad():
        with sparse_decoding(model, "predictor", predictors, predictor_threshold=thresholds) as ffns:
            got = model(ids).logits
            assert {(s.layer, f.predictor_threshold) for (s, _), f in ffns.items()} == {
                (s.layer, 1.0 if s.layer == last else 0.0) for (s, _) in ffns
            }
        for site, module in ffn_sites(model):  # the reference: the last layer's FFNs zeroed
            if site.layer == last:
                module.relufy_observer = lambda m, c, e: c * 0
        expected = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="no predictor threshold"):
        with sparse_decoding(model, "predictor", predictors, predictor_threshold={}):
            pass


def test_sparse_refuses_swiglu():
    model = tiny_model("llama")
    relufy.swap_activation(model, "swiglu")
    with pytest.raises(ValueError, match="needs exact zeros"), sparse_decoding(model, "exact"):
        pass


# ---- the commands --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tiny import corpus, save_tiny_with_tokenizer

    from relufy.conversion import convert
    from relufy.export.options import ExportOptions
    from relufy.export.pipeline import export

    root = tmp_path_factory.mktemp("sparse")
    save_tiny_with_tokenizer("llama", root / "llama")
    convert(root / "llama", root / "drelu")
    convert(root / "llama", root / "swiglu", activation="swiglu")
    (root / "corpus.txt").write_text(corpus()[:20000])
    options = ExportOptions(data=str(root / "corpus.txt"), predictors=True, seq_len=64, max_tokens=2048, predictor_steps=30)
    export(str(root / "drelu"), root / "exported", options, show_progress=False)
    return root


def test_engine_reads_the_exported_thresholds(models):
    from safetensors import safe_open

    from relufy.modeling.predictor import load_predictors
    from relufy.sparse.engine import predictor_thresholds

    model = relufy.load(models / "exported")
    thresholds = predictor_thresholds(models / "exported", model)
    sites = [s for s, _ in ffn_sites(model)]
    assert set(thresholds) == {(s.name, None) for s in sites}
    with safe_open(models / "exported" / "sparsity.safetensors", "pt") as f:
        for s in sites:
            assert f.get_tensor(f"layers.{s.layer}.{s.kind}.predictor_threshold").tolist() == [thresholds[(s.name, None)]]
    assert len(set(thresholds.values())) == len(sites)  # calibrated per layer (--predictor-recall)
    with sparse_decoding(model, "predictor", load_predictors(models / "exported"), thresholds) as ffns:
        assert {s.name: f.predictor_threshold for (s, _), f in ffns.items()} == {k[0]: v for k, v in thresholds.items()}
    assert predictor_thresholds(models / "drelu", relufy.load(models / "drelu")) is None  # no export: none
    # relufy generate --sparse predictor decodes at the same per-predictor thresholds
    from relufy.generate import sparse_context

    with sparse_context(model, models / "exported", "predictor") as ffns:
        assert {s.name: f.predictor_threshold for (s, _), f in ffns.items()} == {k[0]: v for k, v in thresholds.items()}


def test_generate_sparse(cli, models):
    code, err, dense = cli("generate", models / "drelu", "--prompt", "The function", "--max-new-tokens", "8", "--no-chat")
    assert code == 0, err
    code, err, exact = cli(
        "generate", models / "drelu", "--prompt", "The function", "--max-new-tokens", "8", "--no-chat", "--sparse", "exact"
    )
    assert code == 0, err
    assert exact == dense and "tokens/s, sparse exact" in err
    code, err, _ = cli(
        "generate", models / "exported", "--prompt", "The function", "--max-new-tokens", "8", "--no-chat", "--sparse", "predictor"
    )
    assert code == 0 and "sparse predictor" in err


@pytest.mark.parametrize(
    "args, needle",
    [
        (("drelu", "--sparse", "predictor"), "no predictors.safetensors"),
        (("swiglu", "--sparse", "exact"), "needs a ReLU-family model"),
        (("drelu", "--sparse", "fast"), "'fast' is not one of 'off', 'exact', 'predictor'"),
    ],
)
def test_generate_sparse_errors(cli, models, args, needle):
    code, err, _ = cli("generate", models / args[0], "--max-new-tokens", "2", *args[1:])
    assert code == 2 and needle in err.splitlines()[-1] and "Traceback" not in err


def test_bench_command(cli, models, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    code, err, _ = cli(
        "bench",
        models / "exported",
        "--stats",
        models / "exported" / "sparsity.safetensors",
        "--shapes",
        "model,64x256",
        "--dtypes",
        "fp32,bf16",
        "--threads",
        "1",
        "--sparsities",
        "0.5,0.9",
        "--repeats",
        "2",
        "--new-tokens",
        "4",
        "--json",
        out,
        "--plot",
        png,
    )
    assert code == 0, err
    import json

    result = json.loads(out.read_text())
    cases = result["ffn"]
    assert len(cases) == 2 * 2 * (2 + 1)  # shapes x dtypes x (levels + measured)
    assert {(c["hidden"], c["width"]) for c in cases} == {(32, 48), (64, 256)}
    measured = [c for c in cases if c["measured"]]
    assert len(measured) == 4 and 0 < measured[0]["sparsity"] < 1
    for c in cases:
        assert c["dense_ms"] > 0 and c["exact_ms"] > 0 and c["predictor_ms"] > 0
        assert c["exact_speedup"] == pytest.approx(c["dense_ms"] / c["exact_ms"])
        assert c["limit"] == pytest.approx(1 / (1 - c["sparsity"]))
    modes = {g["mode"]: g for g in result["generation"]}
    assert set(modes) == {"off", "exact", "predictor"} and modes["exact"]["same_text_as_off"] is True
    assert all(g["new_tokens"] == 4 and g["decode_tokens_per_second"] > 0 for g in modes.values())  # EOS cannot cut it short
    assert png.stat().st_size > 1000


def test_bench_at_real_densities(cli, models, tmp_path):
    """--data: the export's predictors run on text; per layer true and predicted density, then the FFN
    time at exactly those densities for each shape, beside the synthetic case."""
    out = tmp_path / "bench.json"
    code, err, stdout = cli(
        "bench",
        models / "exported",
        "--data",
        models / "corpus.txt",
        "--max-tokens",
        "256",
        "--seq-len",
        "64",
        "--shapes",
        "model,64x256",
        "--dtypes",
        "fp32",
        "--threads",
        "1",
        "--sparsities",
        "0.5",
        "--repeats",
        "2",
        "--no-generation",
        "--json",
        out,
    )
    assert code == 0, err
    import json

    real = json.loads(out.read_text())["real"]
    assert [(c["hidden"], c["width"]) for c in real] == [(32, 48), (64, 256)]
    for c in real:
        assert [layer["layer"] for layer in c["layers"]] == [0, 1]
        for layer in c["layers"]:
            assert 0 < layer["density"] < 1 and 0 < layer["predicted_density"] <= 1 and layer["rank"] >= 16
            assert layer["exact_ms"] > 0 and layer["predictor_ms"] > 0
        assert c["dense_ms"] > 0 and c["predictor_speedup"] == pytest.approx(c["dense_ms"] / c["predictor_ms"])
        assert c["limit"] == pytest.approx(1 / c["density"]) and c["synthetic_predictor_speedup"] > 0
    # the same densities for both shapes (they are the model's), the 7B-style shape with its own ranks
    assert [x["density"] for x in real[0]["layers"]] == [x["density"] for x in real[1]["layers"]]
    assert "real densities" in stdout + err
    # off a terminal the tables keep their natural width: every header whole, no cell cut to "…"
    assert "synthetic predictor x" in err and "64x256" in err and "…" not in stdout + err


def test_bench_case_has_the_sparsity_it_claims():
    from relufy.sparse.timing import make_case

    gate, up, down, x, gate_frac = make_case(64, 1000, 0.9, seed=1)
    g, u = (gate @ x[0]), (up @ x[0])
    assert (g > 0).float().mean().item() == pytest.approx(gate_frac, abs=1e-3)
    assert ((torch.relu(g) * torch.relu(u)) != 0).float().mean().item() == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize(
    "args, needle",
    [
        (("--sparsities", "1.5"), "--sparsities: sparsity levels must lie in"),
        (("--shapes", "huge"), "is not 7b, model or HxI"),
        (("--dtypes", "fp8"), "--dtypes: Input should be"),
    ],
)
def test_bench_errors(cli, args, needle):
    code, err, _ = cli("bench", "--shapes", "7b", *args) if "--shapes" not in args else cli("bench", *args)
    assert code == 2 and needle in err and "Traceback" not in err
