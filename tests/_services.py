"""Real services for the team tests and bench/scale.py: PostgreSQL and Redis on 127.0.0.1, in a temp dir.

Each ``start_*`` finds the Debian binaries (``initdb``/``pg_ctl`` under /usr/lib/postgresql/*/bin,
``redis-server``) or returns the reason they are missing (``missing_postgres()``,
``missing_redis()``): the tests then skip with it. Nothing is installed here (``.ci/run`` does that).

PostgreSQL refuses to run as root; started by root, the cluster belongs to the ``postgres`` user
(created by Debian's package) and lives in a folder under /tmp that user can reach.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                      key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return versions[-1] if versions else None


def _pg_user() -> str | None:
    """Who runs the cluster: ourselves, or (as root) the ``postgres`` user; None when root has none."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid()).pw_name
    try:
        pwd.getpwnam("postgres")
        return "postgres"
    except KeyError:
        return None


def missing_postgres() -> str | None:
    for name in ("initdb", "pg_ctl"):
        if _pg_bin(name) is None:
            return f"{name} not found (apt-get install postgresql; looked on PATH and in /usr/lib/postgresql/*/bin)"
    if _pg_user() is None:
        return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


@dataclass
class Postgres:
    url: str  # postgresql+asyncpg://… for Prefect
    data: Path
    port: int
    user: str
    log: Path
    _as: list[str] = field(default_factory=list)

    def stop(self) -> None:
        subprocess.run([*self._as, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(self.data.parent, ignore_errors=True)

    def psql(self, sql: str) -> str:
        psql = _pg_bin("psql")
        res = subprocess.run([*self._as, psql, "-h", "127.0.0.1", "-p", str(self.port), "-U", "zhllama", "-d", "prefect",
                              "-Atc", sql], capture_output=True, text=True, timeout=60, check=True)
        return res.stdout


def start_postgres(*, max_connections: int = 200) -> Postgres:
    """A fresh PostgreSQL cluster on 127.0.0.1 (trust auth, database ``prefect``, user ``zhllama``)."""
    user = _pg_user()
    as_user = ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []
    top = Path(tempfile.mkdtemp(prefix="zhllama-pg-"))
    data, sock, log = top / "data", top / "sock", top / "postgres.log"
    sock.mkdir()
    if os.geteuid() == 0:
        os.chmod(top, 0o755)
        uid = pwd.getpwnam(user).pw_uid
        for p in (top, sock):
            os.chown(p, uid, -1)
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-U", "zhllama", "--auth=trust", "-E", "UTF8",
                    "--no-sync"], capture_output=True, text=True, timeout=120, check=True)
    port = free_port()
    opts = (f"-c listen_addresses=127.0.0.1 -p {port} -k {sock} -c fsync=off -c synchronous_commit=off "
            f"-c full_page_writes=off -c max_connections={max_connections}")
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(log), "-w", "-t", "60",
                    "start"], capture_output=True, text=True, timeout=90, check=True)
    pg = Postgres(url=f"postgresql+asyncpg://zhllama@127.0.0.1:{port}/prefect", data=data, port=port,
                  user=user, log=log, _as=as_user)
    try:
        subprocess.run([*as_user, _pg_bin("createdb") or "createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
                        "zhllama", "prefect"], capture_output=True, text=True, timeout=60, check=True)
    except BaseException:
        pg.stop()
        raise
    return pg


# ------------------------------------------------------------------ Redis


def missing_redis() -> str | None:
    return None if shutil.which("redis-server") else "redis-server not found (apt-get install redis-server)"


@dataclass
class Redis:
    url: str
    port: int
    proc: subprocess.Popen
    dir: Path

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


def start_redis(*, timeout: float = 30) -> Redis:
    """redis-server on 127.0.0.1 (no persistence), answering PING."""
    import redis

    top = Path(tempfile.mkdtemp(prefix="zhllama-redis-"))
    port = free_port()
    with open(top / "redis.log", "wb") as fh:
        proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(top), "--protected-mode", "yes"],
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {(top / 'redis.log').read_text()[-2000:]}")
        try:
            if redis.Redis.from_url(url, socket_connect_timeout=1).ping():
                return Redis(url=url, port=port, proc=proc, dir=top)
        except redis.exceptions.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer on {url} within {timeout}s")
