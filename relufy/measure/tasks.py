"""``relufy eval --tasks``: lm-evaluation-harness benchmarks on a model relufy has loaded.

The harness scores the very model object relufy loaded (an original, GGUF or hub model, or a
converted relufy folder, whose FFNs run relufy's activation), wrapped in its ``HFLM``; so the
observers of ``relufy.measure.sites`` (top-k masks, threshold masks) apply to the benchmarks too.
lm-eval is optional (``pip install "relufy[eval]"``) and imported only here, when ``--tasks`` is
given. Its log lines and environment dump are kept out of the way unless relufy runs verbose
(``relufy -v``); its request progress bars show on a terminal (not with ``relufy -q``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import sys
from pathlib import Path

from ..errors import RelufyError
from ..progress import is_quiet
from .options import EvalOptions

MISSING = '--tasks needs lm-eval: pip install "relufy[eval]"'


def verbose() -> bool:
    """Whether relufy runs verbose (``relufy -v``: its logger at debug level)."""
    return logging.getLogger("relufy").isEnabledFor(logging.DEBUG)


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RelufyError(MISSING) from None
    return lm_eval, HFLM, TaskManager


@contextlib.contextmanager
def harness_quiet(loud: bool):
    """lm-eval's log lines, dataset bars and per-task request-building bars off (unless ``loud``),
    and no environment dump (``git describe``, ``collect_env``), which relufy does not report."""
    from lm_eval import evaluator

    from ..text import datasets_quiet

    patches = [(evaluator, "add_env_info", lambda results: None), (evaluator, "get_git_commit_hash", lambda: None)]
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if loud:
        from lm_eval.utils import setup_logging

        setup_logging(logging.INFO)
    else:
        logger.setLevel(logging.ERROR)
        try:
            import functools

            from lm_eval.api import task as task_module
            from tqdm import tqdm

            patches.append((task_module, "tqdm", functools.partial(tqdm, disable=True)))
        except ImportError:  # pragma: no cover - another lm-eval layout: its bars stay
            pass
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in patches if hasattr(mod, name)]
    for mod, name, value in patches:
        if hasattr(mod, name):
            setattr(mod, name, value)
    try:
        with datasets_quiet(loud):
            yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)
        logger.setLevel(level)


def task_manager(options: EvalOptions):
    """The harness's task index (built-in tasks plus ``--tasks-path``); every name of ``--tasks``
    checked against it (or a task YAML file), before any model loads."""
    _, _, TaskManager = _lm_eval()
    include = None
    if options.tasks_path is not None:
        folder = Path(options.tasks_path).expanduser()
        if not folder.is_dir():
            raise RelufyError(f"--tasks-path {options.tasks_path}: not a folder")
        include = str(folder.resolve())
    with harness_quiet(verbose()):
        manager = TaskManager(include_path=include)
    known = manager.task_index
    for name in options.tasks:
        if name in known or (name.endswith((".yaml", ".yml")) and Path(name).expanduser().is_file()):
            continue
        close = difflib.get_close_matches(name, list(known), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        where = "; your own task YAMLs go in --tasks-path" if options.tasks_path is None else f", nor in {options.tasks_path}"
        raise RelufyError(f"--tasks {name}: not an lm-eval task, group or tag{hint}{where}")
    return manager


def _lm_class(HFLM, bars: bool):
    class RelufyLM(HFLM):
        """The harness's HF model, with its request progress bars shown only when ``bars``."""

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not bars)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not bars)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not bars)

    return RelufyLM


def run_tasks(model, tokenizer, options: EvalOptions, manager, log_samples: bool = False) -> dict:
    """``lm_eval.simple_evaluate`` of ``options.tasks`` on the loaded ``model``: the harness's own
    results dict (with per-request ``samples`` when ``log_samples``)."""
    lm_eval, HFLM, _ = _lm_eval()
    bars = verbose() or (sys.stderr.isatty() and not is_quiet())
    with harness_quiet(verbose()):
        lm = _lm_class(HFLM, bars)(pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(options.tasks),
                num_fewshot=options.num_fewshot,
                limit=options.limit,
                task_manager=manager,
                log_samples=log_samples,
            )
        except (KeyError, ValueError, FileNotFoundError, ConnectionError) as e:
            text = str(e).strip().splitlines()
            raise RelufyError(
                f"--tasks: lm-eval could not run {','.join(options.tasks)} ({text[0] if text else type(e).__name__})"
            ) from None
    if results is None:  # pragma: no cover - only a non-zero rank gets None
        raise RelufyError("--tasks: lm-eval returned no results")
    return results


def summarize(results: dict) -> dict:
    """``{task: {metric: {"value", "stderr"}, "samples": n}}`` from the harness's results (groups
    included, with their aggregate metrics); a metric with a filter other than ``none`` keeps it
    in its name (``exact_match,strict-match``); a stderr the harness did not compute is None."""
    out: dict = {}
    rows = {**results.get("results", {}), **results.get("groups", {})}
    counts = results.get("n-samples", {})
    for task, values in rows.items():
        metrics: dict = {}
        for key, value in values.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            if metric.endswith("_stderr"):
                continue
            name = metric if filt == "none" else key
            stderr = values.get(f"{metric}_stderr,{filt}")
            metrics[name] = {
                "value": float(value) if isinstance(value, (int, float)) else value,
                "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            }
        entry: dict = {"metrics": metrics}
        if task in counts:
            entry["samples"] = counts[task].get("effective")
        out[task] = entry
    return out
