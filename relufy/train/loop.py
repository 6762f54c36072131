"""``relufy train``: continued pretraining of a relufy model under Accelerate.

One process on CPU or GPU with a plain ``relufy train``; DDP / FSDP2 / DeepSpeed through
``accelerate launch --config_file recipes/accelerate/*.yaml -m relufy train ...``.

Output folder: ``recipe.yaml`` (the resolved recipe), ``metrics.jsonl`` (one JSON object per
logged step), ``checkpoints/step-N`` (``accelerator.save_state``: model, optimizer, scheduler,
RNG states and the data position), ``curves.png`` and ``final/`` (same format as
``relufy convert`` output).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import RelufyError
from .recipe import Recipe


class TrainingDiverged(RelufyError):
    pass


def lr_lambda(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warmup to 1, then cosine from 1 to ``min_lr / lr`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class SparsityMeter:
    """Training-time observer: zero fraction per FFN site (no host sync until read) and, when
    asked, the L1 norm of the combined activation (kept in the graph)."""

    def __init__(self, sites, l1: bool):
        self.names = {id(m): s.layer for s, m in sites}
        self.layers = sorted(set(self.names.values()))
        self.l1 = l1
        self.reset()

    def reset(self):
        self.zeros = {}
        self.total = {}
        self.l1_terms = []

    def __call__(self, module, combined, expert):
        layer = self.names[id(module)]
        with torch.no_grad():
            z = (combined == 0).sum()
            self.zeros[layer] = self.zeros.get(layer, 0) + z
            self.total[layer] = self.total.get(layer, 0) + combined.numel()
        if self.l1:
            self.l1_terms.append(combined.abs().mean())
        return combined

    def fraction(self, layer: int) -> float:
        """Zero fraction of ``layer`` since the last reset (nan if it ran no FFN)."""
        return float(self.zeros[layer]) / self.total[layer] if self.total.get(layer) else float("nan")

    def per_layer(self) -> list[float]:
        return [self.fraction(layer) for layer in self.layers]


def _load(recipe: Recipe):
    from transformers import AutoModelForCausalLM

    from ..generate import load_tokenizer
    from ..modeling.load import load, swap_activation

    spec = recipe.model
    if spec.config is not None:  # from scratch
        from transformers import AutoConfig

        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = swap_activation(model, spec.activation or "swiglu", spec.threshold, source="scratch")
        return model, load_tokenizer(spec.tokenizer)
    model = load(spec.path, activation=spec.activation, threshold=spec.threshold, dtype=torch.float32)
    return model, load_tokenizer(spec.tokenizer or spec.path)


def _kl(student_logits, teacher_logits, labels, temperature):
    mask = labels[:, 1:] != -100
    s = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, -1)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _save_state(accelerator, root: Path, step: int, keep_last: int) -> Path:
    """Atomic: save into a temporary folder, rename; keep the newest ``keep_last``."""
    ckpts = root / "checkpoints"
    final = ckpts / f"step-{step:08d}"
    tmp = ckpts / f".tmp-step-{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        tmp.rename(final)
        for old in sorted(p for p in ckpts.glob("step-*"))[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted((Path(root) / "checkpoints").glob("step-*"))
    return found[-1] if found else None


def heldout_eval(model, heldout: torch.Tensor, device, batch_size: int = 4) -> tuple[float | None, float | None]:
    """Held-out perplexity and mean per-layer FFN sparsity (the counters of relufy eval).
    Leaves every FFN without an observer: callers reinstall theirs."""
    if len(heldout) == 0:
        return None, None
    from ..data import Window
    from ..measure.evaluate import score
    from ..measure.sites import ActivationCounter, observing
    from ..measure.stats import Stats

    if heldout.dim() == 3:  # chat: (ids, labels) pairs
        wins = [Window(pair[0], pair[1]) for pair in heldout]
    else:
        wins = [Window(seq, torch.cat([torch.tensor([-100]), seq[1:]])) for seq in heldout]
    was_training = model.training
    model.eval()
    with observing(model, ActivationCounter) as counter:
        nll, count = score(model, wins, batch_size, device)
    model.train(was_training)
    per_layer = Stats(counter.result(), 0, {}).layer_sparsity()
    return math.exp(nll / count), sum(per_layer) / len(per_layer)


def train(recipe: Recipe, resume: bool = False, show_progress: bool = True) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..measure.sites import ffn_sites
    from ..modeling.save import save_relufy
    from . import data as train_data

    out = Path(recipe.output_dir)
    metrics_path = out / "metrics.jsonl"
    start_ckpt = latest_checkpoint(out) if resume else None
    if resume and start_ckpt is None:
        raise RelufyError(f"--resume: no checkpoint in {out / 'checkpoints'}")
    if not resume and metrics_path.exists():
        raise RelufyError(f"{out} already holds a run (metrics.jsonl); use --resume or another output_dir")

    if recipe.log.tensorboard:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise RelufyError("log.tensorboard needs TensorBoard: pip install 'relufy[tensorboard]' (or tensorboard)")
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.budget.grad_accum,
        mixed_precision="bf16" if recipe.precision == "bf16" else "no",
        log_with=["tensorboard"] if recipe.log.tensorboard else None,
        project_dir=str(out),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # each process would train alone, into the same folder
        raise RelufyError(
            f"{launched} processes were launched but Accelerate runs each on its own (distributed type "
            f"{accelerator.distributed_type.value}): FSDP and DeepSpeed need GPUs; on CPU use DDP "
            "(ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m relufy train ...)"
        )
    set_seed(recipe.seed)
    model, tokenizer = _load(recipe)
    if recipe.sparsity.router_aux_coef is not None:
        if not hasattr(model, "router_aux_loss_coef"):
            raise RelufyError(f"sparsity.router_aux_coef: {type(model).__name__} computes no router auxiliary loss")
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = model.router_aux_loss_coef = recipe.sparsity.router_aux_coef
    mixture, heldout = train_data.build(recipe.data, tokenizer, recipe.seed)

    budget = recipe.budget
    tokens_per_step = budget.micro_batch_size * budget.grad_accum * recipe.data.seq_len * accelerator.num_processes
    total_steps = budget.max_steps or max(1, budget.max_tokens // tokens_per_step)
    if recipe.optim.warmup_steps >= total_steps:
        raise RelufyError(f"optim.warmup_steps ({recipe.optim.warmup_steps}) must be below the run's {total_steps} steps")
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if sharded and (recipe.sparsity.distill or recipe.sparsity.ffn_warmstart or recipe.lora):
        raise RelufyError(
            "distillation, the FFN warm start and LoRA are not supported with FSDP or DeepSpeed yet: use DDP "
            "(recipes/accelerate/ddp.yaml) for them"
        )

    teacher = None
    if recipe.sparsity.distill or recipe.sparsity.ffn_warmstart:
        from ..modeling.load import load

        teacher_path = (recipe.sparsity.distill and recipe.sparsity.distill.teacher) or recipe.model.path
        if teacher_path is None:
            raise RelufyError("sparsity.distill.teacher is needed when the model is trained from scratch")
        teacher = load(teacher_path, activation="swiglu", dtype=torch.float32).eval().requires_grad_(False)

    if recipe.sparsity.ffn_warmstart and start_ckpt is None:
        from .warmstart import ffn_warmstart

        before = copy.deepcopy(mixture.state_dict())
        report = ffn_warmstart(
            model, teacher, mixture, recipe.sparsity.ffn_warmstart, accelerator.device, recipe.data.seq_len,
            show_progress=show_progress and accelerator.is_main_process,
        )
        mixture.load_state_dict(before)  # the warm start's tokens are not consumed from the training data
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            (out / "warmstart.json").write_text(json.dumps(report, indent=2))
    if recipe.sparsity.distill is None:
        teacher = None

    if recipe.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = recipe.lora
        model = get_peft_model(
            model,
            LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules or None,
                       target_parameters=lora.target_parameters or None),
        )  # fmt: skip
    if recipe.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False

    params = [p for p in model.parameters() if p.requires_grad]
    o = recipe.optim
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, o.warmup_steps, total_steps, o.lr, o.min_lr)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces parameters in prepare
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(mixture)
    if teacher is not None:
        teacher.to(accelerator.device)

    start_step = 0
    if start_ckpt is not None:
        accelerator.load_state(str(start_ckpt))
        start_step = int(start_ckpt.name.split("-")[1])
        if accelerator.is_main_process and metrics_path.exists():  # drop what the interrupted run logged later
            kept = [ln for ln in metrics_path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            metrics_path.write_text("".join(k + "\n" for k in kept))
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(_dump(recipe))
    if recipe.log.tensorboard:
        accelerator.init_trackers(recipe.name)

    unwrapped = accelerator.unwrap_model(model)
    sites = ffn_sites(unwrapped.get_base_model() if recipe.lora else unwrapped)
    meter = SparsityMeter(sites, l1=recipe.sparsity.l1 > 0)

    def install_meter():
        if recipe.log.sparsity or meter.l1:
            for _, module in sites:
                module.relufy_observer = meter

    base = unwrapped.get_base_model() if recipe.lora else unwrapped
    before = heldout_eval(base, heldout, accelerator.device) if start_step == 0 and accelerator.is_main_process else (None, None)
    install_meter()
    model.train()
    last_good = start_ckpt
    window_losses: list[float] = []
    progress = _progress(show_progress and accelerator.is_main_process)
    task = progress.add_task(recipe.name, total=total_steps, completed=start_step) if progress else None
    t0, tokens_at_t0 = time.perf_counter(), start_step * tokens_per_step
    try:
        for step in range(start_step, total_steps):
            meter.reset()
            step_loss = 0.0
            rank, world = accelerator.process_index, accelerator.num_processes
            for _ in range(budget.grad_accum):
                # every rank draws the same global batch (one mixture state) and keeps its slice
                full = mixture.batch(budget.micro_batch_size * world)
                batch = full[rank * budget.micro_batch_size : (rank + 1) * budget.micro_batch_size].to(accelerator.device)
                ids, labels = (batch[:, 0], batch[:, 1]) if batch.dim() == 3 else (batch, batch)
                meter.l1_terms = []
                with accelerator.accumulate(model), accelerator.autocast():
                    outputs = model(input_ids=ids, labels=labels)
                    loss = outputs.loss
                    if teacher is not None:
                        with torch.no_grad():
                            t_logits = teacher(input_ids=ids).logits
                        d = recipe.sparsity.distill
                        loss = loss + d.weight * _kl(outputs.logits, t_logits, labels, d.temperature)
                    if meter.l1:
                        ramp = min(1.0, (step + 1) / recipe.sparsity.l1_warmup_steps) if recipe.sparsity.l1_warmup_steps else 1.0
                        loss = loss + recipe.sparsity.l1 * ramp * torch.stack(meter.l1_terms).mean()
                    accelerator.backward(loss)  # divided by grad_accum inside
                meter.l1_terms = []
                step_loss += float(loss.detach()) / budget.grad_accum
            finite = torch.tensor([1.0 if math.isfinite(step_loss) else 0.0], device=accelerator.device)
            if float(accelerator.gather(finite).min()) == 0:  # every rank stops together
                raise TrainingDiverged(
                    f"loss became {step_loss} at step {step + 1}; stopped"
                    + (f" (last good checkpoint: {last_good})" if last_good else " (no checkpoint saved yet)")
                )
            grad_norm = accelerator.clip_grad_norm_(params, o.grad_clip) if o.grad_clip else None
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_losses.append(step_loss)
            done = step + 1
            if done % recipe.log.every == 0 or done == total_steps:
                sparsity = meter.per_layer() if recipe.log.sparsity else [float("nan")]
                record = {
                    "step": done,
                    "tokens": done * tokens_per_step,
                    "loss": sum(window_losses) / len(window_losses),
                    "lr": scheduler.get_last_lr()[0],
                    "sparsity": sum(sparsity) / len(sparsity),
                    "sparsity_per_layer": sparsity,
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_second": (done * tokens_per_step - tokens_at_t0) / (time.perf_counter() - t0),
                }
                if recipe.log.eval_every and done % recipe.log.eval_every == 0:
                    record["heldout_ppl"], record["heldout_sparsity"] = heldout_eval(base, heldout, accelerator.device)
                    install_meter()
                window_losses = []
                if accelerator.is_main_process:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if isinstance(v, float | int)}, step=done)
                if progress:
                    progress.update(task, description=f"{recipe.name} loss {record['loss']:.3f} lr {record['lr']:.1e} "
                                    f"zeros {record['sparsity']:.1%} {record['tokens_per_second']:,.0f} tok/s")  # fmt: skip
            if progress:
                progress.update(task, completed=done)
            if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < total_steps:
                last_good = _save_state(accelerator, out, done, recipe.checkpoint.keep_last)
    finally:
        if progress:
            progress.stop()
        for _, module in sites:
            module.relufy_observer = None

    final_ppl, final_sparsity = heldout_eval(base, heldout, accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        if recipe.lora is not None:
            unwrapped = unwrapped.merge_and_unload()
            state_dict = None
        note = f"Trained by `relufy train` ({recipe.name}): {total_steps} steps, {total_steps * tokens_per_step:,} tokens."
        save_relufy(unwrapped, out / "final", tokenizer=tokenizer, state_dict=state_dict, card_note=note)
        summary = {
            "steps": total_steps,
            "tokens": total_steps * tokens_per_step,
            "heldout_tokens": int(heldout.numel() if heldout.dim() == 2 else heldout[:, 0].numel()),
            "heldout_ppl_before": before[0],
            "heldout_sparsity_before": before[1],
            "heldout_ppl": final_ppl,
            "heldout_sparsity": final_sparsity,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        from .plots import plot_curves

        plot_curves(metrics_path, out / "curves.png")
    accelerator.end_training()
    return out / "final"


def _dump(recipe: Recipe) -> str:
    import yaml

    return yaml.safe_dump(json.loads(recipe.model_dump_json()), sort_keys=False)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ..progress import console

    p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console)
    p.start()
    return p
