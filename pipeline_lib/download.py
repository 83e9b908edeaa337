"""Download stage: fetch a model/LoRA from the hub, an HTTP(S) URL, a local folder or an archive.

``download(source, *, out, ...) -> DownloadResult``. Every file that lands in ``out`` has been
checked before it is placed there:

- hub files against the hub's own digest from the tree API (LFS sha256; git blob sha1 for small
  non-LFS files), always;
- against the official release sha256 from :mod:`pipeline_lib.catalog` when the catalog knows the
  repo, and against the caller's ``expected={filename: sha256}``.

huggingface_hub does not check downloaded bytes: a corrupted transfer lands silently in its cache.
So a mismatch evicts the file from the HF cache (blob and snapshot link), downloads it once more,
and raises :class:`~pipeline_lib.errors.IntegrityError` if it is still wrong (leaving the cache
clean). Where the hub's own digest already disagrees with the official one, that is known from the
tree listing and reported before anything is downloaded.

The resolved commit sha is recorded in ``DownloadResult.lock`` (JSON-serializable) so a rebuild can
pin it. Tokens (``token=`` or ``HF_TOKEN``) are passed to the hub client only: never logged, never
put in a lock, an artifact or an error message, and never sent to plain HTTP(S) sources. Every hub
error goes through one formatter (:func:`hub_error`), which also scrubs what a server may echo
back (its error text can repeat the ``Authorization`` header): the token, bearer values and
secret URL query values never reach a message (:func:`scrub`).

Every destination in ``out`` is claimed before the first byte is fetched
(:func:`pipeline_lib.fsutil.claim_output`): an existing file is refused unless ``overwrite``, and a
source file is never its own destination.

Sources (see :func:`parse_source`)::

    owner/name                      hub repo at --revision (default "main")
    hf://owner/name@rev             hub repo at rev
    https://host/path/file[.zip]    one file, resumed with Range, retried with exponential backoff
    ./folder  |  ./file             a local folder or file (copied into out)
    ./release.zip | .tar.gz         an archive, extracted safely (pipeline_lib.archive)
"""

from __future__ import annotations

import fnmatch
import hashlib
import http.client
import json
import logging
import os
import posixpath
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tqdm.auto import tqdm

from . import __version__, fsutil, killpoints
from .archive import extract_archive, is_archive
from .errors import InputError, IntegrityError, ZhllamaError
from .fsutil import TMP_PREFIX, check_disk_space, fsync_dir, human_bytes
from .progress import bar, progress_enabled

log = logging.getLogger(__name__)

LOCK_VERSION = 1
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SECRET_QUERY_KEYS = re.compile(r"(token|sig|signature|key|auth|credential|password|secret|^x-amz-)", re.I)
_CHUNK = 1024 * 1024


class DownloadError(ZhllamaError):
    """The source could not be fetched (network, missing repo or revision, HTTP error)."""


# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Artifact:
    """One file placed in ``out``.

    ``origin`` says where the bytes came from (``hf://owner/name@<commit>/path``, a URL without
    credentials, a local path or ``archive.zip!member``); ``revision`` is the resolved hub commit
    (None for other sources); ``verified_against`` names every reference digest that matched,
    e.g. ``("hub lfs sha256", "official release sha256")`` (empty: nothing to check against).
    """

    path: Path
    sha256: str
    size: int
    origin: str
    revision: str | None
    verified_against: tuple[str, ...]

    def summary(self, root: Path | None = None) -> str:
        name = self.path.relative_to(root).as_posix() if root is not None else self.path.name
        against = " + ".join(self.verified_against) if self.verified_against else \
            "nothing (no reference digest; sha256 recorded)"
        return f"{name}  {human_bytes(self.size)}  from {self.origin}  verified against {against}"


@dataclass(frozen=True)
class DownloadResult:
    source: str  # the source as given, credentials removed
    kind: str  # "hub" | "http" | "local" | "archive"
    out: Path
    files: tuple[Artifact, ...]
    commit: str | None  # resolved hub commit sha
    lock: dict  # JSON-serializable record to pin a rebuild (see lock_json)

    def lock_json(self) -> str:
        return json.dumps(self.lock, indent=2, sort_keys=True)


@dataclass(frozen=True)
class Source:
    kind: str  # "hub" | "http" | "local" | "archive"
    text: str  # display form, credentials removed
    repo: str | None = None
    revision: str | None = None
    url: str | None = None
    path: Path | None = None


# ---------------------------------------------------------------------------------------------
# helpers


def redact_url(url: str) -> str:
    """URL without user:password and with secret-looking query values replaced by ``REDACTED``."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    query = urlencode([(k, "REDACTED" if _SECRET_QUERY_KEYS.search(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN")
_SCRUB_PATTERNS = (
    (re.compile(r"(?i)(authorization\s*[:=]\s*)(bearer\s+|basic\s+|token\s+)?[^\s'\",;)]+"), r"\1\2***"),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_***"),
)
REDACTED = "***"


# The HTTP transport's DEBUG log prints every response header; a careless mirror puts the request's
# Authorization header into its error headers, so that log would carry the token. It is kept at
# INFO unless someone set its level on purpose.
for _name in ("httpcore", "httpcore2"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.INFO)


class SecretFilter(logging.Filter):
    """A logging filter that scrubs tokens (the environment's, bearer values) from every record it sees.

    The CLI puts it on its stderr handler, as a second line of defence behind :func:`scrub`.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler
            return True
        clean = scrub(text, secrets=[os.environ[k] for k in _TOKEN_ENV if len(os.environ.get(k, "")) >= 4])
        if clean != text:
            record.msg, record.args = clean, None
        return True


def known_secrets(token: str | None = None) -> list[str]:
    """Token values that must never appear in a message: the call's, the environment's, the login's."""
    found = [token] if token else []
    found += [os.environ[k] for k in _TOKEN_ENV if os.environ.get(k)]
    try:
        from huggingface_hub import get_token

        stored = get_token()
    except Exception:  # no client, or an unreadable login file: nothing stored to hide
        stored = None
    if stored:
        found.append(stored)
    return sorted({t for t in found if isinstance(t, str) and len(t) >= 4}, key=len, reverse=True)


def scrub(text: str, *, secrets: Sequence[str] = (), urls: Sequence[str] = ()) -> str:
    """``text`` with every secret removed: the given token values, ``Authorization``/bearer values,
    ``hf_…`` tokens, and the secret query values (and user:password) of ``urls``."""
    if not text:
        return text
    for url in urls:
        parts = urlsplit(url)
        for k, v in parse_qsl(parts.query, keep_blank_values=True):
            if v and _SECRET_QUERY_KEYS.search(k) and len(v) >= 4:
                text = text.replace(v, REDACTED)
        if parts.password and len(parts.password) >= 2:
            text = text.replace(parts.password, REDACTED)
    for value in secrets:
        text = text.replace(value, REDACTED)
    for pattern, repl in _SCRUB_PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _scrubbed(err: ZhllamaError, *, secrets: Sequence[str], urls: Sequence[str] = ()) -> ZhllamaError:
    """The same error with every part scrubbed (see :func:`scrub`)."""
    def clean(part):
        return scrub(part, secrets=secrets, urls=urls) if part else part

    return type(err)(clean(err.seen), expected=clean(err.expected), fix=clean(err.fix))


def parse_source(text: str, *, revision: str | None = None) -> Source:
    """Classify a source string. A local path wins over an ``owner/name`` look-alike."""
    s = str(text).strip()
    if s.startswith("hf://"):
        body = s[len("hf://"):]
        repo, _, rev = body.partition("@")
        if revision and rev and revision != rev:
            raise InputError(f"source {s} pins revision {rev!r} but --revision is {revision!r}",
                             fix="give the revision once")
        if repo.startswith("models/"):
            repo = repo[len("models/"):]
        if not _REPO_RE.match(repo):
            raise InputError(f"cannot read hub repo in {s!r}", expected="hf://owner/name[@revision]")
        rev = rev or revision or "main"
        return Source("hub", f"hf://{repo}@{rev}", repo=repo, revision=rev)
    if s.startswith(("http://", "https://")):
        return Source("http", redact_url(s), url=s, revision=revision)
    p = Path(s).expanduser()
    if p.exists():
        kind = "archive" if p.is_file() and is_archive(p) else "local"
        return Source(kind, str(p), path=p)
    if _REPO_RE.match(s):
        rev = revision or "main"
        return Source("hub", f"hf://{s}@{rev}", repo=s, revision=rev)
    raise InputError(f"source {s!r} is neither an existing path, a URL nor a hub repo",
                     expected="owner/name, hf://owner/name@rev, https://..., a folder, or a .zip/.tar.gz",
                     fix="check the spelling, or the path if you meant a local file")


def hf_cache_dir() -> Path:
    """The HF hub cache, read from the environment *now* (HF_HUB_CACHE, then HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hf_endpoint() -> str:
    """The hub endpoint, read from HF_ENDPOINT now (huggingface_hub reads it only at import)."""
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _zhllama_home() -> Path:
    return Path(os.environ.get("ZHLLAMA_HOME") or Path.home() / ".cache" / "zhllama").expanduser()


def _matches(relpath: str, include: Sequence[str] | None) -> bool:
    if not include:
        return True
    for pat in include:
        pat = pat + "*" if pat.endswith("/") else pat
        if fnmatch.fnmatch(relpath, pat) or fnmatch.fnmatch(posixpath.basename(relpath), pat):
            return True
    return False


def _merge_refs(expected: Mapping[str, str] | None, catalog_refs: Mapping[str, str] | None
                ) -> dict[str, list[tuple[str, str]]]:
    refs: dict[str, list[tuple[str, str]]] = {}
    for name, digest in (catalog_refs or {}).items():
        refs.setdefault(name, []).append(("official release sha256", digest.lower()))
    for name, digest in (expected or {}).items():
        refs.setdefault(name, []).append(("expected sha256", digest.lower()))
    return refs


def _refs_for(relpath: str, refs: dict[str, list[tuple[str, str]]]) -> list[tuple[str, str]]:
    for key in (relpath, posixpath.basename(relpath)):
        if key in refs:
            return refs[key]
    return []


def _warn_unused(expected: Mapping[str, str] | None, relpaths: Sequence[str]) -> None:
    """A reference digest naming no fetched file is most likely a typo: say so."""
    names = set(relpaths) | {posixpath.basename(r) for r in relpaths}
    unused = sorted(k for k in (expected or {}) if k not in names)
    if unused:
        log.warning("expected sha256 given for %s, but no such file is being fetched", ", ".join(unused))


def _catalog_expected(repo: str) -> dict[str, str]:
    try:
        from . import catalog
    except ImportError:  # catalog not available: only the hub digest and `expected` apply
        return {}
    fn = getattr(catalog, "expected_in_repo", None)
    return dict(fn(repo)) if fn else {}


def _sha256_many(paths: list[Path]) -> dict[Path, str]:
    try:
        from .verify import sha256_files
    except ImportError:
        from .fsutil import sha256_file

        return {p: sha256_file(p) for p in paths}
    return sha256_files(paths) if paths else {}


def git_blob_sha1(path: Path) -> str:
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _place(src: Path, dest: Path, *, link: bool = True) -> None:
    """Put ``src``'s content at ``dest`` atomically: a hard link when ``link`` and possible, else a
    fsynced copy. Local sources are copied (``link=False``): the user may edit their own folder."""
    src = Path(os.path.realpath(src))
    if dest.exists() and dest.is_file():
        try:
            if os.path.samefile(src, dest):
                return
        except OSError:
            pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(fsutil.tmp_name(dest.name))
    try:
        linked = False
        if link:
            try:
                os.link(src, tmp)
                linked = True
            except OSError:  # other filesystem, or links not allowed: copy
                pass
        if not linked:
            with open(src, "rb") as fi, open(tmp, "xb") as fo:
                while block := fi.read(_CHUNK * 8):
                    fo.write(block)
                    killpoints.tick_bytes(len(block))
                fo.flush()
                os.fsync(fo.fileno())
        os.replace(tmp, dest)
    except BaseException as exc:
        free = fsutil.write_failed_for_space(exc, dest.parent)
        tmp.unlink(missing_ok=True)
        if free is not None:
            raise fsutil.disk_full_error(dest, free) from None
        raise
    fsync_dir(dest.parent)


def _claim_all(out: Path, relpaths: Sequence[str], *, inputs: Sequence = (), overwrite: bool) -> None:
    """Claim every destination before anything is fetched (see fsutil.claim_output)."""
    fsutil.claim_output(out, kind="into", what="--out")
    for rel in relpaths:
        fsutil.claim_output(out / rel, kind="file", inputs=inputs, overwrite=overwrite, what="--out file")


class _Bar(tqdm):
    """tqdm honouring ZHLLAMA_PROGRESS / tty (passed to huggingface_hub as tqdm_class)."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("name", None)
        kwargs.setdefault("disable", not progress_enabled())
        kwargs.setdefault("leave", False)
        self._bytes = kwargs.get("unit") == "B"
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        result = super().update(n)
        if self._bytes and n:
            killpoints.tick_bytes(int(n))  # the client's byte loop: kill points count downloaded MiB
        return result


def _lock(source: Source, kind: str, *, files: Sequence[Artifact], out: Path, include, **extra) -> dict:
    lock = {
        "version": LOCK_VERSION,
        "source": source.text,
        "kind": kind,
        "include": list(include) if include else None,
        "files": [{"path": a.path.relative_to(out).as_posix(), "sha256": a.sha256, "size": a.size,
                   "origin": a.origin, "verified_against": list(a.verified_against)} for a in files],
    }
    lock.update(extra)
    return lock


# ---------------------------------------------------------------------------------------------
# entry point


def download(source: str | os.PathLike[str], *, out: str | os.PathLike[str], revision: str | None = None,
             include: Sequence[str] | None = None, expected: Mapping[str, str] | None = None,
             token: str | None = None, endpoint: str | None = None, cache_dir: str | os.PathLike[str] | None = None,
             max_workers: int = 4, retries: int = 5, backoff: float = 0.5,
             on_file: Callable[[Artifact], None] | None = None, overwrite: bool = False) -> DownloadResult:
    """Fetch ``source`` into the folder ``out`` and verify every file; see the module docstring.

    ``include``: globs (matched on the repo path and on the file name) selecting the files a
    stage needs, passed to the hub client as ``allow_patterns``. ``expected``: ``{filename or
    relpath: sha256}`` reference digests. ``token``: hub token (default: HF_TOKEN / the client's
    login). ``endpoint``/``cache_dir`` default to HF_ENDPOINT and HF_HUB_CACHE/HF_HOME read at call
    time. ``retries``/``backoff``: HTTP(S) sources (exponential: backoff·2ⁿ seconds, capped at 30).
    ``on_file`` is called with each placed Artifact (for progress UIs). ``overwrite``: replace files
    of the same name already in ``out`` (otherwise refused before anything is fetched; an archive
    never replaces anything).
    Raises InputError (bad source, unknown repo/revision, an existing destination), DownloadError
    (network), IntegrityError (digest mismatch twice), DiskSpaceError.
    """
    src = parse_source(str(source), revision=revision)
    out = fsutil.claim_output(out, kind="into", inputs=[src.path] if src.path else (), what="--out")
    include = list(include) if include else None
    if src.kind == "hub":
        return _download_hub(src, out=out, include=include, expected=expected, token=token,
                             endpoint=endpoint, cache_dir=cache_dir, max_workers=max_workers, on_file=on_file,
                             overwrite=overwrite)
    if src.kind == "http":
        return _download_http(src, out=out, include=include, expected=expected, retries=retries,
                              backoff=backoff, on_file=on_file, overwrite=overwrite)
    if src.kind == "archive":
        return _from_archive(src, src.path, out=out, include=include, expected=expected, on_file=on_file,
                             origin=str(src.path))
    return _download_local(src, out=out, include=include, expected=expected, on_file=on_file,
                           overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# hub


@dataclass(frozen=True)
class _HubFile:
    path: str
    size: int
    git_oid: str
    lfs_sha256: str | None

    @property
    def etag(self) -> str:
        return self.lfs_sha256 or self.git_oid


def hub_error(exc: BaseException, *, repo: str, revision: str | None, endpoint: str,
              token: str | None = None) -> ZhllamaError:
    """The one message for a failed hub call: what went wrong, for which repo/revision, and the fix.

    Only our own words and the server's first error line are used, and everything is scrubbed
    (:func:`scrub`): the call's token, ``HF_TOKEN``, any ``Authorization``/bearer value a mirror
    echoes back, and secret URL query values never appear in the result.
    """
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"at {redact_url(endpoint)}"
    if isinstance(exc, RevisionNotFoundError):
        err: ZhllamaError = InputError(
            f"revision {revision!r} not found in hub repo {repo} {where}",
            expected="an existing branch, tag or 40-hex commit sha of that repo",
            fix="check --revision (or the @rev in hf://owner/name@rev)")
    elif isinstance(exc, GatedRepoError):
        err = InputError(f"hub repo {repo} {where} is gated and the request was not authorized",
                         expected="a token of an account that accepted the model's license",
                         fix="accept the license on the model page, then set HF_TOKEN (never put it on the "
                         "command line)")
    elif isinstance(exc, RepositoryNotFoundError):
        err = InputError(f"hub repo {repo} not found {where}",
                         expected="an existing model repo id 'owner/name' you can access",
                         fix="check the spelling; for a private or gated repo set HF_TOKEN")
    elif isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        server = getattr(exc, "server_message", None) or ""
        detail = f" ({server.splitlines()[0][:200]})" if server.strip() else ""
        err = DownloadError(f"the hub {where} answered HTTP {status} for {repo}@{revision}{detail}",
                            fix="retry later; check HF_ENDPOINT, HF_TOKEN and your network")
    else:
        detail = str(exc).splitlines()[0][:200] if str(exc) else ""
        err = DownloadError(f"cannot fetch {repo} from the hub {where} ({type(exc).__name__}: {detail})",
                            fix="check the network and HF_ENDPOINT, then retry (finished files stay cached)")
    return _scrubbed(err, secrets=known_secrets(token), urls=[endpoint])


def _hub_error(exc: Exception, src: Source, endpoint: str, token: str | None = None) -> ZhllamaError:
    return hub_error(exc, repo=src.repo or "?", revision=src.revision, endpoint=endpoint, token=token)


def _hub_call(fn, src: Source, endpoint: str, token: str | None = None):
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return fn()
    except HfHubHTTPError as exc:
        raise _hub_error(exc, src, endpoint, token) from None
    except (OSError, ConnectionError) as exc:  # httpx errors on connect are OSError subclasses in places
        if fsutil.is_disk_full(exc):  # the client writing into its cache
            where = getattr(exc, "filename", None) or hf_cache_dir()
            raise fsutil.disk_full_error(where) from None
        raise _hub_error(exc, src, endpoint, token) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise _hub_error(exc, src, endpoint, token) from None
        raise


def resolve_hub_revision(repo: str, revision: str | None = None, *, endpoint: str | None = None,
                         token: str | None = None) -> str:
    """The commit sha a hub revision points at now (a 40-hex commit sha is returned as is).

    Errors are :func:`hub_error`'s (InputError for an unknown repo/revision or a gated repo,
    DownloadError for network and server errors), with every secret scrubbed.
    """
    rev = revision or "main"
    if _COMMIT_RE.match(rev):
        return rev
    from huggingface_hub import HfApi

    endpoint = (endpoint or hf_endpoint()).rstrip("/")
    src = Source("hub", f"hf://{repo}@{rev}", repo=repo, revision=rev)
    api = HfApi(endpoint=endpoint, token=token)
    return _hub_call(lambda: api.model_info(repo, revision=rev), src, endpoint, token).sha


def _evict(storage: Path, commit: str, f: _HubFile) -> None:
    """Remove a file from the HF cache: the snapshot link and the blob it points to."""
    link = storage / "snapshots" / commit / f.path
    targets = {storage / "blobs" / f.etag}
    if link.is_symlink():
        targets.add(Path(os.path.realpath(link)))
    link.unlink(missing_ok=True)
    for t in targets:
        if t.is_relative_to(storage):
            t.unlink(missing_ok=True)
    log.warning("removed %s (commit %s) from the HF cache after a digest mismatch", f.path, commit[:12])


def _check_hub_file(local: Path, f: _HubFile, sha256: str, refs: list[tuple[str, str]]
                    ) -> tuple[tuple[str, ...], tuple[str, str] | None]:
    """(labels that matched, None) or ((), (what was seen, what was expected)) for one downloaded file."""
    size = local.stat().st_size
    if size != f.size:
        return (), (f"{size} bytes", f"{f.size} bytes (the hub's listing)")
    matched = []
    if f.lfs_sha256:
        if sha256 != f.lfs_sha256:
            return (), (f"sha256 {sha256}", f"{f.lfs_sha256} (the hub's LFS sha256)")
        matched.append("hub lfs sha256")
    else:
        oid = git_blob_sha1(local)
        if oid != f.git_oid:
            return (), (f"git blob sha1 {oid}", f"{f.git_oid} (the hub's git sha1)")
        matched.append("hub git sha1")
    for label, digest in refs:
        if sha256 != digest:
            return (), (f"sha256 {sha256}", f"{digest} ({label})")
        matched.append(label)
    return tuple(matched), None


def _download_hub(src: Source, *, out: Path, include, expected, token, endpoint, cache_dir, max_workers,
                  on_file, overwrite) -> DownloadResult:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoFile

    endpoint = (endpoint or hf_endpoint()).rstrip("/")
    cache = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    repo, revision = src.repo, src.revision or "main"
    api = HfApi(endpoint=endpoint, token=token)

    storage = cache / repo_folder_name(repo_id=repo, repo_type="model")

    # 1. plan: resolve the commit, list the tree, pick files, check digests we already know, disk space
    online = True
    try:
        commit = revision if _COMMIT_RE.match(revision) else None
        if commit is None:
            commit = _hub_call(lambda: api.model_info(repo, revision=revision), src, endpoint, token).sha
        listing = _hub_call(lambda: {f.path: (f.lfs.size if f.lfs else f.size, f.blob_id,
                                              f.lfs.sha256 if f.lfs else None)
                                     for f in api.list_repo_tree(repo, revision=commit, recursive=True)
                                     if isinstance(f, RepoFile)}, src, endpoint, token)
    except DownloadError as exc:  # hub unreachable: a complete cached snapshot of the revision still works
        cached = _cached_listing(storage, revision)
        if cached is None:
            raise DownloadError(exc.seen + "; the HF cache holds no listing of that revision to work offline",
                                fix=exc.fix) from None
        commit, listing = cached
        online = False
        log.warning("hub unreachable; using the cached snapshot of %s@%s, checked against the cached hub "
                    "listing", repo, commit[:12])
    files = [_HubFile(path, size, oid, lfs) for path, (size, oid, lfs) in sorted(listing.items())
             if _matches(path, include)]
    if not files:
        names = ", ".join(sorted(listing)[:12]) or "(empty repo)"
        raise InputError(f"no file of {repo}@{commit[:12]} matches --include {include}",
                         expected=f"a glob matching some of: {names}", fix="fix the --include globs")
    _claim_all(out, [f.path for f in files], overwrite=overwrite)
    refs = _merge_refs(expected, _catalog_expected(repo))
    _warn_unused(expected, [f.path for f in files])
    for f in files:
        for label, digest in _refs_for(f.path, refs):
            if f.lfs_sha256 and f.lfs_sha256 != digest:
                raise IntegrityError(
                    f"{f.path} in hub repo {repo} at commit {commit} has sha256 {f.lfs_sha256} (hub LFS listing)",
                    expected=f"{digest} ({label})",
                    fix="the hub copy differs from the official release; pin a revision that holds the official "
                    "file (--revision) or get it from the release's own archive"
                    if label.startswith("official") else "check the digest you gave (--sha256 / expected=), or "
                    "pin the revision it belongs to (--revision)")
    snapshot = storage / "snapshots" / commit
    if not online:
        absent = [f.path for f in files if not (snapshot / f.path).is_file()]
        if absent:
            raise DownloadError(f"cannot reach the hub at {redact_url(endpoint)} and the HF cache misses "
                                f"{len(absent)} file(s) of {repo}@{commit[:12]}: {', '.join(absent[:5])}",
                                fix="retry with network access (HF_HUB_OFFLINE unset)")
    missing = sum(f.size for f in files if not (storage / "blobs" / f.etag).exists())
    check_disk_space(cache, missing, what=f"downloading {repo} into the HF cache")
    total = sum(f.size for f in files)
    if os.stat(_existing_parent(out)).st_dev != os.stat(_existing_parent(cache)).st_dev:
        check_disk_space(out, total, what=f"copying {repo} into {out}")
    log.info("%s %d files (%s) from hf://%s@%s", "downloading" if online else "using cached", len(files),
             human_bytes(total), repo, commit[:12])

    # 2. fetch with the real client (its cache, its resume), only the planned files
    paths = [f.path for f in files]
    if online:
        snapshot = Path(_hub_call(lambda: snapshot_download(
            repo, revision=commit, cache_dir=str(cache), endpoint=endpoint, token=token,
            allow_patterns=[_glob_escape(p) for p in paths], max_workers=max_workers, tqdm_class=_Bar),
            src, endpoint, token))
        if revision != commit:
            _write_ref(storage, revision, commit)

    # 3. verify every file; evict + fetch once more on a mismatch
    digests = _sha256_many([snapshot / p for p in paths])
    checked: dict[str, tuple[str, tuple[str, ...]]] = {}
    for f in files:
        local = snapshot / f.path
        sha = digests[local]
        matched, problem = _check_hub_file(local, f, sha, _refs_for(f.path, refs))
        if problem is not None:
            _evict(storage, commit, f)
            if not online:
                raise IntegrityError(f"cached {f.path} of hf://{repo}@{commit} has {problem[0]}",
                                     expected=problem[1], fix="the bad file was removed from the HF cache; "
                                     "run again with network access to download it")
            log.warning("%s from hf://%s@%s has %s, expected %s; downloading it again", f.path, repo,
                        commit[:12], problem[0], problem[1])
            again = Path(_hub_call(lambda f=f: hf_hub_download(
                repo, f.path, revision=commit, cache_dir=str(cache), endpoint=endpoint, token=token,
                tqdm_class=_Bar), src, endpoint, token))
            sha = _sha256_many([again])[again]
            matched, problem2 = _check_hub_file(again, f, sha, _refs_for(f.path, refs))
            if problem2 is not None:
                _evict(storage, commit, f)
                raise IntegrityError(
                    f"{f.path} from hf://{repo}@{commit} is corrupt after 2 downloads: {problem2[0]}",
                    expected=problem2[1],
                    fix="the bad file was removed from the HF cache; retry later or over another network "
                    "(a proxy or mirror may be altering the transfer)")
        checked[f.path] = (sha, matched)

    _sweep_hf_partials(cache, storage, files)

    # 4. place into out (hard links into the HF cache where possible)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = []
    for f in files:
        dest = out / f.path
        _place(snapshot / f.path, dest)
        sha, matched = checked[f.path]
        art = Artifact(dest, sha, f.size, f"hf://{repo}@{commit}/{f.path}", commit, matched)
        artifacts.append(art)
        log.info("%s", art.summary(out))
        if on_file:
            on_file(art)
    lock = _lock(src, "hub", files=artifacts, out=out, include=include, repo=repo, revision=revision,
                 commit=commit, endpoint=redact_url(endpoint))
    return DownloadResult(src.text, "hub", out, tuple(artifacts), commit, lock)


def _sweep_hf_partials(cache: Path, storage: Path, files: Sequence[_HubFile]) -> None:
    """Remove the HF client's partial downloads of ``files`` that no process is writing any more.

    The client downloads a blob into ``blobs/<etag>.<random>.incomplete`` while holding the
    ``flock`` of ``.locks/<repo folder>/<etag>.lock``, and a killed client leaves that file behind
    (a new run never resumes it). With the lock free, nobody writes those files: they go.
    """
    import fcntl

    for f in files:
        partials = list((storage / "blobs").glob(_glob_escape(f.etag) + "*.incomplete"))
        lock = cache / ".locks" / storage.name / f"{f.etag}.lock"
        if not partials or not lock.is_file():
            continue
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # being downloaded right now
            os.close(fd)
            continue
        try:
            for p in partials:
                p.unlink(missing_ok=True)
                log.info("removed %s, a partial download of an interrupted run", p)
        finally:
            os.close(fd)


def _cached_listing(storage: Path, revision: str) -> tuple[str, dict] | None:
    """(commit, {path: (size, git oid, lfs sha256)}) from the client's cached tree listing, if any."""
    commit = revision if _COMMIT_RE.match(revision) else None
    ref = storage / "refs" / revision
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    if commit is None:
        return None
    try:
        from huggingface_hub._tree_cache import read_tree_cache
    except ImportError:  # older or newer client without the tree cache: no offline mode
        return None
    entries = read_tree_cache(str(storage), commit)
    if entries is None:
        return None
    return commit, {p: (e.lfs_size if e.lfs_sha256 else e.size, e.blob_id, e.lfs_sha256) for p, e in entries.items()}


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _glob_escape(path: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", path)


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """Record branch/tag -> commit in the HF cache layout (refs/<revision>), as the client does."""
    ref = storage / "refs" / revision
    try:
        if ref.is_file() and ref.read_text() == commit:
            return
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f"{TMP_PREFIX}{ref.name}.{os.getpid()}")
        tmp.write_text(commit)
        os.replace(tmp, ref)
    except OSError as exc:  # a read-only cache still works for this run
        log.debug("could not record ref %s: %s", revision, exc)


# ---------------------------------------------------------------------------------------------
# local folder / archive


def _verify_local(relpath: str, path: Path, sha: str, refs) -> tuple[str, ...]:
    matched = []
    for label, digest in _refs_for(relpath, refs):
        if sha != digest:
            raise IntegrityError(f"{path} has sha256 {sha}", expected=f"{digest} ({label})",
                                 fix="get the file again from the official source")
        matched.append(label)
    return tuple(matched)


def _download_local(src: Source, *, out: Path, include, expected, on_file, overwrite) -> DownloadResult:
    root = src.path
    if root.is_file():
        pairs = [(root.name, root)]
    else:
        pairs = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(TMP_PREFIX) for part in p.relative_to(root).parts)
                       and _matches(p.relative_to(root).as_posix(), include))
    if not pairs:
        raise InputError(f"no file in {root} matches --include {include}", fix="fix the path or the globs")
    refs = _merge_refs(expected, None)
    _warn_unused(expected, [rel for rel, _ in pairs])
    digests = _sha256_many([p for _, p in pairs])
    verified = {rel: _verify_local(rel, p, digests[p], refs) for rel, p in pairs}  # all checked first
    same = root.is_dir() and out.exists() and os.path.samefile(root, out)
    if not same:  # (a folder "downloaded" onto itself is only verified, nothing is written)
        _claim_all(out, [rel for rel, _ in pairs], inputs=[p for _, p in pairs], overwrite=overwrite)
        check_disk_space(out, sum(p.stat().st_size for _, p in pairs), what=f"copying {root}")
    artifacts = []
    for rel, p in pairs:
        dest = p if same else out / rel
        if not same:
            _place(p, dest, link=False)
        art = Artifact(dest, digests[p], p.stat().st_size, str(p), None, verified[rel])
        artifacts.append(art)
        if on_file:
            on_file(art)
    return DownloadResult(src.text, "local", out, tuple(artifacts), None,
                          _lock(src, "local", files=artifacts, out=out, include=include))


def _from_archive(src: Source, archive: Path, *, out: Path, include, expected, on_file, origin: str,
                  extra: dict | None = None) -> DownloadResult:
    """Extract into a staging folder beside ``out``, verify, then move into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / fsutil.tmp_name(out.name)
    refs = _merge_refs(expected, None)
    try:
        res = extract_archive(archive, out=staging, include=include)
        files = [p for p in res.files if p.is_file() and not p.is_symlink()]
        digests = _sha256_many(files)
        rels = {p: p.relative_to(staging).as_posix() for p in files}
        _warn_unused({k: v for k, v in (expected or {}).items() if k != archive.name}, list(rels.values()))
        verified = {p: _verify_local(rels[p], p, digests[p], refs) for p in files}
        out.mkdir(parents=True, exist_ok=True)
        clash = sorted(e.name for e in staging.iterdir() if (out / e.name).exists())
        if clash:
            raise InputError(f"output folder {out} already holds {', '.join(clash[:5])}",
                             expected="an empty or new output folder", fix="remove them or choose another --out")
        for entry in sorted(staging.iterdir()):
            os.replace(entry, out / entry.name)
        fsync_dir(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    artifacts = []
    for p in files:
        dest = out / rels[p]
        art = Artifact(dest, digests[p], dest.stat().st_size, f"{origin}!{rels[p]}", None, verified[p])
        artifacts.append(art)
        if on_file:
            on_file(art)
    lock = _lock(src, "archive", files=artifacts, out=out, include=include,
                 archive_sha256=_sha256_many([archive])[archive], **(extra or {}))
    return DownloadResult(src.text, "archive", out, tuple(artifacts), None, lock)


# ---------------------------------------------------------------------------------------------
# HTTP(S)


_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def _http_once(url: str, part: Path, *, validator: str | None, timeout: float, pbar, check_space,
               remember: Callable[[str], None]) -> tuple[bool, str | None]:
    """One GET, appending to ``part`` from its current size. Returns (complete, validator)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"zhllama/{__version__}", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s) only, checked by parse_source
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # our partial file is not a prefix of what is there now
            part.unlink(missing_ok=True)
            return False, None
        exc.close()
        raise
    with resp:
        total = None
        if resp.status == 206:
            m = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                part.unlink(missing_ok=True)
                return False, None
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:
            have = 0
            clen = resp.headers.get("Content-Length")
            total = int(clen) if clen and clen.isdigit() else None
            mode = "wb"
        new_validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified") or validator
        if new_validator and new_validator != validator:
            remember(new_validator)  # before the body: a resume after a drop must send If-Range
        if total is not None:
            check_space(total - have)
        pbar.reset(total=total)
        pbar.update(have)
        with open(part, mode) as fh:
            while True:
                block = resp.read(_CHUNK)
                if not block:
                    break
                fh.write(block)
                pbar.update(len(block))
                killpoints.tick_bytes(len(block))
            fh.flush()
            os.fsync(fh.fileno())
    size = part.stat().st_size
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")
    return True, new_validator


def fetch_url(url: str, dest: str | os.PathLike[str], *, retries: int = 5, backoff: float = 0.5,
              timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically, resuming a ``dest.part`` with Range requests.

    Transient failures (connection errors, timeouts, short bodies, HTTP 408/429/5xx) are retried
    with exponential backoff (``backoff·2ⁿ`` s, capped at 30 s); the retry count restarts whenever
    bytes arrived, so a slow flaky link still finishes. ``If-Range`` with the first response's
    ETag/Last-Modified keeps a resumed file from mixing two versions.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.json")
    validator = None
    if meta.exists() and part.exists():
        try:
            validator = json.loads(meta.read_text()).get("validator")
        except (OSError, ValueError):
            validator = None
    state = {"validator": validator}

    def remember(v: str) -> None:
        state["validator"] = v
        meta.write_text(json.dumps({"validator": v, "url": shown}))

    shown = redact_url(url)
    try:
        _fetch_loop(url, dest, part, state, remember, shown, retries=retries, backoff=backoff, timeout=timeout)
    except OSError as exc:
        if not fsutil.is_disk_full(exc):
            raise
        free = fsutil.free_bytes(dest.parent)
        part.unlink(missing_ok=True)  # a full disk: give back what the partial file took
        meta.unlink(missing_ok=True)
        raise fsutil.disk_full_error(part, free) from None
    os.replace(part, dest)
    if state["validator"]:  # kept to ask the server later whether the cached copy is still current
        dest.with_name(dest.name + ".json").write_text(json.dumps({"validator": state["validator"], "url": shown}))
    meta.unlink(missing_ok=True)
    fsync_dir(dest.parent)
    return dest


def _fetch_loop(url: str, dest: Path, part: Path, state: dict, remember, shown: str, *, retries: int,
                backoff: float, timeout: float) -> None:
    """fetch_url's retry loop: until ``part`` holds the whole file (or retries run out)."""
    failures = 0
    with bar(None, dest.name, per_update=None) as pbar:  # bytes are ticked in _http_once
        while True:
            before = part.stat().st_size if part.exists() else 0
            try:
                done, _ = _http_once(
                    url, part, validator=state["validator"], timeout=timeout, pbar=pbar,
                    check_space=lambda n: check_disk_space(dest.parent, n, what=f"downloading {dest.name}"),
                    remember=remember)
                if done:
                    break
                continue  # the server could not resume: start over at once
            except urllib.error.HTTPError as exc:
                if exc.code not in _RETRY_STATUS:
                    raise _scrubbed(DownloadError(f"{shown} answered HTTP {exc.code} {exc.reason}",
                                                  fix="check the URL (and whether it needs a fresh signed link)"),
                                    secrets=known_secrets(), urls=[url]) from None
                problem = f"HTTP {exc.code}"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, TimeoutError) as exc:
                problem = scrub(f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}", secrets=known_secrets(),
                                urls=[url])
            after = part.stat().st_size if part.exists() else 0
            failures = 0 if after > before else failures + 1
            if failures > retries:
                raise DownloadError(f"giving up on {shown} after {retries} retries without progress ({problem})",
                                    fix="check the network and retry; the partial file is kept and resumed "
                                    f"({part})")
            delay = min(backoff * 2 ** max(failures - 1, 0), 30.0)
            log.warning("%s: %s at %s; retrying in %.1fs", shown, problem, human_bytes(after), delay)
            time.sleep(delay)


def _still_current(url: str, cached: Path, *, timeout: float = 30.0) -> bool:
    """True when the server's ETag/Last-Modified for ``url`` equals the one saved with ``cached``."""
    try:
        saved = json.loads(cached.with_name(cached.name + ".json").read_text()).get("validator")
    except (OSError, ValueError):
        return False
    if not saved:
        return False
    req = urllib.request.Request(url, method="HEAD", headers={"User-Agent": f"zhllama/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
            now = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
    except (urllib.error.URLError, http.client.HTTPException, OSError):
        return False
    return now == saved


def _download_http(src: Source, *, out: Path, include, expected, retries, backoff, on_file,
                   overwrite) -> DownloadResult:
    url = src.url
    name = posixpath.basename(urlsplit(url).path) or "download"
    if not is_archive(name):
        _claim_all(out, [name], overwrite=overwrite)
    key = hashlib.sha256(src.text.encode()).hexdigest()[:16]
    cached = _zhllama_home() / "downloads" / key / name
    refs = _merge_refs(expected, None)
    want = _refs_for(name, refs)
    archive = is_archive(name)
    if cached.exists():
        # reuse a finished earlier download only if it is known to be current: it matches the reference
        # digests given, or the server still reports the same ETag/Last-Modified
        fresh = all(d == _sha256_many([cached])[cached] for _, d in want) if want else _still_current(url, cached)
        if not fresh:
            cached.unlink()
    for attempt in (1, 2):
        if not cached.exists():
            fetch_url(url, cached, retries=retries, backoff=backoff)
        sha = _sha256_many([cached])[cached]
        bad = [(label, d) for label, d in want if d != sha]
        if not bad:
            break
        cached.unlink(missing_ok=True)
        if attempt == 2:
            raise IntegrityError(f"{name} from {src.text} is corrupt after 2 downloads: sha256 {sha}",
                                 expected=f"{bad[0][1]} ({bad[0][0]})",
                                 fix="the bad file was removed; check the URL and the digest, and retry over "
                                 "another network (a proxy may be altering the transfer)")
        log.warning("%s from %s has sha256 %s, expected %s (%s); downloading it again", name, src.text, sha,
                    bad[0][1], bad[0][0])
    matched = tuple(label for label, _ in want)
    if archive:
        return _from_archive(src, cached, out=out, include=include, expected=expected, on_file=on_file,
                             origin=src.text, extra={"url": src.text})
    dest = out / name
    _place(cached, dest)
    art = Artifact(dest, sha, dest.stat().st_size, src.text, None, matched)
    if on_file:
        on_file(art)
    return DownloadResult(src.text, "http", out, (art,), None,
                          _lock(src, "http", files=[art], out=out, include=include, url=src.text))
