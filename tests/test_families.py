"""The family table and the torch-free convert path stay in step with transformers."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from tiny import save_tiny
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from relufy.activations import GATED_ACTIVATIONS
from relufy.families import FAMILIES
from relufy.io.safetensors_index import Checkpoint
from relufy.io.shard_writer import recoded_chunks
from relufy.names import ACTIVATIONS as ACTIVATION_NAMES


@pytest.mark.parametrize("family", list(FAMILIES.values()), ids=list(FAMILIES))
def test_table_names_transformers_classes(family):
    module, config_class = family.config_import
    assert CONFIG_MAPPING_NAMES[family.model_type] == config_class
    assert getattr(importlib.import_module(module), config_class).model_type == family.model_type
    module, model_class = family.model_import
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[family.model_type] == model_class
    modeling = importlib.import_module(module)
    getattr(modeling, model_class)
    for name in family.ffn_classes:
        getattr(modeling, name)


def test_activation_names_match_definitions():
    assert tuple(GATED_ACTIVATIONS) == ACTIVATION_NAMES


def test_recoded_chunks_cross_chunk_boundaries(tmp_path):
    save_tiny("llama", tmp_path / "m")
    ckpt = Checkpoint(tmp_path / "m")
    from safetensors import safe_open

    with safe_open(tmp_path / "m" / "model.safetensors", "pt") as f:
        for info in ckpt.tensors.values():
            expected = f.get_tensor(info.name).to(torch.bfloat16)
            data = b"".join(bytes(c) for c in recoded_chunks(info, "BF16", chunk_bytes=36))  # 9 fp32 per chunk
            assert torch.equal(torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(expected.shape), expected)


def test_plain_convert_imports_neither_torch_nor_transformers(tmp_path):
    save_tiny("mixtral", tmp_path / "m")
    code = (
        "import sys; sys.argv = ['relufy', 'convert', sys.argv[1], sys.argv[2]]\n"
        "from relufy.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "out")], check=True)
    assert (tmp_path / "out" / "modeling_relufy.py").exists()
