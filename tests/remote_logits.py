"""Run in a fresh process where relufy cannot be imported: load checkpoints the way a user
without relufy would, and save their logits.

usage: python remote_logits.py JOBS.json   (a list of {path, out, ids, impl?, trust?, predictors?})

Saves the logits, the model class, the keys the loader found unexpected or missing and, with
``predictors``, the weights the remote model's ``sparsity_predictors()`` returns.
"""

import importlib.abc
import json
import sys


class _NoRelufy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "relufy" or name.startswith("relufy."):
            raise ImportError("relufy must not be imported here")
        return None


sys.meta_path.insert(0, _NoRelufy())

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

for job in json.load(open(sys.argv[1])):
    kwargs = {"trust_remote_code": job.get("trust", True), "dtype": torch.float32}
    if job.get("impl"):
        kwargs["experts_implementation"] = job["impl"]
    try:
        model, info = AutoModelForCausalLM.from_pretrained(job["path"], output_loading_info=True, **kwargs)
        with torch.no_grad():
            logits = model.eval()(torch.tensor(job["ids"])).logits
        result = {"logits": logits, "class": type(model).__name__}
        result |= {k: sorted(info.get(k) or []) for k in ("unexpected_keys", "missing_keys")}
        if job.get("predictors"):
            found = model.sparsity_predictors()
            result["predictors"] = {f"{k}.{i}": m[i].weight for k, m in found.items() for i in (0, 2)}
        torch.save(result, job["out"])
    except Exception as e:  # reported to the test, which decides
        torch.save({"error": f"{type(e).__name__}: {e}"}, job["out"])
assert not any(m == "relufy" or m.startswith("relufy.") for m in sys.modules)
