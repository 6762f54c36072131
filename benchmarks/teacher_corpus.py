"""Write a corpus sampled from the original model itself, for recovery runs that should keep
the model's general behaviour rather than learn one corpus.

    python benchmarks/teacher_corpus.py runs/data/teacher-smollm2.jsonl --tokens 131072

Each record of the JSON-lines output (``{"text": ...}``, what a recipe's ``data.sources`` entry
reads as a ``.jsonl`` file) is one sample drawn from the beginning-of-text token with
``--temperature`` and ``--top-p``, ``--new-tokens`` long, in batches of ``--batch``, seeded. The
default model is the embedded SmolLM2-135M-Instruct GGUF. Text sampled from the teacher is
outside every evaluation corpus, so a run trained on it can be judged on any of them; the cost
is the sampling time, printed at the end (and part of any budget that uses the corpus).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="the .jsonl file to write (refused if it exists)")
    ap.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct GGUF")
    ap.add_argument("--tokens", type=int, default=131072, help="sampled tokens in all")
    ap.add_argument("--new-tokens", type=int, default=256, help="tokens per sample")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose another path")

    import torch

    import relufy
    from relufy.embedded import smollm2_gguf
    from relufy.modeling.tokenizer import load_tokenizer

    source = args.model or str(smollm2_gguf())
    tok = load_tokenizer(source)
    model = relufy.load(source, activation="swiglu", dtype=torch.float32).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")
    done, t0, batch_no = 0, time.perf_counter(), 0
    with open(tmp, "w") as f:
        while done < args.tokens:
            torch.manual_seed(args.seed * 100003 + batch_no)
            ids = torch.full((args.batch, 1), start)
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    max_new_tokens=args.new_tokens,
                    pad_token_id=tok.eos_token_id,
                )
            for row in out[:, 1:]:
                row = row[row != tok.eos_token_id] if tok.eos_token_id is not None else row
                text = tok.decode(row, skip_special_tokens=True).strip()
                if text:
                    f.write(json.dumps({"text": text}) + "\n")
                    done += len(row)
            batch_no += 1
            rate = done / (time.perf_counter() - t0)
            print(f"{done:,}/{args.tokens:,} tokens sampled, {rate:,.0f} tokens/s", flush=True)
    tmp.replace(args.out)
    print(f"wrote {args.out}: {done:,} tokens in {time.perf_counter() - t0:,.0f} s")


if __name__ == "__main__":
    main()
