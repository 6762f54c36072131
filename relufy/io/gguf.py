"""GGUF file -> Hugging Face checkpoint folder, one tensor in memory at a time.

Written by hand because transformers' GGUF loader only builds a whole in-memory model:
``from_pretrained(folder, gguf_file=...)`` dequantizes every tensor into one dict before
``save_pretrained`` can write anything (parameters x 4 bytes of RAM: 28 GB for a 7B). Here the
tensor table is read with gguf's ``GGUFReader`` and each tensor's bytes with plain file reads (no
memory map: its pages would pile up in the process), dequantized with gguf's ``dequantize``, cast
and written before the next one is read. The rest is transformers' own, so the output is what
``from_pretrained`` + ``save_pretrained`` write, bit for bit:

- the config (AutoConfig's steps on the GGUF metadata) and the model class, built on the meta
  device: parameter names, shapes, dtypes, tied weights, the generation config;
- GGUF -> parameter names and the per-architecture fixes of the values (Q/K un-permutation, Gemma
  norms, MoE experts fused): ``get_gguf_hf_weights_map`` and ``TENSOR_PROCESSORS``;
- what ``save_pretrained`` drops, renames and splits (``remove_tied_weights_from_state_dict``,
  ``revert_weight_conversion``: fused MoE experts are saved one tensor per expert), its shard split
  and index.

Tensors are written in safetensors' own order (dtype, then name), so the files are byte-identical
to ``save_pretrained``'s. A value saved as several tensors (a MoE layer's fused experts) stays in
memory until all of them are written.
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RelufyError
from ..families import family_for
from ..names import INDEX_FILE, dtype_choice, st_dtype_of_torch, torch_dtype_of_name

_ST_ORDER = ("F64", "F32", "BF16", "F16")  # safetensors' order of dtypes in a file (then by name)
_DEQUANT_VALUES = 1 << 22  # quantized rows are dequantized about this many values at a time


@dataclass(frozen=True)
class GgufInfo:
    """A GGUF file that ``check_gguf`` accepted."""

    path: Path
    architecture: str  # ``general.architecture`` in the file (llama.cpp's name)
    model_type: str  # the transformers model type it reads as: one of relufy's families
    tensor_count: int
    config: Any = field(repr=False, compare=False)  # the transformers config


def check_gguf(path: Path) -> GgufInfo:
    """Refuse, with a one-line ``RelufyError`` naming the file, a GGUF that cannot be converted: empty,
    not GGUF, truncated, of an architecture transformers or relufy does not support, or without all
    of the model's tensors (a vocabulary-only file). Reads metadata only."""
    return _Gguf(Path(path), "keep").info


def gguf_config_dict(path: Path) -> dict:
    """The transformers config of the GGUF at ``path`` as a dict, after the file's structure is
    checked (empty, not GGUF, truncated, no tensors: one line). Cheaper than ``check_gguf``: no
    model is built, so tensors are not matched to parameters."""
    from transformers import AutoConfig

    path = Path(path)
    reader, architecture = _open_reader(path)
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for unsupported files
        raise RelufyError(f"{path}: unsupported GGUF architecture {architecture!r} ({_first_line(e)})") from None
    _check_layers(path, config, reader)
    return config.to_dict()


def _check_layers(path: Path, config, reader) -> None:
    """The metadata's layer count against the tensor table (``blk.N.`` names), before a model of that
    many layers is built: each layer must have tensors, and no tensor may belong to a layer past the
    count (transformers would skip it and run a shorter model)."""
    from .tensor_names import GGUF_LAYER, check_layer_count

    names = [t.name for t in reader.tensors]
    declared = getattr(config, "num_hidden_layers", None)
    check_layer_count(declared, names, str(path), GGUF_LAYER, "blk.{}.", "the GGUF metadata")
    if isinstance(declared, int):
        limit = declared + (getattr(config, "num_nextn_predict_layers", 0) or 0)
        beyond = [n for n in names if (m := GGUF_LAYER.match(n)) and int(m.group(1)) >= limit]
        if beyond:
            raise RelufyError(
                f"{path}: the GGUF holds tensor {beyond[0]} of a layer past the {declared} its metadata gives "
                "(block_count); metadata and weights do not belong together"
            )


def check_gguf_structure(path: Path) -> str:
    """Refuse an empty, non-GGUF, truncated or tensorless file (metadata read only); returns its
    ``general.architecture``."""
    return _open_reader(Path(path))[1]


def write_gguf_checkpoint(
    gguf_path: Path, out_folder: Path, dtype: str = "keep", max_shard_size: int | str | None = None
) -> None:
    """Write the GGUF at ``gguf_path`` into the existing empty ``out_folder`` as a Hugging Face
    checkpoint (config, generation config, tokenizer, safetensors weights), as ``from_pretrained`` +
    ``save_pretrained(max_shard_size=...)`` would (None: its default); ``dtype``: keep (float32), bf16,
    fp16 or fp32. Checks the file first (``check_gguf``). Peak memory: about one tensor in float32 and
    its cast, whatever the model size."""
    out_folder = Path(out_folder)
    if not out_folder.is_dir() or any(out_folder.iterdir()):
        raise ValueError(f"{out_folder}: expected an existing empty folder")
    gguf = _Gguf(Path(gguf_path), dtype)
    gguf.write_config(out_folder)
    gguf.write_weights(out_folder, max_shard_size)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(gguf.path.parent, gguf_file=gguf.path.name).save_pretrained(out_folder)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open_reader(path: Path):
    """``(GGUFReader, architecture)`` of ``path``, refusing what the reader fails on with a traceback."""
    from gguf import GGUFReader

    from .read import open_regular

    with open_regular(path) as f:  # a pipe or device named *.gguf: refused, never waited on
        size = os.fstat(f.fileno()).st_size
        try:
            magic = f.read(4)
        except OSError as e:
            raise RelufyError(f"{path}: cannot read ({e.strerror or e})") from None
    if size == 0:
        raise RelufyError(f"{path}: empty file, not a GGUF model")
    if magic != b"GGUF":
        raise RelufyError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    try:
        reader = GGUFReader(path)
        architecture = reader.fields["general.architecture"].contents()
    except KeyError:
        raise RelufyError(f"{path}: corrupt GGUF file (no general.architecture in its metadata)") from None
    except Exception as e:  # noqa: BLE001 - a damaged file raises ValueError, IndexError, struct.error, ...
        raise RelufyError(f"{path}: corrupt or truncated GGUF file ({_first_line(e)})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise RelufyError(f"{path}: truncated GGUF file (tensor {t.name} ends past its {size} bytes)")
    if not reader.tensors:
        raise RelufyError(f"{path}: the GGUF holds no tensors (a vocabulary-only file?): no weights to convert")
    return reader, architecture


class _Gguf:
    """A checked GGUF file and the plan of its checkpoint: the GGUF tensors each parameter is made of,
    and the saved tensors each parameter becomes."""

    def __init__(self, path: Path, dtype: str):
        import torch
        from transformers import AutoModelForCausalLM, PreTrainedConfig
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        try:
            dtype_choice(dtype)
        except ValueError as e:
            raise RelufyError(str(e)) from None
        self.path, self.dtype = path, torch_dtype_of_name("fp32" if dtype == "keep" else dtype)  # GGUF weights come out float32
        self.reader, architecture = _open_reader(path)
        try:  # AutoConfig's steps, keeping the metadata dict from_pretrained gives the tensor processors
            raw_config, kwargs = PreTrainedConfig.get_config_dict(path.parent, gguf_file=path.name)
            config = CONFIG_MAPPING[raw_config["model_type"]].from_dict(copy.deepcopy(raw_config), **kwargs)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for unsupported files
            raise RelufyError(f"{path}: unsupported GGUF architecture {architecture!r} ({_first_line(e)})") from None
        try:
            family_for(config.model_type)
        except RelufyError as e:
            raise RelufyError(f"{path}: {e}") from None
        _check_layers(path, config, self.reader)  # before a model of that many layers is built
        try:
            with torch.device("meta"):
                self.model = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            # tied as from_pretrained ties them (transformers 5.0 leaves a model built on the meta device
            # untied, and the plan would then ask a tied GGUF for an lm_head it does not hold)
            self.model.tie_weights()
            self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=raw_config)
            self.names = get_gguf_hf_weights_map(self.model, self.processor)  # GGUF name -> parameter
        except Exception as e:  # noqa: BLE001 - as above: metadata transformers cannot build a model from
            raise RelufyError(f"{path}: transformers cannot build a model from this GGUF ({_first_line(e)})") from None
        self.info = GgufInfo(path, architecture, config.model_type, len(self.reader.tensors), config)
        self._plan()

    def _plan(self) -> None:
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        self.sources: dict[str, list] = {}  # parameter -> the GGUF tensors it is made of
        for t in self.reader.tensors:
            param = self.names.get(t.name) or self.names.get(t.name.removesuffix(".weight"))  # MoE: no suffix
            if param is not None:
                self.sources.setdefault(param, []).append(t)
        self.params = remove_tied_weights_from_state_dict(self.model.state_dict(), self.model)
        missing = [name for name in self.params if name not in self.sources]
        if missing:
            gguf_names = [g for name in missing for g, p in self.names.items() if p == name] or missing
            more = f" and {len(gguf_names) - 3} more" if len(gguf_names) > 3 else ""
            raise RelufyError(f"{self.path}: the GGUF lacks the model's tensor {', '.join(gguf_names[:3])}{more}")
        for name, meta in self.params.items():
            found = sum(int(t.n_elements) for t in self.sources[name])
            if found != meta.numel():
                gguf_names = ", ".join(t.name for t in self.sources[name])
                raise RelufyError(
                    f"{self.path}: tensor {gguf_names} holds {found} values, but the metadata implies "
                    f"{list(meta.shape)} ({math.prod(meta.shape)}) for {name}"
                )
        # the tensors save_pretrained writes (names, shapes, dtypes), and the parameter each comes from
        self.saved = revert_weight_conversion(self.model, dict(self.params))
        self.parent = {}
        for name, meta in self.params.items():
            self.parent.update(dict.fromkeys(revert_weight_conversion(self.model, {name: meta}), name))
        if self.parent.keys() != self.saved.keys():
            raise RelufyError(f"{self.path}: cannot stream this {self.info.model_type} model (saved tensors mix parameters)")

    def write_config(self, out: Path) -> None:
        """config.json and generation_config.json, as save_pretrained writes them."""
        self.model.config.dtype = str(self.model.dtype).split(".")[1]
        self.model.config.architectures = [type(self.model).__name__]
        self.model.config.save_pretrained(out)
        if self.model.can_generate():
            self.model.generation_config.save_pretrained(out)

    def write_weights(self, out: Path, max_shard_size: int | str | None = None) -> None:
        """The safetensors file(s), and the index when sharded, that save_pretrained writes."""
        import torch
        from huggingface_hub import split_torch_state_dict_into_shards
        from transformers import PreTrainedModel

        from ..progress import byte_progress
        from .shard_writer import write_safetensors

        if max_shard_size is None:
            max_shard_size = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
        split = split_torch_state_dict_into_shards(
            self.saved, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
        )
        cache: dict = {}  # saved tensors computed and not written yet

        def produce(name):
            if name not in cache:
                cache.update(self._saved_values(self.parent[name], f))
            tensor, expected = cache.pop(name), self.saved[name]
            if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                raise RelufyError(f"{self.path}: {name} came out {tensor.dtype} {list(tensor.shape)}, not as planned")
            yield memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy())
            advance(tensor.numel() * tensor.element_size())

        total = sum(t.numel() * t.element_size() for t in self.saved.values())
        with byte_progress("GGUF weights", total) as advance, open(self.path, "rb") as f:
            for filename, names in split.filename_to_tensors.items():
                entries = [(n, st_dtype_of_torch(self.saved[n].dtype), tuple(self.saved[n].shape)) for n in names]
                entries.sort(key=lambda e: (_ST_ORDER.index(e[1]), e[0]))
                write_safetensors(out / filename, entries, produce, metadata={"format": "pt"})
        if split.is_sharded:
            index = {
                "metadata": {"total_parameters": self.model.num_parameters(), **split.metadata},
                "weight_map": split.tensor_to_filename,
            }
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _saved_values(self, param: str, f) -> dict:
        """The saved tensors made from ``param``, computed the way from_pretrained then save_pretrained do."""
        import torch
        from transformers.core_model_loading import revert_weight_conversion

        parsed: dict = {"tensors": {}}  # load_gguf_checkpoint's loop, over this parameter's tensors only
        for t in self.sources[param]:
            result = self.processor.process(
                weights=self._dequantized(t, f), name=t.name, tensor_key_mapping=self.names, parsed_parameters=parsed
            )
            if result.name is not None and result.name in self.names:  # else the processor stored it (MoE)
                weights = result.weights if result.weights.flags.writeable else result.weights.copy()
                parsed["tensors"][self.names[result.name]] = torch.from_numpy(weights).to(self.dtype)
        value = parsed["tensors"].pop(param).to(self.params[param].dtype)  # the loader casts to the parameter's
        return revert_weight_conversion(self.model, {param: value})

    def _dequantized(self, t, f):
        """GGUF tensor ``t`` as float32 values: read with plain reads, quantized rows a chunk at a time
        (gguf's ``dequantize`` holds all of its chunks' results and the output at once)."""
        import numpy as np
        from gguf import GGMLQuantizationType, dequantize
        from gguf.quants import quant_shape_from_byte_shape

        raw = np.empty(t.data.shape, dtype=t.data.dtype)  # the reader's (unread) view gives shape and type
        f.seek(t.data_offset)
        if f.readinto(memoryview(raw).cast("B")) != t.n_bytes:
            raise RelufyError(f"{self.path}: unexpected end of file in tensor {t.name}")
        if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return dequantize(raw, t.tensor_type)
        if raw.dtype != np.uint8:  # integer tensors (I8 ... I64): no float weights, and gguf has no dequantize
            raise RelufyError(f"{self.path}: tensor {t.name} is stored as {t.tensor_type.name}, not a float type")
        rows = raw.reshape(-1, raw.shape[-1])
        shape = quant_shape_from_byte_shape(raw.shape, t.tensor_type)
        out = np.empty((rows.shape[0], shape[-1]), dtype=np.float32)
        step = max(1, _DEQUANT_VALUES // shape[-1])
        try:
            for start in range(0, rows.shape[0], step):
                out[start : start + step] = dequantize(rows[start : start + step], t.tensor_type)
        except NotImplementedError:
            raise RelufyError(f"{self.path}: gguf cannot dequantize {t.tensor_type.name} (tensor {t.name})") from None
        return out.reshape(shape)
