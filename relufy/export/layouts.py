"""What ``relufy export`` writes: the ``hf`` and ``powerinfer`` layouts (docs/formats.md).

Both layouts carry ``sparsity.safetensors``: a relufy stats file (``relufy.measure.stats``:
``layers.{L}.{kind}.counts`` / ``.tokens``, in the exported neuron order) plus, per site,
``.frequency`` (float32 ``[experts, width]``, counts / tokens), ``.permutation`` (int64
``[experts, width]``, exported neuron j = original neuron ``permutation[j]``; the identity
without ``--reorder``) and, with predictors, ``.predictor_rank`` (int64 ``[experts]``); metadata
adds ``predictor_threshold`` and ``predictor_input``.

``hf``: ``relufy convert``'s format (safetensors shards, relufy ``config.json`` whose ``relufy``
block gains an ``export`` entry, ``modeling_relufy.py``) plus ``predictors.safetensors`` listed in
``model.safetensors.index.json``: ``{ffn}.predictor.fc1.weight`` ``[rank, hidden]`` and
``{ffn}.predictor.fc2.weight`` ``[width, rank]``, ``{ffn}`` the FFN's module path
(``model.layers.3.mlp``; ``model.layers.3.mlp.experts.{E}`` per expert;
``model.layers.3.mlp.shared_expert(s)``).

``powerinfer`` (dense Llama/Mistral dReLU): the model folder PowerInfer's ``convert.py`` reads
(bamboo config, explicit ``lm_head.weight``, ``vocab.json`` + ``merges.txt`` for BPE vocabularies),
``predictor/model_{i}.pt`` (fp16 ``fc1.weight`` / ``fc2.weight``) with ``predictor/config.json``
``{"sparse_threshold": T}``, and ``activation/activation_{i}.pt`` (float32 per-neuron activation
counts). MoE models, for which no engine format exists yet, get the ``hf`` model folder and the
same files per expert: ``predictor/model_{i}.expert_{e}.pt``, ``predictor/model_{i}.shared.pt``,
``activation/activation_{i}.expert_{e}.pt``, ``activation/activation_{i}.shared.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..modeling.remote import base_config_dict
from ..names import INDEX_FILE, MODELING_FILE, PREDICTORS_FILE, SPARSITY_FILE, dtype_of_config, torch_dtype


def target_dtype(option: str, config: dict) -> torch.dtype:
    """The torch dtype of OUT: ``option``, or with ``keep`` the one config.json records."""
    return torch_dtype(dtype_of_config(config) if option == "keep" else option)


def predictor_prefix(site, expert: int) -> str:
    return f"{site.name}.{expert}" if site.routed else site.name


def _file_stem(site, expert: int) -> str:
    """``{layer}`` dense, ``{layer}.expert_{e}`` routed, ``{layer}.shared`` shared expert(s)."""
    if site.routed:
        return f"{site.layer}.expert_{expert}"
    return f"{site.layer}.shared" if site.kind == "shared" else f"{site.layer}"


def write_sparsity(path: Path, stats, perms: dict, predictors: dict, options) -> None:
    """``stats`` saved as a stats file, plus frequencies, permutations and predictor ranks."""
    extra = {}
    for site, (counts, tokens) in stats.sites.items():
        key = f"layers.{site.layer}.{site.kind}"
        extra[f"{key}.frequency"] = (counts.double() / tokens.clamp_min(1).double()[:, None]).float()
        perm = perms.get(site)
        extra[f"{key}.permutation"] = (
            (perm if perm is not None else torch.arange(site.width).expand(site.experts, -1)).contiguous().long()
        )
        if predictors:
            extra[f"{key}.predictor_rank"] = torch.tensor(
                [predictors[(site, e)].fc1.weight.shape[0] for e in range(site.experts)]
            )
    meta = {"predictor_threshold": options.predictor_threshold, "predictor_input": options.predictor_input} if predictors else {}
    stats.save(path, extra, meta)


def _export_block(options, result) -> dict:
    block = {
        "layout": options.layout,
        "reordered": result.reordered,
        "sparsity": {"overall": result.sparsity["overall"], "per_layer": result.sparsity["per_layer"]},
        "sparsity_file": SPARSITY_FILE,
    }
    if result.predictors:
        recalls = [p["recall"] for p in result.predictors if "recall" in p]
        block["predictors"] = {
            "input": options.predictor_input,
            "threshold": options.predictor_threshold,
            "mean_recall": sum(recalls) / len(recalls) if recalls else None,
            "heldout_ppl_dense": result.ppl_dense,
            "heldout_ppl_predicted": result.ppl_predicted,
            "heldout_top1_agreement": result.top1_agreement,
        }
    return block


def _write_hf_predictors(tmp: Path, predictors: dict, dtype) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for (site, e), p in predictors.items():
        prefix = predictor_prefix(site, e)
        tensors[f"{prefix}.predictor.fc1.weight"] = p.fc1.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.predictor.fc2.weight"] = p.fc2.weight.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(tmp / PREDICTORS_FILE), metadata={"format": "pt"})
    index_path = tmp / INDEX_FILE
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:  # one shard: make the index that lists both files
        from safetensors import safe_open

        with safe_open(str(tmp / "model.safetensors"), "pt") as f:
            names = list(f.keys())
        index = {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")}
    index["weight_map"].update(dict.fromkeys(tensors, PREDICTORS_FILE))
    index["metadata"]["total_size"] = sum((tmp / f).stat().st_size for f in set(index["weight_map"].values()))
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_bpe_files(tmp: Path) -> None:
    """``vocab.json`` + ``merges.txt`` from ``tokenizer.json`` for a BPE vocabulary (PowerInfer's
    gguf writer reads merges only from ``merges.txt``)."""
    path = tmp / "tokenizer.json"
    if not path.exists() or (tmp / "tokenizer.model").exists():
        return
    model = json.loads(path.read_text()).get("model", {})
    if model.get("type") != "BPE":
        return
    if not (tmp / "vocab.json").exists():
        (tmp / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    if not (tmp / "merges.txt").exists():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _powerinfer_config(written: dict, arch: str) -> dict:
    """The config PowerInfer's converter reads for ``arch`` (bamboo: a dReLU Llama) from the saved
    relufy config."""
    base = base_config_dict(written)
    rope = base.pop("rope_parameters", None) or {}
    out = {k: v for k, v in base.items() if k not in ("auto_map",)}
    out.update(model_type=arch, architectures=[f"{arch.capitalize()}ForCausalLM"], hidden_act="relu", tie_word_embeddings=False)
    out["rope_theta"] = rope.get("rope_theta", base.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        out["rope_scaling"] = {"type": rope_type, **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    out["relufy"] = written["relufy"]
    return out


def _untie(model) -> None:
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head.weight is embed or head.weight.data_ptr() == embed.data_ptr():
        head.weight = torch.nn.Parameter(embed.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}


def write_layout(tmp: Path, model, tokenizer, family, options, result, stats, perms, predictors, source_config) -> None:
    from ..modeling.save import write_relufy
    from .card import write_card

    dtype = target_dtype(options.dtype, source_config)
    model.to(dtype)
    model.config.relufy = {**model.config.relufy, "export": _export_block(options, result)}
    powerinfer_dense = options.layout == "powerinfer" and not family.is_moe
    if powerinfer_dense:
        _untie(model)
    written = write_relufy(model, tmp, tokenizer, max_shard_size=options.max_shard_size)
    if options.layout == "hf" and predictors:
        _write_hf_predictors(tmp, predictors, dtype)
    if options.layout == "powerinfer":
        if powerinfer_dense:
            (tmp / "config.json").write_text(
                json.dumps(_powerinfer_config(written, family.powerinfer_arch), indent=2, sort_keys=True) + "\n"
            )
            (tmp / MODELING_FILE).unlink(missing_ok=True)
            _write_bpe_files(tmp)
        (tmp / "predictor").mkdir()
        (tmp / "activation").mkdir()
        for (site, e), p in predictors.items():
            state = {
                "fc1.weight": p.fc1.weight.detach().to("cpu", torch.float16).contiguous(),
                "fc2.weight": p.fc2.weight.detach().to("cpu", torch.float16).contiguous(),
            }
            torch.save(state, tmp / "predictor" / f"model_{_file_stem(site, e)}.pt")
        (tmp / "predictor" / "config.json").write_text(json.dumps({"sparse_threshold": options.predictor_threshold}) + "\n")
        for site, (counts, _) in stats.sites.items():
            for e in range(site.experts):
                torch.save(counts[e].float().contiguous(), tmp / "activation" / f"activation_{_file_stem(site, e)}.pt")
    write_sparsity(tmp / SPARSITY_FILE, stats, perms, predictors, options)
    write_card(tmp, written, family, options, result)
