"""A small fake Hugging Face hub (and a plain Range-capable file server) for tests and benchmarks.

Serves synthetic model repos on ``127.0.0.1:<free port>`` from a background thread, implementing
just the endpoints the real ``huggingface_hub`` client (2.x, httpx-based) calls for
``snapshot_download`` / ``hf_hub_download`` / ``model_info`` / ``list_repo_tree``:

- ``GET /api/models/{repo}`` and ``GET /api/models/{repo}/revision/{rev}``: repo info with ``sha``.
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=...``: files with ``oid`` (git blob sha1),
  ``size`` and, for LFS files, ``lfs: {oid: sha256, size, pointerSize}``.
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: ``X-Repo-Commit``, ``ETag``, ``X-Linked-Etag`` and
  ``X-Linked-Size`` (LFS), ``Content-Length``, ``Accept-Ranges``; ``Range: bytes=N-[M]`` → 206.
- Unknown repo / revision / file → 404 with ``X-Error-Code: RepoNotFound | RevisionNotFound |
  EntryNotFound`` (what the client turns into its typed errors); a gated repo without the right
  ``Authorization: Bearer`` token → 401 with ``X-Error-Code: GatedRepo``.

No xet headers are ever sent, so the client falls back to plain HTTP downloads.

Usage::

    with FakeHub({"owner/name": {"config.json": b"{}", "model.bin": b"..."}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)      # or pass endpoint=hub.url
        sha = hub.commit("owner/name", {"model.bin": b"new"})   # new revision on "main"
        hub.corrupt("owner/name", "model.bin", times=1)          # flip a byte in the next GET
        hub.drop("owner/name", "model.bin", times=1)             # close the connection mid-file
        hub.requests                                             # [(method, path, {lowercased header: value})]

Fault injection counts GET requests of the file body; ``times=None`` means every time.

``FakeHub(..., echo_auth=True)`` plays a careless mirror: every error it answers (its
``X-Error-Message`` header and JSON body) repeats the request's ``Authorization`` header,
so tests can check that a token never travels from a server's error text to the user.
``hub.fail_api(status=500, times=1)`` answers the next repo-info/tree API calls with that error.

``hub.rename(old, new)`` moves a repo as the real hub does when an owner transfers it: every API and
``resolve`` request naming the old repo is answered ``307 Temporary Redirect`` with a relative
``Location`` naming the new one (the real client follows such same-host redirects).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files stored in LFS on the real hub (by suffix); everything else is a plain git file.
LFS_SUFFIXES = (".bin", ".safetensors", ".pth", ".pt", ".model", ".gguf", ".zip", ".gz", ".npy", ".ckpt")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the hub reports as ``oid`` for non-LFS files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _Commit:
    sha: str
    files: dict[str, bytes]
    digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # path -> (git sha1, sha256), once

    def digest(self, path: str) -> tuple[str, str]:
        if path not in self.digests:
            data = self.files[path]
            self.digests[path] = (git_blob_sha1(data), hashlib.sha256(data).hexdigest())
        return self.digests[path]


@dataclass
class _Repo:
    commits: list[_Commit] = field(default_factory=list)
    refs: dict[str, str] = field(default_factory=dict)  # branch/tag -> commit sha
    token: str | None = None  # gated: this bearer token is required


@dataclass
class _Fault:
    kind: str  # "corrupt" | "drop" | "status"
    times: int | None  # None = always
    at: float  # fraction of the file where the fault happens
    status: int = 0  # for "status": the HTTP error answered instead of the file


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=N-`` / ``bytes=N-M`` → (start, end inclusive); None when absent or unsupported."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix range: last N bytes
        n = int(m.group(2))
        return max(size - n, 0), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    return start, min(end, size - 1)


class _ServerBase:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread, usable as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._faults: dict[tuple, _Fault] = {}
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def setup(self):
                super().setup()
                with owner._lock:
                    owner._conns.add(self.connection)

            def finish(self):
                with owner._lock:
                    owner._conns.discard(self.connection)
                super().finish()

            def do_HEAD(self):
                owner._dispatch(self, "HEAD")

            def do_GET(self):
                owner._dispatch(self, "GET")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name=type(self).__name__,
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close open keep-alive connections (clients see the server gone)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "server not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # -- faults --------------------------------------------------------------------------------
    def _take_fault(self, key: tuple) -> _Fault | None:
        with self._lock:
            fault = self._faults.get(key)
            if fault is None:
                return None
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    del self._faults[key]
            return fault

    def clear_faults(self) -> None:
        """Remove every pending fault."""
        with self._lock:
            self._faults.clear()

    def _dispatch(self, h: BaseHTTPRequestHandler, method: str) -> None:
        with self._lock:
            self.requests.append((method, h.path, {k.lower(): v for k, v in h.headers.items()}))
        try:
            self._handle(h, method)
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- responses -----------------------------------------------------------------------------
    @staticmethod
    def _send(h, status: int, body: bytes = b"", headers: dict | None = None, *, method: str = "GET",
              content_length: int | None = None) -> None:
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        h.end_headers()
        if method != "HEAD" and body:
            h.wfile.write(body)

    def _send_json(self, h, obj, *, method: str, headers: dict | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(h, 200, body, {"Content-Type": "application/json", **(headers or {})}, method=method)

    echo_auth = False  # a careless mirror: error texts repeat the Authorization header

    def _send_error(self, h, status: int, code: str | None, message: str, *, method: str,
                    headers: dict | None = None) -> None:
        if self.echo_auth:
            message = f"{message} (request had Authorization: {h.headers.get('Authorization')!s})"
        hdrs = {"Content-Type": "application/json", "X-Error-Message": message, **(headers or {})}
        if code:
            hdrs["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), hdrs, method=method)

    def _send_file(self, h, data: bytes, headers: dict, *, method: str, fault_key: tuple) -> None:
        """Serve ``data`` honouring Range; apply an injected fault to a GET body."""
        size = len(data)
        rng = _parse_range(h.headers.get("Range"), size)
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream", **headers}
        if rng is not None:
            start, end = rng
            if start >= size:
                self._send(h, 416, b"", {"Content-Range": f"bytes */{size}"}, method=method)
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        else:
            start, end, status = 0, size - 1, 200
        body = data[start:end + 1]
        fault = self._take_fault(fault_key) if method == "GET" else None
        if fault is None:
            self._send(h, status, body, headers, method=method)
            return
        if fault.kind == "status":
            self._send_error(h, fault.status, None, f"injected HTTP {fault.status}", method=method)
            return
        cut = min(max(int(size * fault.at) - start, 0), max(len(body) - 1, 0))
        if fault.kind == "corrupt":
            if body:
                body = body[:cut] + bytes([body[cut] ^ 0xFF]) + body[cut + 1:]
            self._send(h, status, body, headers, method=method)
            return
        # "drop": promise the whole body, send part of it, then close the socket
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[:cut])
        h.wfile.flush()
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class FakeHub(_ServerBase):
    """A fake Hugging Face hub serving ``{repo_id: {path: bytes}}`` (see the module docstring).

    Each repo starts with one commit on branch ``main``. ``gated={repo: token}`` makes a repo
    require ``Authorization: Bearer <token>``.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None, *,
                 gated: dict[str, str] | None = None, echo_auth: bool = False) -> None:
        super().__init__()
        self.echo_auth = echo_auth
        self._repos: dict[str, _Repo] = {}
        self._renamed: dict[str, str] = {}  # old repo id -> new repo id
        self._counter = 0
        for repo, files in (repos or {}).items():
            self.commit(repo, files)
        for repo, token in (gated or {}).items():
            self._repos[repo].token = token

    # -- repo state ----------------------------------------------------------------------------
    def commit(self, repo: str, files: dict[str, bytes | None], *, branch: str = "main",
               replace: bool = False) -> str:
        """Add a revision on ``branch`` and return its commit sha (40 hex).

        ``files`` updates the previous revision's files (``None`` deletes a path); with
        ``replace=True`` it is the complete new file set. Creates the repo if it does not exist.
        """
        with self._lock:
            r = self._repos.setdefault(repo, _Repo())
            parent = r.refs.get(branch)
            base = {} if replace or parent is None else dict(self._find(r, parent).files)
            for path, data in files.items():
                if data is None:
                    base.pop(path, None)
                else:
                    base[path] = bytes(data)
            self._counter += 1
            h = hashlib.sha1(f"{repo}\n{self._counter}\n{parent}".encode())
            for path in sorted(base):
                h.update(path.encode() + b"\0" + hashlib.sha256(base[path]).digest())
            sha = h.hexdigest()
            r.commits.append(_Commit(sha, base))
            r.refs[branch] = sha
            return sha

    def tag(self, repo: str, name: str, revision: str = "main") -> str:
        """Point tag/branch ``name`` at ``revision``; returns the commit sha."""
        with self._lock:
            r = self._repos[repo]
            sha = self._resolve(r, revision).sha
            r.refs[name] = sha
            return sha

    def head(self, repo: str, branch: str = "main") -> str:
        """Commit sha that ``branch`` points at."""
        return self._repos[repo].refs[branch]

    def files(self, repo: str, revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            return dict(self._resolve(self._repos[repo], revision).files)

    def corrupt(self, repo: str, path: str, *, times: int | None = 1, at: float = 0.5) -> None:
        """Flip one byte (at fraction ``at`` of the file) of the next ``times`` GETs (None: always)."""
        with self._lock:
            self._faults[("hub", repo, path)] = _Fault("corrupt", times, at)

    def drop(self, repo: str, path: str, *, times: int | None = 1, at: float = 0.5) -> None:
        """Close the connection after fraction ``at`` of the file on the next ``times`` GETs."""
        with self._lock:
            self._faults[("hub", repo, path)] = _Fault("drop", times, at)

    def rename(self, old: str, new: str) -> None:
        """Move repo ``old`` to ``new`` (created empty if absent); the old name then redirects (307)."""
        with self._lock:
            if old in self._repos and new not in self._repos:
                self._repos[new] = self._repos.pop(old)
            self._renamed[old] = new

    def fail_api(self, *, status: int = 500, times: int | None = 1) -> None:
        """Answer the next ``times`` repo-info / tree API requests with HTTP ``status``."""
        with self._lock:
            self._faults[("api",)] = _Fault("status", times, 0.0, status)

    @staticmethod
    def _find(r: _Repo, sha: str) -> _Commit:
        return next(c for c in r.commits if c.sha == sha)

    @classmethod
    def _resolve(cls, r: _Repo, revision: str) -> _Commit:
        sha = r.refs.get(revision, revision)
        for c in r.commits:
            if c.sha == sha:
                return c
        raise KeyError(revision)

    # -- request handling ----------------------------------------------------------------------
    _API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<kind>revision|tree)/(?P<rest>.*))?$")
    _RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")

    def _redirect(self, h, method: str, path: str, query: str) -> bool:
        """A 307 to the repo's new name when ``path`` names a renamed repo (what the hub answers)."""
        for pattern, start in ((self._API, "/api/models/"), (self._RESOLVE, "/")):
            m = pattern.match(path)
            if m and m.group("repo") in self._renamed:
                new = self._renamed[m.group("repo")]
                location = start + new + path[len(start) + len(m.group("repo")):] + (f"?{query}" if query else "")
                self._send(h, 307, b"", {"Location": location}, method=method)
                return True
        return False

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(h.path)
        path, query = parts.path, parse_qs(parts.query)
        if self._redirect(h, method, path, parts.query):
            return
        m = self._API.match(path)
        if m:
            fault = self._take_fault(("api",))
            if fault is not None:
                return self._send_error(h, fault.status, None, f"injected HTTP {fault.status}", method=method)
            return self._api(h, method, m.group("repo"), m.group("kind"), m.group("rest"), query)
        m = self._RESOLVE.match(path)
        if m:
            return self._resolve_file(h, method, m.group("repo"), unquote(m.group("rev")),
                                      unquote(m.group("path")))
        self._send_error(h, 404, None, f"no route for {path}", method=method)

    def _lookup(self, h, method: str, repo: str, revision: str) -> _Commit | None:
        """The commit for ``repo@revision``, or None after sending the hub's 404/401."""
        r = self._repos.get(repo)
        if r is None:
            self._send_error(h, 404, "RepoNotFound", "Repository not found", method=method)
            return None
        if r.token is not None and h.headers.get("Authorization") != f"Bearer {r.token}":
            self._send_error(h, 401, "GatedRepo", "Access to model is restricted.", method=method)
            return None
        try:
            return self._resolve(r, revision)
        except KeyError:
            self._send_error(h, 404, "RevisionNotFound", "Invalid rev id: " + revision, method=method)
            return None

    def _api(self, h, method: str, repo: str, kind: str | None, rest: str | None, query) -> None:
        if kind == "tree":
            rev, _, sub = (rest or "").partition("/")
            commit = self._lookup(h, method, repo, unquote(rev))
            if commit is None:
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            return self._send_json(h, self._tree(commit, unquote(sub), recursive), method=method)
        commit = self._lookup(h, method, repo, unquote(rest) if kind == "revision" else "main")
        if commit is None:
            return
        info = {
            "id": repo, "modelId": repo, "sha": commit.sha, "private": False,
            "gated": "manual" if self._repos[repo].token else False, "disabled": False,
            "tags": [], "downloads": 0, "likes": 0, "lastModified": "2023-06-01T00:00:00.000Z",
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        self._send_json(h, info, method=method)

    @staticmethod
    def _is_lfs(path: str) -> bool:
        return path.endswith(LFS_SUFFIXES)

    def _tree(self, commit: _Commit, sub: str, recursive: bool) -> list[dict]:
        prefix = sub.strip("/") + "/" if sub.strip("/") else ""
        entries: dict[str, dict] = {}
        for path in sorted(commit.files):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if not recursive and "/" in rel:
                d = prefix + rel.split("/")[0]
                entries[d] = {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                              "path": d}
                continue
            if recursive:  # folders on the way, as the hub lists them
                parts = rel.split("/")[:-1]
                for i in range(len(parts)):
                    d = prefix + "/".join(parts[:i + 1])
                    entries.setdefault(d, {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(),
                                           "size": 0, "path": d})
            data = commit.files[path]
            oid, sha256 = commit.digest(path)
            entry = {"type": "file", "oid": oid, "size": len(data), "path": path}
            if self._is_lfs(path):
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": 134}
            entries[path] = entry
        return list(entries.values())

    def _resolve_file(self, h, method: str, repo: str, rev: str, path: str) -> None:
        commit = self._lookup(h, method, repo, rev)
        if commit is None:
            return
        data = commit.files.get(path)
        if data is None:
            self._send_error(h, 404, "EntryNotFound", "Entry not found", method=method,
                             headers={"X-Repo-Commit": commit.sha})
            return
        oid, sha256 = commit.digest(path)
        headers = {"X-Repo-Commit": commit.sha}
        if self._is_lfs(path):
            headers.update({"ETag": f'"{sha256}"', "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": len(data)})
        else:
            headers["ETag"] = f'"{oid}"'
        self._send_file(h, data, headers, method=method, fault_key=("hub", repo, path))


class FileServer(_ServerBase):
    """A plain HTTP file server (``/{name}`` → bytes) with Range support, ETag and fault injection."""

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.files: dict[str, bytes] = dict(files or {})
        self._etags: dict[str, tuple[bytes, str]] = {}

    def corrupt(self, name: str, *, times: int | None = 1, at: float = 0.5) -> None:
        with self._lock:
            self._faults[("file", name)] = _Fault("corrupt", times, at)

    def drop(self, name: str, *, times: int | None = 1, at: float = 0.5) -> None:
        with self._lock:
            self._faults[("file", name)] = _Fault("drop", times, at)

    def fail(self, name: str, *, status: int = 503, times: int | None = 1) -> None:
        """Answer the next ``times`` GETs of ``name`` with HTTP ``status`` instead of the file."""
        with self._lock:
            self._faults[("file", name)] = _Fault("status", times, 0.0, status)

    def file_url(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        name = unquote(urlsplit(h.path).path.lstrip("/"))
        data = self.files.get(name)
        if data is None:
            self._send(h, 404, b"not found", {"Content-Type": "text/plain"}, method=method)
            return
        cached = self._etags.get(name)
        if cached is None or cached[0] is not data:  # hash each content once, not per request
            cached = self._etags[name] = (data, '"' + hashlib.sha256(data).hexdigest()[:16] + '"')
        etag = cached[1]
        if_range = h.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            del h.headers["Range"]  # stale validator: send the whole (new) file
        self._send_file(h, data, {"ETag": etag}, method=method, fault_key=("file", name))
