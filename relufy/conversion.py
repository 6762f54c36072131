"""``relufy convert``: SwiGLU checkpoint -> dReLU (or another gated ReLU) checkpoint.

The weights do not change: only the activation does. So conversion is a copy of the shards
(at disk speed, or hard links with ``link``) plus a new ``config.json``, the remote modeling
code and a model card. With a ``dtype`` change the shards are re-encoded one tensor at a time.
Input is validated (headers, index, FFN shapes against the config) before anything is written,
and output appears only when complete (``relufy.io.atomic``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import RelufyError
from .families import Family, family_for, ffn_tensor
from .io.atomic import atomic_dir, check_free_space, scratch_dir
from .io.safetensors_index import DTYPE_BYTES, INDEX_FILE, Checkpoint
from .io.shard_writer import copy_file, recoded_chunks, write_safetensors
from .io.paths import check_output_dir
from .io.source import Source, resolve
from .modeling.remote import MODELING_FILE, base_config_dict, is_identity, relufy_config_dict, render_modeling
from .progress import byte_progress

# The names of relufy.activations.GATED_ACTIVATIONS, without importing torch (tested equal).
ACTIVATION_NAMES = ("drelu", "reglu", "relu2", "fatrelu", "swiglu")
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_CONFIG_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_FLOAT_ST = {"F64", "F32", "F16", "BF16"}


class ActivationSpec(BaseModel):
    """The gated activation a model is converted to."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    activation: str = Field(
        "drelu",
        description="drelu: relu(gate)*relu(up); reglu: relu(gate)*up; relu2: relu(gate)^2*up; "
        "fatrelu: gate below `threshold` -> 0, times up; swiglu: keep the original (identity).",
    )
    threshold: float | None = Field(None, description="FATReLU threshold T >= 0 (fatrelu only).")

    @model_validator(mode="after")
    def _check(self):
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"unknown activation {self.activation!r}; choose from {', '.join(ACTIVATION_NAMES)}")
        if self.activation == "fatrelu" and self.threshold is None:
            raise ValueError("fatrelu needs a threshold (--threshold T)")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise ValueError(f"the fatrelu threshold must be a finite number, got {self.threshold}")
        if self.activation == "fatrelu" and self.threshold < 0:
            raise ValueError(f"fatrelu threshold must be >= 0, got {self.threshold}")
        if self.activation != "fatrelu" and self.threshold is not None:
            raise ValueError(f"--threshold applies to fatrelu only, not {self.activation}")
        return self


def activation_spec(activation: str, threshold: float | None) -> ActivationSpec:
    try:
        return ActivationSpec(activation=activation, threshold=threshold)
    except ValidationError as e:
        raise RelufyError(e.errors()[0]["msg"].removeprefix("Value error, ")) from None


def base_config(config: dict):
    """``(family, transformers config)`` of a config dict, relufy checkpoints included."""
    import importlib

    base = base_config_dict(config)
    family = family_for(base.get("model_type"))
    module, name = family.config_import
    try:
        config = getattr(importlib.import_module(module), name).from_dict(base)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad configs
        raise RelufyError(f"config.json is not a valid {family.model_type} config: {e}") from None
    check_sizes(family, {key: getattr(config, key, None) for key in _POSITIVE})
    return family, config


def check_sizes(family: Family, config: dict) -> None:
    """The fields that size the model must be positive whole numbers (or absent)."""
    for key in _POSITIVE:
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise RelufyError(f"config.json is not a valid {family.model_type} config: {key} must be a positive whole number, got {value!r}")


# config fields that size the model: a zero or negative value fails deep inside transformers
_POSITIVE = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings")  # fmt: skip


class ConfigView:
    """Attribute access to a config dict; a field the file leaves out (so its default applies)
    is read from the transformers config class. Checkpoints written by transformers list every
    field, so the common case never imports transformers (and torch): a plain copy stays fast."""

    def __init__(self, config: dict):
        self._dict = base_config_dict(config)
        self._full = None
        self._source = config

    def __getattr__(self, name):
        if name in self._dict:
            return self._dict[name]
        if self._full is None:
            self._full = base_config(self._source)[1]
        return getattr(self._full, name)


def validate_checkpoint(ckpt: Checkpoint, family: Family, config) -> int:
    """Check FFN and embedding shapes against the config; returns the number of FFN tensors."""
    found = 0
    for t in ckpt.tensors.values():
        expected = None
        hit = ffn_tensor(family, t.name, config)
        if hit:
            found += 1
            expected = hit[1]
        elif t.name.endswith("embed_tokens.weight"):
            expected = (config.vocab_size, config.hidden_size)
        if expected is not None and t.shape != expected:
            raise RelufyError(
                f"{t.file.name}: tensor {t.name} has shape {list(t.shape)}, but config.json implies {list(expected)}"
            )
    if found == 0:
        raise RelufyError(f"{ckpt.folder}: no {family.model_type} FFN weights found in the safetensors files")
    return found


def _output_bytes(ckpt: Checkpoint, dtype: str) -> int:
    """Bytes of tensor data the weights take at ``dtype`` (headers aside)."""
    target = DTYPES.get(dtype)
    if target is None:
        return ckpt.nbytes
    return sum(t.numel * DTYPE_BYTES[target] if t.dtype in _FLOAT_ST else t.nbytes for t in ckpt.tensors.values())


def _write_weights(ckpt: Checkpoint, out: Path, dtype: str, link: bool) -> None:
    target = DTYPES.get(dtype)
    recode = target is not None and any(t.dtype in _FLOAT_ST and t.dtype != target for t in ckpt.tensors.values())
    tensor_bytes = 0
    with byte_progress("weights", ckpt.nbytes) as advance:
        for path in ckpt.files:
            tensors = ckpt.tensors_in(path)
            if not recode:
                copy_file(path, out / path.name, link=link)
                advance(path.stat().st_size)
                tensor_bytes += sum(t.nbytes for t in tensors)
                continue
            by_name = {t.name: t for t in tensors}
            entries = [(t.name, target if t.dtype in _FLOAT_ST else t.dtype, t.shape) for t in tensors]

            def produce(name, by_name=by_name):
                info = by_name[name]
                for chunk in recoded_chunks(info, target if info.dtype in _FLOAT_ST else info.dtype):
                    yield chunk
                advance(info.nbytes)

            metadata = ckpt.metadata[path.name] or {"format": "pt"}
            tensor_bytes += write_safetensors(out / path.name, entries, produce, metadata=metadata)
    if ckpt.index is not None:
        index = {"metadata": {"total_size": tensor_bytes}, "weight_map": ckpt.index}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def model_card(config: dict, family: Family, spec: ActivationSpec, source: str, found: int) -> str:
    formula = {
        "drelu": "down(relu(x W_gate) * relu(x W_up))",
        "reglu": "down(relu(x W_gate) * (x W_up))",
        "relu2": "down(relu(x W_gate)^2 * (x W_up))",
        "fatrelu": f"down(fatrelu_T(x W_gate) * (x W_up)), T = {spec.threshold}",
        "swiglu": "unchanged (identity conversion, a baseline)",
    }[spec.activation]
    load = (
        "AutoModelForCausalLM.from_pretrained(path)"
        if is_identity(spec.activation)
        else "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # or relufy.load(path)"
    )
    return f"""---
library_name: transformers
tags: [relufy, {spec.activation}, sparse-activation]
---
# {spec.activation} conversion of `{source}`

Converted by relufy {config["relufy"]["relufy_version"]} (Turbo Sparse, arXiv 2406.05955).

- Family: `{family.model_type}`{f", {found} FFN weight tensors" if found else ""}
- FFN: {formula}
- Weights: the original weights, unchanged{" (dtype " + str(config.get("dtype")) + ")" if config.get("dtype") else ""}

A freshly converted model is not yet useful: the activation changed under weights trained for
SwiGLU, so perplexity is very high until the model is trained further (`relufy train`).

```python
from transformers import AutoModelForCausalLM
model = {load}
```

Loading without `trust_remote_code` fails on purpose: the original architecture would compute
SwiGLU with these weights. The `relufy` block of `config.json` records the conversion.
"""


def convert(
    src: str | Path,
    out: str | Path,
    activation: str = "drelu",
    threshold: float | None = None,
    dtype: str = "keep",
    force: bool = False,
    link: bool = False,
) -> Path:
    """Convert the model at ``src`` (folder, .gguf, hub id) and write it to ``out``.

    ``out`` may not be ``src``, lie inside it or contain it (paths compared resolved), so
    ``force`` can never delete the source."""
    spec = activation_spec(activation, threshold)
    if dtype != "keep" and dtype not in DTYPES:
        raise RelufyError(f"unknown dtype {dtype!r}; choose from keep, {', '.join(DTYPES)}")
    check_output_dir(out, force)  # before a hub download
    source = resolve(src)
    inputs = source.inputs()
    out = check_output_dir(out, force, inputs)
    if source.gguf_file:
        return _convert_gguf(source, out, spec, dtype, force)
    plan = _plan_folder(source, spec, dtype, label=source.label)
    if not link:
        check_free_space(out, _output_bytes(plan["ckpt"], dtype))
    with atomic_dir(out, force, inputs) as tmp:
        _write_folder(plan, tmp, link)
    return out


def _plan_folder(source: Source, spec: ActivationSpec, dtype: str, label: str) -> dict:
    """Everything about the conversion that can fail, checked before anything is written."""
    config = source.config_dict()
    family = family_for(base_config_dict(config).get("model_type"))
    check_sizes(family, base_config_dict(config))
    cfg = ConfigView(config)
    ckpt = Checkpoint(source.folder)
    found = validate_checkpoint(ckpt, family, cfg)
    new = relufy_config_dict(base_config_dict(config), family, spec.activation, spec.threshold, label)
    if dtype != "keep":
        new["dtype"] = _CONFIG_DTYPE[dtype]
        new.pop("torch_dtype", None)
    return dict(source=source, spec=spec, dtype=dtype, label=label, family=family, ckpt=ckpt, found=found, config=new,
                side_files=source.side_files())  # fmt: skip


def _write_folder(plan: dict, tmp: Path, link: bool) -> None:
    family, spec = plan["family"], plan["spec"]
    _write_weights(plan["ckpt"], tmp, plan["dtype"], link)
    for path in plan["side_files"]:
        copy_file(path, tmp / path.name)
    (tmp / "config.json").write_text(json.dumps(plan["config"], indent=2, sort_keys=True) + "\n")
    if not is_identity(spec.activation):
        (tmp / MODELING_FILE).write_text(render_modeling(family))
    (tmp / "README.md").write_text(model_card(plan["config"], family, spec, plan["label"], plan["found"]))


def _convert_gguf(source: Source, out: Path, spec: ActivationSpec, dtype: str, force: bool) -> Path:
    """Stream the GGUF into a scratch checkpoint (``relufy.io.gguf``: one tensor in memory at a
    time), then convert that, hard-linking its shards."""
    from .io.gguf import write_gguf_checkpoint

    with atomic_dir(out, force, source.inputs()) as tmp:
        scratch = scratch_dir(out, "gguf")
        try:
            write_gguf_checkpoint(source.folder / source.gguf_file, scratch, dtype)  # checks the file first
            plan = _plan_folder(Source(scratch, source.label), spec, "keep", label=source.label)
            _write_folder(plan, tmp, link=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out
