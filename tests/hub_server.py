"""A tiny Hugging Face Hub–compatible HTTP server for offline publishing tests.

Serves the part of the Hub API that ``huggingface_hub`` (2.x, also 0.3x/1.x) uses to create a repo,
commit files (small ones as base64 "regular" blobs, files matching ``lfs_suffixes`` through the git
LFS batch API: batch → PUT → verify, then an ``lfsFile`` commit entry; the client must have Xet
disabled, ``HF_HUB_DISABLE_XET=1``), create a branch, describe a repo or list its tree, and download
files through ``/{repo}/resolve/{revision}/{path}`` with the headers the client checks (``ETag`` —
git oid, or sha256 for LFS files —, ``X-Repo-Commit``, ``Content-Length``, ``X-Error-Code`` on
404s). Blobs live in a temporary directory, repo state in memory. Start it with :meth:`HubServer.start`, point the client
at ``server.endpoint`` (``HF_ENDPOINT``), inspect ``server.requests``; make an endpoint fail with
``server.fail["commit"] = 500`` (keys: ``create``, ``preupload``, ``lfs``, ``commit``, ``resolve``,
``info``).
No authentication: tokens are ignored.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag / oid for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> blob key (git oid, or sha256 for LFS files)


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        return self.commits.get(revision)


class HubServer:
    """A local Hub stand-in on 127.0.0.1 with a random port, served from a background thread."""

    def __init__(self, root: str | Path, lfs_suffixes: tuple[str, ...] = (".safetensors",)):
        self.root = Path(root)
        self.lfs_suffixes = lfs_suffixes
        self.blob_dir = self.root / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.fail: dict[str, int] = {}
        self.lock = threading.RLock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        server = self

        class Handler(_Handler):
            hub = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ---- storage -------------------------------------------------------------------------
    def read_blob(self, oid: str) -> bytes:
        return (self.blob_dir / oid).read_bytes()

    def write_blob(self, data: bytes) -> str:
        oid = git_blob_oid(data)
        path = self.blob_dir / oid
        if not path.exists():
            path.write_bytes(data)
        return oid

    def file_at(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """Content of ``path`` at ``revision`` (for assertions in tests)."""
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None, f"no revision {revision!r}"
        return self.read_blob(commit.files[path])

    def commit(self, repo_id: str, operations: list[dict], message: str, branch: str) -> Commit:
        with self.lock:
            repo = self.repos[repo_id]
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            for op in operations:
                key, value = op["key"], op["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    files[value["path"]] = self.write_blob(data)
                elif key == "lfsFile":
                    if not (self.blob_dir / value["oid"]).exists():
                        raise ValueError(f"LFS object {value['oid']} was never uploaded")
                    files[value["path"]] = value["oid"]
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise KeyError(value["path"])
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    gone = [p for p in files if p.startswith(prefix)]
                    if not gone:
                        raise KeyError(value["path"])
                    for p in gone:
                        del files[p]
                else:
                    raise ValueError(f"operation {key!r} is not supported by the test server")
            digest = hashlib.sha1(
                json.dumps([parent, message, sorted(files.items())]).encode()
            ).hexdigest()
            commit = Commit(digest, parent, message, files)
            repo.commits[digest] = commit
            repo.branches[branch] = digest
            return commit


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        return

    # ---- helpers ---------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.send_response(status)
        headers = {"Content-Type": "application/json", **(headers or {})}
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict[str, str] | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, message: str, code: str | None = None, **headers: str):
        extra = dict(headers)
        if code:
            extra["X-Error-Code"] = code
        extra["X-Error-Message"] = message
        self._json(status, {"error": message}, extra)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                chunk = self.rfile.read(size + 2)[:size]
                if size == 0:
                    return data
                data += chunk
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(self) -> tuple[list[str], dict[str, list[str]]]:
        parts = urlsplit(self.path)
        return [unquote(p) for p in parts.path.split("/") if p], parse_qs(parts.query)

    def _failing(self, kind: str) -> bool:
        status = self.hub.fail.get(kind)
        if status:
            self._error(status, f"injected failure on {kind}")
            return True
        return False

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    # ---- dispatch --------------------------------------------------------------------------
    def do_HEAD(self):
        self._dispatch()

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def _dispatch(self):
        self.hub.requests.append((self.command, self.path))
        seg, query = self._route()
        try:
            if seg[:1] == ["api"]:
                self._api(seg[1:], query)
            elif (
                len(seg) == 6
                and seg[1].endswith(".git")
                and seg[2:] == ["info", "lfs", "objects", "batch"]
            ):
                self._lfs_batch(f"{seg[0]}/{seg[1][: -len('.git')]}")
            elif len(seg) == 2 and seg[0] in ("lfs-upload", "lfs-verify"):
                self._lfs_object(seg[0], seg[1])
            elif len(seg) >= 5 and seg[2] == "resolve":
                self._resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]))
            else:
                self._error(404, f"no route for {self.path}")
        except Exception as e:  # surface server bugs to the client as 500s
            self._error(500, f"test server error: {type(e).__name__}: {e}")

    def _api(self, seg: list[str], query: dict[str, list[str]]):
        m = self.command
        if m == "POST" and seg == ["repos", "create"]:
            return self._create_repo()
        if m == "POST" and seg == ["validate-yaml"]:
            return self._validate_yaml()
        if len(seg) < 3 or seg[0] != "models":
            return self._error(404, f"no route for {self.path}")
        repo_id, rest = f"{seg[1]}/{seg[2]}", seg[3:]
        if m == "GET" and not rest:
            return self._info(repo_id, "main")
        if m == "GET" and len(rest) == 2 and rest[0] == "revision":
            return self._info(repo_id, rest[1])
        if m == "GET" and len(rest) >= 2 and rest[0] == "tree":
            return self._tree(repo_id, rest[1], "/".join(rest[2:]), query)
        if m == "POST" and len(rest) == 2 and rest[0] == "preupload":
            return self._preupload(repo_id, rest[1])
        if m == "POST" and len(rest) == 2 and rest[0] == "commit":
            return self._commit(repo_id, rest[1])
        if m == "POST" and len(rest) == 2 and rest[0] == "branch":
            return self._branch(repo_id, rest[1])
        return self._error(404, f"no route for {self.path}")

    # ---- endpoints -------------------------------------------------------------------------
    def _create_repo(self):
        payload = json.loads(self._body() or b"{}")
        if self._failing("create"):
            return
        repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
        with self.hub.lock:
            if repo_id in self.hub.repos:
                message = "You already created this model repo"
                url = f"{self.hub.endpoint}/{repo_id}"
                return self._json(409, {"error": message, "url": url}, {"X-Error-Message": message})
            repo = Repo(repo_id, private=bool(payload.get("private")))
            if payload.get("visibility"):
                repo.private = payload["visibility"] != "public"
            self.hub.repos[repo_id] = repo
            self.hub.commit(repo_id, [], "initial commit", "main")
        self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _validate_yaml(self):
        payload = json.loads(self._body() or b"{}")
        content = payload.get("content", "")
        if content.startswith("---"):
            try:
                yaml.safe_load(content.split("---", 2)[1])
            except yaml.YAMLError as e:
                return self._json(400, {"errors": [{"message": str(e)}]})
        self._json(200, {"errors": [], "warnings": []})

    def _info(self, repo_id: str, revision: str):
        if self._failing("info") or (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        self._json(
            200,
            {
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit.oid,
                "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)],
            },
        )

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, list[str]]):
        if (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = path.rstrip("/") + "/" if path else ""
        entries, folders = [], set()
        for p, oid in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            parts = rel.split("/")
            if recursive:
                for i in range(1, len(parts)):
                    folders.add(prefix + "/".join(parts[:i]))
            elif len(parts) > 1:
                folders.add(prefix + parts[0])
                continue
            size = (self.hub.blob_dir / oid).stat().st_size
            entry = {"type": "file", "oid": oid, "size": size, "path": p}
            if (
                len(oid) == 64
            ):  # an LFS file: the git oid would be the pointer's; any 40-hex will do
                entry["oid"] = hashlib.sha1(oid.encode()).hexdigest()
                entry["lfs"] = {"oid": oid, "size": size, "pointerSize": 134}
            entries.append(entry)
        if path and not entries and not folders:
            return self._error(404, f"{path} does not exist", "EntryNotFound")
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": f} for f in folders]
        self._json(200, entries)

    def _preupload(self, repo_id: str, revision: str):
        payload = json.loads(self._body() or b"{}")
        if self._failing("preupload") or (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        existing = commit.files if commit is not None else {}
        files = [
            {
                "path": f["path"],
                "uploadMode": "lfs" if f["path"].endswith(self.hub.lfs_suffixes) else "regular",
                "shouldIgnore": False,
                "oid": existing.get(f["path"]),
            }
            for f in payload.get("files", [])
        ]
        self._json(200, {"files": files, "commitOid": commit.oid if commit else None})

    def _commit(self, repo_id: str, revision: str):
        body = self._body()
        if self._failing("commit") or (repo := self._repo(repo_id)) is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), {})
        ops = [x for x in lines if x["key"] != "header"]
        if revision not in repo.branches:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = header.get("parentCommit")
        if parent and parent != repo.branches[revision]:
            return self._error(412, "A commit has happened since parentCommit")
        try:
            commit = self.hub.commit(repo_id, ops, header.get("summary", ""), revision)
        except KeyError as e:
            return self._error(404, f"A file with this name doesn't exist: {e}")
        except ValueError as e:
            return self._error(400, str(e))
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{commit.oid}",
                "pullRequestUrl": None,
            },
        )

    def _lfs_batch(self, repo_id: str):
        payload = json.loads(self._body() or b"{}")
        if self._failing("lfs") or self._repo(repo_id) is None:
            return
        objects = []
        for obj in payload.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.hub.blob_dir / obj["oid"]).exists():
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"},
                    "verify": {"href": f"{self.hub.endpoint}/lfs-verify/{obj['oid']}"},
                }
            objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects})

    def _lfs_object(self, action: str, oid: str):
        body = self._body()
        if action == "lfs-upload":
            if self.command != "PUT" or hashlib.sha256(body).hexdigest() != oid:
                return self._error(400, f"content does not match LFS oid {oid}")
            (self.hub.blob_dir / oid).write_bytes(body)
            return self._send(200)
        if not (self.hub.blob_dir / oid).exists():
            return self._error(404, f"LFS object {oid} not found")
        self._json(200, {"success": True})

    def _branch(self, repo_id: str, branch: str):
        payload = json.loads(self._body() or b"{}")
        if (repo := self._repo(repo_id)) is None:
            return
        with self.hub.lock:
            if branch in repo.branches:
                return self._error(409, f"Reference {branch} already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[branch] = start.oid
        self._json(200, {})

    def _resolve(self, repo_id: str, revision: str, path: str):
        if self._failing("resolve") or (repo := self._repo(repo_id)) is None:
            return
        commit = repo.resolve(revision)
        if commit is None:
            return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        oid = commit.files.get(path)
        if oid is None:
            return self._error(
                404, f"Entry not found: {path}", "EntryNotFound", **{"X-Repo-Commit": commit.oid}
            )
        data = self.hub.read_blob(oid)
        self._send(
            200,
            data,
            {
                "Content-Type": "application/octet-stream",
                "ETag": f'"{oid}"',
                "X-Repo-Commit": commit.oid,
                "Accept-Ranges": "none",
            },
        )
