"""Cluster pipelines for the paper's recipes: convert -> ``accelerate launch`` train -> eval -> export.

    python -m relufy.pipelines.cluster mistral [--out runs/turbosparse-mistral] [--nproc 64]
        [--accelerate-config FILE] [--eval-data SPEC] [--dry-run]

(``make turbosparse-mistral NPROC=64 ACCELERATE_CONFIG=... [DRY_RUN=1]``.) ``--dry-run`` checks
everything that can be checked on one CPU without weights or network: the recipe with the
pipeline's overrides (pydantic, with the field named on error), the accelerate config (readable,
a known distributed type, a process count), that the recipe's features work under that
distributed type, and that the tools the steps call exist; then prints the commands. Without it
the steps run in order and a step whose output is complete is skipped (rerun to continue).
The recipes and the default accelerate config (``accelerate/fsdp2``) are the ones shipped with
relufy (``relufy recipes list``).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import RelufyError
from ..train import recipes


@dataclass(frozen=True)
class Pipeline:
    source: str  # hub id of the original SwiGLU model
    recipe: str  # a shipped training recipe's name (relufy recipes list)


PIPELINES = {
    "mistral": Pipeline("mistralai/Mistral-7B-v0.1", "turbosparse-mistral-7b"),
    "mixtral": Pipeline("mistralai/Mixtral-8x7B-v0.1", "turbosparse-mixtral-8x7b"),
    "llama-3.1-8b": Pipeline("meta-llama/Llama-3.1-8B", "turbosparse-llama-3.1-8b"),
    "qwen2.5-7b": Pipeline("Qwen/Qwen2.5-7B", "turbosparse-qwen2.5-7b"),
    "qwen3-30b-a3b": Pipeline("Qwen/Qwen3-30B-A3B", "turbosparse-qwen3-30b-a3b"),
}
DISTRIBUTED = ("NO", "MULTI_GPU", "MULTI_CPU", "FSDP")
GPUS_PER_MACHINE = 8  # what a launch may start per machine (an 8-GPU node)


@dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    done: Path  # exists when the step finished


def plan(name: str, out: Path, nproc: int, accelerate_config: str, eval_data: str, source: str | None = None) -> list[Step]:
    if name not in PIPELINES:
        raise RelufyError(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
    p = PIPELINES[name]
    out = Path(out)
    drelu, final = out / "drelu", out / "train" / "final"
    return [
        Step("convert", ["relufy", "convert", source or p.source, str(drelu)], drelu / "config.json"),
        Step(
            "train",
            [
                "accelerate",
                "launch",
                "--config_file",
                accelerate_config,
                "--num_processes",
                str(nproc),
                "-m",
                "relufy",
                "train",
                p.recipe,
                f"model.path={drelu}",
                f"output_dir={out / 'train'}",
            ],
            final / "config.json",
        ),
        Step(
            "eval",
            [
                "relufy",
                "eval",
                str(final),
                "--data",
                eval_data,
                "--topk",
                "0,0.5,0.8,0.85,0.9",
                "--json",
                str(out / "eval.json"),
                "--stats-out",
                str(out / "stats.safetensors"),
                "--plot",
                str(out / "plots"),
            ],
            out / "eval.json",
        ),
        Step(
            "export",
            [
                "relufy",
                "export",
                str(final),
                str(out / "export"),
                "--stats",
                str(out / "stats.safetensors"),
                "--data",
                eval_data,
                "--reorder",
                "--predictors",
                "--eval-json",
                str(out / "eval.json"),
                "--json",
                str(out / "export.json"),
            ],
            out / "export.json",
        ),
    ]


def check(steps: list[Step], accelerate_config: str, nproc: int) -> list[str]:
    """What a dry run verifies; returns one line per check passed (raises on the first failure)."""
    import yaml

    from ..train.recipe import load_recipe

    train = next(s for s in steps if s.name == "train")
    recipe_path = recipes.resolve(train.argv[train.argv.index("train") + 1])
    overrides = [a for a in train.argv if "=" in a and not a.startswith("-")]
    recipe = load_recipe(recipe_path, overrides)
    lines = [
        f"recipe {recipe_path.stem}: valid ({recipe.budget.max_tokens or recipe.budget.max_steps} "
        f"{'tokens' if recipe.budget.max_tokens else 'steps'}, {len(recipe.data.sources)} data sources)"
    ]
    path = Path(accelerate_config)
    if not path.is_file():
        raise RelufyError(f"accelerate config {accelerate_config} not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RelufyError(f"{accelerate_config}: not YAML ({str(e).splitlines()[0]})") from None
    kind = config.get("distributed_type")
    if kind == "DEEPSPEED":
        raise RelufyError(f"{accelerate_config}: relufy train does not run under DeepSpeed: use the shipped accelerate/fsdp2")
    if kind not in DISTRIBUTED:
        raise RelufyError(f"{accelerate_config}: distributed_type {kind!r} is not one of {', '.join(DISTRIBUTED)}")
    if nproc < 1:
        raise RelufyError(f"--nproc must be positive, got {nproc}")
    machines = int(config.get("num_machines") or 1)
    if nproc > GPUS_PER_MACHINE * machines:
        raise RelufyError(
            f"{nproc} processes on {machines} machine(s) of {GPUS_PER_MACHINE} GPUs: use a config for more machines "
            "(the shipped accelerate/fsdp2-multinode: num_machines) or --nproc at most "
            f"{GPUS_PER_MACHINE * machines}"
        )
    if kind == "FSDP" and (config.get("fsdp_config") or {}).get("fsdp_version") != 2:
        raise RelufyError(f"{accelerate_config}: relufy train shards with FSDP2 only: set fsdp_config.fsdp_version: 2")
    lines.append(f"accelerate config {path.name}: {kind}, {nproc} processes on {machines} machine(s)")
    for tool in ("relufy", "accelerate"):
        if shutil.which(tool) is None and not (Path(sys.executable).parent / tool).exists():
            raise RelufyError(f"{tool} is not on PATH (install relufy in this environment)")
    lines.append("tools: relufy, accelerate found")
    return lines


def run(steps: list[Step]) -> None:
    bin_dir = Path(sys.executable).parent
    for step in steps:
        if step.done.exists():
            print(f"== {step.name}: done ({step.done})")
            continue
        print(f"== {step.name}: {shlex.join(step.argv)}", flush=True)
        argv = [str(bin_dir / step.argv[0]) if (bin_dir / step.argv[0]).exists() else step.argv[0], *step.argv[1:]]
        code = subprocess.call(argv)
        if code != 0:
            raise RelufyError(f"step {step.name} failed (exit {code}); fix it and rerun: finished steps are skipped")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m relufy.pipelines.cluster", description=__doc__.splitlines()[0])
    parser.add_argument("pipeline", choices=sorted(PIPELINES))
    parser.add_argument("--out", type=Path, help="Output folder (default runs/turbosparse-<pipeline>).")
    parser.add_argument("--nproc", type=int, default=8, help="Processes for accelerate launch (GPUs).")
    parser.add_argument("--accelerate-config", help="An accelerate config file (default: the shipped accelerate/fsdp2).")
    parser.add_argument("--eval-data", default="wikitext:wikitext-2-raw-v1:test")
    parser.add_argument("--source", help="Original model (default: the recipe's hub id).")
    parser.add_argument("--dry-run", action="store_true", help="Check and print the steps; run nothing.")
    args = parser.parse_args(argv)
    out = args.out or Path("runs") / f"turbosparse-{args.pipeline}"
    try:
        if args.accelerate_config is None:
            args.accelerate_config = str(recipes.find(f"{recipes.ACCELERATE}/fsdp2").path)
        steps = plan(args.pipeline, out, args.nproc, args.accelerate_config, args.eval_data, args.source)
        if args.dry_run:
            for line in check(steps, args.accelerate_config, args.nproc):
                print(f"ok: {line}")
            for step in steps:
                print(f"{step.name}: {shlex.join(step.argv)}")
            return 0
        check(steps, args.accelerate_config, args.nproc)
        run(steps)
    except RelufyError as e:
        print(f"relufy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
