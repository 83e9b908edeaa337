"""Content-addressed artifact store: every stage output, keyed by what produced it.

Layout under ``$ZHLLAMA_HOME`` (default ``~/.cache/zhllama``)::

    artifacts/<key>/manifest.json     stage, version, inputs, params, outputs (sha256, size), timings
    artifacts/<key>/<outputs...>      read-only once committed
    locks/<key>.lock                  per-key file lock

``key = sha256(stage, stage version, code version, input digests, parameters)``. Entries are
produced into a temporary folder beside ``artifacts/<key>`` and renamed into place only when
complete, so a half-written entry never exists under its key. ``get`` re-checks every output
(size, and content for files small enough to re-hash cheaply or when ``verify=True``): an entry
with a missing or altered file is never returned as a hit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from . import __version__
from .errors import StoreError
from .fsutil import TMP_PREFIX, fsync_dir, sha256_bytes, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# Outputs up to this size are re-hashed on every lookup; larger ones are checked by size and
# mtime (re-hashing a 13 GB file on every cache hit would cost half a minute). verify=True
# always re-hashes.
REHASH_LIMIT = 256 * 1024 * 1024


def default_root() -> Path:
    env = os.environ.get("ZHLLAMA_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zhllama"


def canonical_json(value: Any, *, default: Callable[[Any], Any] | None = None) -> str:
    """Stable JSON for hashing: sorted keys, no whitespace, paths and tuples normalised.

    ``default`` turns any other object into JSON (``str`` for a readable summary); without it
    such an object is a TypeError, as for json.dumps.
    """
    def norm(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, os.PathLike):
            return os.fspath(v)
        if hasattr(v, "value") and not isinstance(v, (int, float, str, bool)):  # Enum
            return v.value
        return v

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=default)


@dataclass(frozen=True)
class OutputFile:
    sha256: str
    size: int
    mtime_ns: int = 0


@dataclass(frozen=True)
class Entry:
    key: str
    stage: str
    version: str
    path: Path
    inputs: dict[str, str]
    params: dict[str, Any]
    outputs: dict[str, OutputFile]
    created: float
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    cached: bool = False  # True when returned as a hit (not produced by this call)

    def file(self, relpath: str) -> Path:
        if relpath not in self.outputs:
            raise KeyError(f"{relpath!r} is not an output of {self.stage} entry {self.key[:12]}")
        return self.path / relpath

    @property
    def size(self) -> int:
        return sum(o.size for o in self.outputs.values())


class Store:
    """The artifact store. Safe for concurrent use by several processes."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.artifacts = self.root / "artifacts"
        self.locks = self.root / "locks"

    # ------------------------------------------------------------------ keys

    @staticmethod
    def key(stage: str, *, version: str, inputs: Mapping[str, str], params: Mapping[str, Any] | None = None) -> str:
        """Deterministic key: stage + stage version + code version + input digests + parameters."""
        return sha256_bytes(canonical_json({
            "stage": stage, "version": version, "code": __version__,
            "inputs": dict(inputs), "params": dict(params or {}),
        }).encode())

    def path_for(self, key: str) -> Path:
        return self.artifacts / key

    # ------------------------------------------------------------------ lookup

    def _load(self, path: Path) -> Entry | None:
        try:
            m = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return Entry(
            key=m["key"], stage=m["stage"], version=m["version"], path=path, inputs=m["inputs"],
            params=m["params"], outputs={k: OutputFile(**v) for k, v in m["outputs"].items()},
            created=m["created"], timings=m.get("timings", {}), meta=m.get("meta", {}),
        )

    def problems(self, entry: Entry, *, verify: bool = False) -> list[str]:
        """What is wrong with an entry's files (empty list: the entry is intact)."""
        out = []
        for rel, o in entry.outputs.items():
            p = entry.path / rel
            try:
                st = p.stat()
            except OSError:
                out.append(f"{rel}: missing")
                continue
            if st.st_size != o.size:
                out.append(f"{rel}: size {st.st_size}, manifest says {o.size}")
                continue
            if verify or o.size <= REHASH_LIMIT or st.st_mtime_ns != o.mtime_ns:
                digest = sha256_file(p)
                if digest != o.sha256:
                    out.append(f"{rel}: sha256 {digest}, manifest says {o.sha256}")
        return out

    def get(self, key: str, *, verify: bool = False) -> Entry | None:
        """The intact entry for ``key``, or None (missing, incomplete, or any output altered)."""
        entry = self._load(self.path_for(key))
        if entry is None:
            return None
        bad = self.problems(entry, verify=verify)
        if bad:
            log.warning("cache entry %s (%s) is damaged and will be rebuilt: %s", key[:12], entry.stage, "; ".join(bad))
            return None
        return Entry(**{**entry.__dict__, "cached": True})

    # ------------------------------------------------------------------ produce

    def lock(self, key: str, *, timeout: float = -1) -> FileLock:
        self.locks.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.locks / f"{key}.lock"), timeout=timeout)

    def get_or_produce(
        self,
        stage: str,
        *,
        version: str,
        inputs: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        produce: Callable[[Path], Mapping[str, Any] | None],
        verify: bool = False,
    ) -> Entry:
        """Return the entry for this key, producing it with ``produce(tmp_dir)`` if needed.

        Holds the per-key lock while checking and producing, so concurrent callers (threads or
        processes) compute an entry once; the others wait and get the hit. ``produce`` writes
        its outputs into ``tmp_dir`` and may return a dict of extra metadata. If it raises,
        nothing is left behind.
        """
        params = dict(params or {})
        key = self.key(stage, version=version, inputs=inputs, params=params)
        with self.lock(key):
            hit = self.get(key, verify=verify)
            if hit is not None:
                log.info("%s: cache hit %s", stage, key[:12])
                return hit
            return self._produce(key, stage=stage, version=version, inputs=dict(inputs), params=params,
                                 produce=produce)

    def _produce(self, key: str, *, stage: str, version: str, inputs: dict, params: dict,
                 produce: Callable[[Path], Mapping[str, Any] | None]) -> Entry:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{key}.", dir=self.artifacts))
        try:
            t0 = time.perf_counter()
            meta = produce(tmp) or {}
            elapsed = time.perf_counter() - t0
            outputs = {}
            for p in sorted(tmp.rglob("*")):
                if p.is_file() and p.name != MANIFEST:
                    rel = p.relative_to(tmp).as_posix()
                    with open(p, "rb") as fh:
                        os.fsync(fh.fileno())
                    p.chmod(0o444)  # committed outputs are read-only: copy them, don't edit them
                    st = p.stat()
                    outputs[rel] = OutputFile(sha256=sha256_file(p), size=st.st_size, mtime_ns=st.st_mtime_ns)
            if not outputs:
                raise StoreError(f"stage {stage} produced no files", expected="at least one output file",
                                 fix="this is a bug in the stage; please report it")
            manifest = {
                "key": key, "stage": stage, "version": version, "code": __version__, "inputs": inputs,
                "params": json.loads(canonical_json(params)), "created": time.time(),
                "outputs": {k: o.__dict__ for k, o in outputs.items()},
                "timings": {"produce_s": round(elapsed, 4)}, "meta": json.loads(canonical_json(meta)),
            }
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            final = self.path_for(key)
            if final.exists():  # a damaged entry: move it aside, then replace
                _rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.artifacts)
        except BaseException:
            _rmtree(tmp)
            raise
        log.info("%s: produced %s in %.2fs", stage, key[:12], elapsed)
        entry = self._load(final)
        if entry is None:  # pragma: no cover - we just wrote it
            raise StoreError(f"cache entry {key} vanished right after it was written")
        return entry

    # ------------------------------------------------------------------ maintenance

    def entries(self) -> list[Entry]:
        if not self.artifacts.is_dir():
            return []
        out = []
        for p in sorted(self.artifacts.iterdir()):
            if p.name.startswith(TMP_PREFIX) or not p.is_dir():
                continue
            e = self._load(p)
            if e is not None:
                out.append(e)
        return sorted(out, key=lambda e: e.created)

    def du(self) -> dict[str, int]:
        """Bytes per stage."""
        sizes: dict[str, int] = {}
        for e in self.entries():
            sizes[e.stage] = sizes.get(e.stage, 0) + e.size
        return sizes

    def gc(self, *, older_than_s: float | None = None, stage: str | None = None, everything: bool = False,
           dry_run: bool = False) -> list[str]:
        """Remove damaged entries, leftovers of interrupted runs, and (optionally) old or all entries.

        Returns what was (or would be) removed. Entries are removed under their key lock so a
        running producer is never disturbed.
        """
        removed: list[str] = []
        now = time.time()
        if not self.artifacts.is_dir():
            return removed
        for p in sorted(self.artifacts.iterdir()):
            if p.name.startswith(TMP_PREFIX):
                key = p.name[len(TMP_PREFIX):].split(".")[0]
                lock = self.lock(key, timeout=0)
                try:
                    with lock:  # not being produced right now: a leftover
                        removed.append(f"leftover {p.name}")
                        if not dry_run:
                            _rmtree(p)
                except TimeoutError:
                    pass
                continue
            e = self._load(p)
            reason = None
            if e is None:
                reason = "no manifest"
            elif everything or (stage and e.stage == stage and older_than_s is None):
                reason = "requested"
            elif older_than_s is not None and now - e.created > older_than_s and (stage is None or e.stage == stage):
                reason = "old"
            elif self.problems(e):
                reason = "damaged"
            if reason:
                removed.append(f"{reason} {p.name[:12]} {e.stage if e else ''}".strip())
                if not dry_run:
                    with self.lock(p.name):
                        _rmtree(p)
        return removed


def _rmtree(path: Path) -> None:
    def onerror(func, p, _exc):  # read-only files inside: make writable, retry
        os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)
        func(p)

    if path.exists():
        for p in path.rglob("*"):
            if p.is_file():
                p.chmod(0o644)
        shutil.rmtree(path, onerror=onerror)
