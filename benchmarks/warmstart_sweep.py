"""Sweep the FFN warm start's L1 coefficient: held-out perplexity and FFN zeros right after the
per-layer fit (no training), one row per coefficient, all on the same data and teacher.

    python benchmarks/warmstart_sweep.py recipes/smollm2-recovery-cpu.yaml --l1 0,1,3 \\
        model.path=runs/demo/drelu sparsity.ffn_warmstart.steps=60 sparsity.ffn_warmstart.tokens=8192

The recipe gives model, data, held-out slice and the warm start's tokens / steps / lr; ``key=value``
overrides as for ``relufy train``. Writes ``--json`` (default runs/warmstart-sweep.json).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--l1", default="0,1", help="comma-separated coefficients")
    ap.add_argument("--json", default="runs/warmstart-sweep.json")
    args = ap.parse_intermixed_args(argv)

    from relufy.measure.meter import heldout_eval
    from relufy.modeling.load import load
    from relufy.train import mixture as train_mixture
    from relufy.train.loop import load_student
    from relufy.train.recipe import load_recipe
    from relufy.train.warmstart import ffn_warmstart

    torch.manual_seed(0)
    recipe = load_recipe(args.recipe, args.overrides)
    spec = recipe.sparsity.ffn_warmstart
    if spec is None:
        raise SystemExit("the recipe has no sparsity.ffn_warmstart section")
    model, tokenizer = load_student(recipe)
    mixture, heldout = train_mixture.build(recipe.data, tokenizer, recipe.seed)
    teacher = load(recipe.model.path, activation="swiglu", dtype=torch.float32).eval().requires_grad_(False)
    device = torch.device("cpu")
    ppl, zeros = heldout_eval(model, heldout, device)
    rows = [{"l1": None, "heldout_ppl": ppl, "heldout_sparsity": zeros}]
    print(f"converted, no fit: ppl {ppl:.2f}  zeros {zeros:.1%}", flush=True)
    state = copy.deepcopy(mixture.state_dict())
    for l1 in [float(v) for v in args.l1.split(",")]:
        student = copy.deepcopy(model)
        mixture.load_state_dict(state)  # every coefficient fits on the same tokens
        t0 = time.perf_counter()
        report = ffn_warmstart(student, teacher, mixture, spec.model_copy(update={"l1": l1}), device, recipe.data.seq_len)
        seconds = time.perf_counter() - t0
        ppl, zeros = heldout_eval(student, heldout, device)
        rows.append(
            {
                "l1": l1,
                "heldout_ppl": ppl,
                "heldout_sparsity": zeros,
                "fit_seconds": seconds,
                "fit_zeros_after": report["zeros_after"],
                "layers": report["layers"],
            }
        )
        print(f"l1 {l1:g}: ppl {ppl:.2f}  zeros {zeros:.1%}  (fit {seconds:.0f} s)", flush=True)
        del student
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"recipe": recipe.model_dump(mode="json"), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
