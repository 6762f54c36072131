"""A local stand-in for the Hugging Face Hub HTTP API: what ``huggingface_hub`` 2.x calls to create
a repository, commit files, read model info and trees, and download files (HEAD, GET, Range).

Only the endpoints and headers the client actually reads are implemented (see huggingface_hub's
``hf_api.py``, ``_commit_api.py``, ``file_download.py`` and ``utils/_http.py``):

- ``POST /api/repos/create``; ``POST /api/validate-yaml``;
- ``GET /api/models/{repo}[/revision/{rev}]`` (model info), ``GET /api/models/{repo}/tree/{rev}``;
- ``POST /api/models/{repo}/preupload/{rev}``: every file ``uploadMode: regular``, so the commit
  carries the contents inline (base64 in its NDJSON; no LFS or Xet transfer);
- ``POST /api/models/{repo}/commit/{rev}``, ``POST /api/models/{repo}/branch/{branch}``;
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag``,
  ``Content-Length`` and ``Range`` (206 with ``Content-Range``).

Errors carry ``X-Error-Code`` as the Hub's do: ``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``. Every request is logged, with the body bytes of each download.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: bytes}
    messages: dict[str, str] = field(default_factory=dict)  # commit -> summary

    def commit(self, files: dict[str, bytes], ref: str = "main", message: str = "") -> str:
        parent = self.refs.get(ref, "")
        digest = hashlib.sha1(parent.encode() + message.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.messages[sha] = message
        self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


@dataclass
class Served:
    method: str
    path: str
    status: int
    range: str | None = None
    body_bytes: int = 0
    authorization: str | None = None


class HubServer:
    """``start()`` it, point huggingface_hub at ``url``; ``repos`` holds what was pushed."""

    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.log: list[Served] = []
        self.validated_cards: list[str] = []
        self.lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ---- set-up ----

    def add_repo(self, repo_id: str, files: dict[str, bytes], private: bool = False, gated: bool = False) -> Repo:
        repo = Repo(repo_id, private=private, gated=gated)
        repo.commit(files, "main", "initial commit")
        self.repos[repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    # ---- what happened ----

    def downloads(self, suffix: str = "") -> list[Served]:
        """The GETs of ``/resolve/`` URLs (whose path ends with ``suffix``)."""
        return [s for s in self.log if s.method == "GET" and "/resolve/" in s.path and s.path.endswith(suffix)]

    def files(self, repo_id: str, ref: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.refs[ref]]


_API = re.compile(r"^/api/models/([^/]+)/([^/]+)(?:/(revision|tree|preupload|commit|branch)/([^/]+)(/.*)?)?$")
_RESOLVE = re.compile(r"^/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubServer

    def log_message(self, *args):  # quiet
        pass

    # ---- plumbing ----

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False, length=None):
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Type", "application/json")
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        with self.hub.lock:
            self.hub.log.append(
                Served(
                    self.command,
                    urlsplit(self.path).path,
                    status,
                    self.headers.get("Range"),
                    0 if head else len(body),
                    self.headers.get("Authorization"),
                )
            )

    def _json(self, status: int, data, headers: dict | None = None, head: bool = False):
        self._send(status, json.dumps(data).encode(), headers, head)

    def _error(self, status: int, code: str | None, message: str, head: bool = False, headers: dict | None = None):
        h = {"X-Error-Message": message, **(headers or {})}
        if code:
            h["X-Error-Code"] = code
        self._json(status, {"error": message}, h, head)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.hub.token}"

    def _repo(self, org: str, name: str, head: bool = False, write: bool = False) -> Repo | None:
        """The repository, or None after answering as the Hub does (404, or 401 when private)."""
        repo_id = f"{unquote(org)}/{unquote(name)}"
        repo = self.hub.repos.get(repo_id)
        if write and not self._authorized():
            self._error(401, None, "Invalid credentials in Authorization header", head)
            return None
        if repo is None or (repo.private and not self._authorized()):
            self._error(401 if repo is not None else 404, "RepoNotFound", f"Repository not found: {repo_id}", head)
            return None
        return repo

    # ---- verbs ----

    def do_HEAD(self):
        self._resolve(head=True)

    def do_GET(self):
        path = urlsplit(self.path).path
        if path.startswith("/api/models/"):
            return self._api_get(path)
        return self._resolve(head=False)

    def do_POST(self):
        path = urlsplit(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            return self._create(json.loads(body))
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        m = _API.match(path)
        if not m or m.group(3) not in ("preupload", "commit", "branch"):
            return self._error(404, None, f"no route {path}")
        repo = self._repo(m.group(1), m.group(2), write=True)
        if repo is None:
            return None
        kind, rev = m.group(3), unquote(m.group(4))
        if kind == "branch":
            return self._branch(repo, rev, json.loads(body or b"{}"))
        if rev not in repo.refs:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if kind == "preupload":
            files = json.loads(body)["files"]
            return self._json(
                200,
                {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]},
            )
        return self._commit(repo, rev, body)

    # ---- routes ----

    def _create(self, payload: dict):
        if not self._authorized():
            return self._error(401, None, "Invalid credentials in Authorization header")
        repo_id = f"{payload.get('organization')}/{payload['name']}"
        if repo_id in self.hub.repos:  # the Hub's 409 names the existing repository's URL
            message = "You already created this model repo"
            return self._json(409, {"error": message, "url": f"{self.hub.url}/{repo_id}"}, {"X-Error-Message": message})
        repo = self.hub.add_repo(repo_id, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        repo.private = payload.get("visibility", "public") == "private" or payload.get("private") is True
        return self._json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _validate_yaml(self, payload: dict):
        content = payload.get("content", "")
        self.hub.validated_cards.append(content)
        m = re.match(r"^---\n(.*?)\n---", content, re.S)
        try:
            data = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as e:
            return self._json(400, {"errors": [{"message": str(e)}]}, {"X-Error-Message": "Invalid YAML"})
        if data is not None and not isinstance(data, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
        return self._json(200, {"errors": [], "warnings": []})

    def _branch(self, repo: Repo, branch: str, payload: dict):
        if branch in repo.refs:
            return self._error(409, None, f"Reference already exists: refs/heads/{branch}")
        start = repo.resolve(payload.get("startingPoint") or "main")
        if start is None:
            return self._error(404, "RevisionNotFound", "Invalid starting point")
        repo.refs[branch] = start
        return self._json(200, {})

    def _commit(self, repo: Repo, rev: str, body: bytes):
        files = dict(repo.commits[repo.refs[rev]])
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                assert value["encoding"] == "base64"
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile: never asked for here
                return self._error(400, None, f"unexpected commit operation {key}")
        sha = repo.commit(files, rev, message)
        return self._json(200, {"commitUrl": f"{self.hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha, "success": True})

    def _api_get(self, path: str):
        m = _API.match(path)
        if not m or m.group(3) not in (None, "revision", "tree"):
            return self._error(404, None, f"no route {path}")
        repo = self._repo(m.group(1), m.group(2))
        if repo is None:
            return None
        rev = unquote(m.group(4)) if m.group(4) else "main"
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[sha]
        if m.group(3) == "tree":
            query = parse_qs(urlsplit(self.path).query)
            prefix = unquote(m.group(5) or "").strip("/")
            entries = [
                {"type": "file", "path": p, "size": len(b), "oid": git_sha(b)}
                for p, b in sorted(files.items())
                if not prefix or p.startswith(prefix + "/")
            ]
            if query.get("recursive", ["False"])[0].lower() != "true":
                entries = [e for e in entries if "/" not in e["path"][len(prefix) + 1 if prefix else 0 :]]
            return self._json(200, entries)
        return self._json(
            200,
            {
                "id": repo.repo_id,
                "sha": sha,
                "private": repo.private,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "siblings": [{"rfilename": p} for p in sorted(files)],
            },
        )

    def _resolve(self, head: bool):
        path = urlsplit(self.path).path
        m = _RESOLVE.match(path)
        if not m:
            return self._error(404, None, f"no route {path}", head)
        repo = self._repo(m.group(1), m.group(2), head)
        if repo is None:
            return None
        if repo.gated and not getattr(repo, "granted", False):
            return self._error(
                403,
                "GatedRepo",
                f"Access to model {repo.repo_id} is restricted and you are not in the authorized list.",
                head,
            )
        rev, filename = unquote(m.group(3)), unquote(m.group(4))
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        data = repo.commits[sha].get(filename)
        commit = {"X-Repo-Commit": sha}
        if data is None:
            return self._error(404, "EntryNotFound", f"{filename} does not exist on {rev}", head, commit)
        headers = {
            **commit,
            "ETag": f'"{git_sha(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ranged and not head:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2)) if ranged.group(2) else len(data) - 1, len(data) - 1)
            if start >= len(data):
                return self._send(416, b"", {**headers, "Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers)
        return self._send(200, data, headers, head=head, length=len(data))
