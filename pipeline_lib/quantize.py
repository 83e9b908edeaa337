"""Quantize a GGUF file with the real llama.cpp (llama-cpp-python's ``llama_model_quantize``).

Contract: for each requested type the output is exactly what llama.cpp's quantizer writes for
that input and ftype with its default parameters (``llama_model_quantize_default_params()``; only
``ftype`` and ``nthread`` are set), so it is byte-identical to ``llama-quantize IN OUT TYPE``.
Each output is written to a ``.tmp-*`` sibling and renamed into place when complete. Progress is
read from llama.cpp's own per-tensor log lines (``[  3/ 21] blk.0.attn_q.weight ...``).

The input is checked first (:func:`pipeline_lib.gguf_check.open_gguf`: a truncated or damaged GGUF
is one clear error, not a llama.cpp failure), and every output is claimed
(:func:`pipeline_lib.fsutil.claim_output`): an existing ``<name>.<type>.gguf`` is refused unless
``overwrite``, and no output is ever the input. When llama.cpp refuses the data, the input is
scanned for NaN/Inf so the error names the tensor instead of blaming the conversion.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import fsutil, llama_log
from .errors import InputError
from .fsutil import atomic_path, check_disk_space, human_bytes
from .gguf_check import first_non_finite, open_gguf
from .progress import bar

log = logging.getLogger(__name__)

# type name -> llama.cpp ftype (enum llama_ftype, LLAMA_FTYPE_MOSTLY_*), as data
QUANT_TYPES: dict[str, int] = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q8_0": 7,
    "q2_K": 10,
    "q3_K_S": 11,
    "q3_K_M": 12,
    "q3_K_L": 13,
    "q4_K_S": 14,
    "q4_K_M": 15,
    "q5_K_S": 16,
    "q5_K_M": 17,
    "q6_K": 18,
}
# rough bits per weight of each type (block size and scale overhead), for disk-space planning only
_PLAN_BPW: dict[str, float] = {"q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q2_K": 3.4,
                               "q3_K_S": 3.6, "q3_K_M": 4.0, "q3_K_L": 4.3, "q4_K_S": 4.6, "q4_K_M": 4.9,
                               "q5_K_S": 5.6, "q5_K_M": 5.7, "q6_K": 6.6}

_PROGRESS_RE = re.compile(r"\[\s*(\d+)\s*/\s*(\d+)\s*\]")


def resolve_type(name: str) -> str:
    """Canonical type name (case-insensitive: 'Q4_K_M' -> 'q4_K_M'); InputError for unknown types."""
    by_lower = {k.lower(): k for k in QUANT_TYPES}
    key = by_lower.get(name.strip().lower())
    if key is None:
        raise InputError(f"unknown quantization type {name!r}", expected=", ".join(QUANT_TYPES),
                         fix="pick one of the listed types (q4_0 is the 2023 release's usual choice, "
                             "q4_K_M / q5_K_M a better size/quality trade-off)")
    return key


@dataclass(frozen=True)
class QuantizedFile:
    qtype: str
    path: Path
    file_bytes: int
    n_params: int
    bits_per_weight: float  # tensor data bits / parameters
    seconds: float


@dataclass(frozen=True)
class QuantizeResult:
    source: Path
    source_bytes: int
    outputs: tuple[QuantizedFile, ...]


def output_name(src: Path, qtype: str) -> str:
    """``model.f16.gguf`` / ``model-f16.gguf`` / ``model.gguf`` -> ``model.<qtype>.gguf``."""
    stem = src.name.removesuffix(".gguf")
    stem = re.sub(r"[.-](f16|f32|bf16|F16|F32|BF16)$", "", stem)
    return f"{stem}.{qtype}.gguf"


def gguf_stats(path: Path, reader=None) -> tuple[int, int]:
    """(parameters, tensor data bytes) of a GGUF file (from ``reader`` if given, else its tensor table:
    ``gguf.GGUFReader`` decodes every vocabulary entry, seconds per file)."""
    if reader is not None:
        return sum(int(t.n_elements) for t in reader.tensors), sum(int(t.n_bytes) for t in reader.tensors)
    from .gguf_table import read_tensor_table

    rows = read_tensor_table(path)
    return sum(r.n_elements for r in rows), sum(r.nbytes for r in rows)


def _progress_from_log(on_tensor: Callable[[int, int], None],
                       on_name: Callable[[str], None] | None = None) -> Callable[[str], None]:
    """A llama_log listener turning llama.cpp's "[ i/ n] name" lines into ``on_tensor(i, n)``.

    ``on_name(tensor_name)`` hears the name of each tensor as llama.cpp starts it (the read-ahead).
    """

    def listener(line: str) -> None:
        m = _PROGRESS_RE.search(line)
        if m:
            if on_name is not None:
                rest = line[m.end():].split(maxsplit=1)
                on_name(rest[0] if rest else "")
            on_tensor(int(m.group(1)), int(m.group(2)))

    return listener


_LOCK = threading.Lock()  # llama.cpp's log is process-global: one quantization at a time, so its lines are its own

READ_AHEAD = 512 << 20  # bytes of the input kept requested ahead of the tensor llama.cpp is quantizing


class _InputReadAhead:
    """Keeps the input file read ahead of llama.cpp's quantizer.

    llama.cpp maps the input and quantizes tensor after tensor, reading each one by page faults only
    when it gets to it (no prefetch), so the disk idles while it computes. Told which tensor it has
    started (its own progress lines), this asks the kernel (``POSIX_FADV_WILLNEED``) for the tensors
    that follow in the file, up to :data:`READ_AHEAD` bytes ahead, so reading overlaps quantizing. The
    page cache is shared, so llama.cpp's mapping then finds the pages there. Only a hint: nothing
    llama.cpp writes changes.
    """

    def __init__(self, path: Path, spans: list[tuple[str, int, int]]) -> None:
        self._spans = sorted(spans, key=lambda s: s[1])  # (name, offset, nbytes) in file order
        self._index = {name: i for i, (name, _, _) in enumerate(self._spans)}
        self._hinted = -1
        try:
            self._fd: int | None = os.open(path, os.O_RDONLY)
        except OSError:
            self._fd = None
        self.started("")

    def started(self, name: str) -> None:
        """llama.cpp started tensor ``name`` ("" before the first): request what follows it."""
        from .iobuf import advise

        i = self._index.get(name, -1)
        if self._fd is None or (name and i < 0):
            return
        ahead, j = 0, i + 1
        while j < len(self._spans) and ahead < READ_AHEAD:
            _, offset, nbytes = self._spans[j]
            if j > self._hinted:
                advise(self._fd, offset, nbytes, "WILLNEED")
                self._hinted = j
            ahead += nbytes
            j += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def quantize_one(src: Path, out: Path, qtype: str, *, threads: int | None = None,
                 on_tensor: Callable[[int, int], None] | None = None,
                 spans: list[tuple[str, int, int]] | None = None) -> None:
    """llama.cpp-quantize ``src`` to ``out`` (atomically) with default parameters.

    ``spans`` (tensor name, data offset, bytes) of the input let it be read ahead of llama.cpp.
    """
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_TYPES[qtype]
    params.nthread = int(threads or 0)  # 0: llama.cpp uses all hardware threads
    ahead = _InputReadAhead(src, spans) if spans else None
    try:
        listener = _progress_from_log(on_tensor or (lambda i, n: None), ahead.started if ahead is not None else None)
        with _LOCK, atomic_path(out) as tmp, llama_log.listen(listener):
            rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(tmp), ctypes.byref(params))
            if rc != 0:
                raise _failure(src, out, qtype, rc)
    finally:
        if ahead is not None:
            ahead.close()


# free bytes under which a failed write is taken for a full disk
_NEARLY_FULL = 4 * 1024 * 1024


def _failure(src: Path, out: Path, qtype: str, rc: int) -> Exception:
    """The error for a failed llama.cpp quantization, naming the real cause where it can be found.

    Called while the partial output still exists, so a full disk shows as (almost) no free space.
    """
    free = fsutil.free_bytes(out.parent)
    if free < _NEARLY_FULL:
        return fsutil.disk_full_error(out, free)
    _, reader = open_gguf(src, role="input")
    bad = first_non_finite(reader)
    if bad is not None:
        name, nan, inf = bad
        return InputError(f"{src}: tensor {name} holds non-finite values ({nan} NaN, {inf} Inf), so llama.cpp "
                          f"refuses to quantize it to {qtype}",
                          expected="finite weights in every tensor",
                          fix="the model itself is broken, not the conversion: rebuild it from LoRAs that hold "
                              "finite values (`zhllama merge` checks every merged tensor)")
    return InputError(f"llama.cpp could not quantize {src} to {qtype} (return code {rc})",
                      expected="a complete GGUF LLaMA model in f32/f16/bf16",
                      fix="run with -vv to see llama.cpp's log; check the input with `zhllama eval` or "
                          "convert it again with `zhllama convert`")


def quantize(gguf_path: str | os.PathLike[str], *, qtypes: Sequence[str], out_dir: str | os.PathLike[str],
             names: Mapping[str, str] | None = None, threads: int | None = None,
             on_progress: Callable[[str, int, int], None] | None = None, overwrite: bool = False) -> QuantizeResult:
    """Quantize ``gguf_path`` once per type in ``qtypes`` into ``out_dir`` (one file per type).

    The input, all types, every output path (an existing ``<name>.<type>.gguf`` is refused unless
    ``overwrite``; ``out_dir`` must be a folder) and the disk space for all outputs are checked
    before the first one starts. Each output is named ``names[qtype]`` when given, else
    ``output_name(gguf_path, qtype)``. ``on_progress(qtype, tensors_done, tensors_total)`` follows
    llama.cpp's per-tensor progress.
    """
    types = list(dict.fromkeys(resolve_type(q) for q in qtypes))
    if not types:
        raise InputError("no quantization type given", expected=", ".join(QUANT_TYPES))
    if threads is not None and threads < 0:
        raise InputError(f"--threads {threads}", expected="a thread count >= 1 (or 0 for all cores)")
    out_dir = fsutil.claim_output(out_dir, kind="into", what="--out-dir")
    src, reader = open_gguf(gguf_path, role="GGUF")
    outs = {q: fsutil.claim_output(out_dir / ((names or {}).get(q) or output_name(src, q)), kind="file",
                                   inputs=[src], overwrite=overwrite)
            for q in types}
    n_params, src_tensor_bytes = gguf_stats(src, reader)
    spans = [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    del reader
    need = sum(int(n_params * _PLAN_BPW[q] / 8) for q in types) + src.stat().st_size - src_tensor_bytes
    check_disk_space(out_dir, need, what=f"{len(types)} quantized file(s)")
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        outputs = _quantize_all(src, outs, n_params, threads=threads, on_progress=on_progress, spans=spans)
    except BaseException:
        if made:  # a folder this call created and nothing finished in it: leave no trace
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    return QuantizeResult(source=src, source_bytes=src.stat().st_size, outputs=tuple(outputs))


def _quantize_all(src: Path, outs: dict[str, Path], n_params: int, *, threads, on_progress,
                  spans=None) -> list[QuantizedFile]:
    outputs = []
    for q, out in outs.items():
        t0 = time.perf_counter()
        with bar(None, f"quantize {q}", unit="tensor") as pbar:
            def on_tensor(i: int, n: int, q=q, pbar=pbar) -> None:
                pbar.total = n
                if i > pbar.n:
                    pbar.update(i - pbar.n)  # one kill-point "tensor" event per tensor, too
                if on_progress is not None:
                    on_progress(q, i, n)

            quantize_one(src, out, q, threads=threads, on_tensor=on_tensor, spans=spans)
        _, tensor_bytes = gguf_stats(out)
        res = QuantizedFile(qtype=q, path=out, file_bytes=out.stat().st_size, n_params=n_params,
                            bits_per_weight=tensor_bytes * 8 / n_params, seconds=time.perf_counter() - t0)
        log.info("%s: %s, %.2f bits per weight", out, human_bytes(res.file_bytes), res.bits_per_weight)
        outputs.append(res)
    return outputs
