"""The core install: convert, info, eval and generate run without any extra, and a feature whose
extra is missing says in one line which extra to install.

The optional packages are installed in the test environment, so each subprocess here hides them:
a ``sitecustomize.py`` wraps every ``sys.meta_path`` finder so that neither ``import`` nor
``importlib.util.find_spec`` nor ``importlib.metadata`` sees them, as on a machine without them.
(``make check-install`` does the real thing in a fresh virtual env.)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from tiny import save_tiny_with_tokenizer

from relufy.errors import RelufyError
from relufy.extras import EXTRAS, missing, need, require

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("peft", "datasets", "matplotlib", "ninja", "lm_eval", "tensorboard", "wandb")
# the distribution that provides each optional module
DISTRIBUTION = {"lm_eval": "lm-eval"}

SITECUSTOMIZE = '''
import sys

BLOCKED = set(%r)


def _blocked(name):
    return name.replace("-", "_").lower().partition(".")[0] in BLOCKED


class _Hide:
    """A finder as it was, minus the blocked packages (modules and distributions)."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        find = getattr(self.inner, "find_spec", None)
        return None if _blocked(name) or find is None else find(name, path, target)

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.inner, "find_distributions", None)
        for dist in find(*args, **kwargs) if find else ():
            if not _blocked(dist.metadata["Name"] or ""):
                yield dist

    def invalidate_caches(self):
        if hasattr(self.inner, "invalidate_caches"):
            self.inner.invalidate_caches()


sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
'''


@pytest.fixture
def without(tmp_path):
    """``without(*modules)``: a function running Python (``relufy ...`` by default) in a subprocess
    where ``modules`` (default: every optional package) cannot be imported or found."""

    def runner(*blocked: str):
        site = tmp_path / f"site-{len(blocked)}-{'-'.join(blocked)[:40]}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE % (tuple(blocked or OPTIONAL),))
        path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}

        def run(*args, python: bool = False) -> subprocess.CompletedProcess:
            argv = [sys.executable, *map(str, args)] if python else [sys.executable, "-m", "relufy", *map(str, args)]
            return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)

        return run

    return runner


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 2 and one ``relufy: error:`` line holding ``needles``, no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("relufy: error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def test_the_hidden_packages_are_gone_but_installed_here(without):
    """The blocker itself: the packages exist in this environment, and in the subprocess neither an
    import, nor find_spec, nor the distribution metadata finds them; transformers still loads."""
    assert [m for m in OPTIONAL if m not in ("wandb",) and importlib.util.find_spec(m) is None] == []
    script = (
        "import importlib, importlib.util, importlib.metadata as md, json\n"
        "import transformers\n"
        "from transformers import AutoModelForCausalLM, PreTrainedModel\n"
        "import relufy.cli\n"
        f"names = {OPTIONAL!r}\n"
        "found = [n for n in names if importlib.util.find_spec(n) is not None]\n"
        "dists = [d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].lower().replace('-', '_') in names]\n"
        "imported = []\n"
        "for n in names:\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "        imported.append(n)\n"
        "    except ModuleNotFoundError:\n"
        "        pass\n"
        "print(json.dumps({'found': found, 'dists': dists, 'imported': imported}))\n"
    )
    proc = without()("-c", script, python=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"found": [], "dists": [], "imported": []}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("install") / "llama"
    save_tiny_with_tokenizer("llama", path)
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A llama.cpp-style GGUF of a tiny llama (the GGUF tests' writer)."""
    spec = importlib.util.spec_from_file_location("gguf_writer", ROOT / "tests" / "io" / "test_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from tiny import tiny_tokenizer

    tok = json.loads(tiny_tokenizer().backend_tokenizer.to_str())["model"]
    vocab = sorted(tok["vocab"], key=tok["vocab"].get), [m if isinstance(m, str) else " ".join(m) for m in tok["merges"]]
    path = tmp_path_factory.mktemp("install-gguf") / "tiny.gguf"
    module.write_gguf(path, "llama", vocab)
    return path


def test_core_commands_run_without_any_extra(without, tiny_folder, tiny_gguf, tmp_path):
    run = without()
    proc = run("convert", tiny_folder, tmp_path / "drelu")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "drelu" / "config.json").is_file() and proc.stdout.startswith("wrote ")

    proc = run("convert", tiny_gguf, tmp_path / "from-gguf")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (tmp_path / "from-gguf" / "config.json").is_file()

    proc = run("info", tmp_path / "drelu", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)
    assert info["activation"] == "drelu" and info["layers"] == 2

    proc = run("eval", tmp_path / "drelu", "--data", "builtin:pydoc", "--seq-len", "32", "--max-tokens", "256")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"drelu\s.*\b255\b", proc.stdout), proc.stdout

    proc = run("generate", tmp_path / "drelu", "--prompt", "The", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"\[\d+ tokens, [\d.]+ tokens/s", proc.stderr), proc.stderr

    # a GGUF loaded whole (transformers' de-quantizing loader has its own tqdm bar): no redrawn bar in a log
    proc = run("generate", tiny_gguf, "--prompt", "The", "--max-new-tokens", "2", "--no-chat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "it/s]" not in proc.stderr, proc.stderr


def test_train_without_its_extra_names_it(without, tiny_folder):
    """With only datasets and peft missing (the rest of the train extra installed)."""
    proc = without("datasets", "peft")("train", "demo-smollm2-cpu", f"model.path={tiny_folder}", "--dry-run")
    one_line_error(proc, "relufy train needs datasets, peft", "pip install 'relufy[train]'")


def test_features_without_their_extra_name_it(without, tiny_folder, tmp_path):
    """Each refusal comes before any work: export, --plot, a hub dataset, a Parquet file."""
    run = without()
    one_line_error(run("export", tiny_folder, tmp_path / "export"), "relufy export needs matplotlib", "relufy[export]")
    assert not (tmp_path / "export").exists()
    plot = run("eval", tiny_folder, "--data", "builtin:pydoc", "--plot", tmp_path / "plots")
    one_line_error(plot, "--plot needs matplotlib", "relufy[plot]")
    one_line_error(run("eval", tiny_folder, "--data", "wikitext:wikitext-2-raw-v1:test"), "needs datasets", "relufy[eval]")
    parquet = tmp_path / "text.parquet"
    parquet.write_bytes(b"PAR1")
    # pyarrow comes with datasets: hidden with it, as on a core install
    one_line_error(without("pyarrow")("eval", tiny_folder, "--data", parquet), "needs pyarrow", "relufy[eval]")


def test_need_and_require():
    assert need("json", "plot", "x").dumps([1]) == "[1]"
    with pytest.raises(RelufyError, match=r"^drawing needs relufy_no_such_module: pip install 'relufy\[plot\]'$"):
        need("relufy_no_such_module", "plot", "drawing")
    with pytest.raises(RelufyError, match=r"^drawing needs relufy_no_such_module: pip install 'relufy\[plot\]'$"):
        need("relufy_no_such_module.sub", "plot", "drawing")
    assert missing(["json", "relufy_no_such_module", "relufy_no_such_module.sub"]) == [
        "relufy_no_such_module",
        "relufy_no_such_module.sub",
    ]
    require("plot", "x", modules=("json",))
    with pytest.raises(RelufyError, match=r"^y needs a_missing, b_missing: pip install 'relufy\[wandb\]'$"):
        require("wandb", "y", modules=("json", "a_missing", "b_missing"))


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements}


def test_pyproject_core_and_extras():
    """The core depends on no optional package; each extra lists what relufy checks for it; dev holds
    every extra but wandb (whose missing-extra message a training test checks)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = _requirement_names(project["dependencies"])
    assert core == {
        *("torch", "transformers", "safetensors", "huggingface-hub", "accelerate", "gguf", "typer", "pydantic", "rich", "numpy")
    }
    extras = project["optional-dependencies"]
    for extra, modules in EXTRAS.items():
        names = _requirement_names(extras[extra])
        for module in modules:
            assert DISTRIBUTION.get(module, module).replace("_", "-") in names, (extra, module)
    assert _requirement_names(extras["train"]) == {"peft", "datasets", "matplotlib"}
    assert "ninja" in _requirement_names(extras["export"])
    assert any(r.startswith("lm-eval[hf]>=0.4.13") for r in extras["eval"])
    dev = " ".join(extras["dev"])
    assert {"pytest", "ruff"} <= _requirement_names(extras["dev"])
    listed = set(re.search(r"relufy\[([^\]]+)\]", dev).group(1).split(","))
    assert listed == set(extras) - {"dev", "wandb"}
    # the torch pin comment stays with the range it explains
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r"torch==2\.13\.0.*\n.*\n\s*\"torch>=", text), "the torch pin comment moved"


def test_the_wheel_ships_the_recipes(tmp_path):
    """A wheel built from the sources holds every recipe and accelerate config."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here")
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "relufy", src / "relufy", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("relufy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "relufy" / "recipes").rglob("*.yaml")}
    assert len(shipped) >= 15 and "relufy/recipes/accelerate/fsdp2.yaml" in shipped
    assert shipped <= names, shipped - names
    assert "relufy/sparse/kernels.cpp" in names and "relufy/extras.py" in names
