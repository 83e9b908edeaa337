"""Test-only kill points: SIGKILL this process at the k-th event of a kind.

Crash-safety tests run a real command in a child process with ``ZHLLAMA_KILL_AT=KIND:K`` (several
separated by commas, e.g. ``tensor:7,mib:3``); :func:`tick` counts events per kind and sends
SIGKILL to its own process when the count reaches ``K``, as a power cut or the OOM killer would:
no cleanup handler, ``finally`` block or atexit hook runs. Unset (always, outside those tests),
a tick costs one dictionary lookup.

Events are ticked in shared places, so every stage has them without code of its own:

- ``tensor``: one tensor written or quantized (:mod:`pipeline_lib.progress` bars and callbacks);
- ``mib``: one MiB written or downloaded (progress bars, the download byte loops);
- ``file``: one output file committed to the artifact store (:mod:`pipeline_lib.store`);
- ``stage``: one stage of a build started (``pipeline.stages.run_stage``, both executors);
- ``publish``: one file copied into a build's staged output folder (``pipeline.publishing``);
- and any other kind a caller ticks.
"""

from __future__ import annotations

import os
import signal
import threading

ENV = "ZHLLAMA_KILL_AT"
MIB = 1 << 20

_lock = threading.Lock()
_state: dict[str, object] = {"spec": None, "targets": {}, "counts": {}, "bytes": 0}


def parse(spec: str) -> dict[str, int]:
    """``"tensor:7,mib:3"`` -> ``{"tensor": 7, "mib": 3}``; ValueError for anything else."""
    out: dict[str, int] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        kind, sep, k = item.partition(":")
        if not sep or not kind or not k.isdigit() or int(k) < 1:
            raise ValueError(f"{ENV}={spec!r}: write KIND:K with K >= 1, e.g. tensor:7 or mib:3")
        out[kind] = int(k)
    return out


def _targets() -> dict[str, int]:
    spec = os.environ.get(ENV)
    if spec != _state["spec"]:  # armed, re-armed or disarmed: start counting afresh
        _state.update(spec=spec, targets=parse(spec) if spec else {}, counts={}, bytes=0)
    return _state["targets"]  # type: ignore[return-value]


def armed() -> bool:
    return bool(_targets())


def tick(kind: str, n: int = 1) -> None:
    """Count ``n`` events of ``kind``; SIGKILL this process when the armed count for it is reached."""
    targets = _targets()
    if kind not in targets:
        return
    with _lock:
        counts: dict[str, int] = _state["counts"]  # type: ignore[assignment]
        counts[kind] = counts.get(kind, 0) + n
        if counts[kind] >= targets[kind]:
            os.kill(os.getpid(), signal.SIGKILL)


def tick_bytes(nbytes: int) -> None:
    """Count written or downloaded bytes: one ``mib`` event per MiB boundary crossed."""
    if "mib" not in _targets():
        return
    with _lock:
        before = int(_state["bytes"])  # type: ignore[arg-type]
        _state["bytes"] = before + int(nbytes)
        crossed = (before + int(nbytes)) // MIB - before // MIB
    if crossed:
        tick("mib", crossed)
