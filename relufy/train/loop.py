"""``relufy train``: continued pretraining of a relufy model under Accelerate.

One process on CPU or GPU with a plain ``relufy train``; DDP or FSDP2 through
``accelerate launch --config_file recipes/accelerate/{ddp,fsdp2}.yaml -m relufy train ...``
(DeepSpeed and FSDP1 are refused with one line). ``train()`` runs a ``RecipeRun``: one method
per stage, in the order its docstring lists.

Under FSDP2 everything a run does works sharded: the student through ``accelerator.prepare``,
the frozen teacher sharded the same way (``shard_frozen``), the FFN warm start split by layers
across the processes before the student is sharded, the held-out eval run by every process on
its share of the windows, LoRA adapters sharded with their layers and merged into ``final/``,
and checkpoints as Accelerate's sharded DCP folders (``relufy.train.checkpoint``). Every process
draws the same global batch and trains on its own rows; the logged loss and sparsity are the
means over all processes, so a run's curve does not depend on how many processes share its
global batch (up to float reduction order).

Output folder: ``run.json`` (the run's identity), ``recipe.yaml`` (the resolved recipe, its first
line a comment with the run's id), ``metrics.jsonl`` (one JSON object per logged step; a value
that is not finite is ``null``), ``checkpoints/step-N`` (model, optimizer and RNG states from
Accelerate, relufy's own state as JSON, a manifest of sizes and hashes written last: see
``relufy.train.checkpoint``), ``curves.png``, ``summary.json`` and ``final/`` (same format as
``relufy convert`` output).

Before anything is written the paths are checked (``output_dir`` is not, does not hold and
does not lie in the model, tokenizer, teacher or a data file; ``data.seq_len`` fits the model's
context), and the model, its LoRA adapters, optimizer and teacher are built on the meta device
(``relufy.train.checks``: ``--dry-run`` runs the same ``preflight``); a fresh run into a folder
that already holds a run is refused, so are links and files relufy did not write among the
entries it manages (``relufy.train.rundir``), and the folder is locked while the run trains.
Everything the run writes gets at most its inputs' permissions. A checkpoint is saved only when
the step's loss and gradient norm, the parameters and the optimizer state are finite on every
process; one that cannot be written (the disk full) stops the run on one line, its partial folder
removed, the checkpoints before it whole for ``--resume``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import pickle
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import RelufyError, notice
from ..io.block import RelufyBlock
from ..measure.meter import SparsityMeter, heldout_eval
from ..names import is_identity
from ..progress import console
from . import checkpoint as ckpt
from . import decisions, rundir
from .checks import apply_router_aux, lora_config
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


def l1_factor(step: int, total: int, sparsity) -> float:
    """The fraction of ``sparsity.l1`` applied at optimizer step ``step + 1`` (``sparsity.l1_schedule``):
    ``linear`` ramps from 0 over ``l1_warmup_steps`` then holds 1; ``sine-stages`` (ProSparse) splits
    ``total`` steps into ``l1_stages`` equal stages, stage k rising from (k-1)/S to k/S along a quarter
    sine over ``l1_warmup_steps`` steps (0: half a stage), then holding k/S."""
    warm = sparsity.l1_warmup_steps
    if sparsity.l1_schedule == "linear":
        return min(1.0, (step + 1) / warm) if warm else 1.0
    stages = sparsity.l1_stages
    length = total / stages
    k = min(stages - 1, int(step // length))  # 0-based stage of this step
    into = step - k * length + 1
    rise = warm or max(1.0, length / 2)
    progress = min(1.0, into / rise)
    return (k + math.sin(math.pi / 2 * progress)) / stages


def anneal_blend(step: int, anneal_steps: int) -> float | None:
    """The share ``a`` of the relufy activation at optimizer step ``step + 1`` while annealing
    (``sparsity.anneal_steps``): ``(step + 1) / (anneal_steps + 1)``, rising linearly towards 1;
    None (the relufy activation alone) from step ``anneal_steps + 1`` on, and without annealing."""
    if step >= anneal_steps:
        return None
    return (step + 1) / (anneal_steps + 1)


def hidden_distance(student_hidden, teacher_hidden, labels) -> torch.Tensor:
    """Mean over decoder layers of ``||h_s - h_t||^2 / ||h_t||^2`` on the scored positions (the
    outputs of the model's ``output_hidden_states``; the embeddings, entry 0, are left out)."""
    mask = labels != -100
    terms = []
    for s, t in zip(student_hidden[1:], teacher_hidden[1:], strict=True):
        s, t = s[mask].float(), t[mask].float()
        terms.append((s - t).square().sum() / t.square().sum().clamp_min(1e-12))
    return torch.stack(terms).mean()


def load_student(recipe: Recipe):
    """The model to train (``model.path``, or ``model.config`` from scratch) and its tokenizer."""
    from transformers import AutoModelForCausalLM

    from ..modeling.load import load, swap_activation
    from ..modeling.tokenizer import load_tokenizer

    spec = recipe.model
    if spec.config is not None:  # from scratch
        from transformers import AutoConfig

        cfg = dict(spec.config)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model = swap_activation(model, decisions.student_activation(spec.activation, None), spec.threshold, source="scratch")
        return model, load_tokenizer(spec.tokenizer)
    model = load(spec.path, activation=spec.activation, threshold=spec.threshold, dtype=torch.float32)
    return model, load_tokenizer(spec.tokenizer or spec.path)


def _kl(student_logits, teacher_logits, labels, temperature):
    mask = labels[:, 1:] != -100
    s = F.log_softmax(student_logits[:, :-1][mask].float() / temperature, -1)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def _teacher_top_k(teacher_logits, labels, temperature: float, k: int):
    """``(log-probs [N, k], token ids [N, k])``: the teacher's ``k`` most likely next tokens at the
    N scored positions, at ``temperature``; the teacher's full logits can be dropped afterwards."""
    mask = labels[:, 1:] != -100
    t = teacher_logits[:, :-1][mask].float() / temperature
    values, index = t.topk(min(k, t.shape[-1]), dim=-1)
    return values - torch.logsumexp(t, -1, keepdim=True), index


def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x <= 0``; ``log 1e-30`` where the difference vanishes (finite, and
    so with a finite gradient: a tail bucket that holds nothing adds nothing)."""
    return torch.log((-torch.expm1(x)).clamp_min(1e-30))


def _kl_top_k(student_logits, teacher_top, labels, temperature):
    """KL(teacher || student) over k + 1 outcomes: the teacher's top-k tokens and one tail bucket
    holding the rest of each model's probability (per scored token, mean over them, times T^2,
    as ``_kl``).

    Chosen over the KL of the top-k renormalised: the tail bucket keeps the student's mass outside
    the teacher's top k in the loss (renormalising both sides would let the student put any amount
    there unpenalised), it is a true KL between the two distributions coarsened the same way (so
    never above the full KL, and equal to it when k is the vocabulary), and it needs no more of the
    teacher than its top-k log-probabilities."""
    logp, index = teacher_top
    mask = labels[:, 1:] != -100
    s = student_logits[:, :-1][mask].float() / temperature
    logq = s.gather(-1, index) - torch.logsumexp(s, -1, keepdim=True)
    logp_tail = _log1mexp(torch.logsumexp(logp, -1).clamp_max(0))
    logq_tail = _log1mexp(torch.logsumexp(logq, -1).clamp_max(0))
    kl = (logp.exp() * (logp - logq)).sum(-1) + logp_tail.exp() * (logp_tail - logq_tail)
    return kl.sum() / max(1, kl.shape[0]) * temperature**2


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
    """This process's part of ``t``: the local shard of an FSDP2 DTensor, else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _state_finite(params, optimizer) -> bool:
    """Every trainable parameter and every floating-point optimizer state tensor is finite
    (this process's shards; callers combine the processes' answers)."""
    tensors = [p.detach() for p in params]
    for state in getattr(optimizer, "optimizer", optimizer).state.values():
        if isinstance(state, dict):
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    by_device: dict = {}
    with torch.no_grad():
        for t in tensors:
            t = _local(t)
            if t.numel():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        return all(bool(torch.stack(flags).all()) for flags in by_device.values())


def shard_frozen(model, accelerator):
    """A frozen model (the teacher) sharded with FSDP2 like the student: one unit per decoder layer
    (the classes of ``_no_split_modules``) and the rest in the root, over the student's mesh; its
    parameters move to the accelerator's device as shards. Forward only: every process must run
    each forward together (the all-gathers pair up), which the training step and the warm start do."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": True}
    mesh = getattr(accelerator, "torch_device_mesh", None)
    if mesh is not None:
        kwargs["mesh"] = mesh[tuple(accelerator.parallelism_config.fsdp_dim_names)]
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _save_checkpoint(
    accelerator, out: Path, step: int, keep_last: int, run_id: str, state: dict, last_good: Path | None = None
) -> Path:
    """Accelerate's state and relufy's JSON into ``checkpoints/.tmp-step-N``, then the manifest,
    then the rename to ``step-N``; older checkpoints are rotated out only after that. A failure to
    write (the disk full) stops every process with one line; the partial folder is removed and the
    checkpoints written before stay whole, for ``--resume``."""
    root = out / "checkpoints"
    final = root / ckpt.checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists() or tmp.is_symlink():
            shutil.rmtree(tmp) if tmp.is_dir() and not tmp.is_symlink() else tmp.unlink()
    accelerator.wait_for_everyone()
    failure = None
    try:
        accelerator.save_state(str(tmp))
    except Exception as e:  # noqa: BLE001 - torch reports a full disk as a RuntimeError; judged below
        failure = e
    if not _agree(accelerator, failure is None):  # every process stops, not only the one that failed
        message = _write_failure(failure, root, final, step, last_good) if failure else None
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RelufyError(message or f"another process failed to write checkpoint {final}; stopped after step {step}")
    accelerator.wait_for_everyone()

    def publish():
        try:
            ckpt.write_state(tmp, state)
            ckpt.finish(tmp, final, run_id, step)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RelufyError(_write_failure(e, root, final, step, last_good)) from None
        ckpt.rotate(out, keep_last, run_id, step)

    _on_main(accelerator, publish)
    return final


def _write_failure(e: BaseException, root: Path, final: Path, step: int, last_good: Path | None) -> str:
    """One line for a checkpoint that could not be written: no space left (what torch's writers
    report as ``unexpected pos`` or ``file write failed``), or the error's first line."""
    from ..io.atomic import is_disk_full

    try:
        full = is_disk_full(e) or shutil.disk_usage(root).free < 16 * 2**20
    except OSError:
        full = is_disk_full(e)
    last = f"{last_good} is the last whole checkpoint" if last_good else "no checkpoint was written before"
    if full:
        return (
            f"no space left on device writing checkpoint {final}; stopped after step {step} ({last}: free some space, "
            "then continue with --resume)"
        )
    first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    first = first.splitlines()[0][:300] if first else type(e).__name__
    return f"cannot write checkpoint {final} ({first}); stopped after step {step} ({last})"


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


def preflight(recipe: Recipe, download: bool = True, processes: int | None = None, tokenizer: bool = False) -> Path:
    """The checks that need no weights, the same for ``--dry-run`` as for the run: ``output_dir``
    against the inputs, ``data.seq_len`` against the model's context, the trackers installed, the
    run's length with ``processes`` processes (default: the launch's ``WORLD_SIZE``), and the
    model, its LoRA adapters, optimizer and teacher built on the meta device
    (``relufy.train.checks``; with ``tokenizer`` the tokenizer loaded too). A hub model's config
    is fetched only with ``download``. Returns ``output_dir`` resolved."""
    from .checks import check_model, reachable, run_length

    out = _check_paths(recipe)
    if recipe.model.config is not None or reachable(recipe.model.path, download):
        _check_context(recipe)
    _check_trackers(recipe.log.trackers)
    run_length(recipe, processes or int(os.environ.get("WORLD_SIZE", "1")))
    check_model(recipe, download=download, tokenizer=tokenizer)
    return out


def _check_context(recipe: Recipe) -> None:
    """``data.seq_len`` within the model's ``max_position_embeddings``, from its config alone; a
    ``sparsity.final_cutoff`` on a model trained with a relufy activation."""
    spec = recipe.model
    block = None
    if spec.config is not None:
        from .checks import scratch_config

        config = scratch_config(spec)  # its family supported, its sizes positive
        where = "model.config"
    else:
        from ..io.source import resolve
        from ..modeling.formats import read_config
        from ..modeling.spec import base_config

        raw = read_config(resolve(spec.path))
        _, config = base_config(raw)
        where = spec.path
        block = RelufyBlock.read(raw, spec.path)
    if recipe.sparsity.final_cutoff and is_identity(decisions.student_activation(spec.activation, block)):
        raise RelufyError(
            "sparsity.final_cutoff needs a relufy activation (model.activation, e.g. drelu): a model kept on its "
            "original activation is saved as the original architecture, which has no cutoffs"
        )
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0 and recipe.data.seq_len > limit:
        raise RelufyError(f"data.seq_len {recipe.data.seq_len} exceeds the model's context of {limit} tokens ({where})")


def _claim_folder(out: Path, recipe: Recipe, resume: bool, stack: contextlib.ExitStack) -> dict:
    """Main process, before any weights load: refuse a fresh run into a folder holding one, links
    and files relufy did not write among the entries it manages (``relufy.train.rundir``); take
    the folder's lock, and with ``resume`` pick the newest intact checkpoint of this run."""
    from ..io.atomic import target_lock

    rundir.check(out, recipe, resume)
    out.parent.mkdir(parents=True, exist_ok=True)
    stack.enter_context(target_lock(out))
    markers = rundir.check(out, recipe, resume)  # again, under the lock
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


def _first_writes(out: Path, plan: dict, recipe: Recipe, resume: bool) -> None:
    """Main process, once model and data have loaded: the first writes into ``output_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    if plan["new_run"]:
        ckpt.write_run(out, plan["run_id"], recipe.name)
    ckpt.remove_leftovers(out)
    for path, reason in plan["rejected"]:
        moved = ckpt.set_aside(ckpt.Verdict(Path(path), reason))
        notice(f"skipped checkpoint {path}: {reason}; moved to {moved.name}, not loaded")
    if resume and plan["checkpoint"] is None:
        dropped = " (the metrics logged so far are dropped)" if (out / "metrics.jsonl").exists() else ""
        notice(f"--resume: no intact checkpoint in {out / 'checkpoints'}; starting again from step 0{dropped}")
        ckpt.truncate_metrics(out / "metrics.jsonl", 0)


def train(recipe: Recipe, resume: bool = False, show_progress: bool = True, push=None) -> Path:
    """Run ``recipe`` (continue it from its newest intact checkpoint with ``resume``); returns ``final/``.
    ``push`` (a ``relufy.io.hub.HubPush``, e.g. ``HubPush.of(train_options)``): upload ``final/`` to
    the Hub once it is written, from the main process only."""
    from ..io.hub import check_push, push_folder

    check_push(push)  # no token: refused now, not after the training
    final = RecipeRun(recipe, resume=resume, show_progress=show_progress).run()
    if push is not None and os.environ.get("RANK", "0") == "0":
        push_folder(final, push, f"relufy train: {recipe.name}")
    return final


class RecipeRun:
    """One run of a training recipe, stage by stage (the shape of torchtune's recipes): each stage
    is one method and leaves its results on the object (``accelerator``, ``model``, ``teacher``,
    ``mixture``, ``heldout``, ``optimizer``, ``scheduler``, ``meter``, ...), so that one stage can
    change (FSDP2 through Accelerate, a sharded teacher, a per-rank warm start) without the others.

    ``run()`` calls the stages in this order:

    1. ``open_run``      checks that need no weights, the ``Accelerator`` (``make_accelerator``, the one
                         seam for how it is built), the launch check; the main process locks
                         ``output_dir`` (until ``run`` returns) and picks the checkpoint to resume
                         from (``plan``)
    2. ``load_model``    the seed; the model to train and its tokenizer (router auxiliary loss)
    3. ``setup_data``    the data mixture and the held-out set; the run's steps from the budget
    4. ``load_teacher``  the teacher, for distillation or the warm start (in ``teacher_dtype``; sharded
                         under FSDP2)
    5. ``begin_run``     the first writes into ``output_dir``: run.json, leftovers gone, bad checkpoints
                         set aside
    6. ``warm_start``    the FFN warm start of a fresh run, its layers split across the processes (the
                         mixture rewound afterwards); the teacher is kept only to distil
    7. ``wrap``          LoRA, gradient checkpointing, optimizer and scheduler, ``accelerator.prepare``
    8. ``resume``        the chosen checkpoint's model, optimizer, RNG, scheduler and mixture states;
                         metrics logged after it dropped
    9. ``start_logging`` recipe.yaml, trackers, the sparsity meter on the FFNs
    10. ``train``        held-out eval before a fresh run (by every process, as every eval), then per
                         step: ``step`` (one optimizer step over ``grad_accum`` micro-batches),
                         ``log`` (with ``evaluate`` every ``log.eval_every``), ``save_checkpoint``;
                         ``cleanup`` however the loop ends
    11. ``save_final``   held-out eval after training, ``final/`` (gathered from the shards; LoRA
                         merged), summary.json, curves.png

    Every stage runs on every process; what only the main process does is said where it happens.
    """

    def __init__(self, recipe: Recipe, resume: bool = False, show_progress: bool = True):
        self.recipe, self.resume_requested, self.show_progress = recipe, resume, show_progress
        self.stack = contextlib.ExitStack()  # the output folder's lock (main process)
        self.out: Path | None = None
        self.accelerator = None
        self.plan: dict = {}  # from the main process: run_id, new_run, checkpoint, state, rejected
        self.start_checkpoint: Path | None = None  # the checkpoint resumed from
        self.last_good: Path | None = None  # the newest checkpoint saved or resumed from
        self.model = self.tokenizer = self.teacher = None
        self.mixture = self.heldout = None
        self.tokens_per_step = self.total_steps = 0
        self.optimizer = self.scheduler = None
        self.params: list = []  # the trainable parameters (as prepared)
        self.start_step = 0
        self.base = self.sites = self.meter = None  # the model without LoRA/DDP wrappers, its FFNs, their meter
        self.eval_model = None  # what held-out evals run: the prepared model without a DDP wrapper (FSDP2: its root)
        self.heldout_before: tuple = (None, None)  # held-out (ppl, sparsity) before training
        self.eval_sets: dict = {}  # data.eval_sources: label -> Batch
        self.eval_before: dict = {}  # label -> (ppl, sparsity) before training
        self.original: dict = {}  # the teacher's held-out ppl: "heldout" and each eval source's label
        self.window_losses: list[float] = []  # the step losses since the last log
        self.progress = self.task = None
        self.log_lines = False  # plain log lines instead of a bar (no terminal)
        self.clock: tuple[float, int] = (0.0, 0)  # (time, tokens) when the loop began: tokens per second

    def run(self) -> Path:
        with self.stack:
            # everything written from here on: at most the inputs' permissions (relufy.train.rundir)
            self.stack.enter_context(rundir.narrowed_umask(rundir.input_umask(rundir.recipe_inputs(self.recipe))))
            self.open_run()
            self.load_model()
            self.setup_data()
            self.load_teacher()
            self.begin_run()
            self.warm_start()
            self.wrap()
            self.resume()
            self.start_logging()
            self.train()
            return self.save_final()

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def sharded(self) -> bool:
        """Whether the run shards its models (FSDP2)."""
        return self.accelerator.distributed_type.value == "FSDP"

    def make_accelerator(self, **kwargs):
        """The ``Accelerator`` of this run, from ``kwargs`` (what the recipe asks); the one place that
        says how it is built (the environment ``accelerate launch`` sets chooses DDP or FSDP2)."""
        from accelerate import Accelerator

        return Accelerator(**kwargs)

    def open_run(self) -> None:
        """``output_dir`` and ``data.seq_len`` checked, TensorBoard present, the Accelerator built;
        processes launched that Accelerate did not join, DeepSpeed and FSDP1 are refused. Then the
        main process refuses a fresh run into a run's folder, locks it and picks the checkpoint to
        resume from."""
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        recipe = self.recipe
        self.out = preflight(recipe)
        self.accelerator = accelerator = self.make_accelerator(
            gradient_accumulation_steps=recipe.budget.grad_accum,
            mixed_precision=decisions.mixed_precision(recipe),
            log_with=list(recipe.log.trackers) or None,
            project_dir=str(self.out),
            # the main process hashes each checkpoint (and verifies one on --resume) while the others
            # wait in a collective: room for hundreds of GB instead of the default 10-30 minutes
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))],
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and accelerator.num_processes == 1:  # each process would train alone, into the same folder
            raise RelufyError(
                f"{launched} processes were launched but Accelerate runs each on its own (distributed type "
                f"{accelerator.distributed_type.value}): Accelerate runs FSDP on GPUs only; on CPU use DDP "
                "(ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m relufy train ...)"
            )
        kind = accelerator.distributed_type.value
        if kind == "DEEPSPEED":
            raise RelufyError("relufy train does not run under DeepSpeed: use FSDP2 (recipes/accelerate/fsdp2.yaml) or DDP")
        if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise RelufyError("relufy train shards with FSDP2 only: set fsdp_version: 2 (recipes/accelerate/fsdp2.yaml)")
        self.plan = _on_main(accelerator, lambda: _claim_folder(self.out, recipe, self.resume_requested, self.stack))
        self.start_checkpoint = self.last_good = Path(self.plan["checkpoint"]) if self.plan["checkpoint"] else None

    def load_model(self) -> None:
        """The seed set, then the model to train and its tokenizer; ``sparsity.router_aux_coef``
        applied (refused for a model without a router auxiliary loss)."""
        from accelerate.utils import set_seed

        set_seed(self.recipe.seed)
        self.model, self.tokenizer = load_student(self.recipe)
        apply_router_aux(self.model, self.recipe.sparsity.router_aux_coef)

    def setup_data(self) -> None:
        """The training mixture and the held-out set (``relufy.train.mixture``, both giving
        ``(ids, labels)``); the tokens of one optimizer step over all processes and the run's steps."""
        from . import mixture as train_mixture
        from .checks import run_length

        recipe = self.recipe
        a = self.accelerator
        self.mixture, self.heldout = train_mixture.build(
            recipe.data, self.tokenizer, recipe.seed, rank=a.process_index, world=a.num_processes
        )
        self.eval_sets = train_mixture.build_eval(recipe.data, self.tokenizer)
        self.tokens_per_step, self.total_steps = run_length(recipe, self.accelerator.num_processes)

    def _teacher_dtype(self) -> torch.dtype:
        """``sparsity.distill.teacher_dtype`` resolved (``relufy.train.decisions.teacher_dtype``, which the
        memory plan reads too): auto is bf16 when sharded, else fp32 (and fp32 for a teacher that only
        serves the warm start)."""
        choice = decisions.teacher_dtype(decisions.teacher_dtype_choice(self.recipe.sparsity), self.sharded)
        return torch.bfloat16 if choice == "bf16" else torch.float32

    def load_teacher(self) -> None:
        """The teacher (the original SwiGLU model, frozen, in ``teacher_dtype``) loads when
        distillation or the warm start needs it: on the CPU until ``wrap``, or, under FSDP2, sharded
        across the processes at once (``shard_frozen``: each keeps its shard on its device)."""
        if decisions.loads_teacher(self.recipe.sparsity):
            from ..modeling.load import load

            teacher_path = decisions.teacher_path(self.recipe)
            if teacher_path is None:
                raise RelufyError("sparsity.distill.teacher is needed when the model is trained from scratch")
            self.teacher = load(teacher_path, activation="swiglu", dtype=self._teacher_dtype()).eval().requires_grad_(False)
            if self.sharded:
                self.teacher = shard_frozen(self.teacher, self.accelerator)

    def begin_run(self) -> None:
        """Everything has loaded: the first writes into ``output_dir`` (main process)."""
        _on_main(self.accelerator, lambda: _first_writes(self.out, self.plan, self.recipe, self.resume_requested))

    def warm_start(self) -> None:
        """A fresh run with ``sparsity.ffn_warmstart`` fits each FFN (or each block of
        ``ffn_warmstart.block`` layers) to the teacher's (``relufy.train.warmstart``; report in
        warmstart.json): every process fits its share of the layers (blocks) and receives the
        others', before the student is wrapped or sharded. Its tokens are not consumed from the
        training data: the mixture goes back to where it was. The teacher stays only to distil."""
        spec = self.recipe.sparsity.ffn_warmstart
        if spec and self.start_checkpoint is None:
            from .warmstart import ffn_warmstart

            accelerator = self.accelerator
            mixture_at_start = copy.deepcopy(self.mixture.state_dict())
            report = ffn_warmstart(
                self.model,
                self.teacher,
                self.mixture,
                spec,
                accelerator.device,
                self.recipe.data.seq_len,
                batch_tokens=decisions.WARMSTART_BATCH_TOKENS,
                show_progress=self.show_progress and accelerator.is_main_process,
                rank=accelerator.process_index,
                world=accelerator.num_processes,
            )
            self.mixture.load_state_dict(mixture_at_start)
            if accelerator.is_main_process:
                ckpt.write_json(self.out / "warmstart.json", report)
        if not decisions.keeps_teacher(self.recipe.sparsity):
            self.teacher = None

    def wrap(self) -> None:
        """LoRA adapters, gradient checkpointing, the AdamW optimizer and the warmup-cosine
        scheduler, then ``accelerator.prepare`` of model and optimizer (under FSDP2 it shards the
        model, adapters included, and rebinds the optimizer to the shards); the teacher to the device.
        The scheduler and the mixture are not registered with Accelerate (its custom states are
        pickles, loaded with weights_only=False): relufy keeps them in relufy_state.json."""
        recipe, o, total = self.recipe, self.recipe.optim, self.total_steps
        if recipe.lora is not None:
            from peft import get_peft_model

            self.model = get_peft_model(self.model, lora_config(recipe.lora))
        if decisions.gradient_checkpointing(recipe):
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.config.use_cache = False
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_lambda(s, o.warmup_steps, total, o.lr, o.min_lr)
        )
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        self.params = [p for p in self.model.parameters() if p.requires_grad]  # FSDP2 replaces parameters in prepare
        if self.teacher is not None and not self.sharded:  # a sharded teacher is on its device already
            self.teacher.to(self.accelerator.device)

    def resume(self) -> None:
        """With a checkpoint chosen in ``open_run``: its states loaded on every process (all go
        on, or all stop with one line), ``start_step`` set, the metrics logged after it dropped."""
        path, state, accelerator = self.start_checkpoint, self.plan["state"], self.accelerator
        if path is None:
            return
        error = self._load_checkpoint(path, state)
        if not _agree(accelerator, error is None):
            raise RelufyError(error or f"cannot resume from {path}: another process failed to load it")
        self.start_step = int(state["step"])
        saved_world = state.get("processes")
        if accelerator.is_main_process:
            notice(f"resuming from {path} (step {self.start_step})")
            if saved_world != accelerator.num_processes:
                notice(
                    f"{path} was saved by {saved_world} processes, this run has {accelerator.num_processes}: "
                    "the run goes on, but not as the original one would have"
                )
            ckpt.truncate_metrics(self.metrics_path, self.start_step)  # drop what the interrupted run logged later

    def _load_checkpoint(self, path: Path, state: dict) -> str | None:
        """This process's part of ``path`` and relufy's ``state`` loaded; the one-line error, or None."""
        try:
            problem = ckpt.scheduler_problem(state["scheduler"], self.scheduler.state_dict(), int(state["step"]))
            if problem:
                raise RelufyError(f"{ckpt.STATE_FILE}: the scheduler state does not fit this run ({problem})")
            self.accelerator.load_state(str(path))
            rng = path / f"random_states_{self.accelerator.process_index}.pkl"
            if rng.exists():
                ckpt.restore_rng(rng)  # Accelerate ignores a failure here; relufy does not
            self.scheduler.load_state_dict(state["scheduler"])
            self.mixture.load_state_dict(state["mixture"])
            return None
        except RelufyError as e:  # e.g. a data position saved by another number of processes
            return f"cannot resume from {path}: {e}"
        except pickle.UnpicklingError:  # torch.load(weights_only=True) met something other than tensors
            return (
                f"cannot resume from {path}: a file holds pickled objects other than tensors and "
                "plain containers (possibly code); refused, nothing of it was run"
            )
        except Exception as e:  # noqa: BLE001 - reported on one line, on every process
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
            first = first.splitlines()[0][:300] if first else type(e).__name__
            return f"cannot resume from {path} (its files match its manifest): {first}; did the recipe's model change?"

    def start_logging(self) -> None:
        """recipe.yaml (main process), the trackers (``log.trackers``), and the sparsity meter over the
        model's FFNs (installed by ``train``)."""
        from ..measure.sites import ffn_sites

        if self.accelerator.is_main_process:  # marked as this run's: relufy replaces only its own files
            text = rundir.recipe_header(self.plan["run_id"]) + dump(self.recipe)
            ckpt.write_text(self.out / rundir.RECIPE_FILE, text)
        if self.recipe.log.trackers:
            config = self.recipe.model_dump(mode="json")
            self.accelerator.init_trackers(self.recipe.name, init_kwargs={"wandb": {"config": config, "dir": str(self.out)}})
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.eval_model = unwrapped
        self.base = unwrapped.get_base_model() if self.recipe.lora else unwrapped
        self.sites = ffn_sites(self.base)
        self.meter = SparsityMeter(self.sites, l1=self.recipe.sparsity.l1 > 0)

    def _observe(self) -> None:
        """The meter on every FFN, when the log or the L1 term reads it (held-out evals remove it)."""
        if self.recipe.log.sparsity or self.meter.l1:
            for _, module in self.sites:
                module.relufy_observer = self.meter

    def evaluate(self) -> tuple[float | None, float | None]:
        """Held-out perplexity and mean FFN sparsity of the model as it is, by every process at once
        (each scores its share of the windows; under FSDP2 a forward on one process alone would
        pair its all-gathers with the others' collectives); every process gets the same figures.
        Leaves the FFNs without observers."""
        a = self.accelerator
        return heldout_eval(self.eval_model, self.heldout, a.device, rank=a.process_index, world=a.num_processes)

    def evaluate_outside(self, model=None) -> dict[str, tuple[float | None, float | None]]:
        """``{label: (ppl, sparsity)}`` on each of ``data.eval_sources`` (text outside the training
        mixture), as ``evaluate`` does on the in-domain slice; ``model``: the student by default."""
        a = self.accelerator
        model = self.eval_model if model is None else model
        return {
            label: heldout_eval(model, batch, a.device, rank=a.process_index, world=a.num_processes)
            for label, batch in self.eval_sets.items()
        }

    def score_original(self) -> None:
        """With a teacher (distillation): its perplexity on the in-domain held-out slice and on each
        eval source, the denominators of the recovery ratios in summary.json."""
        if self.teacher is None:
            return
        a = self.accelerator
        ppl, _ = heldout_eval(self.teacher, self.heldout, a.device, rank=a.process_index, world=a.num_processes)
        self.original = {"heldout": ppl}
        for label, (ppl, _) in self.evaluate_outside(self.teacher).items():
            self.original[label] = ppl

    def train(self) -> None:
        """The step loop from ``start_step`` to ``total_steps``: ``step``, then ``log`` and
        ``save_checkpoint`` when due; after the last step the state must be finite for ``final/``
        to be written. ``cleanup`` runs however the loop ends."""
        recipe, accelerator = self.recipe, self.accelerator
        self.score_original()
        if self.start_step == 0:
            self.heldout_before = self.evaluate()
            self.eval_before = self.evaluate_outside()
        self._observe()
        self.model.train()
        shown = self.show_progress and accelerator.is_main_process
        self.progress = _progress(shown and console.is_terminal)  # a bar on a terminal
        self.log_lines = shown and not console.is_terminal  # else one line per log.every steps
        if self.progress:
            self.task = self.progress.add_task(recipe.name, total=self.total_steps, completed=self.start_step)
        self.clock = (time.perf_counter(), self.start_step * self.tokens_per_step)
        try:
            for step in range(self.start_step, self.total_steps):
                grad_norm = self.step(step)
                done = step + 1
                if done % recipe.log.every == 0 or done == self.total_steps or done in recipe.log.eval_steps:
                    self.log(done, grad_norm)
                if self.progress:
                    self.progress.update(self.task, completed=done)
                if recipe.checkpoint.every and done % recipe.checkpoint.every == 0 and done < self.total_steps:
                    self.save_checkpoint(done)
            self._check_state(
                f"parameters or optimizer state became non-finite at step {self.total_steps}; the final model is not written"
            )
        finally:
            self.cleanup()

    def step(self, step: int):
        """Optimizer step ``step + 1``: ``grad_accum`` micro-batches forward and backward, the loss
        and then the gradient norm checked finite on every process (else all stop together),
        clipping, optimizer and scheduler. Returns the gradient norm (None if Accelerate gives none);
        the step's loss (the mean over the processes) goes to ``window_losses``."""
        accelerator, accum = self.accelerator, self.recipe.budget.grad_accum
        self._anneal(step)
        self.meter.reset()
        step_loss = 0.0
        for _ in range(accum):
            ids, labels = self._micro_batch()
            self.meter.l1_terms = []
            with accelerator.accumulate(self.model), accelerator.autocast():
                loss = self._loss(ids, labels, step)
                accelerator.backward(loss)  # divided by grad_accum inside
            self.meter.l1_terms = []
            step_loss += float(loss.detach()) / accum
        # the mean over the processes (each trained on its rows of the global batch): not finite
        # on one process, not finite for all, so all stop together
        step_loss = float(accelerator.gather(torch.tensor([step_loss], device=accelerator.device)).mean())
        if not math.isfinite(step_loss):
            raise self._diverged(f"loss became {step_loss} at step {step + 1}")
        # the norm is measured without clipping too (max_norm inf scales by exactly 1)
        clip = self.recipe.optim.grad_clip
        grad_norm = accelerator.clip_grad_norm_(self.params, clip if clip else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor
            grad_norm = grad_norm.full_tensor()
        if grad_norm is not None and not _agree(accelerator, math.isfinite(float(grad_norm))):
            raise self._diverged(f"the gradient norm became {float(grad_norm)} at step {step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.window_losses.append(step_loss)
        return grad_norm

    def _anneal(self, step: int) -> None:
        """``sparsity.anneal_steps``: every FFN's blend for step ``step + 1`` (``anneal_blend``)."""
        if self.recipe.sparsity.anneal_steps:
            blend = anneal_blend(step, self.recipe.sparsity.anneal_steps)
            for _, module in self.sites:
                module.relufy_blend = blend

    def _micro_batch(self):
        """This process's ``(ids, labels)`` on its device: its rows of the global batch
        (``Mixture.local_batch``: in-memory sources give every process its rows of one global draw,
        node-split streaming sources each process its own next sequences)."""
        return self.mixture.local_batch(self.recipe.budget.micro_batch_size).to(self.accelerator.device)

    def _loss(self, ids, labels, step: int):
        """The model's loss, plus the distillation KL to the teacher (over the vocabulary, or its top k
        and a tail bucket: ``_kl_top_k``) and the (ramped) L1 term."""
        sparsity = self.recipe.sparsity
        d = sparsity.distill
        hidden = bool(self.teacher is not None and d.hidden_weight)
        outputs = self.model(input_ids=ids, labels=labels, output_hidden_states=hidden)
        loss = outputs.loss
        if self.teacher is not None:
            with torch.no_grad():
                t_out = self.teacher(input_ids=ids, output_hidden_states=hidden)
                teacher = t_out.logits
                if d.top_k:  # kept: the top-k log-probabilities; the vocabulary-wide logits go at once
                    teacher = _teacher_top_k(teacher, labels, d.temperature, d.top_k)
            kl = _kl_top_k if d.top_k else _kl
            loss = loss + d.weight * kl(outputs.logits, teacher, labels, d.temperature)
            if hidden:
                loss = loss + d.hidden_weight * hidden_distance(outputs.hidden_states, t_out.hidden_states, labels)
            del t_out
        if self.meter.l1:
            factor = l1_factor(step, self.total_steps, sparsity)
            loss = loss + sparsity.l1 * factor * torch.stack(self.meter.l1_terms).mean()
        return loss

    def log(self, done: int, grad_norm) -> None:
        """One line of metrics.jsonl (main process) and the trackers, after step ``done``: the mean
        loss since the last line, lr, sparsity (over all processes), gradient norm, throughput;
        held-out figures every ``log.eval_every`` steps. Every process calls it (its sums are
        collectives)."""
        recipe, accelerator = self.recipe, self.accelerator
        if recipe.log.sparsity:  # the zeros counted on every process
            sparsity = self.meter.fractions(accelerator.reduce(self.meter.tallies(accelerator.device), "sum"))
        else:
            sparsity = [float("nan")]
        started, tokens_then = self.clock
        record = {
            "step": done,
            "tokens": done * self.tokens_per_step,
            "loss": sum(self.window_losses) / len(self.window_losses),
            "lr": self.scheduler.get_last_lr()[0],
            "sparsity": sum(sparsity) / len(sparsity),
            "sparsity_per_layer": sparsity,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_second": (done * self.tokens_per_step - tokens_then) / (time.perf_counter() - started),
        }
        if (recipe.log.eval_every and done % recipe.log.eval_every == 0) or done in recipe.log.eval_steps:
            record["heldout_ppl"], record["heldout_sparsity"] = self.evaluate()
            if self.eval_sets:
                record["eval"] = {k: {"ppl": p, "sparsity": z} for k, (p, z) in self.evaluate_outside().items()}
            self._observe()
        self.window_losses = []
        if accelerator.is_main_process:
            with open(self.metrics_path, "a") as f:
                f.write(ckpt.dumps(record) + "\n")
        flat = {k: v for k, v in record.items() if isinstance(v, float | int)}
        for label, figures in record.get("eval", {}).items():
            flat.update({f"eval/{label}/{k}": v for k, v in figures.items() if isinstance(v, float | int)})
        accelerator.log(flat, step=done)
        if self.progress:
            self.progress.update(
                self.task,
                description=f"{recipe.name} loss {record['loss']:.3f} lr {record['lr']:.1e} "
                f"zeros {record['sparsity']:.1%} {record['tokens_per_second']:,.0f} tok/s",
            )
        if self.log_lines:
            console.print(self._log_line(record), markup=False, highlight=False, soft_wrap=True)

    def _log_line(self, record: dict) -> str:
        """The plain log line of a metrics record: step, loss, lr, zeros, tokens/s, the time left at
        the pace since the loop began (held-out figures when they were measured)."""
        done, total = record["step"], self.total_steps
        elapsed, steps = time.perf_counter() - self.clock[0], done - self.clock[1] // self.tokens_per_step
        left = _duration(elapsed / steps * (total - done)) if steps > 0 else "-"
        line = (
            f"{self.recipe.name} step {done}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e} "
            f"zeros {record['sparsity']:.1%} {record['tokens_per_second']:,.0f} tok/s ETA {left}"
        )
        if record.get("heldout_ppl") is not None:
            line += f" held-out ppl {record['heldout_ppl']:.2f}"
        for label, figures in record.get("eval", {}).items():
            if figures["ppl"] is not None:
                line += f" {label} ppl {figures['ppl']:.2f}"
        return line

    def save_checkpoint(self, done: int) -> None:
        """``checkpoints/step-N`` after step ``done`` (``relufy.train.checkpoint``), only when the
        parameters and the optimizer state are finite on every process."""
        from accelerate.utils import gather_object

        self._check_state(f"parameters or optimizer state became non-finite at step {done}; not saved")
        state = {
            "format": "relufy-train-state",
            "version": ckpt.FORMAT_VERSION,
            "run_id": self.plan["run_id"],
            "step": done,
            "tokens": done * self.tokens_per_step,
            "total_steps": self.total_steps,
            "processes": self.accelerator.num_processes,
            "scheduler": self.scheduler.state_dict(),
            "mixture": self.mixture.checkpoint_state(gather_object),  # per process with node-split streams
        }
        keep = self.recipe.checkpoint.keep_last
        self.last_good = _save_checkpoint(self.accelerator, self.out, done, keep, self.plan["run_id"], state, self.last_good)

    def _check_state(self, what: str) -> None:
        if not _agree(self.accelerator, _state_finite(self.params, self.optimizer)):
            raise self._diverged(what)

    def _diverged(self, what: str) -> TrainingDiverged:
        last = f" (last good checkpoint: {self.last_good})" if self.last_good else " (no checkpoint saved yet)"
        return TrainingDiverged(f"{what}; stopped{last}")

    def cleanup(self) -> None:
        """After the step loop, however it ended: the progress display stopped, the FFNs' observers removed."""
        if self.progress:
            self.progress.stop()
        for _, module in self.sites or []:
            module.relufy_observer = module.relufy_blend = None

    def save_final(self) -> Path:
        """The held-out eval after training; ``final/`` in ``relufy convert``'s format (LoRA merged),
        summary.json and curves.png (main process); Accelerate's trackers ended. Under FSDP2 the
        weights are gathered from the shards onto the main process's CPU first (every process
        takes part), and saved from there."""
        from ..modeling.save import save_relufy
        from .plots import plot_curves

        accelerator, recipe = self.accelerator, self.recipe
        heldout_after = self.evaluate()
        eval_after = self.evaluate_outside()
        cutoff = None
        if recipe.sparsity.final_cutoff:
            cutoff = self.final_cutoff(heldout_after, eval_after)
            heldout_after = self.evaluate()
            eval_after = self.evaluate_outside()
        unwrapped = accelerator.unwrap_model(self.model)
        state_dict = accelerator.get_state_dict(self.model)  # FSDP2: the full weights, on the main process only
        if accelerator.is_main_process:
            if recipe.lora is not None:
                if self.sharded:
                    unwrapped = self._unsharded_copy(state_dict)
                unwrapped, state_dict = unwrapped.merge_and_unload(), None
            tokens = self.total_steps * self.tokens_per_step
            note = f"Trained by `relufy train` ({recipe.name}): {self.total_steps} steps, {tokens:,} tokens."
            ppl0, (ppl1, zeros1) = self.heldout_before[0], heldout_after
            if ppl1 is not None:
                before = f"{ppl0:.2f} before, " if ppl0 is not None else ""
                note += f" Held-out perplexity {before}{ppl1:.2f} after"
                note += f"; FFN zeros {zeros1:.1%}." if zeros1 is not None else "."
            for label, (ppl, _) in eval_after.items():
                if ppl is not None:
                    ratio = f" ({ppl / self.original[label]:.2f}x the original)" if self.original.get(label) else ""
                    note += f" On {label} (outside the training text): perplexity {ppl:.2f}{ratio}."
            # the card and any later export name the model trained ("finetune" of its base_model)
            block = RelufyBlock.read(unwrapped.config).with_updates(
                trained={"recipe": recipe.name, "steps": self.total_steps, "tokens": tokens}
            )
            if cutoff is not None:
                block = block.with_updates(cutoffs=cutoff["cutoffs"])
                note += (
                    f" Magnitude cutoffs per FFN (relufy.cutoffs) calibrated to {cutoff['sparsity']:.0%} zeros on "
                    f"{cutoff['tokens']:,} training tokens apply; the figures above are taken with them."
                )
            unwrapped.config.relufy = block.to_dict()
            save_relufy(unwrapped, self.out / "final", tokenizer=self.tokenizer, state_dict=state_dict, card_note=note)
            summary = {
                "steps": self.total_steps,
                "tokens": tokens,
                "heldout_tokens": int(self.heldout.ids.numel()),
                "heldout_ppl_before": self.heldout_before[0],
                "heldout_sparsity_before": self.heldout_before[1],
                "heldout_ppl": heldout_after[0],
                "heldout_sparsity": heldout_after[1],
                "heldout_ppl_original": self.original.get("heldout"),
                "eval": self._eval_summary(eval_after),
            }
            if cutoff is not None:
                summary["cutoff"] = {k: v for k, v in cutoff.items() if k != "cutoffs"}
            ckpt.write_json(self.out / "summary.json", summary)
            plot_curves(self.metrics_path, self.out / rundir.CURVES_FILE, mark=rundir.mark(self.plan["run_id"]))
        # every process waits for final/: the last collective's work is then released while no
        # process holds the GIL (gloo's destructor at exit joins its threads holding it, and hung
        # forever when one of them still had a tensor to release)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.out / "final"

    def final_cutoff(self, heldout: tuple, outside: dict) -> dict:
        """``sparsity.final_cutoff``: one magnitude cutoff per FFN module, the quantile at ``sparsity``
        of its combined activations on ``tokens`` fresh training tokens (``relufy.measure.threshold``,
        experts pooled), set on the student. Every process runs the calibration forward passes on its
        draw (a sharded model's all-gathers pair up); process 0's cutoffs go to all. Returns the
        report: the cutoffs, the zeros they reach on the calibration tokens, and ``heldout`` /
        ``outside`` (the figures before, as ``evaluate`` and ``evaluate_outside`` gave them)."""
        from ..measure.evaluate import score
        from ..measure.threshold import calibrate
        from ..modeling.ffn import set_cutoffs
        from ..text import Window

        spec, a = self.recipe.sparsity.final_cutoff, self.accelerator
        ids, _ = self.mixture.batch(max(1, spec.tokens // self.recipe.data.seq_len))
        windows = [Window(row, torch.full_like(row, -100)) for row in ids]
        model, was_training = self.eval_model, self.eval_model.training
        model.eval()
        calibration = calibrate(self.base, [spec.sparsity], lambda: score(model, windows, 4, a.device), per_expert=False)
        model.train(was_training)
        # 0: the FFN's zeros alone reach the target; inf (every entry): too few tokens to place a cutoff
        cutoffs = {name: ts[0] for name, ts in calibration.thresholds[spec.sparsity].items() if 0 < ts[0] < math.inf}
        reached = calibration.below[spec.sparsity]
        if a.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            cutoffs, reached = broadcast_object_list([cutoffs, reached], from_process=0)
        set_cutoffs(self.base, cutoffs)
        if self.show_progress and a.is_main_process:
            console.print(
                f"final cutoff: {len(cutoffs)} FFN(s) cut, {reached:.1%} zeros on {ids.numel():,} calibration tokens",
                markup=False,
                highlight=False,
            )
        return {
            "sparsity": spec.sparsity,
            "tokens": int(ids.numel()),
            "calibration_zeros": reached,
            "cutoffs": cutoffs,
            "before": {
                "heldout_ppl": heldout[0],
                "heldout_sparsity": heldout[1],
                "eval": {label: {"ppl": ppl, "sparsity": zeros} for label, (ppl, zeros) in outside.items()},
            },
        }

    def _eval_summary(self, after: dict) -> dict:
        """summary.json's ``eval``: per eval source its tokens, perplexity and zeros before and after,
        the teacher's perplexity and the ratio after / teacher (null where not measured)."""
        out = {}
        for label, batch in self.eval_sets.items():
            before = self.eval_before.get(label, (None, None))
            ppl, zeros = after[label]
            original = self.original.get(label)
            out[label] = {
                "tokens": int(batch.ids.numel()),
                "ppl_before": before[0],
                "sparsity_before": before[1],
                "ppl": ppl,
                "sparsity": zeros,
                "ppl_original": original,
                "ratio": ppl / original if ppl is not None and original else None,
            }
        return out

    def _unsharded_copy(self, state_dict: dict):
        """Main process, FSDP2 with LoRA: the trained model rebuilt unsharded for peft to merge (the
        student loaded again, with the config as trained, the same adapters, then the gathered
        weights). It holds a second copy of the model in CPU memory while ``final/`` is written."""
        from peft import get_peft_model

        model, _ = load_student(self.recipe)
        model.config = self.base.config  # as trained (router and cache settings), as the unsharded path saves it
        model = get_peft_model(model, lora_config(self.recipe.lora))
        model.load_state_dict(state_dict)
        return model


def _check_trackers(trackers) -> None:
    """Each of ``log.trackers`` is installed (one line naming the extra otherwise)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    for name, available in (("tensorboard", is_tensorboard_available), ("wandb", is_wandb_available)):
        if name in trackers and not available():
            raise RelufyError(f"log.trackers: {name} is not installed: pip install 'relufy[{name}]' (or {name})")


def _duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from ..progress import new_progress

    return new_progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
