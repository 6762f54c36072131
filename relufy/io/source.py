"""Where a model comes from: a local folder, a ``.gguf`` file, or a Hugging Face Hub id."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RelufyError
from .block import RelufyBlock
from .hub import HUB_ID as _HUB_ID
from .hub import cache_repo_id, split_revision
from .paths import allowed_roots, inside, user_path
from .read import CONFIG_BYTES, INDEX_BYTES, TOKENIZER_BYTES, check_regular, file_kind, read_json, read_text, size_text

# Weight formats that are never carried over (relufy reads and writes safetensors only).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")

# The small files of a model folder that relufy or transformers read, and the most each may take
# (``check_files``): a pipe or device under one of these names would block or never end.
MODEL_FILES = {
    "config.json": CONFIG_BYTES,
    "generation_config.json": CONFIG_BYTES,
    "model.safetensors.index.json": INDEX_BYTES,
    "tokenizer.json": TOKENIZER_BYTES,
    "tokenizer_config.json": TOKENIZER_BYTES,
    "special_tokens_map.json": TOKENIZER_BYTES,
    "added_tokens.json": TOKENIZER_BYTES,
    "tokenizer.model": TOKENIZER_BYTES,
    "vocab.json": TOKENIZER_BYTES,
    "vocab.txt": TOKENIZER_BYTES,
    "merges.txt": TOKENIZER_BYTES,
    "chat_template.jinja": TOKENIZER_BYTES,
    "chat_template.json": TOKENIZER_BYTES,
}


@dataclass(frozen=True)
class Source:
    """A resolved model location. ``gguf_file`` is set for GGUF input (a file inside ``folder``)."""

    folder: Path
    label: str  # what the model is called in cards and config.json: a hub id, or a local folder's name
    gguf_file: str | None = None
    base_model: str | None = None  # the hub id of these weights, when known
    revision: str | None = None  # the hub commit read
    card: dict = field(default_factory=dict, compare=False)  # the front matter of the source's README.md

    def provenance(self) -> dict:
        """What the ``relufy`` block records about where the weights came from (never a local path):
        ``base_model``, ``source_revision`` and the source card's license, when known."""
        out = {}
        if self.base_model:
            out["base_model"] = self.base_model
        if self.revision:
            out["source_revision"] = self.revision
        for key in ("license", "license_name", "license_link"):
            value = self.card.get(key)
            if isinstance(value, str) and value.strip():
                out[key] = value.strip()
        return out

    @property
    def where(self) -> str:
        """How messages name this model: the GGUF file, the hub id of a download, else the folder."""
        if self.gguf_file:
            return str(self.folder / self.gguf_file)
        return self.label if self.revision else str(self.folder)

    def inputs(self) -> list[Path]:
        """The resolved places this source reads: outputs must stay clear of them."""
        if self.gguf_file:
            return [(self.folder / self.gguf_file).resolve()]
        return list(allowed_roots(self.folder))

    def check_files(self) -> None:
        """The model folder's small files (``MODEL_FILES``) that exist must be regular files inside
        the folder and within their bounds, so that neither relufy nor transformers, which opens
        tokenizer and generation files itself, blocks on a pipe or reads a device without end.
        The safetensors files named by the folder are checked when their headers are read."""
        if self.gguf_file:
            return
        for name, limit in MODEL_FILES.items():
            path = self.folder / name
            if not (path.exists() or path.is_symlink()):
                continue
            inside(path, self.folder)
            size = check_regular(path)
            if size > limit:
                raise RelufyError(
                    f"{path}: {size_text(size)} is more than a {name} ever takes ({size_text(limit)} at most); not read"
                )

    def config_dict(self) -> dict:
        if self.gguf_file:
            from .gguf import gguf_config_dict

            return gguf_config_dict(self.folder / self.gguf_file)
        self.check_files()
        path = self.folder / "config.json"
        if not path.exists():
            raise RelufyError(f"{self.folder}: no config.json (not a Hugging Face model folder)")
        inside(path, self.folder)  # a link out of the folder is refused; messages name the file as spelled
        config = read_json(path, CONFIG_BYTES, "config.json")
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


def resolve(src: str | Path, revision: str | None = None, token: str | None = None) -> Source:
    """A model folder, a ``.gguf`` file, or a hub id (``org/name``, ``org/name@revision``, or with
    ``revision``): an existing local path wins over a hub id spelled the same."""
    path = user_path(src, "the model path")
    if revision is not None and path.exists():
        raise RelufyError(f"{src}: a local model; --revision is for models on the Hugging Face Hub")
    if path.is_dir():
        return _local(path, path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise RelufyError(f"{src}: expected a model folder, a .gguf file or a hub id")
        return _local(path.parent, path, gguf_file=path.name)
    if path.exists():  # a pipe, device or socket: never opened
        raise RelufyError(f"{src} is {file_kind(os.stat(path).st_mode)}, not a model folder or a .gguf file")
    hub = split_revision(str(src), revision)
    if hub is not None:
        return _download(hub[0], hub[1], token)
    raise RelufyError(f"{src}: no such model folder or file")


def _card(folder: Path) -> dict:
    """The YAML front matter of ``folder/README.md`` ({} when there is none or it does not parse)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        import yaml
        from huggingface_hub.repocard import REGEX_YAML_BLOCK

        inside(readme, folder)
        match = REGEX_YAML_BLOCK.search(read_text(readme, CONFIG_BYTES, "model card").removeprefix("\ufeff"))
        card = yaml.safe_load(match.group(2)) if match else None
    except Exception:  # noqa: BLE001 - unreadable, too large or bad YAML: the card is optional, it just names nothing
        return {}
    return card if isinstance(card, dict) else {}


def _recorded_hub_id(folder: Path, card: dict) -> str | None:
    """The hub id a local model folder records for itself: the Hugging Face cache layout, a relufy
    block's ``base_model``, ``_name_or_path`` in its config.json, or its card's ``base_model``."""
    repo = cache_repo_id(folder)
    if repo:
        return repo
    candidates = []
    try:
        inside(folder / "config.json", folder)
        config = read_json(folder / "config.json", CONFIG_BYTES, "config.json")
    except RelufyError:
        config = {}
    if isinstance(config, dict):
        block = config.get("relufy")
        if isinstance(block, dict):
            candidates.append(block.get("base_model"))
        candidates.append(config.get("_name_or_path"))
    base = card.get("base_model")
    candidates.append(base[0] if isinstance(base, list) and len(base) == 1 else base)
    for c in candidates:
        if isinstance(c, str) and _HUB_ID.match(c) and not Path(c).expanduser().exists():
            return c
    return None


def _local(folder: Path, path: Path, gguf_file: str | None = None) -> Source:
    card = _card(folder)
    base = _recorded_hub_id(folder, card)
    return Source(folder, base or path.name, gguf_file=gguf_file, base_model=base, card=card)


def _download(repo_id: str, revision: str | None = None, token: str | None = None) -> Source:
    from .hub import download_snapshot, snapshot_commit
    from .safetensors_index import read_index

    patterns = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "README.md"]
    folder = download_snapshot(repo_id, revision, token, patterns)
    # the same commit for the weights, even if the branch moves meanwhile
    commit = snapshot_commit(folder) or revision
    # only the shards the index names (repos such as Mistral's also hold consolidated.safetensors)
    index = folder / "model.safetensors.index.json"
    shards = sorted(set(read_index(index, folder).values())) if index.exists() else ["model.safetensors"]
    folder = download_snapshot(repo_id, commit, token, patterns + shards)
    return Source(folder, repo_id, base_model=repo_id, revision=snapshot_commit(folder), card=_card(folder))


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
