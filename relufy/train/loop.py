"""``relufy train``: continued pretraining of a relufy model under Accelerate.

One process on CPU or GPU with a plain ``relufy train``; DDP / FSDP2 / DeepSpeed through
``accelerate launch --config_file recipes/accelerate/*.yaml -m relufy train ...``.

Output folder: ``run.json`` (the run's identity), ``recipe.yaml`` (the resolved recipe),
``metrics.jsonl`` (one JSON object per logged step; a value that is not finite is ``null``),
``checkpoints/step-N`` (model, optimizer and RNG states from Accelerate, relufy's own state as
JSON, a manifest of sizes and hashes written last: see ``relufy.train.checkpoint``),
``curves.png``, ``summary.json`` and ``final/`` (same format as ``relufy convert`` output).

Before anything is written the paths are checked (``output_dir`` is not, does not hold and
does not lie in the model, tokenizer, teacher or a data file; ``data.seq_len`` fits the model's
context); a fresh run into a folder that already holds a run is refused, and the folder is
locked while the run trains. A checkpoint is saved only when the step's loss and gradient norm,
the parameters and the optimizer state are finite on every process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import RelufyError
from . import checkpoint as ckpt
from ..measure.meter import SparsityMeter, heldout_eval
from .recipe import Recipe, dump


class TrainingDiverged(RelufyError):
    pass


def lr_lambda(step: int, warmup: int, total: int, lr: float, min_lr: float) -> float:
    """Linear warmup to 1, then cosine from 1 to ``min_lr / lr`` at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = min_lr / lr
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _load(recipe: Recipe):
    from transformers import AutoModelForCausalLM

    from ..modeling.tokenizer import load_tokenizer
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


def _on_main(accelerator, fn):
    """``fn()`` on the main process only; its result (or its one-line error) reaches every process,
    so that all of them go on, or all stop with the same message."""
    result, error = None, None
    if accelerator.is_main_process:
        try:
            result = fn()
        except RelufyError as e:
            error = str(e)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            error = f"{where}{e.strerror or e}"
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        box = [result, error]
        broadcast_object_list(box, from_process=0)
        result, error = box
    if error is not None:
        raise RelufyError(error)
    return result


def _agree(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process."""
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    return bool(float(accelerator.gather(flag).min()) > 0)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of an FSDP2 DTensor, the partition of a
    DeepSpeed ZeRO-3 parameter, else ``t``."""
    if hasattr(t, "ds_tensor"):
        return t.ds_tensor
    return t.to_local() if hasattr(t, "to_local") else t


def _state_finite(params, optimizer) -> bool:
    """Every trainable parameter and every floating-point optimizer state tensor is finite
    (this process's shards; callers combine the processes' answers)."""
    tensors = [p.detach() for p in params]
    try:
        states = list(getattr(optimizer, "optimizer", optimizer).state.values())
    except (AttributeError, TypeError):  # an optimizer without per-parameter state dicts (DeepSpeed's)
        states = []
    for state in states:
        if isinstance(state, dict):
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    by_device: dict = {}
    with torch.no_grad():
        for t in tensors:
            t = _local(t)
            if t.numel():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def _save_checkpoint(accelerator, out: Path, step: int, keep_last: int, run_id: str, state: dict) -> Path:
    """Accelerate's state and relufy's JSON into ``checkpoints/.tmp-step-N``, then the manifest,
    then the rename to ``step-N``; older checkpoints are rotated out only after that."""
    root = out / "checkpoints"
    final = root / ckpt.checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()

    def publish():
        ckpt.write_state(tmp, state)
        ckpt.finish(tmp, final, run_id, step)
        ckpt.rotate(out, keep_last, run_id, step)

    _on_main(accelerator, publish)
    return final


def _check_paths(recipe: Recipe) -> Path:
    """``output_dir`` resolved, checked against every local input (model, tokenizer, teacher,
    data files): not one of them, not inside one, not holding one. It may exist (a resume)."""
    from ..io.paths import check_output_folder, user_path
    from ..io.source import local_inputs

    spec = recipe.model
    teacher = recipe.sparsity.distill.teacher if recipe.sparsity.distill else None
    named = [("model.path", spec.path), ("model.tokenizer", spec.tokenizer), ("sparsity.distill.teacher", teacher)]
    named += [(f"data.sources.{i}.data", s.data) for i, s in enumerate(recipe.data.sources)]
    target = user_path(recipe.output_dir, "output_dir")
    for field, value in named:
        for inp in local_inputs(value):
            if target == inp or target.is_relative_to(inp) or inp.is_relative_to(target):
                rel = "is" if target == inp else "is inside" if target.is_relative_to(inp) else "contains"
                raise RelufyError(f"output_dir {recipe.output_dir} {rel} {field} {value}: choose another output_dir")
    return check_output_folder(recipe.output_dir, what="output_dir")


def preflight(recipe: Recipe, download: bool = True) -> Path:
    """The checks that need no weights: ``output_dir`` against the inputs, ``data.seq_len``
    against the model's context (a hub model's config is fetched only with ``download``).
    Returns ``output_dir`` resolved."""
    out = _check_paths(recipe)
    from ..io.source import local_inputs

    if download or recipe.model.config is not None or local_inputs(recipe.model.path):
        _check_context(recipe)
    return out


def _check_context(recipe: Recipe) -> None:
    """``data.seq_len`` within the model's ``max_position_embeddings``, from its config alone."""
    spec = recipe.model
    if spec.config is not None:
        from transformers import AutoConfig

        cfg = dict(spec.config)
        try:
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        except (ValueError, TypeError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RelufyError(f"model.config: not a valid transformers config ({first})") from None
        where = "model.config"
    else:
        from ..modeling.spec import base_config
        from ..io.source import resolve

        _, config = base_config(resolve(spec.path).config_dict())
        where = spec.path
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and recipe.data.seq_len > limit:
        raise RelufyError(f"data.seq_len {recipe.data.seq_len} exceeds the model's context of {limit} tokens ({where})")


def _open_run(out: Path, resume: bool, stack: contextlib.ExitStack) -> dict:
    """Main process, before any weights load: refuse a fresh run into a folder holding one, take
    the folder's lock, and with ``resume`` pick the newest intact checkpoint of this run."""
    from ..io.atomic import target_lock

    def refuse_fresh():
        markers = ckpt.run_markers(out) if out.is_dir() else []
        if not resume and markers:
            raise RelufyError(
                f"{out} already holds a run ({', '.join(markers)}); continue it with --resume, or choose another output_dir"
            )
        return markers

    refuse_fresh()
    out.parent.mkdir(parents=True, exist_ok=True)
    stack.enter_context(target_lock(out))
    markers = refuse_fresh()  # again, under the lock
    run_id = ckpt.read_run_id(out) if resume else None
    chosen, rejected = None, []
    if resume:
        if run_id is None and markers:
            raise RelufyError(
                f"{out} holds a run without {ckpt.RUN_FILE} (written by an earlier relufy, or not by relufy); its "
                "checkpoints are not loaded (they may hold pickled state): train into another output_dir"
            )
        chosen, rejected = ckpt.choose(out, run_id)
    return {
        "run_id": run_id or ckpt.new_run_id(),
        "new_run": run_id is None,
        "checkpoint": str(chosen.path) if chosen else None,
        "state": chosen.state if chosen else None,
        "rejected": [(str(v.path), v.reason) for v in rejected],
    }


def _begin_run(out: Path, plan: dict, recipe: Recipe, resume: bool) -> None:
    """Main process, once model and data have loaded: the first writes into ``output_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    if plan["new_run"]:
        ckpt.write_run(out, plan["run_id"], recipe.name)
    ckpt.remove_leftovers(out)
    for path, reason in plan["rejected"]:
        moved = ckpt.set_aside(ckpt.Verdict(Path(path), reason))
        ckpt.notice(f"skipped checkpoint {path}: {reason}; moved to {moved.name}, not loaded")
    if resume and plan["checkpoint"] is None:
        dropped = " (the metrics logged so far are dropped)" if (out / "metrics.jsonl").exists() else ""
        ckpt.notice(f"--resume: no intact checkpoint in {out / 'checkpoints'}; starting again from step 0{dropped}")
        ckpt.truncate_metrics(out / "metrics.jsonl", 0)


def train(recipe: Recipe, resume: bool = False, show_progress: bool = True) -> Path:
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    out = preflight(recipe)
    if recipe.log.tensorboard:
        from accelerate.utils import is_tensorboard_available

        if not is_tensorboard_available():
            raise RelufyError("log.tensorboard needs TensorBoard: pip install 'relufy[tensorboard]' (or tensorboard)")
    accelerator = Accelerator(
        gradient_accumulation_steps=recipe.budget.grad_accum,
        mixed_precision="bf16" if recipe.precision == "bf16" else "no",
        log_with=["tensorboard"] if recipe.log.tensorboard else None,
        project_dir=str(out),
        # the main process hashes each checkpoint (and verifies one on --resume) while the others
        # wait in a collective: room for hundreds of GB instead of the default 10-30 minutes
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:  # each process would train alone, into the same folder
        raise RelufyError(
            f"{launched} processes were launched but Accelerate runs each on its own (distributed type "
            f"{accelerator.distributed_type.value}): FSDP and DeepSpeed need GPUs; on CPU use DDP "
            "(ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m relufy train ...)"
        )
    with contextlib.ExitStack() as stack:  # holds the output folder's lock (main process)
        plan = _on_main(accelerator, lambda: _open_run(out, resume, stack))
        return _train(recipe, resume, show_progress, accelerator, out, plan)


def _train(recipe: Recipe, resume: bool, show_progress: bool, accelerator, out: Path, plan: dict) -> Path:
    from accelerate.utils import set_seed

    from ..measure.sites import ffn_sites
    from ..modeling.save import save_relufy
    from . import mixture as train_mixture

    metrics_path = out / "metrics.jsonl"
    start_ckpt = Path(plan["checkpoint"]) if plan["checkpoint"] else None
    set_seed(recipe.seed)
    model, tokenizer = _load(recipe)
    if recipe.sparsity.router_aux_coef is not None:
        if not hasattr(model, "router_aux_loss_coef"):
            raise RelufyError(f"sparsity.router_aux_coef: {type(model).__name__} computes no router auxiliary loss")
        model.config.output_router_logits = True
        model.config.router_aux_loss_coef = model.router_aux_loss_coef = recipe.sparsity.router_aux_coef
    mixture, heldout = train_mixture.build(recipe.data, tokenizer, recipe.seed)

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

    _on_main(accelerator, lambda: _begin_run(out, plan, recipe, resume))
    run_id = plan["run_id"]
    if recipe.sparsity.ffn_warmstart and start_ckpt is None:
        from .warmstart import ffn_warmstart

        before = copy.deepcopy(mixture.state_dict())
        report = ffn_warmstart(
            model, teacher, mixture, recipe.sparsity.ffn_warmstart, accelerator.device, recipe.data.seq_len,
            show_progress=show_progress and accelerator.is_main_process,
        )
        mixture.load_state_dict(before)  # the warm start's tokens are not consumed from the training data
        if accelerator.is_main_process:
            ckpt.write_json(out / "warmstart.json", report)
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
    # The scheduler and the data mixture are not registered with Accelerate (its custom states
    # are pickles, loaded with weights_only=False): relufy keeps them in relufy_state.json.
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaces parameters in prepare
    if teacher is not None:
        teacher.to(accelerator.device)

    start_step = 0
    if start_ckpt is not None:
        state = plan["state"]
        try:
            accelerator.load_state(str(start_ckpt))
            rng = start_ckpt / f"random_states_{accelerator.process_index}.pkl"
            if rng.exists():
                ckpt.restore_rng(rng)  # Accelerate ignores a failure here; relufy does not
            scheduler.load_state_dict(state["scheduler"])
            mixture.load_state_dict(state["mixture"])
            error = None
        except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
            error = (f"cannot resume from {start_ckpt}: a file holds pickled objects other than tensors and "
                     "plain containers (possibly code); refused, nothing of it was run")  # fmt: skip
        except Exception as e:  # noqa: BLE001 - reported on one line, on every process
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            first = first.splitlines()[0][:300] if first else type(e).__name__
            error = f"cannot resume from {start_ckpt} (its files match its manifest): {first}; did the recipe's model change?"
        if not _agree(accelerator, error is None):
            raise RelufyError(error or f"cannot resume from {start_ckpt}: another process failed to load it")
        start_step = int(state["step"])
        saved_world = state.get("processes")
        if accelerator.is_main_process:
            ckpt.notice(f"resuming from {start_ckpt} (step {start_step})")
            if saved_world != accelerator.num_processes:
                ckpt.notice(f"{start_ckpt} was saved by {saved_world} processes, this run has {accelerator.num_processes}: "
                            "the run goes on, but not as the original one would have")  # fmt: skip
            ckpt.truncate_metrics(metrics_path, start_step)  # drop what the interrupted run logged later
    if accelerator.is_main_process:
        ckpt.write_text(out / "recipe.yaml", dump(recipe))
    if recipe.log.tensorboard:
        accelerator.init_trackers(recipe.name)

    unwrapped = accelerator.unwrap_model(model)
    sites = ffn_sites(unwrapped.get_base_model() if recipe.lora else unwrapped)
    meter = SparsityMeter(sites, l1=recipe.sparsity.l1 > 0)

    def install_meter():
        if recipe.log.sparsity or meter.l1:
            for _, module in sites:
                module.relufy_observer = meter

    def diverged(what: str) -> TrainingDiverged:
        return TrainingDiverged(
            f"{what}; stopped" + (f" (last good checkpoint: {last_good})" if last_good else " (no checkpoint saved yet)")
        )

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
            if not _agree(accelerator, math.isfinite(step_loss)):  # every rank stops together
                raise diverged(f"loss became {step_loss} at step {step + 1}")
            # the norm is measured without clipping too (max_norm inf scales by exactly 1)
            grad_norm = accelerator.clip_grad_norm_(params, o.grad_clip if o.grad_clip else float("inf"))
            if grad_norm is not None and not _agree(accelerator, math.isfinite(float(grad_norm))):
                raise diverged(f"the gradient norm became {float(grad_norm)} at step {step + 1}")
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
                        f.write(ckpt.dumps(record) + "\n")
                accelerator.log({k: v for k, v in record.items() if isinstance(v, float | int)}, step=done)
                if progress:
                    progress.update(task, description=f"{recipe.name} loss {record['loss']:.3f} lr {record['lr']:.1e} "
                                    f"zeros {record['sparsity']:.1%} {record['tokens_per_second']:,.0f} tok/s")  # fmt: skip
            if progress:
                progress.update(task, completed=done)
            if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < total_steps:
                if not _agree(accelerator, _state_finite(params, optimizer)):
                    raise diverged(f"parameters or optimizer state became non-finite at step {done}; not saved")
                state = {
                    "format": "relufy-train-state", "version": ckpt.FORMAT_VERSION, "run_id": run_id, "step": done,
                    "tokens": done * tokens_per_step, "total_steps": total_steps, "processes": accelerator.num_processes,
                    "scheduler": scheduler.state_dict(), "mixture": mixture.state_dict(),
                }  # fmt: skip
                last_good = _save_checkpoint(accelerator, out, done, recipe.checkpoint.keep_last, run_id, state)
        if not _agree(accelerator, _state_finite(params, optimizer)):
            raise diverged(f"parameters or optimizer state became non-finite at step {total_steps}; the final model is not written")
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
        ckpt.write_json(out / "summary.json", summary)
        from .plots import plot_curves

        plot_curves(metrics_path, out / "curves.png")
    accelerator.end_training()
    return out / "final"


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..progress import new_progress

    return new_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
