"""relufy convert: activation options that cannot be written into a config are refused."""

from __future__ import annotations

import pytest
from safety import Snapshot, assert_refused
from tiny import save_tiny


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf"])
def test_fatrelu_threshold_must_be_finite(tmp_path, cli, threshold):
    save_tiny("llama", tmp_path / "src")
    snap = Snapshot(tmp_path)
    code, err, _ = cli("convert", tmp_path / "src", tmp_path / "out", "--activation", "fatrelu", "--threshold", threshold)
    assert_refused(snap, code, err, "finite number" if threshold != "-inf" else "threshold")


def test_convert_takes_its_options_whole_or_as_keywords(tmp_path):
    import json

    import relufy
    from relufy.conversion import ConvertOptions

    save_tiny("llama", tmp_path / "src")
    whole = relufy.convert(tmp_path / "src", tmp_path / "a", ConvertOptions(activation="reglu", dtype="bf16"))
    keywords = relufy.convert(tmp_path / "src", tmp_path / "b", activation="reglu", dtype="bf16")
    configs = [json.loads((p / "config.json").read_text()) for p in (whole, keywords)]
    assert configs[0] == configs[1]
    assert configs[0]["relufy"]["activation"] == "reglu" and configs[0]["dtype"] == "bfloat16"


def test_convert_refuses_options_and_keywords_together(tmp_path):
    import relufy
    from relufy.conversion import ConvertOptions

    save_tiny("llama", tmp_path / "src")
    with pytest.raises(TypeError, match="not both"):
        relufy.convert(tmp_path / "src", tmp_path / "out", ConvertOptions(), activation="reglu")
    with pytest.raises(TypeError, match="unexpected keyword argument 'activations'"):
        relufy.convert(tmp_path / "src", tmp_path / "out", activations="reglu")
    with pytest.raises(TypeError, match="ConvertOptions"):
        relufy.convert(tmp_path / "src", tmp_path / "out", "reglu")  # the activation, once the third argument
    assert not (tmp_path / "out").exists()
