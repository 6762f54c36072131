"""Tabulate `make recovery-smollm2`: held-out perplexity and sparsity before and after each
variant, next to the original SwiGLU model scored on the same held-out sequences.

    python benchmarks/recovery_table.py [runs/recovery]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    import relufy
    from relufy.embedded import smollm2_gguf
    from relufy.generate import load_tokenizer
    from relufy.train import data as train_data
    from relufy.train.loop import heldout_eval
    from relufy.train.recipe import Recipe

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/recovery")
    runs = [p for p in ("plain", "warmstart", "warmstart-kd") if (root / p / "summary.json").exists()]
    recipe = Recipe.model_validate(__import__("yaml").safe_load((root / runs[0] / "recipe.yaml").read_text()))
    gguf = smollm2_gguf()
    _, heldout = train_data.build(recipe.data, load_tokenizer(gguf), recipe.seed)
    original = relufy.load(gguf, dtype=torch.float32)
    ppl0, sp0 = heldout_eval(original, heldout, torch.device("cpu"))
    print(f"held-out: {heldout.numel():,} tokens ({len(heldout)} x {heldout.shape[1]}) of {', '.join(s.data for s in recipe.data.sources)}")
    print("| model | steps | train tokens | held-out ppl before | after | x original | FFN zeros before | after |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| original SmolLM2-135M (SwiGLU) | - | - | {ppl0:,.2f} | | 1.00x | {sp0:.1%} | |")
    for name in runs:
        s = json.loads((root / name / "summary.json").read_text())
        print(f"| dReLU, {name} | {s['steps']} | {s['tokens']:,} | {s['heldout_ppl_before']:,.1f} | {s['heldout_ppl']:,.2f} | "
              f"{s['heldout_ppl'] / ppl0:.2f}x | {s['heldout_sparsity_before']:.1%} | {s['heldout_sparsity']:.1%} |")  # fmt: skip


if __name__ == "__main__":
    main()
