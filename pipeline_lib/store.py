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

What the store promises:

- a manifest is schema-checked when read: one of the wrong shape (or ``"outputs": {}``) makes the
  entry damaged, never a crash; damaged entries are rebuilt on the next lookup and removed by gc;
- an entry holds regular files and folders only: a producer that leaves a link, FIFO or device
  fails, and no link is ever followed (committing and checking open files with ``O_NOFOLLOW``;
  permissions are changed on the open file, not through a path);
- locks are ``flock`` locks, released by the kernel when their process dies (a killed run never
  makes a later one wait); a lock file is checked to still be the one at its path after
  locking, so gc may remove lock files that no process holds without two holders ever arising;
  under ``ZHLLAMA_LOCKS=redis://…`` they are Redis leases instead, for a store shared by several
  hosts (``pipeline_lib.locks``: same contract, a dead holder's lock expires after the lease);
- every manifest names its producer (host and pid), so who built an entry is never a guess;
- gc never blocks and never removes what is in use: an entry being produced or checked (its key
  lock is held), or one a running stage reads (:meth:`Store.hold`), is kept for a later gc.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__, killpoints
from .errors import StoreError
from .fsutil import (
    HASH_BUFFER,
    TMP_PREFIX,
    disk_full_error,
    fsync_dir,
    remove_path,
    sha256_bytes,
    sha256_file,
    sweep_leftovers,
    tmp_name,
    write_failed_for_space,
    write_text_atomic,
)
from .locks import RedisKeyLock, lock_url

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
    producer: dict[str, Any] = field(default_factory=dict)  # {"host", "pid"} of the process that produced it

    def file(self, relpath: str) -> Path:
        if relpath not in self.outputs:
            raise KeyError(f"{relpath!r} is not an output of {self.stage} entry {self.key[:12]}")
        return self.path / relpath

    @property
    def size(self) -> int:
        return sum(o.size for o in self.outputs.values())


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _check_manifest(m: Any, key: str) -> str | None:
    """What is wrong with a parsed manifest (None: the shape is right). Never raises."""
    if not isinstance(m, dict):
        return f"manifest is a JSON {type(m).__name__}, not an object"
    for name, kind in (("key", str), ("stage", str), ("version", str), ("inputs", dict), ("params", dict),
                       ("outputs", dict), ("created", (int, float))):
        if not isinstance(m.get(name), kind) or isinstance(m.get(name), bool):
            return f"manifest field {name!r} is missing or not a {getattr(kind, '__name__', 'number')}"
    if m["key"] != key:
        return f"manifest is for key {str(m['key'])[:12]}, not {key[:12]}"
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in m["inputs"].items()):
        return "manifest inputs are not name -> digest strings"
    for name in ("timings", "meta", "producer"):
        if name in m and not isinstance(m[name], dict):
            return f"manifest field {name!r} is not an object"
    if not m["outputs"]:
        return "manifest lists no outputs"
    for rel, o in m["outputs"].items():
        parts = rel.split("/") if isinstance(rel, str) else []
        if not parts or rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in rel \
                or rel == MANIFEST:
            return f"manifest output name {rel!r} is not a plain relative path"
        if not isinstance(o, dict) or not isinstance(o.get("sha256"), str) or not _HEX64.match(o["sha256"]):
            return f"manifest output {rel!r} has no sha256"
        for num in ("size", "mtime_ns"):
            v = o.get(num, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                return f"manifest output {rel!r} has a bad {num}"
        if set(o) - {"sha256", "size", "mtime_ns"}:
            return f"manifest output {rel!r} has unknown fields"
    return None


class KeyLock:
    """An ``flock`` lock on ``path``: exclusive (producers, gc) or shared (readers, :meth:`Store.hold`).

    The kernel releases it when the holding process dies, so a killed run never blocks a later
    one. After locking, the open file is checked to still be the file at ``path``; if gc removed
    (or replaced) it meanwhile, the lock is taken again on the new file, so removing a lock file
    nobody holds is safe. ``timeout``: -1 waits forever, 0 tries once, else seconds; TimeoutError
    when it cannot be had in time. Opened with ``O_NOFOLLOW``: a link planted as a lock file is
    refused, not followed.
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = -1, shared: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.shared = shared
        self._fd: int | None = None

    @property
    def is_locked(self) -> bool:
        return self._fd is not None

    def acquire(self) -> KeyLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        mode = fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX
        deadline = None if self.timeout < 0 else time.monotonic() + self.timeout
        delay = 0.01
        while True:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(fd, mode | (0 if deadline is None else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.path} is locked by another process") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
                continue
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # removed or replaced while we waited: lock the file that is there now
                os.close(fd)
                continue
            if not self.shared:
                with contextlib.suppress(OSError):  # who holds it, for a person looking at the file
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> KeyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Store:
    """The artifact store. Safe for concurrent use by several processes (and hosts, with Redis locks).

    ``locks``: the lock backend, a ``redis://`` URL or None for ``$ZHLLAMA_LOCKS`` (unset: flock
    files under ``locks/``); an unknown scheme is an InputError here, before any lock is taken.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None, *, locks: str | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.artifacts = self.root / "artifacts"
        self.locks = self.root / "locks"
        self.lock_url = lock_url(locks)

    def _key_lock(self, path: Path, *, timeout: float, shared: bool = False) -> KeyLock | RedisKeyLock:
        """The lock at ``path`` on this store's backend: a flock file, or a Redis lease named after the path."""
        if self.lock_url is None:
            return KeyLock(path, timeout=timeout, shared=shared)
        return RedisKeyLock(path, url=self.lock_url, timeout=timeout, shared=shared)

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

    def _read(self, path: Path) -> tuple[Entry | None, str | None]:
        """(entry, None), or (None, why it cannot be used): no manifest, unreadable, wrong shape."""
        try:
            fd = os.open(path / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None, "no manifest"
        except OSError as exc:
            return None, f"unreadable manifest ({exc.strerror})"
        try:
            with open(fd, "rb") as fh:
                m = json.loads(fh.read().decode("utf-8"))
        except (OSError, ValueError) as exc:
            return None, f"damaged manifest ({type(exc).__name__})"
        problem = _check_manifest(m, path.name)
        if problem is not None:
            return None, f"damaged manifest ({problem})"
        return Entry(
            key=m["key"], stage=m["stage"], version=m["version"], path=path, inputs=m["inputs"],
            params=m["params"], outputs={k: OutputFile(**v) for k, v in m["outputs"].items()},
            created=float(m["created"]), timings=m.get("timings", {}), meta=m.get("meta", {}),
            producer=m.get("producer", {}),
        ), None

    def _load(self, path: Path) -> Entry | None:
        return self._read(path)[0]

    def problems(self, entry: Entry, *, verify: bool = False) -> list[str]:
        """What is wrong with an entry's files (empty list: the entry is intact). Links are never followed."""
        out = []
        for rel, o in entry.outputs.items():
            p = entry.path / rel
            try:
                st = os.lstat(p)
            except OSError:
                out.append(f"{rel}: missing")
                continue
            if not stat.S_ISREG(st.st_mode):
                out.append(f"{rel}: not a regular file")
                continue
            if st.st_size != o.size:
                out.append(f"{rel}: size {st.st_size}, manifest says {o.size}")
                continue
            if verify or o.size <= REHASH_LIMIT or st.st_mtime_ns != o.mtime_ns:
                try:
                    digest = sha256_file(p, follow_symlinks=False)
                except OSError as exc:
                    out.append(f"{rel}: unreadable ({exc.strerror})")
                    continue
                if digest != o.sha256:
                    out.append(f"{rel}: sha256 {digest}, manifest says {o.sha256}")
        return out

    def get(self, key: str, *, verify: bool = False) -> Entry | None:
        """The intact entry for ``key``, or None (missing, incomplete, damaged, or any output altered)."""
        path = self.path_for(key)
        entry, why = self._read(path)
        if entry is None:
            if why != "no manifest" or path.is_dir():
                log.warning("cache entry %s is damaged and will be rebuilt: %s", key[:12], why)
            return None
        bad = self.problems(entry, verify=verify)
        if bad:
            log.warning("cache entry %s (%s) is damaged and will be rebuilt: %s", key[:12], entry.stage, "; ".join(bad))
            return None
        return Entry(**{**entry.__dict__, "cached": True})

    # ------------------------------------------------------------------ produce

    def lock(self, key: str, *, timeout: float = -1) -> KeyLock | RedisKeyLock:
        """The exclusive lock of ``key`` (held while an entry is checked, produced or removed)."""
        return self._key_lock(self.locks / f"{key}.lock", timeout=timeout)

    def _use_lock(self, key: str, *, shared: bool, timeout: float = -1) -> KeyLock | RedisKeyLock:
        return self._key_lock(self.locks / f"{key}.use", timeout=timeout, shared=shared)

    @contextlib.contextmanager
    def hold(self, *entries: Entry) -> Iterator[None]:
        """Keep ``entries`` from being removed by gc while the block runs (a stage reading its inputs).

        Shared locks: any number of readers hold an entry at once; gc skips held entries.
        """
        keys = list(dict.fromkeys(e.key for e in entries))
        locks = [self._use_lock(k, shared=True) for k in keys]
        try:
            for key, lk in zip(keys, locks, strict=True):
                lk.acquire()
                if self._load(self.path_for(key)) is None:  # removed just before we held it
                    raise StoreError(f"cache entry {key[:12]} was removed (by `zhllama cache gc`?) just as a stage "
                                     "started to read it", fix="run the build again: the entry is rebuilt")
            yield
        finally:
            for lk in locks:
                lk.release()

    def get_or_produce(
        self,
        stage: str,
        *,
        version: str,
        inputs: Mapping[str, str],
        params: Mapping[str, Any] | None = None,
        produce: Callable[[Path], Mapping[str, Any] | None],
        verify: bool = False,
        holding: tuple[Entry, ...] = (),
    ) -> Entry:
        """Return the entry for this key, producing it with ``produce(tmp_dir)`` if needed.

        Holds the per-key lock while checking and producing, so concurrent callers (threads or
        processes) compute an entry once; the others wait and get the hit. ``produce`` writes
        its outputs into ``tmp_dir`` and may return a dict of extra metadata. If it raises,
        nothing is left behind. ``holding``: entries ``produce`` reads, kept from gc meanwhile.
        """
        params = dict(params or {})
        key = self.key(stage, version=version, inputs=inputs, params=params)
        with self.lock(key):
            hit = self.get(key, verify=verify)
            if hit is not None:
                log.info("%s: cache hit %s", stage, key[:12])
                return hit
            with self.hold(*holding):
                return self._produce(key, stage=stage, version=version, inputs=dict(inputs), params=params,
                                     produce=produce)

    def _commit_files(self, tmp: Path, stage: str) -> dict[str, OutputFile]:
        """fsync, make read-only and hash every output, never through a link; refuse anything else."""
        outputs: dict[str, OutputFile] = {}
        for dirpath, dirnames, filenames in os.walk(tmp, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
                p = Path(dirpath) / name
                rel = p.relative_to(tmp).as_posix()
                if rel == MANIFEST:
                    continue
                fd = None
                if stat.S_ISREG(os.lstat(p).st_mode):
                    # O_NOFOLLOW: no link; O_NONBLOCK: a FIFO swapped in meanwhile cannot hang us
                    with contextlib.suppress(OSError):
                        fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
                    if fd is not None:
                        os.close(fd)
                    mode = os.lstat(p).st_mode
                    what = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file (a FIFO, socket or device)"
                    raise StoreError(f"stage {stage} left {rel} in its output, which is {what}",
                                     expected="regular files and folders only (the store never follows links)",
                                     fix="write copies of the files instead of links; if the stage is ours, "
                                     "please report it")
                try:
                    os.fsync(fd)
                    os.fchmod(fd, 0o444)  # committed outputs are read-only; fchmod: never through a path
                    h = hashlib.sha256()
                    while block := os.read(fd, HASH_BUFFER):
                        h.update(block)
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                outputs[rel] = OutputFile(sha256=h.hexdigest(), size=st.st_size, mtime_ns=st.st_mtime_ns)
                killpoints.tick("file")
        return dict(sorted(outputs.items()))

    def _produce(self, key: str, *, stage: str, version: str, inputs: dict, params: dict,
                 produce: Callable[[Path], Mapping[str, Any] | None]) -> Entry:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        # Under the key lock, a temporary of this key is a killed producer's (this host, pid gone):
        # remove it now rather than waiting for `cache gc`.
        sweep_leftovers(self.artifacts / key)
        tmp = self.artifacts / tmp_name(key)
        os.mkdir(tmp)
        try:
            t0 = time.perf_counter()
            meta = produce(tmp) or {}
            elapsed = time.perf_counter() - t0
            outputs = self._commit_files(tmp, stage)
            if not outputs:
                raise StoreError(f"stage {stage} produced no files", expected="at least one output file",
                                 fix="this is a bug in the stage; please report it")
            manifest = {
                "key": key, "stage": stage, "version": version, "code": __version__, "inputs": inputs,
                "params": json.loads(canonical_json(params)), "created": time.time(),
                "outputs": {k: o.__dict__ for k, o in outputs.items()},
                "timings": {"produce_s": round(elapsed, 4)}, "meta": json.loads(canonical_json(meta)),
                "producer": {"host": socket.gethostname(), "pid": os.getpid()},
            }
            write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
            final = self.path_for(key)
            if os.path.lexists(final):  # a damaged entry: remove it, then put the new one in its place
                remove_path(final)
            os.replace(tmp, final)
            fsync_dir(self.artifacts)
        except BaseException as exc:
            free = write_failed_for_space(exc, self.artifacts) if not isinstance(exc, StoreError) else None
            remove_path(tmp)
            if free is not None:
                raise disk_full_error(self.artifacts / key, free) from None
            raise
        log.info("%s: produced %s in %.2fs", stage, key[:12], elapsed)
        entry = self._load(final)
        if entry is None:  # pragma: no cover - we just wrote it
            raise StoreError(f"cache entry {key} vanished right after it was written")
        return entry

    # ------------------------------------------------------------------ maintenance

    def _scan(self) -> Iterator[tuple[Path, Entry | None, str | None]]:
        """(folder, entry or None, problem) for every entry folder; temporaries are skipped."""
        try:
            names = sorted(os.listdir(self.artifacts))
        except FileNotFoundError:
            return
        for name in names:
            p = self.artifacts / name
            if name.startswith(TMP_PREFIX):
                continue
            try:
                if not stat.S_ISDIR(os.lstat(p).st_mode):
                    yield p, None, "not a folder"
                    continue
            except FileNotFoundError:  # removed meanwhile (a concurrent gc)
                continue
            entry, why = self._read(p)
            yield p, entry, why

    def entries(self) -> list[Entry]:
        """Every readable entry (damaged manifests are left out: see :meth:`damaged`)."""
        return sorted((e for _, e, _ in self._scan() if e is not None), key=lambda e: e.created)

    def damaged(self) -> list[tuple[str, str]]:
        """(folder name, why) of every entry folder whose manifest is missing or of the wrong shape."""
        return [(p.name, why or "") for p, e, why in self._scan() if e is None]

    def du(self) -> dict[str, int]:
        """Bytes per stage."""
        sizes: dict[str, int] = {}
        for e in self.entries():
            sizes[e.stage] = sizes.get(e.stage, 0) + e.size
        return sizes

    @contextlib.contextmanager
    def _unused(self, key: str) -> Iterator[bool]:
        """Yield True, holding the key's locks, when nobody produces, checks or holds ``key``."""
        lock, use = self.lock(key, timeout=0), self._use_lock(key, shared=False, timeout=0)
        try:
            lock.acquire()
        except TimeoutError:
            yield False
            return
        try:
            try:
                use.acquire()
            except TimeoutError:
                yield False
                return
            try:
                yield True
            finally:
                use.release()
        finally:
            lock.release()

    def gc(self, *, older_than_s: float | None = None, stage: str | None = None, everything: bool = False,
           dry_run: bool = False) -> list[str]:
        """Remove damaged entries, leftovers of interrupted runs, stale lock files, and (optionally) old
        or all entries.

        Returns what was (or would be) removed. Never blocks and never disturbs a running stage:
        an entry whose key lock is held (being produced or checked) or that is held for reading
        (:meth:`hold`) is kept, and so is every lock file some process holds.
        """
        removed: list[str] = []
        now = time.time()
        try:
            names = sorted(os.listdir(self.artifacts))
        except FileNotFoundError:
            names = []
        for name in names:
            p = self.artifacts / name
            if name.startswith(TMP_PREFIX):
                key = name[len(TMP_PREFIX):].split(".")[0].split("@")[0]
                with self._unused(key) as free:
                    if free and os.path.lexists(p):  # not being produced right now: a leftover
                        removed.append(f"leftover {name}")
                        if not dry_run:
                            remove_path(p)
                continue
            try:
                is_dir = stat.S_ISDIR(os.lstat(p).st_mode)
            except FileNotFoundError:
                continue
            entry, why = self._read(p) if is_dir else (None, "not a folder")
            reason = None
            if entry is None:
                reason = why or "damaged"
            elif everything or (stage and entry.stage == stage and older_than_s is None):
                reason = "requested"
            elif older_than_s is not None and now - entry.created > older_than_s and (stage is None or entry.stage == stage):
                reason = "old"
            if reason is None and entry is not None:
                try:
                    bad = self.problems(entry)
                except OSError:  # files vanishing under us: look again next time
                    bad = []
                reason = "damaged" if bad else None
            if not reason:
                continue
            with self._unused(name) as free:
                if not free:
                    log.info("cache gc: %s is in use; kept for a later gc", name[:12])
                    continue
                removed.append(f"{reason} {name[:12]} {entry.stage if entry else ''}".strip())
                if not dry_run:
                    remove_path(p)
        removed += self._gc_locks(dry_run=dry_run)
        return removed

    def _gc_locks(self, *, dry_run: bool) -> list[str]:
        """Remove lock files no process holds, in every lock folder of the store (see LOCK_DIRS)."""
        return [r for d in LOCK_DIRS for r in remove_unheld_locks(self.root / d, dry_run=dry_run)]


# Folders of flock lock files under a store's root: the store's key locks, and the Prefect executor's
# transaction locks (tasks.cache.FlockLockManager keeps KeyLock files there). `cache gc` sweeps both.
LOCK_DIRS: tuple[str, ...] = ("locks", "prefect/locks")


def remove_unheld_locks(folder: Path, *, dry_run: bool = False) -> list[str]:
    """Remove the lock files in ``folder`` that no process holds (each is taken first; see KeyLock)."""
    removed = []
    try:
        names = sorted(os.listdir(folder))
    except FileNotFoundError:
        return removed
    for name in names:
        if not name.endswith((".lock", ".use")):
            continue
        p = folder / name
        lk = KeyLock(p, timeout=0)
        try:
            if os.path.islink(p):  # never ours: a planted link is removed, not followed
                removed.append(f"stale lock {name}")
                if not dry_run:
                    p.unlink(missing_ok=True)
                continue
            lk.acquire()
        except (TimeoutError, OSError):
            continue  # held by a running process: it keeps its lock
        try:
            removed.append(f"stale lock {name}")
            if not dry_run:
                p.unlink(missing_ok=True)  # while held: a waiter re-checks and locks a new file
        finally:
            lk.release()
    return removed


def _rmtree(path: Path) -> None:
    """Remove an entry folder (read-only files inside), never following a link."""
    remove_path(path)
