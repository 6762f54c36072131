"""The tokenizer of any model relufy reads (folder, .gguf file, hub id), or a tokenizer folder of its own."""

from __future__ import annotations

from pathlib import Path

from ..errors import RelufyError
from ..io.gguf import check_gguf_structure
from ..io.source import resolve
from .formats import read_config
from .spec import base_config


def load_tokenizer(path: str | Path):
    """The tokenizer of any model relufy reads; never asks for remote code (tokenizers have none)."""
    from transformers import AutoTokenizer

    source = resolve(path)
    if source.gguf_file:
        check_gguf_structure(source.folder / source.gguf_file)
    source.check_files()  # tokenizer files transformers opens: regular files inside the folder, bounded
    if source.gguf_file:
        kwargs = {"gguf_file": source.gguf_file}
    elif not (source.folder / "config.json").exists() and (source.folder / "tokenizer_config.json").is_file():
        kwargs = {}  # a tokenizer folder of its own (tokenizer.json and tokenizer_config.json, no model)
    else:
        kwargs = {"config": base_config(read_config(source))[1]}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, TypeError... for a missing tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RelufyError(f"{path}: no usable tokenizer in the model folder ({first})") from None
    if tokenizer is None or not callable(tokenizer):
        raise RelufyError(f"{path}: no usable tokenizer in the model folder")
    return tokenizer
