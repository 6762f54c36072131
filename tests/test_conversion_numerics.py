"""Converted checkpoints compute exactly the independent reference, for every family and activation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import apply_reference, midpoint_cutoff
from tiny import FAMILIES, MOE_FAMILIES, save_tiny, tiny_model

import relufy

ACTIVATIONS = {"drelu": None, "reglu": None, "relu2": None, "fatrelu": 0.1, "swiglu": None}
IMPLS = {f: ([None, "eager", "batched_mm"] if f in MOE_FAMILIES else [None]) for f in FAMILIES}
CASES = [(f, a, i) for f in FAMILIES for a in ACTIVATIONS for i in IMPLS[f]]
TOL = dict(rtol=1e-4, atol=1e-4)


def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 96, (2, 9), generator=g)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Convert every (family, activation); load each in one fresh process without relufy."""
    root = tmp_path_factory.mktemp("numerics")
    jobs = []
    for family in FAMILIES:
        save_tiny(family, root / family)
        for act, t in ACTIVATIONS.items():
            out = root / f"{family}-{act}"
            relufy.convert(root / family, out, activation=act, threshold=t)
            for impl in IMPLS[family]:
                jobs.append(
                    {"path": str(out), "impl": impl, "ids": input_ids().tolist(), "out": str(root / f"{family}-{act}-{impl}.pt")}
                )
        cut = root / f"{family}-drelu-cut"
        relufy.convert(root / family, cut, activation="drelu")
        config = json.loads((cut / "config.json").read_text())
        config["relufy"]["cutoffs"] = cutoffs(family)
        (cut / "config.json").write_text(json.dumps(config))
        for impl in IMPLS[family]:
            out = str(root / f"{family}-cut-{impl}.pt")
            jobs.append({"path": str(cut), "impl": impl, "ids": input_ids().tolist(), "out": out})
        for trust in (False,):
            jobs.append(
                {
                    "path": str(root / f"{family}-drelu"),
                    "trust": trust,
                    "ids": input_ids().tolist(),
                    "out": str(root / f"{family}-untrusted.pt"),
                }
            )
    (root / "jobs.json").write_text(json.dumps(jobs))
    script = Path(__file__).with_name("remote_logits.py")
    env = {**os.environ, "PYTHONPATH": ""}
    subprocess.run([sys.executable, str(script), str(root / "jobs.json")], check=True, env=env, cwd=root)
    return root


def reference_logits(family, activation, cut: dict | None = None):
    """``cut``: module path -> magnitude cutoff, applied to the combined activation of that FFN."""
    model = tiny_model(family)
    for name, module in model.named_modules():
        module._cut = (cut or {}).get(name, 0.0)
    apply_reference(model, activation, ACTIVATIONS[activation], post=lambda m, h, e: h * (h.abs() >= m._cut))
    with torch.no_grad():
        return model(input_ids()).logits


def cutoffs(family) -> dict:
    """Per FFN module path of the tiny dReLU model: a cutoff near the median of its non-zero
    activations on ``input_ids``, halfway between two neighbouring magnitudes (none lies on it)."""
    model = tiny_model(family)
    names = {id(m): n for n, m in model.named_modules()}
    seen = {}
    apply_reference(model, "drelu", post=lambda m, h, e: seen.setdefault(names[id(m)], []).append(h.abs().flatten()) or h)
    with torch.no_grad():
        model(input_ids())
    return {name: midpoint_cutoff(found) for name, found in seen.items()}


@pytest.mark.parametrize("family,impl", [(f, i) for f in FAMILIES for i in IMPLS[f]])
def test_magnitude_cutoffs_match_the_reference(remote, family, impl):
    """relufy.cutoffs in config.json: the remote code (every experts implementation) and relufy.load
    zero the combined activations under each FFN's cutoff, as the reference does."""
    cut = cutoffs(family)
    expected = reference_logits(family, "drelu", cut)
    result = torch.load(remote / f"{family}-cut-{impl}.pt", weights_only=True)
    assert "error" not in result, result.get("error")
    torch.testing.assert_close(result["logits"], expected, **TOL)
    assert (expected - reference_logits(family, "drelu")).abs().max() > 1e-3  # the cutoffs changed the function
    loaded = relufy.load(remote / f"{family}-drelu-cut").eval()
    assert {n: m.relufy_cutoff for n, m in loaded.named_modules() if n in cut} == cut
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids()).logits, expected, **TOL)


@pytest.mark.parametrize("family,activation,impl", CASES)
def test_remote_code_matches_reference(remote, family, activation, impl):
    result = torch.load(remote / f"{family}-{activation}-{impl}.pt", weights_only=True)
    assert "error" not in result, result.get("error")
    expected = reference_logits(family, activation)
    torch.testing.assert_close(result["logits"], expected, **TOL)
    if activation != "swiglu":  # the activation really changed the function
        with torch.no_grad():
            original = tiny_model(family)(input_ids()).logits
        assert (result["logits"] - original).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_untrusted_load_fails_loudly(remote, family):
    result = torch.load(remote / f"{family}-untrusted.pt", weights_only=True)
    assert "logits" not in result
    assert "trust_remote_code" in result["error"]


@pytest.mark.parametrize("family", FAMILIES)
def test_original_class_refuses_converted_checkpoint(remote, family):
    """Even the base class, asked for by name, must not compute SwiGLU with dReLU weights."""
    model_cls = type(tiny_model(family))
    with pytest.raises(Exception, match="relufy_drelu"):
        model_cls.from_pretrained(remote / f"{family}-drelu")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["drelu", "fatrelu"])
def test_relufy_load_without_remote_code(remote, family, activation):
    expected = reference_logits(family, activation)
    converted = relufy.load(remote / f"{family}-{activation}", dtype=torch.float32).eval()
    assert not converted.config.auto_map if hasattr(converted.config, "auto_map") else True
    in_memory = relufy.load(remote / family, activation=activation, threshold=ACTIVATIONS[activation]).eval()
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids()).logits, expected, **TOL)
        torch.testing.assert_close(in_memory(input_ids()).logits, expected, **TOL)
