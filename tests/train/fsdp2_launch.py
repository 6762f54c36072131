"""Test harness: ``relufy train``'s real FSDP2 path in CPU processes (gloo), no GPU needed.

Run as ``accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2
tests/train/fsdp2_launch.py [--resume] RECIPE.yaml [RECIPE.yaml ...]`` with
``ACCELERATE_USE_CPU=true``: the shipped config sets the ``FSDP_*`` variables, and each process
runs the recipes one after the other with ``RecipeRun``, as ``relufy train`` does.

Accelerate refuses FSDP without GPUs (with ``ACCELERATE_USE_CPU`` it makes the processes a
MULTI_CPU run), but torch's FSDP2 (``fully_shard``) runs on CPU over gloo, and Accelerate's FSDP2
``prepare``, ``save_state``, ``load_state`` and ``get_state_dict`` work once the state says FSDP.
So the only change is in ``RecipeRun.make_accelerator``, the seam for how the Accelerator is
built: the FSDP plugin from the launcher's variables (as Accelerate builds it on GPUs), and the
distributed type set to FSDP after creation. Everything else is relufy's own code, a real process
group and real ``fully_shard``.

Several recipes in one launch (to spare the ~10 s start of a launch): Accelerate's end of training
destroys the process group, so the harness's Accelerator keeps it until the last recipe and
resets Accelerate's singletons between runs. Not for production: a single run per process there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

from relufy.errors import RelufyError
from relufy.train.loop import RecipeRun
from relufy.train.recipe import load_recipe


class _KeepGroup(Accelerator):
    def end_training(self):  # the process group outlives one recipe; torchrun's exit ends it
        for tracker in self.trackers:
            tracker.finish()


class FSDP2Run(RecipeRun):
    def make_accelerator(self, **kwargs):
        plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables, as Accelerate builds it
        accelerator = _KeepGroup(fsdp_plugin=plugin, **kwargs)
        assert accelerator.distributed_type == DistributedType.MULTI_CPU, accelerator.distributed_type
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        return accelerator


def write_facts(run: RecipeRun, folder: Path) -> None:
    """What the tests cannot see from outside: how this process held the student and the teacher."""

    def held(model) -> dict:
        params = list(model.parameters())
        local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
        return {
            "sharded": all(hasattr(p, "to_local") for p in params),
            "dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
            "numel": sum(p.numel() for p in params),
            "local_numel": sum(t.numel() for t in local),
        }

    facts = {"sharded": run.sharded, "student": held(run.model)}
    if run.teacher is not None:
        facts["teacher"] = held(run.teacher)
    folder.mkdir(parents=True, exist_ok=True)
    out = Path(run.recipe.output_dir)
    name = f"{out.parent.name}-{out.name}.{run.accelerator.process_index}.json"
    (folder / name).write_text(json.dumps(facts))


def main(argv: list[str]) -> int:
    if os.environ.get("RELUFY_TEST_PIDS"):  # torchrun starts each worker in a session of its own: a test
        # that kills the run must know their ids
        pids = Path(os.environ["RELUFY_TEST_PIDS"])
        pids.mkdir(parents=True, exist_ok=True)
        (pids / os.environ["RANK"]).write_text(str(os.getpid()))
    resume = "--resume" in argv
    for i, path in enumerate(a for a in argv if a != "--resume"):
        if i:  # Accelerate's singletons as before the first run; PartialState keeps the process group
            PartialState().distributed_type = DistributedType.MULTI_CPU
            AcceleratorState._reset_state()
            GradientState._reset_state()
        try:
            run = FSDP2Run(load_recipe(path), resume=resume, show_progress=False)
            run.run()
            if os.environ.get("RELUFY_TEST_FACTS"):
                write_facts(run, Path(os.environ["RELUFY_TEST_FACTS"]))
        except RelufyError as e:
            print(f"relufy: error: {e}", file=sys.stderr, flush=True)
            return 2
    PartialState().destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
