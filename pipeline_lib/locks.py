"""Store locks that hold across hosts: Redis leases, selected by ``ZHLLAMA_LOCKS=redis://HOST:PORT/DB``.

The store's default lock (``pipeline_lib.store.KeyLock``) is ``flock(2)``: exact on one machine,
released by the kernel when its holder dies, but not something to rely on between hosts (NFS
implements it, or not, depending on server, client and mount options). ``RedisKeyLock`` keeps the
same contract — exclusive or shared, ``timeout`` -1 waits forever, 0 tries once, else seconds,
``TimeoutError`` when it cannot be had in time — with a *lease* in place of the kernel's cleanup:

* a hold lives ``ZHLLAMA_LOCK_LEASE`` seconds (default 30) unless renewed; one daemon thread per
  process (:data:`RENEWER`) renews every hold of the process every lease/3 seconds, so a stage may
  hold a lock for hours;
* a holder that dies (SIGKILL, OOM killer, a host that loses power or network) stops renewing and
  its hold expires at most one lease later; the next acquirer then takes it;
* each lock is one Redis sorted set, ``zhllama:lock:<lock file path>``: members are the holders
  (``x:`` exclusive or ``s:`` shared, then ``host:pid:random``, readable with
  ``redis-cli ZRANGE … WITHSCORES``), scores their lease deadlines in the Redis server's clock
  (``TIME``), so the hosts' clocks never matter; one Lua script takes, renews or drops a hold
  atomically, after dropping expired holds. The key itself expires with its last hold.

A hold whose renewal fails for longer than a lease (the process was stopped, Redis was
unreachable) is *lost*: the renewer logs an error and marks it (:attr:`RedisKeyLock.lost`). The
store stays consistent even then, because entries are produced in a temporary folder and renamed
into place whole; the cost is at most one duplicate computation.

No Prefect here: the redis client only (``tasks.locks`` puts Prefect's transaction locks on the
same Redis and the same renewer).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from .errors import InputError, StoreError

log = logging.getLogger(__name__)

LOCKS_ENV = "ZHLLAMA_LOCKS"
LEASE_ENV = "ZHLLAMA_LOCK_LEASE"
DEFAULT_LEASE_S = 30.0
REDIS_SCHEMES = ("redis", "rediss", "unix")
KEY_PREFIX = "zhllama:lock:"


def lock_url(value: str | None = None) -> str | None:
    """The lock server URL in use: ``value``, else ``$ZHLLAMA_LOCKS``; None (or ``file``) means flock files.

    Raises InputError for a scheme that is neither (checked before any lock is taken)."""
    url = (value if value is not None else os.environ.get(LOCKS_ENV, "")).strip()
    if not url or url in ("file", "flock"):
        return None
    scheme = urlsplit(url).scheme
    if scheme not in REDIS_SCHEMES:
        raise InputError(f"{LOCKS_ENV}={url!r} is not a lock backend",
                         expected="unset (flock files, one machine) or redis://HOST:PORT/DB (several hosts)",
                         fix=f"export {LOCKS_ENV}=redis://redis-host:6379/0, or unset it")
    return url


def lease_seconds() -> float:
    """``$ZHLLAMA_LOCK_LEASE`` (seconds a dead holder's lock outlives it), default 30."""
    raw = os.environ.get(LEASE_ENV, "")
    try:
        lease = float(raw) if raw else DEFAULT_LEASE_S
    except ValueError:
        lease = -1.0
    if not 0.5 <= lease <= 3600:
        raise InputError(f"{LEASE_ENV}={raw!r}", expected="seconds between 0.5 and 3600 (default 30)")
    return lease


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_clients: dict[tuple[int, str], object] = {}
_clients_mutex = threading.Lock()


def redis_client(url: str):
    """One Redis client per URL and process (connection pools are not shared across fork/spawn)."""
    import redis

    key = (os.getpid(), url)
    with _clients_mutex:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5,
                                                          health_check_interval=30)
        return client


def unreachable(url: str, exc: Exception) -> StoreError:
    return StoreError(f"cannot reach the lock server {redacted(url)} ({type(exc).__name__}: {exc})",
                      expected=f"a Redis server at {LOCKS_ENV}",
                      fix="start Redis there (see docs/team.md), or unset ZHLLAMA_LOCKS to use file locks on one machine")


# KEYS[1]: the lock's sorted set. ARGV: op, member, lease (ms), mode ("x" or "s").
# Holds whose deadline passed are dropped first, in the server's clock.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key, op, member, lease = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
local function keep()
  if redis.call('PTTL', key) < lease then redis.call('PEXPIRE', key, lease) end
end
if op == 'acquire' then
  local holders = redis.call('ZRANGE', key, 0, -1)
  if ARGV[4] == 'x' then
    if #holders > 0 then return 0 end
  else
    for _, m in ipairs(holders) do
      if string.sub(m, 1, 2) == 'x:' then return 0 end
    end
  end
  redis.call('ZADD', key, now + lease, member)
  keep()
  return 1
elseif op == 'renew' then
  if not redis.call('ZSCORE', key, member) then return 0 end
  redis.call('ZADD', key, 'XX', now + lease, member)
  keep()
  return 1
elseif op == 'release' then
  return redis.call('ZREM', key, member)
end
return redis.error_reply('unknown op ' .. tostring(op))
"""

_scripts: dict[int, object] = {}


def _script(client):
    script = _scripts.get(id(client))
    if script is None:
        script = _scripts[id(client)] = client.register_script(_SCRIPT)
    return script


class Renewer:
    """One daemon thread per process renewing every registered hold every ``period`` seconds.

    ``add(name, renew, lease)`` registers a callable returning False when the hold is gone;
    a hold not renewed for longer than its lease is dropped from the registry and reported lost.
    """

    def __init__(self) -> None:
        self._holds: dict[str, tuple[Callable[[], bool], float, float, Callable[[], None] | None]] = {}
        self._mutex = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def add(self, name: str, renew: Callable[[], bool], lease: float,
            on_lost: Callable[[], None] | None = None) -> None:
        with self._mutex:
            if self._pid != os.getpid():  # a forked child: the parent's thread and holds are not ours
                self._holds, self._thread, self._pid = {}, None, os.getpid()
            self._holds[name] = (renew, lease, time.monotonic(), on_lost)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="zhllama-lock-renewer", daemon=True)
                self._thread.start()
        self._wake.set()  # the period may have become shorter

    def discard(self, name: str) -> None:
        with self._mutex:
            self._holds.pop(name, None)

    def held(self) -> list[str]:
        with self._mutex:
            return list(self._holds)

    def _period(self) -> float:
        with self._mutex:
            return min((lease for _, lease, _, _ in self._holds.values()), default=DEFAULT_LEASE_S) / 3

    def _run(self) -> None:
        while True:
            self._wake.wait(self._period())
            self._wake.clear()
            with self._mutex:
                holds = list(self._holds.items())
            for name, (renew, lease, last_ok, on_lost) in holds:
                try:
                    ok = renew()
                except Exception as exc:  # Redis away for a moment: keep trying until the lease is gone
                    ok = None
                    log.warning("lock %s: renewal failed (%s); retrying", name, exc)
                now = time.monotonic()
                with self._mutex:
                    if name not in self._holds:  # released meanwhile
                        continue
                    if ok:
                        self._holds[name] = (renew, lease, now, on_lost)
                        continue
                    if ok is None and now - last_ok < lease:
                        continue
                    del self._holds[name]
                log.error("lock %s: lease lost (not renewed for %.0f s); another process may take it", name,
                          now - last_ok)
                if on_lost is not None:
                    on_lost()


RENEWER = Renewer()


class RedisKeyLock:
    """``KeyLock``'s contract on Redis, with a lease renewed by :data:`RENEWER` (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, url: str, timeout: float = -1, shared: bool = False,
                 lease: float | None = None) -> None:
        self.path = Path(path)
        self.url = url
        self.timeout = timeout
        self.shared = shared
        self.lease = lease if lease is not None else lease_seconds()
        self.name = KEY_PREFIX + os.path.abspath(self.path)
        self.lost = False
        self._member: str | None = None

    @property
    def is_locked(self) -> bool:
        return self._member is not None

    def _call(self, op: str, member: str) -> int:
        import redis

        client = redis_client(self.url)
        try:
            return int(_script(client)(keys=[self.name], args=[op, member, int(self.lease * 1000),
                                                                "s" if self.shared else "x"]))
        except redis.exceptions.ConnectionError as exc:
            raise unreachable(self.url, exc) from None

    def acquire(self) -> RedisKeyLock:
        if self._member is not None:
            raise RuntimeError(f"{self.path} is already locked by this object")
        member = f"{'s' if self.shared else 'x'}:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        deadline = None if self.timeout < 0 else time.monotonic() + self.timeout
        delay = 0.01
        while not self._call("acquire", member):
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"{self.path} is locked by another process (Redis lock {self.name})")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        self._member, self.lost = member, False
        RENEWER.add(f"{self.name} {member}", lambda: bool(self._call("renew", member)), self.lease,
                    on_lost=self._mark_lost)
        return self

    def _mark_lost(self) -> None:
        self.lost = True

    def release(self) -> None:
        member, self._member = self._member, None
        if member is None:
            return
        RENEWER.discard(f"{self.name} {member}")
        try:
            self._call("release", member)
        except StoreError as exc:  # the lease runs out by itself
            log.warning("lock %s: not released (%s); it expires within %.0f s", self.name, exc.seen, self.lease)

    def __enter__(self) -> RedisKeyLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
