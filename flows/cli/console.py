"""What a person at the terminal sees while a build runs: one line per stage, a live progress line.

``Console`` is the build reporter (``pipeline_lib.pipeline.stages.REPORTER``): both executors tell
it when a stage ends (one line: label, computed or cache hit, seconds, key) and how a running stage
progresses (a single tqdm line on stderr, only on a terminal). ``quiet_prefect()`` keeps Prefect's
flow- and task-run logs (tracebacks included) for the Prefect database and UI and off the console.
``local_server()`` is the temporary Prefect server a build uses when no PREFECT_API_URL is set:
its output goes to a log file, it is stopped cleanly after the run's events and logs are sent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline_lib.errors import ZhllamaError


class Console:
    """Build reporter for a terminal: stage lines on stdout, one live progress line on stderr."""

    def __init__(self, *, width: int = 24, stream=None) -> None:
        self.width = width
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._lock = threading.Lock()
        self._bar: Any = None
        self._bar_label = ""

    def progress(self, label: str, fraction: float, text: str) -> None:
        if not self.live:
            return
        from tqdm import tqdm

        with self._lock:
            if self._bar is None or self._bar_label != label:
                self._close_bar()
                self._bar = tqdm(total=100, desc=f"  {label}", file=self.stream, leave=False, dynamic_ncols=True,
                                 bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {postfix}")
                self._bar_label = label
            self._bar.n = round(100 * fraction, 1)
            self._bar.set_postfix_str(text.removeprefix(f"{label}: "), refresh=True)

    def finished(self, run: Any) -> None:
        with self._lock:
            if self._bar is not None and self._bar_label == run.label:
                self._close_bar()
            how = "cache hit" if run.cached else "computed"
            seconds = "" if run.cached else f"{run.seconds:6.1f} s"
            print(f"  {run.label:<{self.width}}  {how:<9}  {seconds:>8}  {run.key[:12]}", flush=True)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def quiet_prefect() -> None:
    """Keep Prefect's run logs (and their tracebacks) in the Prefect database, not on the console.

    Called after Prefect set up its logging: flow- and task-run loggers stop propagating to the
    root console handler; their API handler still ships every line to the server (and the UI).
    """
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).propagate = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, *, timeout: float, log: Path | None = None) -> None:
    """Wait for a Prefect server's /health; a clear one-line error if it exits or never answers."""
    deadline = time.monotonic() + timeout
    where = f" (its log: {log})" if log else ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ZhllamaError(f"the Prefect server exited with code {proc.returncode} while starting{where}",
                               fix="read its log; is the port taken? is PREFECT_HOME writable?")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ZhllamaError(f"the Prefect server did not answer on {url} within {timeout:.0f} s{where}",
                       expected="a local server up in 10-20 s",
                       fix="the machine may be overloaded; retry, raise ZHLLAMA_SERVER_TIMEOUT (seconds), or start "
                           "one with `zhllama server` and set PREFECT_API_URL")


def prefect_exe() -> str:
    exe = Path(sys.executable).with_name("prefect")
    return str(exe) if exe.exists() else "prefect"


def stop(proc: subprocess.Popen | None, *, timeout: float = 20) -> None:
    """SIGINT the process group (a clean shutdown), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=timeout)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def drain_prefect() -> None:
    """Send this process's pending events and run logs before its server goes away."""
    with contextlib.suppress(Exception):
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=10)
    with contextlib.suppress(Exception):
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)


@contextlib.contextmanager
def local_server(log_dir: Path) -> Iterator[str]:
    """A temporary Prefect server on 127.0.0.1 for this process (yields its API URL).

    Like Prefect's own temporary server, it uses the profile's database (so runs appear in the UI of
    a later ``zhllama server``), but its output goes to ``log_dir/server.log`` and it is stopped only
    after this process's events and logs are sent: no shutdown tracebacks on the console.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / "server.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    with open(log, "ab") as fh:
        proc = subprocess.Popen([prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
                                env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(url, proc, timeout=float(os.environ.get("ZHLLAMA_SERVER_TIMEOUT", "120")), log=log)
        os.environ["PREFECT_API_URL"] = url  # worker threads and child processes of this run
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        drain_prefect()
        os.environ.pop("PREFECT_API_URL", None)
        stop(proc)
