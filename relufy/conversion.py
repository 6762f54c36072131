"""``relufy convert``: SwiGLU checkpoint -> dReLU (or another gated ReLU) checkpoint.

The weights do not change: only the activation does. So conversion is a copy of the shards
(at disk speed, or hard links with ``link``) plus a new ``config.json``, the remote modeling
code and a model card. With a ``dtype`` change the shards are re-encoded one tensor at a time.
Input is validated (headers, index, FFN and embedding shapes, layer and expert counts against the
config: ``relufy.modeling.weights.check_counts``) before anything is written, and output appears
only when complete (``relufy.io.atomic``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from .errors import RelufyError
from .families import Family, family_for, ffn_tensor
from .io.atomic import atomic_dir, check_free_space, scratch_dir
from .io.hub import HubPush, PushOptions, check_push, check_revision, push_folder, revision_field
from .io.paths import check_output_dir
from .io.safetensors_index import DTYPE_BYTES, Checkpoint
from .io.shard_writer import copy_file, recoded_chunks, write_safetensors
from .io.source import Source, resolve
from .modeling.card import model_card
from .modeling.remote import base_config_dict, relufy_config_dict, render_modeling
from .modeling.spec import ActivationSpec, ConfigView, activation_spec, check_sizes
from .modeling.weights import check_counts
from .names import ACTIVATIONS, DTYPES, INDEX_FILE, MODELING_FILE, is_identity
from .options import option_field
from .progress import byte_progress

_FLOAT_ST = {"F64", "F32", "F16", "BF16"}


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
    if dtype not in DTYPES:
        return ckpt.nbytes
    target = DTYPES[dtype][0]
    return sum(t.numel * DTYPE_BYTES[target] if t.dtype in _FLOAT_ST else t.nbytes for t in ckpt.tensors.values())


def _write_weights(ckpt: Checkpoint, out: Path, dtype: str, link: bool) -> None:
    target = DTYPES[dtype][0] if dtype in DTYPES else None
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
                yield from recoded_chunks(info, target if info.dtype in _FLOAT_ST else info.dtype)
                advance(info.nbytes)

            metadata = ckpt.metadata[path.name] or {"format": "pt"}
            tensor_bytes += write_safetensors(out / path.name, entries, produce, metadata=metadata)
    if ckpt.index is not None:
        index = {"metadata": {"total_size": tensor_bytes}, "weight_map": ckpt.index}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ConvertOptions(PushOptions):
    """How ``relufy convert`` writes OUT."""

    activation: Literal[ACTIVATIONS] = option_field(
        "drelu",
        description="Gated activation to convert to: drelu relu(gate)*relu(up); reglu relu(gate)*up; relu2 "
        "relu(gate)^2*up; fatrelu gate below --threshold -> 0, times up; swiglu keeps the original (a baseline).",
    )
    threshold: float | None = option_field(None, description="FATReLU threshold T >= 0 (fatrelu only).")
    dtype: Literal[("keep", *DTYPES)] = option_field("keep", description="Weight dtype of OUT (keep: the source's own).")
    force: bool = option_field(False, description="Replace an existing OUT (never an input: SRC, or a folder around it).")
    link: bool = option_field(False, description="Hard-link unchanged shards instead of copying them.")
    revision: str | None = revision_field()

    @field_validator("revision")
    @classmethod
    def _revision(cls, value):
        return check_revision(value)


def convert(
    src: str | Path,
    out: str | Path,
    activation: str = "drelu",
    threshold: float | None = None,
    dtype: str = "keep",
    force: bool = False,
    link: bool = False,
    revision: str | None = None,
    token: str | None = None,
    push_to_hub: str | None = None,
    public: bool = False,
    hub_revision: str | None = None,
) -> Path:
    """Convert the model at ``src`` (folder, .gguf, hub id) and write it to ``out`` (``ConvertOptions``
    says what each argument does). ``out`` may not be ``src``, lie inside it or contain it (paths
    compared resolved), so ``force`` can never delete the source. With ``push_to_hub`` the finished
    folder is then uploaded (``relufy.io.hub.push_folder``)."""
    options = ConvertOptions.build(
        activation=activation,
        threshold=threshold,
        dtype=dtype,
        force=force,
        link=link,
        revision=revision,
        token=token,
        push_to_hub=push_to_hub,
        public=public,
        hub_revision=hub_revision,
    )
    spec = activation_spec(options.activation, options.threshold)
    push = HubPush.of(options)
    check_push(push)  # no token: refused before any work
    check_output_dir(out, force)  # before a hub download
    source = resolve(src, options.revision, options.token)
    inputs = source.inputs()
    out = check_output_dir(out, force, inputs)
    if source.gguf_file:
        _convert_gguf(source, out, spec, dtype, force)
    else:
        plan = _plan_folder(source, spec, dtype, label=source.label)
        if not link:
            check_free_space(out, _output_bytes(plan["ckpt"], dtype))
        with atomic_dir(out, force, inputs) as tmp:
            _write_folder(plan, tmp, link)
    if push is not None:  # OUT is complete: a failed push leaves it as written
        push_folder(out, push, f"relufy convert: {spec.activation} conversion of {source.label}")
    return out


def _plan_folder(source: Source, spec: ActivationSpec, dtype: str, label: str) -> dict:
    """Everything about the conversion that can fail, checked before anything is written."""
    config = source.config_dict()
    family = family_for(base_config_dict(config).get("model_type"))
    check_sizes(family, base_config_dict(config))
    cfg = ConfigView(config)
    ckpt = Checkpoint(source.folder)
    found = validate_checkpoint(ckpt, family, cfg)
    # the layers and experts against the weights, both ways (torch-free: a plain copy imports neither
    # torch nor transformers; every other tensor is checked where a model is built or loaded)
    check_counts(config, {n: t.shape for n, t in ckpt.loaded_tensors().items()}, source.where)
    new = relufy_config_dict(base_config_dict(config), family, spec.activation, spec.threshold, label, source.provenance())
    if dtype != "keep":
        new["dtype"] = DTYPES[dtype][1]
        new.pop("torch_dtype", None)
    return dict(
        source=source,
        spec=spec,
        dtype=dtype,
        label=label,
        family=family,
        ckpt=ckpt,
        found=found,
        config=new,
        side_files=source.side_files(),
    )


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
            plan = _plan_folder(dataclasses.replace(source, folder=scratch, gguf_file=None), spec, "keep", label=source.label)
            _write_folder(plan, tmp, link=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return out
