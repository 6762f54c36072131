"""Helpers of the training tests (tests/train/conftest.py puts this folder on sys.path)."""

from __future__ import annotations

import json
import pickle

import yaml

STEPS = 5  # the reference run: checkpoints after steps 1..4 (step 5 writes final/), newest 3 kept


def recipe_dict(base, out, **overrides) -> dict:
    """A small recipe; ``a__b=value`` sets ``raw[a][b]``."""
    raw = {
        "name": "t",
        "output_dir": str(out),
        "seed": 0,
        "model": {"path": str(base / "llama-drelu")},
        "data": {"sources": [{"data": str(base / "text.txt")}], "seq_len": 32, "heldout_fraction": 0.05},
        "optim": {"lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 1},
        "budget": {"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 1},
        "log": {"every": 1},
        "checkpoint": {"every": 1, "keep_last": 3},
    }
    for key, value in overrides.items():
        node = raw
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return raw


def train_single_threaded(raw: dict) -> None:
    """``relufy train`` of the recipe ``raw`` in this process with one thread, as each process of
    a multi-process test run has (``OMP_NUM_THREADS=1``): the same kernels, so their numbers compare."""
    import torch

    from relufy.train.loop import train
    from relufy.train.recipe import validate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(validate(raw), show_progress=False)
    finally:
        torch.set_num_threads(threads)


def write_recipe(path, raw):
    path.write_text(yaml.safe_dump(raw))
    return path


def strict_json(text: str):
    """``json.loads`` that refuses NaN / Infinity (not JSON, though Python writes them)."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def curve(out) -> list[tuple]:
    """(step, loss, lr) per logged step; every line must be standard JSON."""
    rows = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows]


def reseal(folder) -> None:
    """Rewrite a checkpoint's manifest for its current files (whoever can write the output folder
    can do this too: the manifest guards against damage; against code, the loaders must)."""
    from relufy.train import checkpoint as ckpt

    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"] = {}
    for rel in ckpt._files(folder):
        size, sha = ckpt._hash(folder / rel)
        manifest["files"][rel] = {"size": size, "sha256": sha}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def plant(path, marker) -> None:
    """A ``torch.save`` file (what Accelerate's .pkl/.bin files are) whose unpickling runs code."""
    import torch

    torch.save({"state": Payload(marker)}, path)


def plain_pickle(path, marker) -> None:
    path.write_bytes(pickle.dumps({"state": Payload(marker)}))
