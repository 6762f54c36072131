"""The dtype table (``relufy.names.ST_DTYPES``) and the maps derived from it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from relufy import names
from relufy.io.safetensors_index import DTYPE_BYTES


@pytest.mark.parametrize("st", sorted(names.ST_DTYPES))
def test_table_matches_torch(st):
    entry = names.ST_DTYPES[st]
    dtype = names.torch_dtype_of_st(st)
    assert dtype.itemsize == entry.nbytes == DTYPE_BYTES[st]
    assert entry.is_float == (dtype.is_floating_point and dtype.itemsize > 1)  # FP8 kinds are kept as they are
    if entry.is_float:
        assert names.st_dtype_of_torch(dtype) == st == names.st_dtype_of_torch(entry.torch)


def test_user_names_and_old_aliases():
    assert names.DTYPES == {"fp32": ("F32", "float32"), "bf16": ("BF16", "bfloat16"), "fp16": ("F16", "float16")}
    assert names.FLOAT_ST_DTYPES == {"F64", "F32", "F16", "BF16"}
    for name, (st, torch_name) in names.DTYPES.items():
        assert names.torch_dtype_of_name(name) is names.torch_dtype(name) is getattr(torch, torch_name)
        assert names.torch_dtype_of_st(st) is getattr(torch, torch_name)
        assert names.dtype_of_config({"dtype": torch_name}) == name
    with pytest.raises(KeyError):
        names.st_dtype_of_torch(torch.int64)  # only float tensors are written from torch dtypes


def test_table_needs_no_torch():
    code = (
        "import sys\n"
        "from relufy.names import ST_DTYPES, DTYPES\n"
        "from relufy.io.safetensors_index import DTYPE_BYTES\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
