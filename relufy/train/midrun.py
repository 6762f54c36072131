"""``relufy train RECIPE --export-step N``: a run's training checkpoint as a model folder.

A run keeps its training state in ``OUTPUT_DIR/checkpoints/step-N`` (``relufy.train.checkpoint``),
in the form Accelerate saves it: ``model.safetensors`` from one process or DDP, sharded
``torch.distributed.checkpoint`` folders (``pytorch_model_fsdp_0/``) from FSDP2. Neither is a
folder transformers or ``relufy eval`` can open. This writes the checkpoint's weights into
``OUTPUT_DIR/exports/step-N`` in ``relufy convert``'s format (LoRA adapters merged), so a run can
be evaluated while it trains, or a step other than the last kept.

Runs in one process, on the CPU, without a process group: the recipe's student is built as
training builds it (LoRA adapters included), and the checkpoint is read into it. A checkpoint is
read only after its manifest is verified (sizes, SHA-256, run id) and, for FSDP2, after its
``.metadata`` passed the allow-list unpickler (``checkpoint.verify``): nothing else is unpickled.
Memory: one full copy of the model in fp32 (plus the checkpoint's memory map). The run folder's
``checkpoints/``, ``exports/`` and the step's folder must not be links (``relufy.train.rundir``),
a checkpoint whose weights file cannot be read (truncated, a damaged header) is refused on one
line even when its manifest was rewritten to match, and the export gets at most the permissions
of the checkpoint and the recipe's inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import RelufyError
from ..io.atomic import atomic_dir
from . import checkpoint as ckpt
from . import rundir
from .recipe import Recipe

EXPORTS = "exports"
FSDP_MODEL = "pytorch_model_fsdp_0"


def export_checkpoint(recipe: Recipe, step: int, out: str | Path | None = None) -> Path:
    """Write step ``step``'s checkpoint of the run in ``recipe.output_dir`` as a model folder
    (default ``OUTPUT_DIR/exports/step-N``, which must not exist yet); returns the folder."""
    run = Path(recipe.output_dir)
    folder = run / "checkpoints" / ckpt.checkpoint_name(step)
    rundir.check_entries(run, recipe)
    if folder.is_symlink():
        raise RelufyError(f"{folder} is a symbolic link, not a checkpoint of this run; not exported")
    if not folder.is_dir():
        steps = [ckpt.step_of(p) for p in ckpt.checkpoint_dirs(run)] if run.is_dir() else []
        kept = ", ".join(str(s) for s in steps) or "none"
        raise RelufyError(f"{run} has no checkpoint of step {step} (kept: {kept})")
    verdict = ckpt.verify(folder, ckpt.read_run_id(run))
    if verdict.reason is not None:
        raise RelufyError(f"{folder}: {verdict.reason}; not exported")
    dest = Path(out) if out is not None else run / EXPORTS / ckpt.checkpoint_name(step)
    if dest.exists():
        raise RelufyError(f"{dest} already exists: remove it, or export another step")
    model, tokenizer = _student(recipe)
    _read_weights(model, folder)
    if recipe.lora is not None:
        model = model.merge_and_unload()
    model.config.use_cache = True
    note = f"Checkpoint of step {step} of `relufy train` ({recipe.name}), exported with --export-step."
    from ..modeling.save import write_relufy

    with rundir.narrowed_umask(rundir.input_umask([folder, *rundir.recipe_inputs(recipe)])):
        dest.parent.mkdir(parents=True, exist_ok=True)
        with atomic_dir(dest) as tmp:
            write_relufy(model, tmp, tokenizer, card_note=note)
    return dest


def _student(recipe: Recipe):
    """The model as training held it when it saved: the recipe's student (router settings
    applied) with its LoRA adapters."""
    from .checks import apply_router_aux, lora_config
    from .loop import load_student

    model, tokenizer = load_student(recipe)
    apply_router_aux(model, recipe.sparsity.router_aux_coef)
    if recipe.lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(recipe.lora))
    return model, tokenizer


def _read_weights(model, folder: Path) -> None:
    """The checkpoint's weights into ``model``: every tensor the model has must be there, with its
    shape (a checkpoint of another recipe is refused in one line)."""
    state = model.state_dict()
    if (folder / FSDP_MODEL).is_dir():
        import warnings

        import torch.distributed.checkpoint as dcp

        wanted = {"model": state}
        try:
            with warnings.catch_warnings():  # "no process group: loading in one process" is what is meant
                warnings.simplefilter("ignore")
                dcp.load(wanted, checkpoint_id=str(folder / FSDP_MODEL))
        except (RuntimeError, KeyError, ValueError) as e:
            raise RelufyError(f"{folder}: the checkpoint does not fit the recipe's model ({_first(e)})") from None
        except (Exception, dcp.api.CheckpointException) as e:  # noqa: BLE001 - damaged shards (CheckpointException is a BaseException)
            raise RelufyError(f"{folder}: the sharded checkpoint cannot be read ({_first(e)}); not exported") from None
        return
    path = folder / "model.safetensors"
    if not path.is_file():
        raise RelufyError(f"{folder}: no model.safetensors or {FSDP_MODEL}/ (not a relufy train checkpoint)")
    from safetensors.torch import load_file

    try:
        saved = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise RelufyError(f"{path}: not a readable safetensors file ({_first(e)}); not exported") from None
    missing = sorted(name for group in _groups(model) if not set(group) & set(saved) for name in group)
    unexpected = sorted(set(saved) - set(state))
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise RelufyError(f"{path}: the checkpoint does not fit the recipe's model ({what})")
    for name, tensor in saved.items():
        if tensor.shape != state[name].shape:
            raise RelufyError(f"{path}: {name} has shape {tuple(tensor.shape)}, the recipe's model {tuple(state[name].shape)}")
    with torch.no_grad():
        model.load_state_dict(saved, strict=False)


def _groups(model) -> list[list[str]]:
    """The model's tensor names, those of tied weights in one group (safetensors keeps one name of
    each group; loading it sets them all)."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _first(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
