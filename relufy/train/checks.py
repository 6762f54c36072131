"""What ``relufy train`` checks before it loads weights or writes anything, the same for
``--dry-run`` as for the run: a dry run that passes is a run that gets to its first step.

``check_model`` builds what the run builds, on the meta device (no memory, no weights):

- the student, from ``model.config`` (its sizes must be positive whole numbers) or from
  ``model.path``'s config, with the activation the run swaps in, and the router auxiliary loss;
- the LoRA adapters on it, attached by peft as the run attaches them; every entry of
  ``lora.target_modules`` and ``lora.target_parameters`` must adapt something (peft refuses only
  when none matches: a misspelt entry beside good ones, or ``gate_proj`` on a model whose experts
  are fused into one parameter, was dropped silently);
- AdamW over its trainable parameters (betas, eps, weight decay as torch checks them);
- the teacher (distillation and the FFN warm start): it must exist, and match the student where
  the losses compare them (vocabulary for the KL term; hidden size and layer count for hidden-state
  distillation and the warm start);
- with ``tokenizer``, the tokenizer (the run loads it first thing anyway).

A model named by hub id is checked only when ``download`` allows fetching its config (a dry run
does not download). ``run_length`` is the run's step count from the budget, with the checks that
depend on it (warmup, annealing, L1 stages).
"""

from __future__ import annotations

import warnings
from pathlib import Path

from ..errors import RelufyError
from .recipe import Recipe


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def reachable(spec: str | None, download: bool) -> bool:
    """Whether the model ``spec`` can be checked now: a local path (or a path that is missing: it
    is refused), or a hub id when ``download`` allows fetching its config."""
    from ..io.hub import split_revision

    if spec is None:
        return False
    if download or Path(spec).expanduser().exists():
        return True
    try:
        return split_revision(str(spec)) is None  # not a hub id: a local path, missing
    except RelufyError:
        return True  # a malformed hub id: resolving it says so


def run_length(recipe: Recipe, processes: int) -> tuple[int, int]:
    """``(tokens per optimizer step, the run's steps)`` with ``processes`` processes; refuses a
    warmup, an annealing or L1 stages that do not fit in the run."""
    budget = recipe.budget
    tokens_per_step = budget.micro_batch_size * budget.grad_accum * recipe.data.seq_len * processes
    total = budget.max_steps or max(1, budget.max_tokens // tokens_per_step)
    if recipe.optim.warmup_steps >= total:
        raise RelufyError(f"optim.warmup_steps ({recipe.optim.warmup_steps}) must be below the run's {total} steps")
    if recipe.sparsity.anneal_steps >= total:
        raise RelufyError(
            f"sparsity.anneal_steps ({recipe.sparsity.anneal_steps}) must be below the run's {total} "
            "steps: the run has to end on the relufy activation alone"
        )
    if recipe.sparsity.l1_schedule == "sine-stages" and recipe.sparsity.l1_stages > total:
        raise RelufyError(f"sparsity.l1_stages ({recipe.sparsity.l1_stages}) exceeds the run's {total} steps")
    return tokens_per_step, total


def scratch_config(spec):
    """The transformers config of ``model.config``, its family supported and its sizes checked."""
    from transformers import AutoConfig

    from ..families import family_for
    from ..modeling.spec import check_sizes

    cfg = dict(spec.config)
    model_type = cfg.pop("model_type")
    family = family_for(model_type)
    try:
        check_sizes(family, cfg)
    except RelufyError as e:
        raise RelufyError(f"model.config: {str(e).split(': ', 1)[-1]}") from None
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError, huggingface_hub's strict dataclass errors...
        raise RelufyError(f"model.config: not a valid transformers config ({_first(e)})") from None


def _on_meta(config, where: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for configs it cannot build
        raise RelufyError(f"{where}: cannot build the model ({_first(e)})") from None


def _student(recipe: Recipe):
    """The student as ``loop.load_student`` builds it, on the meta device; and its config."""
    from ..io.block import RelufyBlock
    from ..modeling.load import swap_activation

    spec = recipe.model
    if spec.config is not None:
        config = scratch_config(spec)
        model = _on_meta(config, "model.config")
        return swap_activation(model, spec.activation or "swiglu", spec.threshold, source="scratch"), config
    from ..io.source import resolve
    from ..modeling.formats import read_config
    from ..modeling.spec import base_config

    raw = read_config(resolve(spec.path))
    block = RelufyBlock.read(raw, spec.path)
    _, config = base_config(raw)
    model = _on_meta(config, spec.path)
    activation, threshold = spec.activation, spec.threshold
    if activation is None and block:
        activation, threshold = block.activation, block.threshold
    if block:
        model.config.relufy = dict(raw["relufy"])
    return swap_activation(model, activation or "swiglu", threshold, source=spec.path), config


def _matches(names, target: str) -> bool:
    """peft's rule for a name in a list of targets: the full name, or its last dotted parts."""
    return any(name == target or name.endswith(f".{target}") for name in names)


def _adapter_names(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".lora_" in name}


def _attach_lora(build, lora):
    """LoRA adapters on a meta model from ``build()``, as the run attaches them; every target must
    adapt something. peft refuses only targets that match nothing at all: a target beside others
    that match (a misspelt one, or ``gate_proj`` on a model whose experts are fused) was dropped
    silently. A target that names no module (parameter) of the model is tried without: if the
    adapters stay the same, it is refused."""
    from peft import get_peft_model

    def attach(spec):
        with warnings.catch_warnings():  # peft warns about targets that match nothing: judged below, on one line
            warnings.simplefilter("ignore")
            return get_peft_model(build(), lora_config(spec))

    plain = build()
    kind = type(plain).__name__
    names = {
        "target_modules": [name for name, _ in plain.named_modules() if name],
        "target_parameters": [name for name, _ in plain.named_parameters()],
    }
    unmatched = [(f, t) for f in names for t in getattr(lora, f) if not _matches(names[f], t)]
    try:
        model = attach(lora)
    except Exception as e:  # noqa: BLE001 - peft raises ValueError, TypeError, its own errors...
        if type(e).__name__ == "NoMatchingPeftModuleError" and unmatched:
            raise RelufyError(_no_match(*unmatched[0], kind, plain)) from None
        raise RelufyError(f"lora: peft cannot attach these adapters ({_first(e)})") from None
    adapters = _adapter_names(model)
    for field, target in unmatched:
        others = lora.model_copy(update={field: [t for t in getattr(lora, field) if t != target]})
        if not others.target_modules and not others.target_parameters:
            continue  # the only target, and peft attached adapters: it matched
        try:
            without = _adapter_names(attach(others))
        except Exception:  # noqa: BLE001 - the others need it (a pair fused into one parameter, e.g. gate_up_proj)
            continue
        if without == adapters:
            raise RelufyError(_no_match(field, target, kind, plain))
    return model


def _no_match(field: str, target: str, kind: str, model) -> str:
    what = "module" if field == "target_modules" else "parameter"
    hint = f" (its linear layers end in {', '.join(_linear_leaves(model)) or 'nothing'})" if what == "module" else ""
    fused = " (fused experts are adapted through lora.target_parameters)" if "experts" in {*_all_leaves(model)} else ""
    return f"lora.{field}: {target!r} names no {what} of {kind} and adapts nothing{hint}{fused}"


def _all_leaves(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def _linear_leaves(model) -> list[str]:
    import torch

    leaves = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(leaves)[:12]


def _optimizer(model, optim) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, eps=optim.eps)
    except (ValueError, TypeError) as e:
        raise RelufyError(f"optim: AdamW refuses these settings ({_first(e)})") from None


def _check_teacher(recipe: Recipe, student_config, download: bool) -> None:
    sparsity = recipe.sparsity
    if not (sparsity.distill or sparsity.ffn_warmstart):
        return
    path = (sparsity.distill and sparsity.distill.teacher) or recipe.model.path
    if path is None:
        raise RelufyError("sparsity.distill.teacher is needed when the model is trained from scratch")
    if not reachable(path, download):
        return
    from ..io.source import resolve
    from ..modeling.formats import read_config
    from ..modeling.spec import base_config

    where = "sparsity.distill.teacher" if sparsity.distill and sparsity.distill.teacher else "model.path (the teacher)"
    try:
        raw = read_config(resolve(path))
        _, config = base_config(raw)
    except RelufyError as e:
        raise RelufyError(f"{where}: {e}") from None
    pairs = []
    if sparsity.distill:
        pairs.append(("vocab_size", "the distillation compares logits"))
    if (sparsity.distill and sparsity.distill.hidden_weight) or sparsity.ffn_warmstart:
        why = "hidden states are compared layer by layer"
        pairs += [("hidden_size", why), ("num_hidden_layers", why)]
    for key, why in pairs:
        mine, theirs = getattr(student_config, key, None), getattr(config, key, None)
        if mine != theirs:
            raise RelufyError(f"{where} {path} has {key} {theirs}, the model {mine}: {why}")


def check_model(recipe: Recipe, download: bool = True, tokenizer: bool = False) -> None:
    """The student, its adapters, its optimizer and the teacher, built on the meta device as the
    run builds them (see the module's docstring); one line on the first problem."""
    spec = recipe.model
    if spec.config is None and not reachable(spec.path, download):
        return

    def build():
        model, config = _student(recipe)
        apply_router_aux(model, recipe.sparsity.router_aux_coef)
        return model, config

    model, config = build()
    if recipe.lora is not None:
        model = _attach_lora(lambda: build()[0], recipe.lora)
    _optimizer(model, recipe.optim)
    _check_teacher(recipe, config, download)
    if tokenizer:
        source = spec.tokenizer or spec.path
        if reachable(source, download):
            from ..modeling.tokenizer import load_tokenizer

            load_tokenizer(source)


def apply_router_aux(model, coef: float | None) -> None:
    """``sparsity.router_aux_coef`` set on ``model`` (refused for a model without a router auxiliary loss)."""
    if coef is None:
        return
    if not hasattr(model, "router_aux_loss_coef"):
        raise RelufyError(f"sparsity.router_aux_coef: {type(model).__name__} computes no router auxiliary loss")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = model.router_aux_loss_coef = coef


def lora_config(lora):
    """peft's ``LoraConfig`` of a recipe's ``lora`` section."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),  # [] with target_parameters: None would add peft's defaults
        target_parameters=list(lora.target_parameters) or None,
    )
