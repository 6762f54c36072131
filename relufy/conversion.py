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

from .errors import RelufyError, notice
from .families import Family, family_for, ffn_tensor
from .io.atomic import atomic_dir, check_free_space, scratch_dir
from .io.block import RelufyBlock
from .io.hub import HubPush, PushOptions, check_push, check_revision, push_folder, revision_field
from .io.paths import check_output_dir
from .io.safetensors_index import Checkpoint
from .io.shard_writer import copy_file, recoded_chunks, write_safetensors
from .io.source import Source, resolve
from .modeling.card import model_card
from .modeling.formats import FORMAT_TYPES, describe, recognise
from .modeling.remote import base_config_dict, relufy_config_dict, render_modeling
from .modeling.spec import ActivationSpec, ConfigView, activation_spec, check_sizes
from .modeling.weights import check_counts
from .names import ACTIVATIONS, FLOAT_ST_DTYPES, INDEX_FILE, MODELING_FILE, ST_DTYPES, USER_DTYPES, is_identity
from .options import option_field
from .progress import byte_progress


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
    if dtype not in USER_DTYPES:
        return ckpt.nbytes
    size = ST_DTYPES[USER_DTYPES[dtype]].nbytes
    return sum(t.numel * size if t.dtype in FLOAT_ST_DTYPES else t.nbytes for t in ckpt.tensors.values())


def _write_weights(ckpt: Checkpoint, out: Path, dtype: str, link: bool) -> None:
    target = USER_DTYPES.get(dtype)
    recode = target is not None and any(t.dtype in FLOAT_ST_DTYPES and t.dtype != target for t in ckpt.tensors.values())
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
            entries = [(t.name, target if t.dtype in FLOAT_ST_DTYPES else t.dtype, t.shape) for t in tensors]

            def produce(name, by_name=by_name):
                info = by_name[name]
                yield from recoded_chunks(info, target if info.dtype in FLOAT_ST_DTYPES else info.dtype)
                advance(info.nbytes)

            metadata = ckpt.metadata[path.name] or {"format": "pt"}
            tensor_bytes += write_safetensors(out / path.name, entries, produce, metadata=metadata)
    if ckpt.index is not None:
        index = {"metadata": {"total_size": tensor_bytes}, "weight_map": ckpt.index}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class ConvertOptions(PushOptions):
    """How ``relufy convert`` writes OUT."""

    activation: Literal[ACTIVATIONS] | None = option_field(
        None,
        description="Gated activation to convert to: drelu relu(gate)*relu(up); reglu relu(gate)*up; relu2 "
        "relu(gate)^2*up; fatrelu gate below --threshold -> 0, times up; swiglu keeps the original (a baseline). "
        "Default: drelu, or for a model that is ReLU-family already (ReluLLaMA, ProSparse, Bamboo) its own function.",
    )
    threshold: float | None = option_field(None, description="FATReLU threshold T >= 0 (fatrelu only).")
    dtype: Literal[("keep", *USER_DTYPES)] = option_field("keep", description="Weight dtype of OUT (keep: the source's own).")
    force: bool = option_field(False, description="Replace an existing OUT (never an input: SRC, or a folder around it).")
    link: bool = option_field(False, description="Hard-link unchanged shards instead of copying them.")
    revision: str | None = revision_field()

    @field_validator("revision")
    @classmethod
    def _revision(cls, value):
        return check_revision(value)


def convert(src: str | Path, out: str | Path, options: ConvertOptions | None = None, **overrides) -> Path:
    """Convert the model at ``src`` (folder, .gguf, hub id) and write it to ``out``, as ``options``
    say (``ConvertOptions``: what each field does); or, instead of ``options``, its fields as
    keywords (``convert(src, out, activation="reglu")``), the rest at their defaults. ``out`` may not
    be ``src``, lie inside it or contain it (paths compared resolved), so ``force`` can never delete
    the source. With ``push_to_hub`` the finished folder is then uploaded (``relufy.io.hub.push_folder``)."""
    options = _options_of(options, overrides)
    if options.activation is not None:
        activation_spec(options.activation, options.threshold)  # a bad pair: refused before any work
    elif options.threshold is not None:
        raise RelufyError("--threshold applies to fatrelu only: add --activation fatrelu")
    push = HubPush.of(options)
    check_push(push)  # no token: refused before any work
    check_output_dir(out, options.force)  # before a hub download
    source = resolve(src, options.revision, options.token)
    inputs = source.inputs()
    out = check_output_dir(out, options.force, inputs)
    if source.gguf_file:
        spec = _convert_gguf(source, out, options)
    else:
        plan = _plan_folder(source, options, label=source.label)
        spec = plan["spec"]
        if not options.link:
            check_free_space(out, _output_bytes(plan["ckpt"], options.dtype))
        with atomic_dir(out, options.force, inputs) as tmp:
            _write_folder(plan, tmp, options.link)
    if push is not None:  # OUT is complete: a failed push leaves it as written
        push_folder(out, push, f"relufy convert: {spec.activation} conversion of {source.label}")
    return out


def _options_of(options: ConvertOptions | None, overrides: dict) -> ConvertOptions:
    """``options`` as given, or built from keyword ``overrides`` (refused: both at once, or a keyword
    that is no option, as Python refuses an unknown keyword)."""
    unknown = sorted(set(overrides) - set(ConvertOptions.model_fields))
    if unknown:
        raise TypeError(f"convert() got an unexpected keyword argument {unknown[0]!r}")
    if options is None:
        return ConvertOptions.build(**overrides)
    if not isinstance(options, ConvertOptions):
        raise TypeError(f"convert() takes its options as a ConvertOptions, not {type(options).__name__}: name them as keywords")
    if overrides:
        raise TypeError("convert() takes a ConvertOptions or options as keywords, not both")
    return options


def target_spec(
    options: ConvertOptions, current: tuple[str, float | None] | None, what: str, where: str
) -> tuple[ActivationSpec, str | None]:
    """The activation OUT gets: ``--activation`` when given, else the source's own function
    (``current``: a ReLU-family source's activation and threshold, described by ``what``), else
    dReLU; and the line that says so when a ReLU-family source's function is kept or changed."""
    if current is None:
        return activation_spec(options.activation or "drelu", options.threshold), None
    if options.activation is None:
        kept = f"{where}: {what}; kept as {describe(*current)}, the function it computes (--activation changes it)"
        return activation_spec(*current), kept
    if is_identity(options.activation):
        raise RelufyError(
            f"{where}: {what} already; --activation swiglu keeps a SwiGLU model as it is: leave --activation out to keep "
            "its function, or name the ReLU-family activation to convert to"
        )
    spec = activation_spec(options.activation, options.threshold)
    if (spec.activation, spec.threshold) == tuple(current):
        return spec, None
    return spec, (
        f"{where}: {what}; converted to {describe(spec.activation, spec.threshold)}, so OUT computes another function "
        "than the source (recover its quality with relufy train)"
    )


def _plan_folder(source: Source, options: ConvertOptions, label: str) -> dict:
    """Everything about the conversion that can fail, checked before anything is written."""
    dtype = options.dtype
    config = source.config_dict()
    block = RelufyBlock.read(config, source.where)
    if block is None and config.get("model_type") not in FORMAT_TYPES:
        family_for(config.get("model_type"))  # an unsupported family: refused before the weights are read
    ckpt = Checkpoint(source.folder)
    tensors = {n: t.shape for n, t in ckpt.loaded_tensors().items()}
    found = recognise(config, tensors, source.where)
    if found is not None:
        if not found.exact and options.activation is None:
            raise RelufyError(
                f"{source.where}: {found.why}; --activation {found.activation} converts it to the dense "
                f"{describe(found.activation, None)} model those predictors approximate (their tensors are then left unused)"
            )
        current, what, base, family = (found.activation, found.threshold), found.format, found.base, found.family
        extra = {"source_format": found.format}
    elif block is not None:
        current, what = (block.activation, block.threshold), f"a relufy {describe(block.activation, block.threshold)} checkpoint"
        base, family, extra = base_config_dict(config), family_for(block.base_model_type), {}
        if is_identity(block.activation):
            current = None  # a baseline relufy wrote: converted as the SwiGLU model it is
    else:
        current, what, base, extra = None, "", base_config_dict(config), {}
        family = family_for(base.get("model_type"))
    spec, message = target_spec(options, current, what, source.where)
    kept = current is not None and (spec.activation, spec.threshold) == tuple(current)
    if found is not None and not found.exact and kept:
        kept, message = (
            False,
            (
                f"{source.where}: {found.format}; converted to the dense {describe(spec.activation, spec.threshold)} model, "
                "its embedded predictors left unused (relufy export --predictors trains new ones)"
            ),
        )
    if block is not None and block.cutoffs and (block.activation, block.threshold) == (spec.activation, spec.threshold):
        extra["cutoffs"] = dict(block.cutoffs)  # the same function: its calibrated cutoffs stay
    check_sizes(family, base)
    ckpt_found = validate_checkpoint(ckpt, family, ConfigView(base))
    # the layers and experts against the weights, both ways (torch-free: a plain copy imports neither
    # torch nor transformers; every other tensor is checked where a model is built or loaded)
    check_counts(base, tensors, source.where)
    new = relufy_config_dict(base, family, spec.activation, spec.threshold, label, {**source.provenance(), **extra})
    if dtype != "keep":
        new["dtype"] = ST_DTYPES[USER_DTYPES[dtype]].torch
        new.pop("torch_dtype", None)
    if message:
        notice(message)
    return dict(
        source=source,
        spec=spec,
        kept=kept,
        dtype=dtype,
        label=label,
        family=family,
        ckpt=ckpt,
        found=ckpt_found,
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
    (tmp / "README.md").write_text(model_card(plan["config"], family, spec, plan["label"], plan["found"], plan["kept"]))


def _convert_gguf(source: Source, out: Path, options: ConvertOptions) -> ActivationSpec:
    """Stream the GGUF into a scratch checkpoint (``relufy.io.gguf``: one tensor in memory at a
    time), then convert that, hard-linking its shards."""
    from .io.gguf import write_gguf_checkpoint

    with atomic_dir(out, options.force, source.inputs()) as tmp:
        scratch = scratch_dir(out, "gguf")
        try:
            write_gguf_checkpoint(source.folder / source.gguf_file, scratch, options.dtype)  # checks the file first
            scratch_source = dataclasses.replace(source, folder=scratch, gguf_file=None)
            scratch_options = options.model_copy(update={"dtype": "keep"})  # the scratch checkpoint has OUT's dtype already
            plan = _plan_folder(scratch_source, scratch_options, label=source.label)
            _write_folder(plan, tmp, link=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return plan["spec"]
