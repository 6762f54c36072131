"""``relufy info``: what a model is, from its config (parameters counted on the meta device) and
the headers of its safetensors files. A hub model is read the same way without downloading its
weights: ``config.json``, then each shard's header by range requests."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from .errors import RelufyError
from .io.block import RelufyBlock
from .io.hub import revision_field, token_field
from .names import ST_DTYPES
from .options import Options, option_field


class InfoOptions(Options):
    """How ``relufy info`` prints."""

    json_out: bool = option_field(False, flag="--json", description="Print JSON instead of a table.")
    revision: str | None = revision_field()
    token: str | None = token_field("reading gated or private models")


class WeightsInfo(BaseModel):
    """What the safetensors headers say: files, parameters (per dtype) and bytes of tensor data."""

    files: int
    params: int
    bytes: int
    dtypes: dict[str, int]


class ModelInfo(BaseModel):
    path: str
    family: str
    activation: str
    threshold: float | None = None
    layers: int
    hidden_size: int
    ffn_size: int
    routed_experts: int = 0
    shared_experts: int = 0
    experts_per_token: int = 0
    expert_ffn_size: int = 0
    params_total: int
    params_ffn: int
    relufy: dict | None = None
    weights: WeightsInfo | None = None
    revision: str | None = None


def count_parameters(family, config) -> tuple[int, int]:
    """``(total, ffn)`` parameter counts of the architecture, tied weights counted once."""
    return _architecture(family, config)[:2]


def _architecture(family, config) -> tuple[int, int, set[str]]:
    """``count_parameters`` and the module paths of the FFNs (what ``relufy.cutoffs`` names)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    ffns = {name: m for name, m in model.named_modules() if type(m).__name__ in family.ffn_classes}
    ffn = sum(p.numel() for m in ffns.values() for p in m.parameters())
    return total, ffn, set(ffns)


def _local_weights(folder: Path) -> WeightsInfo | None:
    """Headers of a local folder's safetensors files (None when it has none or they do not read)."""
    from .io.safetensors_index import Checkpoint

    try:
        ckpt = Checkpoint(folder)
    except (RelufyError, OSError):
        return None
    dtypes: dict[str, int] = {}
    for t in ckpt.tensors.values():
        dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
    size = sum(t.numel * ST_DTYPES[t.dtype].nbytes for t in ckpt.tensors.values() if t.dtype in ST_DTYPES)
    return WeightsInfo(files=len(ckpt.files), params=sum(dtypes.values()), bytes=size, dtypes=dtypes)


def _hub_weights(repo: str, revision: str | None, token: str | None) -> tuple[WeightsInfo | None, dict]:
    """What the headers of a hub model's shards say, and its tensors (name -> shape)."""
    from .io.hub import safetensors_metadata

    meta = safetensors_metadata(repo, revision, token)
    if meta is None:
        return None, {}
    dtypes: dict[str, int] = {}
    size = 0
    shapes = {}
    for file in meta.files_metadata.values():
        for name, t in file.tensors.items():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.parameter_count
            size += t.data_offsets[1] - t.data_offsets[0]
            shapes[name] = tuple(t.shape)
    info = WeightsInfo(files=len(meta.files_metadata), params=sum(dtypes.values()), bytes=size, dtypes=dtypes)
    return info, shapes


def _hub_config(repo: str, revision: str | None, token: str | None) -> tuple[dict, str | None]:
    """config.json of a hub model (one small download) and the commit it came from."""
    from .io.hub import download_file, snapshot_commit
    from .io.read import CONFIG_BYTES, JSONError, read_json

    path = download_file(repo, "config.json", revision, token)
    try:
        config = read_json(path, CONFIG_BYTES, "config.json")
    except JSONError as e:
        raise RelufyError(f"{repo}: config.json is {str(e).split(': ', 1)[-1]}") from None
    if not isinstance(config, dict):
        raise RelufyError(f"{repo}: config.json is not a JSON object")
    return config, snapshot_commit(path.parent)


def info(path: str | Path, revision: str | None = None, token: str | None = None) -> ModelInfo:
    """The facts of the model at ``path`` (folder, .gguf, hub id with an optional revision)."""
    from .io.hub import split_revision
    from .io.paths import user_path
    from .io.source import resolve
    from .modeling.spec import base_config

    local = user_path(path, "the model path").exists()
    hub = None if local else split_revision(str(path), revision)
    commit = None
    if hub is not None:  # config and headers only: never the weights
        config, commit = _hub_config(hub[0], hub[1], token)
        weights, shapes = _hub_weights(hub[0], commit or hub[1], token)
        if shapes:  # sizes the headers do not hold are refused before a skeleton is built
            from .modeling.weights import check_weights

            check_weights(config, shapes, hub[0])
    else:
        source = resolve(path, revision, token)
        from .modeling.weights import checked_config

        config = checked_config(source)
        weights = None if source.gguf_file else _local_weights(source.folder)
    block = RelufyBlock.read(config, str(path))
    family, cfg = base_config(config)
    total, ffn, ffn_names = _architecture(family, cfg)
    unknown = sorted(set(block.cutoffs) - ffn_names) if block else []
    if unknown:  # as relufy.load refuses them
        raise RelufyError(
            f"{path}: config.json: the relufy block's cutoffs name {len(unknown)} module(s) that are not FFNs "
            f"of this model, e.g. {unknown[0]!r}"
        )
    moe = {}
    if family.is_moe:
        moe = dict(
            routed_experts=family.routed_experts(cfg),
            shared_experts=family.shared_experts(cfg),
            experts_per_token=family.top_k(cfg),
            expert_ffn_size=family.moe_ffn_size(cfg),
        )
    return ModelInfo(
        path=str(path),
        family=family.model_type,
        activation=block.activation if block else "swiglu",
        threshold=block.threshold if block else None,
        layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        ffn_size=cfg.intermediate_size,
        params_total=total,
        params_ffn=ffn,
        relufy=config.get("relufy"),
        weights=weights,
        revision=commit,
        **moe,
    )


def show(path: str, options: InfoOptions) -> ModelInfo:
    """``relufy info``: the model's facts as a table (or JSON) on stdout."""
    import json

    result = info(path, options.revision, options.token)
    if options.json_out:
        print(json.dumps(result.model_dump(), indent=2))
        return result
    from rich.table import Table

    from .progress import show_table

    table = Table(show_header=False, title=str(path))
    rows = [
        ("family", result.family),
        ("activation", result.activation + (f" (T={result.threshold})" if result.threshold is not None else "")),
        ("layers", result.layers),
        ("hidden / FFN", f"{result.hidden_size} / {result.ffn_size}"),
    ]
    if result.routed_experts:
        rows += [
            ("experts", f"{result.routed_experts} routed, {result.shared_experts} shared, top-{result.experts_per_token}"),
            ("expert FFN", result.expert_ffn_size),
        ]
    rows += [
        ("parameters", f"{result.params_total:,}"),
        ("FFN parameters", f"{result.params_ffn:,} ({result.params_ffn / result.params_total:.1%})"),
    ]
    if result.weights:
        w = result.weights
        dtypes = ", ".join(f"{k} {v:,}" for k, v in sorted(w.dtypes.items()))
        rows.append(("weights", f"{w.params:,} parameters in {w.files} safetensors file(s), {w.bytes:,} bytes ({dtypes})"))
    if result.revision:
        rows.append(("revision", result.revision))
    if result.relufy:
        rows += [(f"relufy.{k}", _shown(k, v)) for k, v in result.relufy.items() if k not in ("activation", "threshold")]
    for k, v in rows:
        table.add_row(k, str(v))
    show_table(table)
    return result


def _shown(key: str, value):
    """A relufy block entry as the table shows it: the cutoffs (one per FFN) summed up."""
    if key == "cutoffs" and isinstance(value, dict) and value:
        return f"{len(value)} FFN(s), magnitude {min(value.values()):.3g} to {max(value.values()):.3g}"
    return value
