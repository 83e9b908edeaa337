"""Prefect caching over the zhllama artifact store: keys, result records and locks.

* **Keys.** ``StoreCachePolicy`` derives a stage task's cache key from the stage's request
  (``pipeline_lib.pipeline.stages.request_for``: stage + version + content digests of the input
  artifacts + parameters), i.e. the artifact-store key itself, and yields **no key** when the
  store entry a cached result points at is missing or altered, so the task runs again and the
  store rebuilds the entry.
* **Result records are data, never code.** A stage task returns a small JSON record (a store key,
  see ``tasks.stage.StageRef``). ``JsonRecordStorage`` keeps only that JSON on disk
  (``$ZHLLAMA_HOME/prefect/results``) and, on reading, checks its shape and hands Prefect a record
  it rebuilt itself with the JSON serializer. A record file written by anyone else (a pickle, a
  record naming another serializer) is refused and the stage recomputes: whoever can write the
  cache cannot make the next build run code.
* **Locks die with their holder.** ``FlockLockManager`` implements Prefect's transaction locks
  with the store's ``flock`` locks (KeyLock) in ``$ZHLLAMA_HOME/prefect/locks``: the kernel releases a lock when its
  process dies, so a build killed while a stage held its lock never blocks later runs, and
  ``zhllama cache gc`` removes the lock files no process holds.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer
from prefect.transactions import IsolationLevel

from pipeline_lib.fsutil import sha256_bytes, write_bytes_atomic
from pipeline_lib.pipeline.stages import StageRequest, request_for
from pipeline_lib.store import Entry, KeyLock, Store

log = logging.getLogger(__name__)

RECORD_FORMAT = "zhllama-result/1"


def prefect_dir(store_root: str | Path) -> Path:
    return Path(store_root) / "prefect"


# ------------------------------------------------------------------ what a stage task returns


def check_ref(value: Any) -> dict[str, Any]:
    """A stage task's result: ``{"key": 64 hex, "stage": str, "hit": bool, "seconds": float}``.

    Raises ValueError for anything else (the shape is all a result record may hold)."""
    if not isinstance(value, dict) or set(value) != {"key", "stage", "hit", "seconds"}:
        raise ValueError(f"not a stage result record: {str(value)[:200]}")
    key, stage = value["key"], value["stage"]
    if not (isinstance(key, str) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)):
        raise ValueError(f"bad store key in a stage result record: {key!r}")
    if not (isinstance(stage, str) and stage.replace("-", "").isalnum() and len(stage) < 64):
        raise ValueError(f"bad stage name in a stage result record: {stage!r}")
    if not isinstance(value["hit"], bool) or not isinstance(value["seconds"], int | float):
        raise ValueError("bad hit/seconds in a stage result record")
    return {"key": key, "stage": stage, "hit": value["hit"], "seconds": float(value["seconds"])}


def entry_of(store: Store, ref: dict[str, Any]) -> Entry:
    """The intact store entry a stage result points at; LookupError when it is gone or damaged."""
    entry = store.get(check_ref(ref)["key"])
    if entry is None:
        raise LookupError(f"input artifact {ref['stage']} {ref['key'][:12]} is missing or damaged")
    return entry


def resolve_refs(store: Store, value: Any) -> Any:
    """Replace every stage result inside ``value`` (dicts and lists of them) by its store entry."""
    if isinstance(value, dict) and set(value) == {"key", "stage", "hit", "seconds"}:
        return entry_of(store, value)
    if isinstance(value, dict):
        return {k: resolve_refs(store, v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_refs(store, v) for v in value]
    return value


def request_of(store: Store, node: Any, inputs: dict[str, Any]) -> StageRequest:
    return request_for(node, resolve_refs(store, inputs))


# ------------------------------------------------------------------ keys


@dataclass
class StoreCachePolicy(CachePolicy):
    """Cache key = the artifact-store key of the task's stage request; None when its entry is damaged."""

    records_dir: Path | None = field(default=None)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        store = Store(inputs["store_root"])
        try:
            request = request_of(store, inputs["node"], inputs["inputs"])
        except LookupError as exc:  # an input vanished: never trust a cached result built from it
            log.warning("%s: no cache key (%s)", inputs["node"].label, exc)
            return None
        key = f"zhllama-{request.stage}-{request.key()}"
        if store.get(request.key()) is not None:
            return key
        # No intact entry. Never built: use the key so this run's result is recorded. Built before
        # (a record exists) but its files are gone or altered: no key, so the task runs and the
        # store rebuilds the entry instead of Prefect returning a stale result.
        if self.records_dir is not None and (Path(self.records_dir) / key).exists():
            log.warning("%s: cached output %s is missing or altered; recomputing", inputs["node"].label, key[:40])
            return None
        return key


# ------------------------------------------------------------------ result records


class JsonRecordStorage(LocalFileSystem):
    """Result storage that keeps stage results as plain, shape-checked JSON (never a pickle).

    Prefect hands ``write_path`` a serialized ResultRecord of this process (trusted); only its
    result value is kept, after ``check_ref``. ``read_path`` parses the file as JSON with no
    object hooks, checks the value again and rebuilds the record with the JSON serializer, so a
    file can never make Prefect unpickle or instantiate anything. A bad file raises, which Prefect
    treats as "no cached result": the stage runs.
    """

    _block_type_name = "zhllama JSON result records"
    _block_type_slug = "zhllama-json-result-records"

    def _record(self, path: str) -> bytes:
        from prefect._internal.result_records import ResultRecord, ResultRecordMetadata

        raw = Path(self._resolve_path(path)).read_bytes()
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != RECORD_FORMAT:
                raise ValueError(f"format is not {RECORD_FORMAT}")
            value = check_ref(doc.get("value"))
        except ValueError as exc:
            log.warning("ignoring the Prefect result record %s: %s", path, exc)
            raise ValueError(f"result record {path} is not a zhllama record") from exc
        return ResultRecord(metadata=ResultRecordMetadata(storage_key=path, serializer=JSONSerializer()),
                            result=value).serialize()

    def _store(self, path: str, content: bytes) -> str:
        from prefect._internal.result_records import ResultRecord

        value = check_ref(ResultRecord.deserialize(content).result)
        target = Path(self._resolve_path(path))
        target.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(target, json.dumps({"format": RECORD_FORMAT, "value": value}).encode())
        return str(target)

    async def aread_path(self, path: str) -> bytes:
        return self._record(path)

    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:
        return self._record(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._store(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:
        return self._store(path, content)


# ------------------------------------------------------------------ locks


class PollingWait:
    """``wait_for_lock`` by polling ``is_locked`` (never holding the lock while waiting), for lock managers."""

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.wait_for_lock, key, timeout)


class FlockLockManager(PollingWait):
    """Prefect's LockManager protocol on the store's ``flock`` locks (``pipeline_lib.store.KeyLock``):
    the kernel releases a lock when its holder process dies, so no lock is ever stale.

    One KeyLock per held key; locks of two open files conflict even within one process, so threads
    are excluded too. ``cache gc`` removes the lock files no process holds.
    """

    def __init__(self, lock_files_directory: Path) -> None:
        self.directory = Path(lock_files_directory)
        self._held: dict[str, tuple[str, KeyLock]] = {}  # key -> (holder, its lock)
        self._mutex = threading.Lock()

    def __getstate__(self) -> dict:  # pickled to other processes (Dask) without its open files
        return {"directory": self.directory}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"])

    def _lock(self, key: str, timeout: float) -> KeyLock:
        return KeyLock(self.directory / f"{key.replace('/', '_')}.lock", timeout=timeout)

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            with self._mutex:
                held = self._held.get(key)
                if held is not None and held[0] == holder:
                    return True
                if held is None:
                    try:
                        self._held[key] = (holder, self._lock(key, 0).acquire())
                        return True
                    except TimeoutError:
                        pass
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        with self._mutex:
            held = self._held.get(key)
            if held is None or held[0] != holder:
                raise ValueError(f"No lock held by {holder} for transaction with key {key}")
            del self._held[key]
            held[1].release()

    def is_locked(self, key: str) -> bool:
        with self._mutex:
            if key in self._held:
                return True
            try:
                self._lock(key, 0).acquire().release()
            except TimeoutError:
                return True
            return False

    def is_lock_holder(self, key: str, holder: str) -> bool:
        held = self._held.get(key)
        return held is not None and held[0] == holder



def lock_manager(store_root: str | Path, *, locks: str | None = None) -> Any:
    """The transaction lock manager for this store: flock files beside the store's (pipeline_lib.store.LOCK_DIRS),
    or Redis under ZHLLAMA_LOCKS=redis://…

    The same setting picks the store's own per-key locks (``pipeline_lib.store.Store``), so a
    stage's Prefect lock and its store lock are always on one backend."""
    from pipeline_lib.locks import lock_url

    url = lock_url(locks)
    if url is None:
        return FlockLockManager(prefect_dir(store_root) / "locks")
    from .locks import redis_lock_manager

    return redis_lock_manager(url, namespace=str(Path(store_root).resolve()))


@functools.lru_cache(maxsize=16)
def _record_storage(api_url: str | None, records: str) -> JsonRecordStorage:
    """The result-storage block for a records folder, saved on the server (Prefect requires a
    task's storage block to be saved); one block document per store, saved once per process."""
    from prefect.exceptions import ObjectAlreadyExists

    block = JsonRecordStorage(basepath=records)
    name = "zhllama-results-" + sha256_bytes(records.encode())[:12]
    for attempt in range(5):
        try:
            block.save(name, overwrite=True)
            return block
        except ObjectAlreadyExists:  # another run registered the type or the document a moment earlier
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    return block


def cache_options(store_root: str | Path) -> dict[str, Any]:
    """``Task.with_options`` keywords that make a stage task cache into the store at ``store_root``."""
    from prefect.settings import PREFECT_API_URL

    records = prefect_dir(store_root) / "results"
    records.mkdir(parents=True, exist_ok=True)
    policy = StoreCachePolicy(records_dir=records).configure(
        isolation_level=IsolationLevel.SERIALIZABLE, lock_manager=lock_manager(store_root))
    return {"cache_policy": policy, "persist_result": True, "result_serializer": JSONSerializer(),
            "result_storage": _record_storage(PREFECT_API_URL.value(), str(records.resolve()))}
