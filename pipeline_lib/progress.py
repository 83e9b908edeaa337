"""Progress bars for long work: tqdm on a terminal, quiet otherwise, overridable by callers.

Library code never prints; a progress bar goes to stderr only when stderr is a terminal or
``ZHLLAMA_PROGRESS=1``. Prefect tasks pass their own ``on_progress`` callbacks instead.

Progress is also where the test-only kill points count work (:mod:`pipeline_lib.killpoints`):
every ``update`` of a byte bar is one ``tensor`` event (stages update once per tensor written)
plus a ``mib`` event per MiB, and every unit of a ``tensor`` bar is one ``tensor`` event.
Callbacks that report progress without a bar call :func:`advance` to count the same events.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tqdm.auto import tqdm

from . import killpoints

ProgressCallback = Callable[[int], None]


def progress_enabled() -> bool:
    env = os.environ.get("ZHLLAMA_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def advance(*, nbytes: int = 0, tensors: int = 0) -> None:
    """Count work done for the kill points: ``tensors`` tensors, ``nbytes`` bytes written."""
    if tensors:
        killpoints.tick("tensor", tensors)
    if nbytes:
        killpoints.tick_bytes(nbytes)


class Bar(tqdm):
    """tqdm that also counts its updates as kill-point events (see the module docstring).

    ``per_update``: the event kind one ``update()`` call of a byte bar stands for ("tensor" by
    default; None for bars updated per block of a stream, such as downloads and hashing).
    """

    def __init__(self, *args, per_update: str | None = "tensor", **kwargs) -> None:
        self._per_update = per_update
        self._unit = kwargs.get("unit", "it")  # tqdm sets .unit only on an enabled bar
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1):
        result = super().update(n)
        n = int(n or 0)
        if self._unit == "B":
            if self._per_update:
                killpoints.tick(self._per_update)
            killpoints.tick_bytes(n)
        elif self._unit == "tensor" and n > 0:
            killpoints.tick("tensor", n)
        return result


def bar(total: int | None, desc: str, *, unit: str = "B", enabled: bool | None = None,
        per_update: str | None = "tensor") -> Bar:
    """A progress bar (disabled unless progress is enabled). Use as a context manager."""
    return Bar(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not (progress_enabled() if enabled is None else enabled),
        leave=False,
        dynamic_ncols=True,
        per_update=per_update,
    )
