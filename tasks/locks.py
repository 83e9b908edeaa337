"""Prefect's transaction locks on Redis, with a lease: ``ZHLLAMA_LOCKS=redis://HOST:PORT/DB``.

``prefect_redis.RedisLockManager`` does the locking (redis-py ``Lock``: ``SET NX PX`` with the
holder as token). As shipped, a lock Prefect takes for a transaction has no expiry (Prefect passes
no ``hold_timeout``), so a worker killed inside a stage would keep that cache key locked forever.
``LeasedRedisLockManager`` gives every hold a lease (``ZHLLAMA_LOCK_LEASE``, default 30 s) and
renews it from the store's renewer thread (``pipeline_lib.locks.RENEWER``) while the holder lives;
a dead holder's lock expires one lease later. Lock names carry the store path, so two stores on
one Redis never wait on each other.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect_redis.locking import RedisLockManager
from redis.lock import Lock

from pipeline_lib.locks import RENEWER, lease_seconds, redacted, unreachable

from .cache import PollingWait

log = logging.getLogger(__name__)


# PollingWait first: the parent's wait takes the lock without an expiry for a moment; polling never holds it.
class LeasedRedisLockManager(PollingWait, RedisLockManager):
    """``RedisLockManager`` whose holds expire unless renewed (see the module docstring)."""

    def __init__(self, url: str, *, namespace: str, lease: float | None = None) -> None:
        self.namespace = namespace
        self.lease = lease if lease is not None else lease_seconds()
        super().__init__(connection_url=url)

    def __getstate__(self) -> dict[str, Any]:  # pickled into Dask workers: settings only, no clients
        return {**super().__getstate__(), "namespace": self.namespace, "lease": self.lease}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)

    def __repr__(self) -> str:
        return f"LeasedRedisLockManager({redacted(self.connection_url or '')!r}, lease={self.lease})"

    def _lock_name_for_key(self, key: str) -> str:  # an instance method: the store's namespace
        return f"zhllama:txn:{self.namespace}:{key}"

    def acquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                     hold_timeout: float | None = None) -> bool:
        import redis

        try:
            ok = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease)
        except redis.exceptions.ConnectionError as exc:
            raise unreachable(self.connection_url or "", exc) from None
        if ok:
            lock = self._locks[self._lock_name_for_key(key)]
            RENEWER.add(self._renewal(key, holder), lambda: _renew(lock), lock.timeout or self.lease)
        return ok

    async def aacquire_lock(self, key: str, holder: str, acquire_timeout: float | None = None,
                            hold_timeout: float | None = None) -> bool:
        import anyio

        # the sync lock: the renewer thread renews it with the sync client
        return await anyio.to_thread.run_sync(self.acquire_lock, key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import LockNotOwnedError

        RENEWER.discard(self._renewal(key, holder))
        try:
            super().release_lock(key, holder)
        except LockNotOwnedError:  # its lease ran out (and maybe another holder took it): nothing to release
            log.warning("transaction lock %s: the lease had run out before the release", key)
            self._locks.pop(self._lock_name_for_key(key), None)
        except RedisConnectionError as exc:
            log.warning("transaction lock %s: not released (%s); it expires within %.0f s", key, exc, self.lease)
            self._locks.pop(self._lock_name_for_key(key), None)

    def _renewal(self, key: str, holder: str) -> str:
        return f"{self._lock_name_for_key(key)} {holder}"


def _renew(lock: Lock) -> bool:
    """Reset a held lock's TTL to its lease; False when it is no longer ours (the renewer reports it lost)."""
    from redis.exceptions import LockNotOwnedError

    try:
        return bool(lock.reacquire())
    except LockNotOwnedError:
        return False


def redis_lock_manager(url: str, *, namespace: str) -> LeasedRedisLockManager:
    """The transaction lock manager for one store on the Redis at ``url``."""
    return LeasedRedisLockManager(url, namespace=namespace)
