"""relufy eval --threshold-sparsity (TEAL/CATS-style magnitude thresholds) against a hand
re-implementation on the original transformers modules, dense and MoE."""

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
from relufy.errors import RelufyError
from relufy.measure.evaluate import EvalOptions, evaluate_model

SEQ, MAX_TOKENS, CALIBRATION, LEVELS = 24, 400, 120, (0.0, 0.5, 0.8)
TEXT = corpus()[:20_000]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("threshold")
    (root / "corpus.txt").write_text(TEXT)
    for family in ("llama", "qwen2_moe"):
        save_tiny_with_tokenizer(family, root / family)
    relufy.convert(root / "qwen2_moe", root / "qwen2_moe-drelu")
    return root


def options(root, **kw) -> EvalOptions:
    kw = {"threshold_sparsity": LEVELS, "threshold_calibration_tokens": CALIBRATION, **kw}
    return EvalOptions(data=str(root / "corpus.txt"), seq_len=SEQ, max_tokens=MAX_TOKENS, **kw)


def reference_windows(n: int, seq: int):
    """relufy's default windows over n tokens: (start, end) of each, consecutive ones sharing a token."""
    out, start = [], 0
    while True:
        end = min(start + seq, n)
        out.append((max(0, end - seq), end))
        if end == n:
            return out
        start = end - 1


def site_of(names, module, expert) -> tuple[str, int]:
    return names[id(module)], expert or 0


def calibration_activations(root, family) -> dict:
    """The unmasked ``h`` of every (FFN module, expert) on the calibration tokens (the first
    CALIBRATION tokens in back-to-back chunks of SEQ), from the original transformers model."""
    ids = AutoTokenizer.from_pretrained(root / family)(TEXT, add_special_tokens=False)["input_ids"][:CALIBRATION]
    model = tiny_model(family)
    names = {id(m): n for n, m in model.named_modules()}
    seen = defaultdict(list)

    def record(module, h, expert):
        seen[site_of(names, module, expert)].append(h.detach().reshape(-1))
        return h

    apply_reference(model, "swiglu", post=record)
    for start in range(0, len(ids), SEQ):
        with torch.no_grad():
            model(torch.tensor([ids[start : start + SEQ]]))
    return {k: torch.cat(v) for k, v in seen.items()}


def relufy_calibration_activations(root, family) -> dict:
    """The same activations from relufy's own model and calibration windows (bit for bit what it calibrated on)."""
    from relufy.measure.evaluate import score
    from relufy.measure.sites import observing
    from relufy.measure.threshold import calibration_windows

    ids = AutoTokenizer.from_pretrained(root / family)(TEXT, add_special_tokens=False)["input_ids"][:CALIBRATION]
    model = relufy.load(root / family).eval()
    seen = defaultdict(list)

    class Record:
        def __init__(self, sites):
            self.names = {id(m): s.name for s, m in sites}

        def __call__(self, module, h, expert):
            seen[site_of(self.names, module, expert)].append(h.detach().reshape(-1))
            return h

    with observing(model, Record):
        score(model, calibration_windows(torch.tensor(ids), SEQ), 1, "cpu")
    return {k: torch.cat(v) for k, v in seen.items()}


def reference_ppl(root, family, thresholds: dict) -> tuple[float, int]:
    """Perplexity of the original transformers model with a hand hook zeroing |h| < t (t per
    module and expert), over the tokens after the calibration ones, in relufy's windows."""
    ids = AutoTokenizer.from_pretrained(root / family)(TEXT, add_special_tokens=False)["input_ids"][:MAX_TOKENS]
    ids = ids[CALIBRATION:]
    model = tiny_model(family)
    names = {id(m): n for n, m in model.named_modules()}

    def zero_small(module, h, expert):
        name, e = site_of(names, module, expert)
        return torch.where(h.abs() < thresholds[name][e], torch.zeros_like(h), h)

    apply_reference(model, "swiglu", post=zero_small)
    nll, count, prev_end = 0.0, 0, 0
    for start, end in reference_windows(len(ids), SEQ):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[start:end]])).logits[0].double(), -1)
        for pos in range(max(prev_end, 1), end):
            nll -= float(logp[pos - 1 - start, ids[pos]])
            count += 1
        prev_end = end
    return math.exp(nll / count), count


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_threshold_matches_hand_reimplementation(setup, family):
    result, _ = evaluate_model(str(setup / family), options(setup), [TEXT])
    assert result.calibration["tokens"] == CALIBRATION
    assert result.tokens == MAX_TOKENS - CALIBRATION - 1  # calibration tokens are never scored
    rows = {p["sparsity"]: p for p in result.threshold}
    assert list(rows) == list(LEVELS)
    # s = 0: thresholds of 0, the very same perplexity as the plain pass
    assert rows[0.0]["ppl"] == result.ppl
    assert all(t == 0 for ts in result.thresholds[0.0].values() for t in ts)

    # the quantile: on the calibration tokens a fraction s of each site's (expert's) |h| is under t
    acts = calibration_activations(setup, family)
    own = relufy_calibration_activations(setup, family)
    assert set(own) == set(acts)
    expected_sites = {(name, e) for name, ts in result.thresholds[0.5].items() for e in range(len(ts))}
    assert set(acts) <= expected_sites
    if family == "qwen2_moe":
        assert any(k[0].endswith("experts") for k in acts) and any(k[0].endswith("shared_expert") for k in acts)
    for s in LEVELS[1:]:
        for (name, e), h in acts.items():
            t = result.thresholds[s][name][e]
            # round(s n) entries under t, up to entries within float noise of t: the hand experts compute
            # token by token, and the tiny random MoE gives near-equal activations to many tokens
            below, at_most = int((h.abs() < t * (1 - 1e-5)).sum()), int((h.abs() <= t * (1 + 1e-5)).sum())
            assert below <= round(s * h.numel()) <= at_most, (s, name, e, below, at_most, h.numel())
        # exactly so on the activations relufy calibrated on (entries equal to t stay)
        for (name, e), h in own.items():
            t = result.thresholds[s][name][e]
            assert int((h.abs() < t).sum()) <= round(s * h.numel()) <= int((h.abs() <= t).sum()), (s, name, e)
        assert rows[s]["calibration_below"] == pytest.approx(s, abs=2e-3)

    # the perplexity with |h| < t zeroed == the hand hook on the original modules (fp32)
    for s in LEVELS[1:]:
        ppl, count = reference_ppl(setup, family, result.thresholds[s])
        assert count == result.tokens
        assert rows[s]["ppl"] == pytest.approx(ppl, rel=1e-5)
        assert rows[s]["ppl"] != pytest.approx(result.ppl, rel=1e-6)  # the mask did change the model
        # realized zeros on the scored tokens: near s (later layers drift: thresholds come from the unmasked model)
        assert rows[s]["realized"]["mean"] == pytest.approx(s, abs=0.06)
        assert len(rows[s]["realized"]["per_layer"]) == 2


def test_drelu_under_its_own_sparsity_keeps_everything(setup):
    """A dReLU model already sparser than s: its zeros alone reach s, t = 0, nothing changes."""
    result, _ = evaluate_model(str(setup / "qwen2_moe-drelu"), options(setup, threshold_sparsity=(0.3,)), [TEXT])
    (row,) = result.threshold
    assert result.sparsity["overall"] > 0.5
    assert all(t == 0 for ts in result.thresholds[0.3].values() for t in ts)
    assert row["ppl"] == result.ppl
    assert row["realized"]["overall"] == result.sparsity["overall"]
    assert row["calibration_below"] > 0.5


def test_calibration_must_leave_tokens_to_score(setup):
    with pytest.raises(RelufyError, match="leaves 0 to score"):
        evaluate_model(str(setup / "llama"), options(setup, threshold_calibration_tokens=MAX_TOKENS), [TEXT])


def test_default_calibration_is_a_quarter_of_short_data(setup):
    result, _ = evaluate_model(
        str(setup / "llama"), options(setup, threshold_calibration_tokens=None, threshold_sparsity=(0.5,)), [TEXT]
    )
    assert result.calibration["tokens"] == MAX_TOKENS // 4
    assert result.tokens == MAX_TOKENS - MAX_TOKENS // 4 - 1


def test_names_match_reference_modules(setup):
    """The thresholds are keyed by module path, the same in relufy's model and the original."""
    model = tiny_model("qwen2_moe")
    result, _ = evaluate_model(str(setup / "qwen2_moe"), options(setup, threshold_sparsity=(0.5,)), [TEXT])
    names = dict(model.named_modules())
    for name in result.thresholds[0.5]:
        assert name in names and re.search(r"layers\.\d+\.mlp", name)


def test_pooled_calibration_gives_one_threshold_per_site(setup):
    """per_expert=False (relufy train's final cutoff): one t per FFN module, the quantile of all its
    experts' entries together, the same item for every expert."""
    from relufy.measure.evaluate import score
    from relufy.measure.threshold import calibrate, calibration_windows

    ids = AutoTokenizer.from_pretrained(setup / "qwen2_moe")(TEXT, add_special_tokens=False)["input_ids"][:CALIBRATION]
    model = relufy.load(setup / "qwen2_moe").eval()
    windows = calibration_windows(torch.tensor(ids), SEQ)
    pooled = calibrate(model, [0.5], lambda: score(model, windows, 1, "cpu"), per_expert=False)
    own = relufy_calibration_activations(setup, "qwen2_moe")
    for name, ts in pooled.thresholds[0.5].items():
        assert len(set(ts)) == 1
        h = torch.cat([v for (n, _), v in own.items() if n == name]).abs()
        assert int((h < ts[0]).sum()) <= round(0.5 * h.numel()) <= int((h <= ts[0]).sum()), name
    experts = [ts for name, ts in pooled.thresholds[0.5].items() if name.endswith("experts")]
    per_expert = calibrate(model, [0.5], lambda: score(model, windows, 1, "cpu")).thresholds[0.5]
    assert any(len(set(ts)) > 1 for name, ts in per_expert.items() if name.endswith("experts"))  # pooling changed them
    assert experts and pooled.below[0.5] == pytest.approx(0.5, abs=2e-3)
