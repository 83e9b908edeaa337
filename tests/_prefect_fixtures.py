"""One real Prefect server per test session (SQLite, 127.0.0.1, its own PREFECT_HOME, analytics off).

Every process without ``PREFECT_API_URL`` starts a temporary server of its own (10-20 s each);
tests instead share this one. ``prefect_server`` yields a ``PrefectServer`` whose ``env`` holds
the variables that point a subprocess (worker, CLI) at it; the fixture also sets them in this
process for the whole session.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectServer:
    url: str  # API URL (…/api)
    home: Path
    env: dict[str, str]
    proc: subprocess.Popen
    log: Path

    def prefect(self, *args: str, timeout: float = 120, check: bool = True, env: dict | None = None,
                cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run the ``prefect`` CLI against this server."""
        return subprocess.run([str(VENV_BIN / "prefect"), *args], env={**os.environ, **self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, check=check, cwd=cwd)


def server_env(home: Path, url: str, *, database: str | None = None) -> dict[str, str]:
    """Variables for a server (and its clients): SQLite in ``home`` unless ``database`` names another."""
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_API_DATABASE_CONNECTION_URL": database or f"sqlite+aiosqlite:///{home}/prefect.db",
    }


def start_server(home: Path, *, timeout: float = 90, database: str | None = None) -> PrefectServer:
    """A Prefect server on 127.0.0.1 with its own PREFECT_HOME; ``database``: e.g. postgresql+asyncpg://…."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = server_env(home, url, database=database)
    log = home / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
            env={**os.environ, **env}, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return PrefectServer(url=url, home=home, env=env, proc=proc, log=log)
        except OSError:
            time.sleep(0.5)
    stop_process(proc)
    raise RuntimeError(f"prefect server did not answer on {url} within {timeout}s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, *, timeout: float = 20) -> None:
    """SIGINT the process group (clean shutdown), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# How many session servers this test process started: exactly one, whatever modules use it
# (fixtures are registered once, through ``pytest_plugins`` in conftest.py; tests/test_flow.py checks).
SESSION_STARTS = 0


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    global SESSION_STARTS
    if SESSION_STARTS:
        pytest.fail("a second session Prefect server: a test module imported the prefect_server fixture "
                    "instead of using the one registered in conftest.py (pytest_plugins)")
    SESSION_STARTS += 1
    if shutil.which("prefect", path=str(VENV_BIN)) is None:
        pytest.fail("the prefect CLI is not installed next to this Python; install the package (make install)")
    home = tmp_path_factory.mktemp("prefect-home")
    server = start_server(home)
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    # Prefect reads its settings when it is imported; point this process at the server explicitly.
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: server.url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            yield server
    finally:
        try:  # send this process's pending run logs while the server is still up
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
        except Exception:
            pass
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_process(server.proc)
