"""Model cards: written through huggingface_hub.ModelCard, they parse back with the metadata the
Hub reads (base_model, license, tags, pipeline, library), and never hold a local path."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard
from tiny import save_tiny, save_tiny_with_tokenizer

import relufy
from relufy.families import family_for
from relufy.modeling.card import model_card
from relufy.modeling.spec import ActivationSpec


def no_local_path(folder, *paths):
    for name in ("README.md", "config.json"):
        text = (folder / name).read_text()
        for path in paths:
            assert str(path) not in text, (name, str(path))


def test_card_of_a_local_source_with_a_card(tmp_path):
    src = tmp_path / "my-model"
    save_tiny_with_tokenizer("qwen2", src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: org/tiny-qwen\ntags: [chat]\n---\n# Tiny\n")
    out = relufy.convert(src, tmp_path / "out", activation="drelu")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/tiny-qwen" and card.data.license == "apache-2.0"
    assert set(card.data.tags) == {"relufy", "drelu", "sparse", "turbo-sparse", "qwen2"}
    assert card.data.pipeline_tag == "text-generation" and card.data.library_name == "transformers"
    assert getattr(card.data, "base_model_relation", None) is None  # a conversion is none of the Hub's relations
    block = json.loads((out / "config.json").read_text())["relufy"]
    assert block["source"] == "org/tiny-qwen" and block["base_model"] == "org/tiny-qwen" and block["license"] == "apache-2.0"
    assert "drelu conversion of `org/tiny-qwen`" in card.text
    no_local_path(out, tmp_path, src)


def test_card_of_a_local_source_without_a_hub_id(tmp_path):
    src = tmp_path / "plain-model"
    save_tiny("llama", src)
    out = relufy.convert(src, tmp_path / "out", activation="relu2")
    card = ModelCard.load(out / "README.md")
    assert getattr(card.data, "base_model", None) is None and getattr(card.data, "license", None) is None
    assert "relu2" in card.data.tags and "llama" in card.data.tags
    assert json.loads((out / "config.json").read_text())["relufy"]["source"] == "plain-model"
    assert "conversion of `plain-model`" in card.text
    no_local_path(out, tmp_path)


def test_name_or_path_and_the_cache_layout_name_the_base_model(tmp_path):
    src = tmp_path / "dl"
    save_tiny("llama", src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/from-config"}))
    out = relufy.convert(src, tmp_path / "a")
    assert ModelCard.load(out / "README.md").data.base_model == "org/from-config"
    snapshot = tmp_path / "cache" / "models--org--cached" / "snapshots" / ("ab" * 20)
    shutil.copytree(src, snapshot)
    (snapshot / "config.json").write_text(json.dumps(config))
    out = relufy.convert(snapshot, tmp_path / "b")
    assert ModelCard.load(out / "README.md").data.base_model == "org/cached"
    no_local_path(out, tmp_path)


def test_swiglu_identity_card_is_not_tagged_sparse(tmp_path):
    save_tiny("llama", tmp_path / "m")
    out = relufy.convert(tmp_path / "m", tmp_path / "out", activation="swiglu")
    tags = ModelCard.load(out / "README.md").data.tags
    assert "swiglu" in tags and "sparse" not in tags and "turbo-sparse" not in tags


@pytest.mark.parametrize("trained", [False, True])
def test_trained_models_are_finetunes_of_their_base(tmp_path, trained):
    save_tiny("llama", tmp_path / "m")
    out = relufy.convert(tmp_path / "m", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["relufy"]["base_model"] = "org/base"
    if trained:
        config["relufy"]["trained"] = {"recipe": "r", "steps": 3, "tokens": 96}
    text = model_card(config, family_for("llama"), ActivationSpec(activation="drelu"), "org/base", found=0)
    card = ModelCard(text)
    assert card.data.base_model == "org/base"
    assert getattr(card.data, "base_model_relation", None) == ("finetune" if trained else None)
    assert ("trained from `org/base`" in card.text) is trained


def test_an_old_absolute_source_never_reaches_the_card(tmp_path):
    """A checkpoint written before sources were recorded by name: its card shows the name only."""
    save_tiny("llama", tmp_path / "m")
    out = relufy.convert(tmp_path / "m", tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    config["relufy"]["source"] = str(tmp_path / "m")
    text = model_card(config, family_for("llama"), ActivationSpec(activation="drelu"), str(tmp_path / "m"), found=0)
    assert str(tmp_path) not in text and "conversion of `m`" in text
    assert getattr(ModelCard(text).data, "base_model", None) is None
