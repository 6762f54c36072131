"""Where a model comes from: a local folder, a ``.gguf`` file, or a Hugging Face Hub id."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import RelufyError
from .block import RelufyBlock
from .paths import allowed_roots, inside, user_path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Weight formats that are never carried over (relufy reads and writes safetensors only).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


@dataclass(frozen=True)
class Source:
    """A resolved model location. ``gguf_file`` is set for GGUF input (a file inside ``folder``)."""

    folder: Path
    label: str
    gguf_file: str | None = None

    def inputs(self) -> list[Path]:
        """The resolved places this source reads: outputs must stay clear of them."""
        if self.gguf_file:
            return [(self.folder / self.gguf_file).resolve()]
        return list(allowed_roots(self.folder))

    def config_dict(self) -> dict:
        if self.gguf_file:
            from .gguf import gguf_config_dict

            return gguf_config_dict(self.folder / self.gguf_file)
        path = self.folder / "config.json"
        if not path.is_file():
            raise RelufyError(f"{self.folder}: no config.json (not a Hugging Face model folder)")
        try:
            config = json.loads(inside(path, self.folder).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RelufyError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise RelufyError(f"{path}: not a JSON object")
        RelufyBlock.read(config, str(path))  # a malformed block: one line here, not a traceback later
        return config

    def side_files(self) -> list[Path]:
        """Tokenizer, generation config, chat template and the like: every plain file except
        weights, ``config.json``, the model card and code."""
        if self.gguf_file:
            return []
        skip = {"config.json", "README.md", "model.safetensors.index.json"}
        files = sorted(
            p
            for p in self.folder.iterdir()
            if p.is_file()
            and p.name not in skip
            and not p.name.startswith(".")
            and not p.name.endswith(_WEIGHT_SUFFIXES + (".py",))
        )
        for p in files:
            inside(p, self.folder)
        return files


def resolve(src: str | Path) -> Source:
    path = user_path(src, "the model path")
    if path.is_dir():
        return Source(path, str(src))
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise RelufyError(f"{src}: expected a model folder, a .gguf file or a hub id")
        return Source(path.parent, str(src), gguf_file=path.name)
    if _HUB_ID.match(str(src)) and not str(src).startswith((".", "/", "~")):
        return _download(str(src))
    raise RelufyError(f"{src}: no such model folder or file")


def _download(repo_id: str) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    from .safetensors_index import read_index

    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        # only the shards the index names (repos such as Mistral's also hold consolidated.safetensors)
        index = folder / "model.safetensors.index.json"
        shards = sorted(set(read_index(index, folder).values())) if index.exists() else ["model.safetensors"]
        folder = snapshot_download(repo_id, allow_patterns=patterns + shards)
    except RepositoryNotFoundError:
        raise RelufyError(
            f"{repo_id}: no such local folder, and no such model on the Hugging Face Hub (or it is gated)"
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RelufyError(
            f"{repo_id}: no such local folder, and could not download it from the Hugging Face Hub ({first})"
        ) from None
    return Source(Path(folder), repo_id)


def local_inputs(*specs: str | Path | None) -> list[Path]:
    """Resolved local places among model and data specs (folders, files; hub ids skipped):
    what an output must not overwrite."""
    out: list[Path] = []
    for spec in specs:
        if spec is None or not str(spec).strip():
            continue
        path = Path(spec).expanduser()
        if path.is_dir():
            out.extend(allowed_roots(path))
        elif path.exists():
            out.append(path.resolve())
    return out
