"""One sanity check for GGUF inputs (quantize, eval, chat): readable, complete, and finite on request.

llama.cpp given a damaged file fails deep inside C++ (or crashes); the ``gguf`` reader raises
numpy errors. :func:`open_gguf` turns every such case into one :class:`InputError` that names the
file, what is wrong with it and what to do, before any work starts:

- not there, not a regular file, shorter than a GGUF header;
- another format (legacy GGML/GGJT magic, a PyTorch zip, anything else);
- a GGUF version this reader does not know;
- a header, metadata or tensor table that cannot be parsed (truncated or overwritten);
- tensor data that lies beyond the end of the file (a truncated download or copy);
- no tensors at all.

:func:`first_non_finite` scans the float tensors for NaN/Inf (one pass over the file), to name the
tensor when llama.cpp refuses to quantize non-finite data.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
HEADER_BYTES = 24  # magic, version (u32), tensor count (u64), metadata count (u64)
# what other files start with, for a message that says what the file is instead (data, not branches)
OTHER_MAGICS: dict[bytes, str] = {
    b"ggjt": "a legacy GGML (ggjt) file",
    b"ggmf": "a legacy GGML (ggmf) file",
    b"ggml": "a legacy GGML file",
    b"lmgg": "a legacy GGML file (byte-swapped magic)",
    b"tjgg": "a legacy GGML (ggjt) file (byte-swapped magic)",
    b"PK\x03\x04": "a zip archive (a PyTorch .bin/.pth checkpoint?)",
    b"\x80\x02\x8a\x0a": "a legacy PyTorch pickle",
}
_FIX_DAMAGED = ("the file is damaged or incomplete: copy or download it again, or rebuild it with "
                "`zhllama convert`")


def _bad(path: Path, what: str, *, expected: str = "a complete GGUF file (as `zhllama convert` writes it)",
         fix: str = _FIX_DAMAGED) -> InputError:
    return InputError(f"{path} {what}", expected=expected, fix=fix)


def check_header(path: str | os.PathLike[str], *, role: str = "model") -> Path:
    """The cheap checks (a regular file, GGUF magic and version, a whole header): milliseconds, so
    callers run them before anything slow. InputError naming what the file is instead."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        raise InputError(f"no {role} file at {path}", expected="a .gguf file",
                         fix="build one with `zhllama convert` (or `zhllama build`), or check the path") from None
    if not stat.S_ISREG(st.st_mode):
        raise InputError(f"{role} {path} is not a regular file", expected="a .gguf file", fix="check the path")
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    if head[:4] != GGUF_MAGIC:
        other = OTHER_MAGICS.get(head[:4])
        if other is not None:
            raise _bad(path, f"is {other}, not GGUF", expected="a GGUF file",
                       fix="convert the model to GGUF with `zhllama convert` first")
        if len(head) < 4:
            raise _bad(path, f"is empty or truncated ({st.st_size} bytes)")
        raise _bad(path, f"is not a GGUF file (it starts with {head[:4]!r})", expected="a GGUF file (magic 'GGUF')",
                   fix="give a .gguf file written by `zhllama convert` or llama.cpp")
    if len(head) < HEADER_BYTES:
        raise _bad(path, f"is truncated: {st.st_size} bytes, shorter than a GGUF header")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise _bad(path, f"says GGUF version {version}", expected="GGUF version 2 or 3",
                   fix=_FIX_DAMAGED if version > 100 else "convert the model again with `zhllama convert`")
    return path


def open_gguf(path: str | os.PathLike[str], *, role: str = "model"):
    """Check a GGUF file and return ``(path, gguf.GGUFReader)``; InputError when it cannot be used."""
    import gguf

    path = check_header(path, role=role)
    st = path.stat()
    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # the reader fails with numpy/struct errors on damaged files
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise _bad(path, f"cannot be read as GGUF: truncated or damaged ({detail})") from None
    if not reader.tensors:
        raise _bad(path, "holds no tensors", expected="a GGUF model with its weights")
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > st.st_size or int(t.data.nbytes) != int(t.n_bytes):
            raise _bad(path, f"is truncated: tensor {t.name} ends at byte {end}, but the file has {st.st_size}")
    return path, reader


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def first_non_finite(reader, *, block_elems: int = 1 << 24) -> tuple[str, int, int] | None:
    """``(tensor name, NaN count, Inf count)`` of the first float tensor holding NaN/Inf, else None.

    Quantized tensors are not scanned (their scales could be checked too, but llama.cpp's
    validator reports those itself). Reads each float tensor once, in blocks.
    """
    for t in reader.tensors:
        if t.tensor_type.name not in _FLOAT_TYPES:
            continue
        flat = np.asarray(t.data).reshape(-1)
        if t.tensor_type.name == "BF16":  # stored as uint16 by the reader: widen to float32
            flat = flat.view(np.uint16)
        nan = inf = 0
        for i in range(0, flat.size, block_elems):
            block = flat[i:i + block_elems]
            if t.tensor_type.name == "BF16":
                block = (block.astype(np.uint32) << 16).view(np.float32)
            finite = np.isfinite(block)
            if not finite.all():
                bad = block[~finite]
                n_nan = int(np.isnan(bad).sum())
                nan += n_nan
                inf += int(bad.size - n_nan)
        if nan or inf:
            return t.name, nan, inf
    return None
