"""Predictor calibration: rows streamed to disk give the same predictors as rows kept in memory,
per-predictor thresholds reach their recall target, the magnitude-weighted loss runs, and
thresholds fold into the weights for engines that take one threshold."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

import relufy
from relufy.export.calibration import Collector, DiskRows, MemoryRows, decode_magnitude, encode_magnitude
from relufy.export.layouts import MAX_FOLD_SCALE, _scaled, fold_thresholds
from relufy.export.options import ExportOptions
from relufy.export.pipeline import Chain, fit_predictors
from relufy.export.predictors import predictor_metrics, recall_threshold, train_predictor
from relufy.families import family_for
from relufy.measure.sites import ActivationCounter, ffn_sites, observing, preactivations, tapped
from relufy.modeling.layouts import layout_of
from relufy.modeling.predictor import Predictor


def _ids(n, length, seed):
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_magnitude_codes_keep_zeros_exact():
    a = torch.tensor([0.0, -0.0, 1e-30, 1e-6, 0.5, 1.0, -3.0, 1e6])
    codes = encode_magnitude(a)
    assert codes.dtype == torch.uint8
    assert (codes == 0).tolist() == [True, True, False, False, False, False, False, False]
    back = decode_magnitude(codes)
    assert back[0] == 0 and back[2] > 0  # a tiny non-zero stays active
    torch.testing.assert_close(back[4:7], a[4:7].abs(), rtol=0.05, atol=0)  # 1/8-octave steps: within 4.5%


def _collect(model, sites, stores, parts):
    with tapped(model, sites, "residual") as tap:
        collector = Collector(sites, tap, stores=stores, limits={"train": 300})
        counter = ActivationCounter(sites)
        with observing(model, lambda _: Chain([counter, collector])), torch.no_grad():
            for part, ids in parts.items():
                collector.part = part
                model(ids)
    return counter.result()


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_streamed_calibration_gives_the_in_memory_predictors(tmp_path, family):
    model = relufy.swap_activation(tiny_model(family), "drelu")
    sites = ffn_sites(model)
    parts = {"train": _ids(4, 48, 1), "tune": _ids(2, 48, 2), "report": _ids(2, 48, 3)}
    options = ExportOptions(predictors=True, data="-", predictor_steps=15, predictor_recall=0.9, min_expert_tokens=8)
    results = []
    for stores in ({p: MemoryRows() for p in parts}, {p: DiskRows(tmp_path / p) for p in parts}):
        counts = _collect(model, sites, stores, parts)
        assert stores["train"].counts and max(stores["train"].counts.values()) == 192  # 4 x 48 rows (under the 300 cap)
        results.append(fit_predictors(model, sites, counts, {}, stores, options, torch.device("cpu")))
        if isinstance(stores["train"], DiskRows):
            assert not any((tmp_path / "train").iterdir())  # every key's rows dropped once used
    (p_mem, t_mem, r_mem), (p_disk, t_disk, r_disk) = results
    assert p_mem.keys() == p_disk.keys()
    for key in p_mem:
        assert torch.equal(p_mem[key].fc1.weight, p_disk[key].fc1.weight)
        assert torch.equal(p_mem[key].fc2.weight, p_disk[key].fc2.weight)
        assert t_mem[key] == t_disk[key]
        assert r_mem[key] == r_disk[key]
    assert any(r.threshold_from == "tune" for r in r_mem.values())


def test_recall_threshold_hits_the_target_on_its_rows():
    torch.manual_seed(0)
    x = torch.randn(400, 16)
    y = (x @ torch.randn(16, 24)) > 0.5  # a learnable active set
    predictor = train_predictor(x[:300], y[:300], rank=16, steps=40, lr=1e-2)
    for target in (0.8, 0.9, 0.95, 0.99, 1.0):
        t = recall_threshold(predictor, x[300:], y[300:], target)
        assert predictor_metrics(predictor, x[300:], y[300:], t).recall >= target
        # the largest such threshold: a hair above it drops below the target
        assert predictor_metrics(predictor, x[300:], y[300:], t + 1e-4).recall < target
    assert recall_threshold(predictor, x[:5], torch.zeros(5, 24, dtype=torch.bool), 0.9) is None  # nothing active


def test_magnitude_weighted_loss_trains_and_needs_codes():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    a = torch.relu(x @ torch.randn(16, 24))
    codes = encode_magnitude(a)
    p = train_predictor(x, codes, rank=16, steps=30, lr=1e-2, magnitude_power=1.0)
    m = predictor_metrics(p, x, codes, 0.0)
    assert m.recall > 0.5 and 0 <= m.missed_magnitude < m.missed  # the large activations are the ones kept
    with pytest.raises(ValueError, match="magnitude codes"):
        train_predictor(x, a > 0, rank=16, steps=1, magnitude_power=1.0)


@pytest.mark.parametrize("values", [[-0.5, -2.0, -0.01], [0.3, 1.5], [-1.0, 0.0, 0.4], [-1.0, -1.0], [-0.8, 1.33]])
def test_folded_thresholds_keep_the_same_neurons(values):
    torch.manual_seed(1)
    predictors, thresholds = {}, {}
    for i, t in enumerate(values):
        predictors[i] = Predictor(16, 64, 8).requires_grad_(False)
        thresholds[i] = t
    if min(values) <= 0:  # an all-zero predictor (every neuron kept at threshold 0) needs T <= 0
        zero = Predictor(16, 64, 8).requires_grad_(False)
        torch.nn.init.zeros_(zero.fc1.weight)
        torch.nn.init.zeros_(zero.fc2.weight)
        predictors["zero"], thresholds["zero"] = zero, 0.0
    target, scales = fold_thresholds(predictors, thresholds)
    x = torch.randn(200, 16)
    for key, p in predictors.items():
        folded = Predictor(16, 64, 8)
        folded.load_state_dict(_scaled(p, scales[key]))
        raw_keep = p(x) >= thresholds[key]
        folded_keep = folded(x) >= target
        t = thresholds[key]
        if key == "zero" or (t * target > 0 and (target > 0 or t <= -1 / MAX_FOLD_SCALE)):
            assert torch.equal(folded_keep, raw_keep), key  # exactly the same neurons
        else:  # a threshold above -1/MAX_FOLD_SCALE under T = -1 acts as -1/MAX_FOLD_SCALE: a superset
            assert torch.equal(folded_keep, p(x) >= -1 / MAX_FOLD_SCALE), key
            assert (folded_keep | ~raw_keep).all() and folded_keep.sum() > raw_keep.sum()
        if target < 0:  # scores stay within MAX_FOLD_SCALE times their own range (fp16-safe in the engine)
            assert scales[key] <= MAX_FOLD_SCALE
    assert target == (1.0 if min(values) > 0 else -1.0)


def test_magnitude_recall_threshold_keeps_that_share_of_the_activation():
    torch.manual_seed(0)
    x = torch.randn(400, 16)
    a = torch.relu(x @ torch.randn(16, 24) - 0.3)
    codes = encode_magnitude(a)
    predictor = train_predictor(x[:300], codes[:300], rank=16, steps=40, lr=1e-2)
    held_x, held = x[300:], codes[300:]
    for target in (0.9, 0.99, 1.0):
        t = recall_threshold(predictor, held_x, held, target, magnitude=True)
        assert 1 - predictor_metrics(predictor, held_x, held, t).missed_magnitude >= target - 1e-9
        # the largest such threshold: a hair above it keeps less than the target
        assert 1 - predictor_metrics(predictor, held_x, held, t + 1e-4).missed_magnitude < target
        # dropping small activations first: the count recall is lower than the magnitude recall
        assert (
            predictor_metrics(predictor, held_x, held, t).recall
            <= 1 - predictor_metrics(predictor, held_x, held, t).missed_magnitude + 1e-9
        )
    with pytest.raises(ValueError, match="magnitude codes"):
        recall_threshold(predictor, held_x, held != 0, 0.9, magnitude=True)


@pytest.mark.parametrize("of, target", [("neurons", 0.95), ("magnitude", 0.99)])
def test_per_predictor_thresholds_reach_the_recall_on_the_tune_rows(of, target):
    model = relufy.swap_activation(tiny_model("llama"), "drelu")
    sites = ffn_sites(model)
    parts = {"train": _ids(4, 48, 1), "tune": _ids(2, 48, 2), "report": _ids(2, 48, 3)}
    stores = {p: MemoryRows() for p in parts}
    counts = _collect(model, sites, stores, parts)
    tune = {key: stores["tune"].load(key) for key in stores["tune"].counts}
    options = ExportOptions(predictors=True, data="-", predictor_steps=15, predictor_recall=target, predictor_recall_of=of)
    predictors, thresholds, rows = fit_predictors(model, sites, counts, {}, stores, options, torch.device("cpu"))
    assert len(set(thresholds.values())) == len(thresholds)  # one per layer
    for key, (x, codes) in tune.items():
        m = predictor_metrics(predictors[key], x, codes, thresholds[key])
        assert (m.recall if of == "neurons" else 1 - m.missed_magnitude) >= target - 1e-9
        assert rows[key].threshold == thresholds[key] and 0 <= rows[key].recall <= 1  # report rows scored


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "qwen2_moe"])
def test_weight_start_is_the_least_squares_gate_plus_up(family):
    """At full rank and before any step, a predictor started from its FFN's weights scores each
    neuron by its standardized gate + up pre-activation (times the row's RMS), computed here from
    the norm module and the weights directly."""
    model = relufy.swap_activation(tiny_model(family), "drelu")
    sites = ffn_sites(model)
    stores = {"train": MemoryRows()}
    _collect(model, sites, stores, {"train": _ids(4, 48, 1)})
    modules = dict(model.named_modules())
    norm_name = family_for(family).ffn_norm
    checked = 0
    for site, module in sites:
        got = stores["train"].load((site, 0))
        if got is None or got[0].shape[0] < 64:
            continue
        x = got[0].float()
        norm = modules[f"model.layers.{site.layer}.{norm_name}"]
        gate, up, _ = layout_of(module).weights(module, 0)
        with torch.no_grad():
            n = norm(x)
            rms = x.pow(2).mean(-1, keepdim=True).sqrt()
            t_g, t_u = (n @ gate.T) * rms, (n @ up.T) * rms
            expected = t_g / t_g.std(0, unbiased=False) + t_u / t_u.std(0, unbiased=False)
        hidden = x.shape[1]
        predictor = train_predictor(
            got[0], got[1], rank=2 * hidden, steps=0, preact=preactivations(model, site, module, 0, "residual")
        )
        with torch.no_grad():
            score = predictor(x)
        torch.testing.assert_close(score, expected, rtol=0, atol=2e-3 * float(expected.abs().max()))
        checked += 1
    assert checked >= 2


def test_weight_start_reaches_the_recall_with_fewer_neurons():
    """Same rows, rank and steps: started from the FFN's weights, a predictor computes fewer neurons
    for 95% recall on held-out rows than started at random."""
    model = relufy.swap_activation(tiny_model("llama", intermediate_size=256), "drelu")
    sites = ffn_sites(model)
    stores = {"train": MemoryRows(), "report": MemoryRows()}
    _collect(model, sites, stores, {"train": _ids(8, 48, 1), "report": _ids(4, 48, 2)})
    for site, module in sites:
        x, y = stores["train"].load((site, 0))
        xr, yr = stores["report"].load((site, 0))
        computed = {}
        for start in ("weights", "random"):
            preact = preactivations(model, site, module, 0, "residual") if start == "weights" else None
            p = train_predictor(x, y, rank=16, steps=30, lr=1e-2, preact=preact)
            computed[start] = predictor_metrics(p, xr, yr, recall_threshold(p, xr, yr, 0.95)).computed
        assert computed["weights"] < computed["random"], (site.name, computed)
