"""Progress bars for long work: tqdm on a terminal, quiet otherwise, overridable by callers.

Library code never prints; a progress bar goes to stderr only when stderr is a terminal or
``ZHLLAMA_PROGRESS=1``. Prefect tasks pass their own ``on_progress`` callbacks instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from tqdm.auto import tqdm

ProgressCallback = Callable[[int], None]


def progress_enabled() -> bool:
    env = os.environ.get("ZHLLAMA_PROGRESS")
    if env is not None:
        return env not in ("0", "", "false", "no")
    return sys.stderr.isatty()


def bar(total: int | None, desc: str, *, unit: str = "B", enabled: bool | None = None) -> tqdm:
    """A tqdm bar (disabled unless progress is enabled). Use as a context manager."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit == "B",
        unit_divisor=1024 if unit == "B" else 1000,
        disable=not (progress_enabled() if enabled is None else enabled),
        leave=False,
        dynamic_ncols=True,
    )
