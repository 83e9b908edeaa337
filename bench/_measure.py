"""How every benchmark runs a tool: in a child process, with its wall time and its own peak RSS.

Output goes to temporary files, not pipes, so a chatty child can never fill a pipe and stall;
the child is reaped with ``wait4`` so ``ru_maxrss`` is that child's peak (and its waited-for
descendants'), not the benchmark driver's. The same ``rusage`` gives user and system CPU apart,
page faults, and the bytes the child made the block layer read and write (``ru_inblock`` /
``ru_oublock``, 512-byte units: what ``/proc/<pid>/io`` calls read_bytes / write_bytes).

A sampler also reads the child's own ``VmHWM`` (the peak of the memory it got at ``exec``) and its
anonymous and file-backed resident parts every 0.1 s: ``ru_maxrss`` starts from the parent's
resident size at fork (Linux keeps the pre-exec high-water mark), so for a parent that has grown
(a benchmark driver holding numpy, torch) ``hwm_bytes`` is the honest figure; ``rss_bytes`` is
``hwm_bytes`` where it was read, else ``ru_maxrss``.

``rss_limit``: the sampler kills the child (SIGKILL) the moment its resident set exceeds the limit,
so a tool that would take the machine's memory cannot; the result then says ``killed_for_memory``
with the last resident size seen.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Measured:
    wall_s: float
    rss_bytes: int
    cpu_s: float
    returncode: int
    stdout: str
    stderr: str
    user_s: float = 0.0
    sys_s: float = 0.0
    read_bytes: int = 0  # block-layer reads (ru_inblock * 512)
    write_bytes: int = 0  # block-layer writes (ru_oublock * 512)
    minflt: int = 0
    majflt: int = 0
    killed_for_memory: bool = False
    rss_seen_bytes: int = 0  # the largest VmRSS the sampler read
    hwm_bytes: int = 0  # the largest VmHWM the sampler read (0: never read)
    anon_bytes: int = 0  # the largest RssAnon read
    file_bytes: int = 0  # the largest RssFile read


_FIELDS = {"VmRSS": "rss", "VmHWM": "hwm", "RssAnon": "anon", "RssFile": "file"}


def status_of(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of a live process, bytes (empty when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = _FIELDS.get(line.split(":", 1)[0])
                if key:
                    out[key] = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def rss_of(pid: int) -> int:
    """Resident bytes of a live process (0 when it is gone)."""
    return status_of(pid).get("rss", 0)


def run_measured(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 check: bool = True, rss_limit: int | None = None) -> Measured:
    """Run ``cmd`` to completion and measure it; RuntimeError with its stderr tail if it fails and ``check``."""
    t0 = time.perf_counter()
    killed = threading.Event()
    peak = {"rss": 0, "hwm": 0, "anon": 0, "file": 0}
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(list(cmd), stdout=fo, stderr=fe, env=dict(env) if env is not None else None, cwd=cwd)
        done = threading.Event()

        def watch() -> None:
            # the first reading comes 0.1 s in, long after the child's exec (subprocess execs at once)
            while not done.wait(0.1):
                st = status_of(p.pid)
                for k, v in st.items():
                    peak[k] = max(peak[k], v)
                if rss_limit and st.get("rss", 0) > rss_limit:
                    killed.set()
                    try:
                        os.kill(p.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(p.pid, 0)
        done.set()
        watcher.join()
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode(errors="replace")
        err = fe.read().decode(errors="replace")
    if check and rc:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({rc}):\n{err[-3000:]}")
    return Measured(wall, peak["hwm"] or usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, rc, out, err,
                    user_s=usage.ru_utime, sys_s=usage.ru_stime, read_bytes=usage.ru_inblock * 512,
                    write_bytes=usage.ru_oublock * 512, minflt=usage.ru_minflt, majflt=usage.ru_majflt,
                    killed_for_memory=killed.is_set(), rss_seen_bytes=peak["rss"], hwm_bytes=peak["hwm"],
                    anon_bytes=peak["anon"], file_bytes=peak["file"])
