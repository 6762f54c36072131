"""What ``relufy export`` writes: the files of the ``hf`` and ``powerinfer`` layouts (docs/formats.md),
for the layout classes of ``relufy.export.registry``.

Both layouts carry ``sparsity.safetensors``: a relufy stats file (``relufy.measure.stats``:
``layers.{L}.{kind}.counts`` / ``.tokens``, in the exported neuron order) plus, per site,
``.frequency`` (float32 ``[experts, width]``, counts / tokens), ``.permutation`` (int64
``[experts, width]``, exported neuron j = original neuron ``permutation[j]``; the identity
without ``--reorder``) and, with predictors, ``.predictor_rank`` (int64 ``[experts]``); metadata
adds ``predictor_threshold`` and ``predictor_input``.

``hf``: ``relufy convert``'s format (safetensors shards, relufy ``config.json`` whose ``relufy``
block gains an ``export`` entry, ``modeling_relufy.py``) plus ``predictors.safetensors``, kept out of
``model.safetensors.index.json`` (which lists the weights only): ``{ffn}.predictor.fc1.weight`` ``[rank, hidden]`` and
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

``powerinfer-gguf`` (dense Llama/Mistral dReLU): ``model.gguf``, the GGUF PowerInfer's ``convert.py``
makes of the ``powerinfer`` folder (``relufy.export.powerinfer_gguf``), with ``activation/`` beside it
(PowerInfer's GPU/CPU neuron split reads it there), ``sparsity.safetensors`` and the model card.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..families import powerinfer_arch
from ..modeling.remote import base_config_dict
from ..names import MODELING_FILE, PREDICTORS_FILE, SPARSITY_FILE, dtype_of_config, torch_dtype


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


# Largest scale fold_thresholds gives a predictor under T = -1: its thresholds above -0.1 act as
# -0.1. On the one-hour SmolLM2 the last layer's threshold (+1.33) then keeps 9.9% of its neurons
# instead of 7.8% (9.7% at 0), and its scores reach -883 instead of -8.8e5 (docs/results.md).
MAX_FOLD_SCALE = 10.0


def fold_thresholds(predictors: dict, thresholds: dict) -> tuple[float, dict]:
    """One engine threshold ``T`` and, per predictor, a scale ``c > 0`` such that the predictor with
    ``fc1`` and ``fc2`` each multiplied by ``sqrt(c)`` keeps neuron j (score >= ``T``) exactly when the
    original keeps it at its own threshold ``t`` (scores are positively homogeneous: ``c * s >= T``
    iff ``s >= T / c``). For engines that take one threshold for all layers (PowerInfer's
    ``sparse_threshold``).

    Equal thresholds: ``T`` is that value, no scaling. Otherwise ``T = -1`` and ``c = -1 / t`` (all
    ``t > 0``: ``T = 1``, ``c = 1 / t``). Under ``T = -1``, ``c`` is at most ``MAX_FOLD_SCALE``: a
    ``t`` above ``-1 / MAX_FOLD_SCALE`` (``t >= 0`` included, which no positive scale reaches) acts
    as ``-1 / MAX_FOLD_SCALE``, which keeps every neuron ``t`` keeps and a few more. Without the cap a
    layer's scores would be scaled by thousands, past fp16's range in the engine, and no engine
    threshold (``-60000`` and below) would compute all its neurons any more. ``c`` is also capped so
    that fp16 weights stay finite, which again only keeps more."""
    values = {float(t) for t in thresholds.values()}
    if len(values) <= 1:
        return (values.pop() if values else 0.0), dict.fromkeys(predictors, 1.0)
    target = 1.0 if min(values) > 0 else -1.0
    scales = {}
    for key, p in predictors.items():
        t = float(thresholds[key])
        largest = max(float(p.fc1.weight.abs().max()), float(p.fc2.weight.abs().max()), 1e-30)
        cap = (6e4 / largest) ** 2  # sqrt(c) * largest <= 6e4 (fp16's max is 65504)
        if largest <= 1e-30:  # an all-zero predictor: its scores are 0 at any scale
            c = 1.0
        elif target > 0:
            c = 1.0 / t
        else:
            c = min(-1.0 / t, MAX_FOLD_SCALE) if t < 0 else MAX_FOLD_SCALE
        scales[key] = min(c, cap)
    return target, scales


def _scaled(p, c: float) -> dict:
    r = c**0.5
    return {"fc1.weight": p.fc1.weight.detach().cpu().float() * r, "fc2.weight": p.fc2.weight.detach().cpu().float() * r}


def _engine_state(p, c: float) -> dict:
    """The predictor as PowerInfer gets it: scaled by ``c`` (``fold_thresholds``), fp16."""
    return {k: v.to(torch.float16).contiguous() for k, v in _scaled(p, c).items()}


def write_sparsity(path: Path, stats, perms: dict, predictors: dict, options, thresholds: dict | None = None) -> None:
    """``stats`` saved as a stats file, plus frequencies, permutations and predictor ranks and thresholds."""
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
            extra[f"{key}.predictor_threshold"] = torch.tensor(
                [float(thresholds[(site, e)]) for e in range(site.experts)], dtype=torch.float32
            )
    meta = {}
    if predictors:
        meta = {
            "predictor_threshold": min(float(t) for t in thresholds.values()),
            "predictor_input": options.predictor_input,
            "predictor_recall": options.predictor_recall,
        }
    stats.save(path, extra, meta)


def export_block(options, result, threshold: float | None = None) -> dict:
    block = {
        "layout": options.layout,
        "reordered": result.reordered,
        "sparsity": {"overall": result.sparsity["overall"], "per_layer": result.sparsity["per_layer"]},
        "sparsity_file": SPARSITY_FILE,
    }
    if result.predictors:
        block["predictors"] = {
            "input": options.predictor_input,
            "threshold": threshold,
            "thresholds": "per predictor (sparsity.safetensors .predictor_threshold)" if options.predictor_recall else "one",
            "recall_target": options.predictor_recall or None,
            "recall_of": options.predictor_recall_of if options.predictor_recall else None,
            "mean_recall": result.mean_recall,
            "min_recall": result.min_recall,
            "heldout_computed": result.predicted_kept,
            "heldout_missed_active": result.missed_active,
            "predictor_cost": result.predictor_cost,
            "heldout_ppl_dense": result.ppl_dense,
            "heldout_ppl_predicted": result.ppl_predicted,
            "heldout_top1_agreement": result.top1_agreement,
        }
    return block


def write_hf_predictors(tmp: Path, predictors: dict, dtype) -> None:
    """``predictors.safetensors`` beside the weights and outside ``model.safetensors.index.json``: the
    index lists the model's weights only, so any loader (transformers, vLLM, a converter) reads the
    folder without unknown tensors; ``load_predictors`` and the remote model's
    ``sparsity_predictors()`` read the file by name."""
    from safetensors.torch import save_file

    tensors = {}
    for (site, e), p in predictors.items():
        prefix = predictor_prefix(site, e)
        tensors[f"{prefix}.predictor.fc1.weight"] = p.fc1.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{prefix}.predictor.fc2.weight"] = p.fc2.weight.detach().to("cpu", dtype).contiguous()
    save_file(tensors, str(tmp / PREDICTORS_FILE), metadata={"format": "pt"})


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


def _powerinfer_config(written: dict, family) -> dict:
    """The config PowerInfer's converter reads, from the saved relufy config: its architecture for
    the activation (``relufy.families.powerinfer_arch``: bamboo for dReLU, llama for ReGLU)."""
    arch = powerinfer_arch(family, written["relufy"]["activation"])
    base = base_config_dict(written)
    rope = base.pop("rope_parameters", None) or {}
    out = {k: v for k, v in base.items() if k not in ("auto_map",)}
    out.update(model_type=arch, architectures=[f"{arch.capitalize()}ForCausalLM"], hidden_act="relu", tie_word_embeddings=False)
    out["rope_theta"] = rope.get("rope_theta", base.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        out["rope_scaling"] = {"type": rope_type, **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
        if rope_type == "yarn":  # PowerInfer's converter reads it with no default (convert.py:239)
            out["rope_scaling"].setdefault("finetuned", False)
    out["relufy"] = written["relufy"]
    return out


def untie(model) -> None:
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head.weight is embed or head.weight.data_ptr() == embed.data_ptr():
        head.weight = torch.nn.Parameter(embed.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}


def write_gguf(tmp: Path, model, tokenizer, family, options, result, predictors: dict, scales: dict, threshold) -> dict:
    """``model.gguf`` (``relufy.export.powerinfer_gguf``) from the in-memory model; returns the relufy
    config. The config and tokenizer files convert.py would read are written to a scratch folder
    first (no weights), so that the GGUF's vocabulary and keys come from the same files."""
    import shutil

    from . import powerinfer_gguf

    src = tmp / ".powerinfer-src"
    src.mkdir()
    try:
        model.config.save_pretrained(src)
        tokenizer.save_pretrained(src)
        written = json.loads((src / "config.json").read_text())
        written["relufy"] = dict(model.config.relufy)
        _write_bpe_files(src)
        layers = {site.layer: _engine_state(p, scales[(site, e)]) for (site, e), p in predictors.items()}
        powerinfer_gguf.write(
            tmp / powerinfer_gguf.GGUF_FILE,
            src,
            _powerinfer_config(written, family),
            model.state_dict(),
            layers,
            threshold,
            options.gguf_type,
            name=Path(result.out).name,
        )
    finally:
        shutil.rmtree(src, ignore_errors=True)
    return written


def write_powerinfer_folder(tmp: Path, written: dict, family) -> None:
    """A dense model folder as PowerInfer's converter reads it: its config, no remote code, BPE files."""
    (tmp / "config.json").write_text(json.dumps(_powerinfer_config(written, family), indent=2, sort_keys=True) + "\n")
    (tmp / MODELING_FILE).unlink(missing_ok=True)
    _write_bpe_files(tmp)


def write_powerinfer_predictors(tmp: Path, predictors: dict, scales: dict, folded: float | None) -> None:
    """``predictor/model_{i}.pt`` (scaled by ``scales``, fp16) and ``predictor/config.json``."""
    (tmp / "predictor").mkdir()
    for (site, e), p in predictors.items():
        torch.save(_engine_state(p, scales[(site, e)]), tmp / "predictor" / f"model_{_file_stem(site, e)}.pt")
    (tmp / "predictor" / "config.json").write_text(json.dumps({"sparse_threshold": folded}) + "\n")


def write_activation_counts(tmp: Path, stats) -> None:
    """``activation/activation_{i}.pt``: float32 per-neuron activation counts (PowerInfer's GPU/CPU split)."""
    (tmp / "activation").mkdir()
    for site, (counts, _) in stats.sites.items():
        for e in range(site.experts):
            torch.save(counts[e].float().contiguous(), tmp / "activation" / f"activation_{_file_stem(site, e)}.pt")
