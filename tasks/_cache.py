"""Prefect caching over the zhllama artifact store.

Prefect's ``INPUTS`` policy hashes task arguments: two different tasks called with equal
arguments collide, and a cached result is returned even after its output file was deleted or
edited. ``StoreCachePolicy`` instead derives the key from the stage's *request*
(``pipeline_lib.build``): stage name + stage version + content digests of the input artifacts
+ parameters — the artifact-store key itself — and yields **no key** when the store entry a
cached result points at is missing or altered, so the task runs again and rebuilds it.

Results are persisted beside the store (``$ZHLLAMA_HOME/prefect/results``); with
``SERIALIZABLE`` isolation and a file lock manager (``$ZHLLAMA_HOME/prefect/locks``) two runs of
one build compute each artifact once: the second waits on the first's lock and then reads
its committed result ("Cached").
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.locking.filesystem import FileSystemLockManager
from prefect.transactions import IsolationLevel

from pipeline_lib.build import StageRequest
from pipeline_lib.store import Entry, Store

log = logging.getLogger(__name__)

# task name -> function building the StageRequest from the task's arguments (minus store_root)
RequestBuilder = Callable[..., StageRequest]
BUILDERS: dict[str, RequestBuilder] = {}


def prefect_dir(store_root: str | Path) -> Path:
    return Path(store_root) / "prefect"


def refresh(store: Store, value: Any) -> Any:
    """Replace every store Entry inside ``value`` by its current, intact manifest.

    A cached Prefect result may hold an Entry whose files were since rebuilt; downstream keys
    must be computed from what is on disk now. Raises LookupError when an input entry is gone.
    """
    if isinstance(value, Entry):
        current = store.get(value.key)
        if current is None:
            raise LookupError(f"input artifact {value.stage} {value.key[:12]} is missing or damaged")
        return current
    if isinstance(value, dict):
        return {k: refresh(store, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(refresh(store, v) for v in value)
    return value


def request_for(task_name: str, inputs: dict[str, Any]) -> tuple[Store, StageRequest]:
    store = Store(inputs["store_root"])
    args = {k: refresh(store, v) for k, v in inputs.items() if k != "store_root"}
    return store, BUILDERS[task_name](**args)


@dataclass
class StoreCachePolicy(CachePolicy):
    """Cache key = the artifact-store key of the task's stage request; None when its entry is damaged."""

    records_dir: Path | None = field(default=None)

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        name = task_ctx.task.name
        try:
            store, request = request_for(name, inputs)
        except LookupError as exc:  # an input vanished: never trust a cached result built from it
            log.warning("%s: no cache key (%s)", name, exc)
            return None
        key = f"zhllama-{request.stage}-{request.key()}"
        if store.get(request.key()) is not None:
            return key
        # No intact entry. Never built: use the key so this run's result is recorded. Built before
        # (a Prefect record exists) but its files are gone or altered: no key, so the task runs
        # and the store rebuilds the entry instead of Prefect returning a stale result.
        if self.records_dir is not None and (Path(self.records_dir) / key).exists():
            log.warning("%s: cached output of %s is missing or altered; recomputing", name, key[:40])
            return None
        return key


class LivenessLockManager(FileSystemLockManager):
    """FileSystemLockManager that frees a lock whose holder process on this host no longer exists.

    Prefect's file locks never expire (no hold timeout): a worker killed while computing a stage
    would leave its lock behind and every later run of that build would wait forever. Holders are
    ``hostname:pid:thread...``; a lock held by a dead pid of this host is stale and is removed.
    """

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        if not super().is_locked(key, use_cache=use_cache):
            return False
        info = self._get_lock_info(key, use_cache=False)
        holder = (info or {}).get("holder") or ""
        host, _, rest = holder.partition(":")
        pid_text = rest.partition(":")[0]
        if info is None or host != socket.gethostname() or not pid_text.isdigit() or _alive(int(pid_text)):
            return info is not None
        log.warning("removing the stale lock of %s held by the dead process %s", key[:40], pid_text)
        Path(info["path"]).unlink(missing_ok=True)
        self._locks.pop(key, None)
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def cache_options(store_root: str | Path) -> dict[str, Any]:
    """``Task.with_options`` keywords that make a stage task cache into the store at ``store_root``."""
    base = prefect_dir(store_root)
    records = base / "results"
    records.mkdir(parents=True, exist_ok=True)
    policy = StoreCachePolicy(records_dir=records).configure(
        isolation_level=IsolationLevel.SERIALIZABLE,
        lock_manager=LivenessLockManager(lock_files_directory=base / "locks"),
    )
    return {
        "cache_policy": policy,
        "persist_result": True,
        "result_storage": records,  # a Path: a local file system block, no server-side block needed
    }
