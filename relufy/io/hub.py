"""The Hugging Face Hub: model ids with a revision, downloads and pushes, its errors as one line.

A model on the Hub is ``org/name``, optionally ``org/name@revision`` (a branch, tag or commit) or
with ``--revision``. Every call goes through a ``huggingface_hub.HfApi`` made at call time, so the
endpoint (``HF_ENDPOINT``) and the token are resolved then: ``--token`` when given, else
``HF_TOKEN`` or the token of ``hf auth login`` (huggingface_hub's own rules). A token is never
printed: messages are masked before they reach the user.

Pushing (``--push-to-hub``) happens after a folder is complete on disk; a repository is created
private unless ``--public`` is given, and pushing into an existing public repository needs
``--public`` too, so that a model is never published by accident.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import field_validator

from ..errors import RelufyError
from ..options import Options, option_field

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_REVISION = re.compile(r"^[\w.-][\w./-]*$")  # a branch, tag or commit; no spaces, no leading "/"
_LOGIN = "log in with `hf auth login` or set HF_TOKEN"


# ---- option fields (declared once, used by convert, info, export and train) -------------------------


def revision_field():
    return option_field(
        None,
        description="Hub models: the branch, tag or commit to read (also written MODEL@REVISION); default: main.",
    )


def token_field(use: str = "reading gated or private models and for --push-to-hub"):
    return option_field(
        None,
        repr=False,
        description=f"Hugging Face token for {use}; default: HF_TOKEN or the `hf auth login` token.",
    )


def push_field(what: str):
    return option_field(
        None,
        description=f"After {what} is written, upload it to this Hugging Face Hub repository (org/name); it is created "
        "private unless --public is given.",
    )


def public_field():
    return option_field(
        False,
        description="With --push-to-hub: create the repository public (and allow pushing into an existing public one).",
    )


def hub_revision_field():
    return option_field(
        None, description="With --push-to-hub: the branch to push to (created from main when new); default: main."
    )


class PushOptions(Options):
    """The Hub fields of every command that writes a model (convert, train, export): declared once,
    inherited by their options models."""

    push_to_hub: str | None = push_field("the model folder (OUT; for relufy train, OUTPUT_DIR/final)")
    public: bool = public_field()
    hub_revision: str | None = hub_revision_field()
    token: str | None = token_field()

    @field_validator("push_to_hub")
    @classmethod
    def _push_repo(cls, value):
        return check_push_repo(value)

    @field_validator("hub_revision")
    @classmethod
    def _hub_revision(cls, value):
        return check_revision(value)


def check_push_repo(value: str | None) -> str | None:
    """A ``--push-to-hub`` value: ``org/name``, checked before any work starts."""
    if value is None:
        return None
    value = value.strip()
    if not HUB_ID.match(value) or ".." in value or value.endswith((".git", ".")):
        raise ValueError(f"{value!r} is not a Hub repository id (org/name)")
    return value


def check_revision(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if not value or not _REVISION.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a branch, tag or commit name")
    return value


# ---- model ids ----------------------------------------------------------------------------------


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None] | None:
    """``org/name@rev`` -> ``("org/name", "rev")``; ``org/name`` -> ``("org/name", revision)``;
    None when ``spec`` is no hub id. A ``--revision`` must agree with an ``@rev`` in ``spec``."""
    spec = str(spec)
    repo, at, rev = spec.partition("@")
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(repo):
        return None
    if at:
        try:
            rev = check_revision(rev)
        except ValueError as e:
            raise RelufyError(f"{spec}: {e}") from None
        if revision is not None and revision != rev:
            raise RelufyError(f"{spec}: the revision is given twice (@{rev} and --revision {revision})")
        return repo, rev
    if revision is not None:
        try:
            revision = check_revision(revision)
        except ValueError as e:
            raise RelufyError(f"--revision: {e}") from None
    return repo, revision


def cache_repo_id(folder: Path) -> str | None:
    """The repo id of a Hugging Face cache snapshot (``.../models--org--name/snapshots/<commit>``)."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        parts = parent.parent.name.split("--")[1:]
        repo = "/".join(parts)
        return repo if HUB_ID.match(repo) else None
    return None


def public_name(spec) -> str:
    """How a model or data spec may appear in a card: anything local (an absolute path, or one that
    exists here) by its last name only, never as a path; a hub id without its ``@revision``; other
    specs (``org/data:config:split``, URLs) as given."""
    if spec is None:
        return ""
    text = str(spec)
    local = Path(text).expanduser()
    if local.is_absolute() or text.startswith(("~", ".")) or local.exists():
        return local.name or text
    try:
        hub = split_revision(text)
    except RelufyError:  # a malformed @revision: still a name, not a path
        hub = None
    return hub[0] if hub is not None else text


# ---- errors -------------------------------------------------------------------------------------


def _tokens(explicit: str | None) -> list[str]:
    found = [explicit] if explicit else []
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # noqa: BLE001 - masking must never fail
        stored = None
    return found + ([stored] if stored else [])


def _first_line(e: BaseException, tokens: list[str]) -> str:
    text = str(e).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    for token in tokens:
        line = line.replace(token, "***")
    return line


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_error(e: BaseException, repo: str, revision: str | None = None, token: str | None = None) -> RelufyError:
    """One line for what went wrong reading ``repo`` from the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}@{revision}" if revision else repo
    if isinstance(e, GatedRepoError):
        return RelufyError(
            f"{repo}: a gated model on the Hugging Face Hub; request access on {constants.ENDPOINT}/{repo}, then "
            f"{_LOGIN} with a token of the account that was granted access"
        )
    if isinstance(e, RepositoryNotFoundError):
        return RelufyError(
            f"{repo}: no such local folder, and no such model on the Hugging Face Hub (if it is private, {_LOGIN})"
        )
    if isinstance(e, RevisionNotFoundError):
        return RelufyError(f"{repo}: the Hugging Face Hub has no revision {revision or 'main'!r} (a branch, tag or commit)")
    if isinstance(e, RemoteEntryNotFoundError):
        return RelufyError(f"{where}: a file is missing on the Hugging Face Hub ({_first_line(e, _tokens(token))})")
    if isinstance(e, OfflineModeIsEnabled | LocalEntryNotFoundError) and _offline():
        return RelufyError(
            f"{where}: no such local folder, and not in the local Hugging Face cache while the Hub is offline "
            "(HF_HUB_OFFLINE is set; unset it to download)"
        )
    if isinstance(e, LocalEntryNotFoundError):
        cause = e.__cause__ or e
        return RelufyError(
            f"{where}: no such local folder, and the Hugging Face Hub cannot be reached "
            f"({_first_line(cause, _tokens(token))}) and it is not in the local cache"
        )
    if isinstance(e, HfHubHTTPError) and e.response is not None and e.response.status_code in (401, 403):
        return RelufyError(f"{where}: the Hugging Face Hub refused access ({e.response.status_code}); {_LOGIN}")
    return RelufyError(
        f"{where}: no such local folder, and could not read it from the Hugging Face Hub ({_first_line(e, _tokens(token))})"
    )


def _hub_exceptions() -> tuple[type[BaseException], ...]:
    import importlib

    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, OfflineModeIsEnabled

    found = [HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError]
    for client in ("httpx2", "httpx"):  # huggingface_hub 2.x speaks httpx2, 1.x httpx
        try:
            found.append(importlib.import_module(client).HTTPError)
        except ImportError:
            continue
    return tuple(found)


@contextmanager
def reading(repo: str, revision: str | None = None, token: str | None = None) -> Iterator[None]:
    """Hub errors inside become one ``RelufyError`` line about ``repo``."""
    try:
        yield
    except RelufyError:
        raise
    except _hub_exceptions() as e:
        raise hub_error(e, repo, revision, token) from None


def api(token: str | None = None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


# ---- reading ------------------------------------------------------------------------------------


def download_snapshot(repo: str, revision: str | None, token: str | None, patterns: list[str]) -> Path:
    """The files of ``repo`` matching ``patterns`` at ``revision``, from the cache or downloaded."""
    with reading(repo, revision, token):
        return Path(api(token).snapshot_download(repo, revision=revision, allow_patterns=patterns))


def download_file(repo: str, filename: str, revision: str | None, token: str | None) -> Path:
    with reading(repo, revision, token):
        return Path(api(token).hf_hub_download(repo, filename, revision=revision))


def safetensors_metadata(repo: str, revision: str | None, token: str | None):
    """``huggingface_hub.SafetensorsRepoMetadata`` of ``repo``: its tensors' names, dtypes and
    shapes read from the shard headers by range requests (no weights downloaded); None when the
    repository holds no safetensors weights."""
    from huggingface_hub.errors import NotASafetensorsRepoError

    with reading(repo, revision, token):
        try:
            return api(token).get_safetensors_metadata(repo, revision=revision)
        except NotASafetensorsRepoError:
            return None


def snapshot_commit(folder: Path) -> str | None:
    """The commit of a cache snapshot folder (its name), or None."""
    name = Path(folder).name
    return name if re.fullmatch(r"[0-9a-f]{40}", name) else None


# ---- pushing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubPush:
    """Where a finished folder goes: ``repo`` (created private unless ``public``), ``branch``."""

    repo: str
    public: bool = False
    token: str | None = None
    branch: str | None = None

    def __repr__(self) -> str:  # never the token
        return f"HubPush(repo={self.repo!r}, public={self.public}, branch={self.branch!r})"

    @classmethod
    def of(cls, options: PushOptions) -> HubPush | None:
        """The push an options model asks for, or None."""
        if not options.push_to_hub:
            return None
        return cls(repo=options.push_to_hub, public=options.public, token=options.token, branch=options.hub_revision)


def check_push(push: HubPush | None) -> None:
    """Before long work: a push needs a token (given, ``HF_TOKEN`` or a login); no network here."""
    if push is None or push.token:
        return
    from huggingface_hub import get_token

    if not get_token():
        raise RelufyError(f"--push-to-hub {push.repo}: no Hugging Face token; {_LOGIN}, or pass --token")


def push_folder(folder: str | Path, push: HubPush, message: str) -> str:
    """Upload every file of ``folder`` to ``push.repo`` in one commit; returns the commit URL.
    A failure says what was written and what did not happen, in one line; the folder stays."""
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    hub = api(push.token)
    failed = f"wrote {folder}, but pushing it to {push.repo} on the Hugging Face Hub failed"
    try:
        hub.create_repo(push.repo, private=not push.public, exist_ok=True)
        info = hub.repo_info(push.repo)
        if info.private is False and not push.public:
            raise RelufyError(f"{failed}: {push.repo} exists and is public; pass --public to push to it anyway")
        if push.branch and push.branch != "main":
            hub.create_branch(push.repo, branch=push.branch, exist_ok=True)
        commit = hub.upload_folder(
            repo_id=push.repo, folder_path=folder, revision=push.branch, commit_message=message, ignore_patterns=[".*"]
        )
    except RelufyError:
        raise
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status in (401, 403):
            reason = f"no write access to {push.repo} ({status}): use a token that may write there"
            reason += " (`hf auth login`, HF_TOKEN or --token)"
        else:
            reason = _first_line(e, _tokens(push.token))
        raise RelufyError(f"{failed}: {reason}") from None
    except _hub_exceptions() as e:
        raise RelufyError(f"{failed}: {_first_line(e, _tokens(push.token))}") from None
    visibility = "public" if info.private is False else "private"
    print(f"pushed {folder.name} to {push.repo} ({visibility}{', ' + push.branch if push.branch else ''})", file=sys.stderr)
    return str(commit.commit_url) if hasattr(commit, "commit_url") else str(commit)
