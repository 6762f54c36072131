"""relufy eval against brute-force re-computation on tiny models (dense and MoE)."""

from __future__ import annotations

import math
import re
from collections import defaultdict

import pytest
import torch
from reference import apply_reference
from tiny import corpus, save_tiny_with_tokenizer, tiny_model
from transformers import AutoTokenizer

import relufy
from relufy.measure.evaluate import EvalOptions, evaluate_model
from relufy.measure.stats import Stats, merge

SEQ, MAX_TOKENS, LEVELS = 24, 400, (0.0, 0.5, 0.8)
FAMILIES = ["llama", "qwen2_moe", "deepseek_v3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (root / "corpus.txt").write_text(corpus()[:20_000])
    for family in FAMILIES:
        save_tiny_with_tokenizer(family, root / family)
        relufy.convert(root / family, root / f"{family}-drelu")
    return root


def reference_windows(n: int, seq: int):
    """Default stride: consecutive windows share one token; the last one ends at the data's end."""
    out, start = [], 0
    while True:
        end = min(start + seq, n)
        out.append((max(0, end - seq), end, start + 1 if start == 0 else start + 1))
        if end == n:
            return out
        start = end - 1


def brute_force(root, family, activation, level=0.0):
    """NLL, predicted tokens, and per (layer, kind, expert) the recorded combined activations."""
    tok = AutoTokenizer.from_pretrained(root / family)
    ids = tok(corpus()[:20_000], add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    model = tiny_model(family)
    names = {id(m): n for n, m in model.named_modules()}
    seen = defaultdict(list)

    def post(module, h, expert):
        if level > 0:
            keep = math.ceil(round((1 - level) * h.shape[-1], 6))
            thr = h.abs().sort(dim=-1, descending=True).values[..., keep - 1 : keep]
            h = h * (h.abs() >= thr)
        name = names[id(module)]
        layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
        kind = "experts" if expert is not None else ("shared" if "shared" in name else "dense")
        seen[(layer, kind, expert or 0)].append(h.detach().reshape(-1, h.shape[-1]))
        return h

    apply_reference(model, activation, post=post)
    nll, count, prev_end = 0.0, 0, 0
    for start, end, _ in reference_windows(len(ids), SEQ):
        window = torch.tensor([ids[start:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
        for pos in range(max(prev_end, 1), end):  # predict ids[pos] from position pos - 1
            nll -= float(logp[pos - 1 - start, ids[pos]])
            count += 1
        prev_end = end
    return nll, count, {k: torch.cat(v) for k, v in seen.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("converted", [False, True])
def test_eval_matches_brute_force(setup, family, converted):
    path = setup / (f"{family}-drelu" if converted else family)
    options = EvalOptions(data=str(setup / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS, topk=LEVELS)
    result, stats = evaluate_model(str(path), options, [corpus()[:20_000]])
    activation = "drelu" if converted else "swiglu"
    nll, count, acts = brute_force(setup, family, activation)
    assert result.tokens == count == MAX_TOKENS - 1
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)

    # per-site neuron counts and tokens == a plain count over the recorded activations
    by_key = {(s.layer, s.kind): (c, t) for s, (c, t) in stats.sites.items()}
    for (layer, kind, expert), h in acts.items():
        counts, tokens = by_key[(layer, kind)]
        assert int(tokens[expert]) == h.shape[0]
        assert torch.equal(counts[expert], (h != 0).sum(0))
    # per-layer sparsity
    for layer, value in enumerate(result.sparsity["per_layer"]):
        hs = [h for (at, _, _), h in acts.items() if at == layer]
        zeros = sum(int((h == 0).sum()) for h in hs) / sum(h.numel() for h in hs)
        assert value == pytest.approx(zeros, abs=1e-12)
    if converted:
        assert result.sparsity["mean"] > 0.3
    else:
        assert result.sparsity["mean"] < 0.01
    # per-expert sparsity and router share (MoE)
    if result.moe:
        for i, layer in enumerate(result.moe["layers"]):
            rows = {e: h for (at, k, e), h in acts.items() if at == layer and k == "experts"}
            total = sum(h.shape[0] for h in rows.values())
            for e, value in enumerate(result.moe["per_expert"][i]):
                if e in rows:
                    assert value == pytest.approx(float((rows[e] == 0).double().mean()), abs=1e-12)
                    assert result.moe["router_share"][i][e] == pytest.approx(rows[e].shape[0] / total)
                else:
                    assert value is None and result.moe["router_share"][i][e] == 0
    # top-k curve
    curve = {p["sparsity"]: p["ppl"] for p in result.topk}
    assert curve[0.0] == pytest.approx(result.ppl)
    for level in LEVELS[1:]:
        nll_k, count_k, _ = brute_force(setup, family, activation, level)
        assert curve[level] == pytest.approx(math.exp(nll_k / count_k), rel=1e-5)


def test_active_param_fraction_dense_is_density(setup):
    options = EvalOptions(data=str(setup / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS)
    result, _ = evaluate_model(str(setup / "llama-drelu"), options, [corpus()[:20_000]])
    assert result.active_ffn_param_fraction == pytest.approx(1 - result.sparsity["overall"], abs=1e-12)


def test_active_param_fraction_moe(setup):
    """Routed top-k times neuron density, shared experts and dense layers included."""
    options = EvalOptions(data=str(setup / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS)
    result, stats = evaluate_model(str(setup / "deepseek_v3-drelu"), options, [corpus()[:20_000]])
    _, _, acts = brute_force(setup, "deepseek_v3", "drelu")
    hidden, positions = 32, stats.positions
    used = sum(int((h != 0).sum()) * 3 * hidden for h in acts.values()) / positions
    # layer 0 dense (I=48); layer 1: 4 experts x 24 + shared 24 neurons
    total = 3 * hidden * (48 + 4 * 24 + 24)
    assert result.active_ffn_param_fraction == pytest.approx(used / total, rel=1e-9)
    assert result.active_ffn_param_fraction < 1 - result.sparsity["overall"]  # top-2 of 4 experts


def test_stats_file_roundtrip_and_merge(setup, tmp_path):
    options = EvalOptions(data=str(setup / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS)
    _, stats = evaluate_model(str(setup / "qwen2_moe-drelu"), options, [corpus()[:20_000]])
    stats.save(tmp_path / "s.safetensors")
    back = Stats.load(tmp_path / "s.safetensors")
    assert back.positions == stats.positions and back.meta["family"] == "qwen2_moe"
    assert back.layer_sparsity() == stats.layer_sparsity()
    merged = merge([back, back])
    assert merged.positions == 2 * stats.positions
    for site, (counts, tokens) in merged.sites.items():
        c0, t0 = back.sites[site]
        assert torch.equal(counts, 2 * c0) and torch.equal(tokens, 2 * t0)
    assert merged.layer_sparsity() == pytest.approx(stats.layer_sparsity())


def test_second_half_windowing_scores_as_llama_cpp(setup):
    """--windowing second-half: back-to-back windows of SEQ tokens, the logits at positions
    SEQ/2 .. SEQ-2 scored (llama.cpp's and PowerInfer's perplexity), brute force in float64."""
    path = setup / "llama-drelu"
    options = EvalOptions(data=str(setup / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS, windowing="second-half")
    result, _ = evaluate_model(str(path), options, [corpus()[:20_000]])
    tok = AutoTokenizer.from_pretrained(setup / "llama")
    ids = tok(corpus()[:20_000], add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    model = relufy.load(path).eval()
    nll, count = 0.0, 0
    for c in range(len(ids) // SEQ):
        window = torch.tensor([ids[c * SEQ : (c + 1) * SEQ]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), -1)
        for pos in range(SEQ // 2, SEQ - 1):
            nll -= float(logp[pos, window[0, pos + 1]])
            count += 1
    assert result.tokens == count == (MAX_TOKENS // SEQ) * (SEQ // 2 - 1)
    assert result.ppl == pytest.approx(math.exp(nll / count), rel=1e-5)
    with pytest.raises(ValueError, match="--stride is for --windowing sliding"):
        EvalOptions(data="x", windowing="second-half", stride=4)
