import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _hermetic_hf(tmp_path_factory):
    """No hub access and a private modules cache for remote code."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["HF_MODULES_CACHE"] = str(home / "modules")
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub.constants  # read HF_HUB_OFFLINE when first imported, maybe before this fixture

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    yield


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the relufy CLI in-process: ``cli(*args) -> (exit code, stderr, stdout)``."""
    from relufy.cli import main

    def run(*args):
        capsys.readouterr()  # drop what setting up printed
        monkeypatch.setattr(sys, "argv", ["relufy", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
        captured = capsys.readouterr()
        return code, captured.err.strip(), captured.out

    return run
