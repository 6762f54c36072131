"""relufy info against counts taken from the real (materialized) model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import FAMILIES, FAMILY_CONFIGS, save_tiny

import relufy


def structural_ffn_params(model) -> int:
    total = 0
    for m in model.modules():
        gate_up = getattr(m, "gate_up_proj", None)
        if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj")) or gate_up is not None:
            total += sum(p.numel() for p in m.parameters())
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_model(tmp_path, family):
    model = save_tiny(family, tmp_path / "m")
    out = relufy.convert(tmp_path / "m", tmp_path / "out")
    for path, activation in ((tmp_path / "m", "swiglu"), (out, "drelu")):
        result = relufy.info(path)
        assert result.family == family and result.activation == activation
        assert result.params_total == sum(p.numel() for p in model.parameters())
        assert result.params_ffn == structural_ffn_params(model)
        assert result.layers == 2 and result.hidden_size == 32 and result.ffn_size == 48
    cfg = FAMILY_CONFIGS[family]
    experts = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0
    assert result.routed_experts == experts
    assert result.experts_per_token == (2 if experts else 0)
    shared = {"qwen2_moe": 1, "deepseek_v3": 1}.get(family, 0)
    assert result.shared_experts == shared


def test_info_json_cli(tmp_path, cli):
    save_tiny("qwen2_moe", tmp_path / "m")
    relufy.convert(tmp_path / "m", tmp_path / "out", activation="reglu")
    code, _, out = cli("info", tmp_path / "out", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["activation"] == "reglu" and data["routed_experts"] == 4 and data["shared_experts"] == 1
    assert data["expert_ffn_size"] == 24 and data["relufy"]["base_model_type"] == "qwen2_moe"
    assert 0 < data["params_ffn"] < data["params_total"]


def test_info_loads_no_weights(tmp_path, monkeypatch):
    """info reads config only: deleting the weights changes nothing."""
    save_tiny("llama", tmp_path / "m")
    before = relufy.info(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").unlink()
    assert relufy.info(tmp_path / "m").params_total == before.params_total
    assert torch.get_default_device().type == "cpu"


def test_info_sums_up_the_cutoffs(tmp_path, cli):
    save_tiny("llama", tmp_path / "m")
    out = relufy.convert(tmp_path / "m", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["relufy"]["cutoffs"] = {"model.layers.0.mlp": 0.0125, "model.layers.1.mlp": 0.5}
    (out / "config.json").write_text(json.dumps(config))
    code, err, shown = cli("info", out)
    assert code == 0, err
    assert "2 FFN(s), magnitude 0.0125 to 0.5" in " ".join(shown.split())
    code, _, raw = cli("info", out, "--json")
    assert json.loads(raw)["relufy"]["cutoffs"] == config["relufy"]["cutoffs"]
