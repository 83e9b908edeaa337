"""llama.cpp's log lines, routed to Python logging (logger ``llama.cpp``), with listeners.

llama.cpp reports through one process-wide callback. llama-cpp-python's own callback maps ggml's
log levels one off (it reads WARN as ERROR), so every llama.cpp warning reached the terminal even
with ``verbose=False``. :func:`install` puts this module's callback in place once: every line goes
to the ``llama.cpp`` logger at DEBUG (``zhllama -vv`` shows them), and to the listeners registered
with :func:`listen` (quantize reads its per-tensor progress there). Nothing prints on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger("llama.cpp")

_lock = threading.Lock()
_listeners: list[Callable[[str], None]] = []
_installed: list[object] = []  # the ctypes callback, kept alive while installed


def _on_line(level: int, text: bytes, user_data) -> None:  # called from llama.cpp, with the GIL
    try:
        line = text.decode("utf-8", "replace")
        if line.strip():
            log.debug("%s", line.rstrip())
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(line)
    except Exception:  # never raise into C
        pass


def install() -> None:
    """Route llama.cpp's log to Python logging (idempotent; after llama_cpp is imported)."""
    import llama_cpp

    with _lock:
        if _installed:
            return
        callback = llama_cpp.llama_log_callback(_on_line)
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
        _installed.append(callback)


@contextlib.contextmanager
def listen(listener: Callable[[str], None]) -> Iterator[None]:
    """Also hand every llama.cpp log line to ``listener(line)`` while the block runs."""
    install()
    with _lock:
        _listeners.append(listener)
    try:
        yield
    finally:
        with _lock:
            _listeners.remove(listener)
