"""How every benchmark runs a tool: in a child process, with its wall time and its own peak RSS.

Output goes to temporary files, not pipes, so a chatty child can never fill a pipe and stall;
the child is reaped with ``wait4`` so ``ru_maxrss`` is that child's peak (and its waited-for
descendants'), not the benchmark driver's.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
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


def run_measured(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 check: bool = True) -> Measured:
    """Run ``cmd`` to completion and measure it; RuntimeError with its stderr tail if it fails and ``check``."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as fo, tempfile.TemporaryFile() as fe:
        p = subprocess.Popen(list(cmd), stdout=fo, stderr=fe, env=dict(env) if env is not None else None, cwd=cwd)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = rc = os.waitstatus_to_exitcode(status)
        fo.seek(0)
        fe.seek(0)
        out = fo.read().decode(errors="replace")
        err = fe.read().decode(errors="replace")
    if check and rc:
        raise RuntimeError(f"{' '.join(map(str, cmd[:3]))} failed ({rc}):\n{err[-3000:]}")
    return Measured(wall, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime, rc, out, err)
