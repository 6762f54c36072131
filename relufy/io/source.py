"""Where a model comes from: a local folder, a ``.gguf`` file, or a Hugging Face Hub id."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RelufyError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weight formats that are never carried over (relufy reads and writes safetensors only).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class Source:
    """A resolved model location. ``gguf_file`` is set for GGUF input (a file inside ``folder``)."""

    folder: Path
    label: str
    gguf_file: str | None = None

    def config_dict(self) -> dict:
        if self.gguf_file:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(self.folder, gguf_file=self.gguf_file).to_dict()
        path = self.folder / "config.json"
        if not path.is_file():
            raise RelufyError(f"{self.folder}: no config.json (not a Hugging Face model folder)")
        try:
            config = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RelufyError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise RelufyError(f"{path}: not a JSON object")
        return config

    def side_files(self) -> list[Path]:
        """Tokenizer, generation config, chat template and the like: every plain file except
        weights, ``config.json``, the model card and code."""
        if self.gguf_file:
            return []
        skip = {"config.json", "README.md", "model.safetensors.index.json"}
        return sorted(
            p
            for p in self.folder.iterdir()
            if p.is_file()
            and p.name not in skip
            and not p.name.startswith(".")
            and not p.name.endswith(_WEIGHT_SUFFIXES + (".py",))
        )


def resolve(src: str | Path) -> Source:
    path = Path(src).expanduser()
    if path.is_dir():
        return Source(path.absolute(), str(src))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise RelufyError(f"{src}: expected a model folder, a .gguf file or a hub id")
        return Source(path.parent.absolute(), str(src), gguf_file=path.name)
    if _HUB_ID.match(str(src)) and not str(src).startswith((".", "/", "~")):
        return _download(str(src))
    raise RelufyError(f"{src}: no such model folder or file")


def _download(repo_id: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        # only the shards the index names (repos such as Mistral's also hold consolidated.safetensors)
        index = folder / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
        folder = snapshot_download(repo_id, allow_patterns=patterns + shards)
    except RepositoryNotFoundError:
        raise RelufyError(f"{repo_id}: no such model on the Hugging Face Hub (or it is gated)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RelufyError(f"{repo_id}: could not download from the Hugging Face Hub ({first})") from None
    return Source(Path(folder), repo_id)
