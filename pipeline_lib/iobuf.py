"""Bulk tensor I/O close to the disk's speed: direct reads into recycled buffers, cache hints, workspaces.

Why this module exists (measured on 7B-shaped streams, see docs/benchmarks.md): most of the system
time of the merge and of the GGUF conversion was memory the kernel had to provide fresh — page
faults on every tensor copied out of an mmap'd shard and on every float32 temporary of the LoRA
arithmetic, and page-cache pages allocated for input that is read exactly once. On a virtual
machine that hands freed memory back to its host, a fresh page also costs a host fault: there a
buffered read of a cold file ran at 165 MB/s with 3 s of system time per GB, the same file read
with ``O_DIRECT`` at 736 MB/s with almost none. The remedies:

* :class:`TensorFile` reads a tensor's bytes straight into a buffer: copied from the page cache
  when all of it is there already (``preadv2(RWF_NOWAIT)``: a stage before just wrote or read it),
  else with ``O_DIRECT`` (the device writes into our memory; no page-cache pages, no copy, and the
  input never evicts the output the next stage reads) where the filesystem allows it, else with
  ``pread`` plus the sequential read-ahead hint, ``POSIX_FADV_WILLNEED`` for the next tensor and
  ``POSIX_FADV_DONTNEED`` for bytes consumed;
* :class:`BufferPool` (:data:`POOL`, :func:`empty`) hands a large block out again once nothing
  references the tensor it backed — a stream reuses the same few blocks for every layer, already
  faulted in — and gets fresh blocks through numpy, which asks for transparent huge pages (one
  fault per 2 MiB instead of per 4 KiB);
* :class:`Workspace` keeps a stream's scratch tensors (the float32 update of a LoRA pair, chunk
  buffers) and reuses them for every tensor.

Every call degrades to plain behaviour where the platform lacks it (no ``O_DIRECT``: buffered
reads; no ``posix_fadvise``: no hint). Nothing here changes a byte of any result.
"""

from __future__ import annotations

import errno
import os
import threading
import weakref

import numpy as np
import torch

from .errors import InputError

ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of this (safe for any device)
READ_CHUNK = 64 << 20  # bytes per read system call: large I/O, few calls (a multiple of ALIGN)
DROP_MIN = 1 << 20  # consumed buffered ranges at least this large are dropped from the page cache
DIRECT_MIN = 1 << 20  # tensors smaller than this are read buffered (an aligned read would be mostly slack)

_FADVISE = getattr(os, "posix_fadvise", None)
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def advise(fd: int, offset: int, length: int, advice: str) -> None:
    """``posix_fadvise(fd, offset, length, POSIX_FADV_<advice>)``; a no-op where unsupported."""
    if _FADVISE is None:
        return
    try:
        _FADVISE(fd, offset, length, getattr(os, f"POSIX_FADV_{advice}"))
    except (OSError, AttributeError):  # e.g. a pipe, or a filesystem without page cache hints
        pass


def drop_cache(path: str | os.PathLike[str]) -> None:
    """Ask the kernel to forget a file's cached pages (written pages are flushed first)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        advise(fd, 0, 0, "DONTNEED")
    finally:
        os.close(fd)


# ------------------------------------------------------------------ recycled buffers


_ITEMSIZE: dict[torch.dtype, int] = {}


def _itemsize(dtype: torch.dtype) -> int:
    size = _ITEMSIZE.get(dtype)
    if size is None:
        size = _ITEMSIZE[dtype] = torch.empty((), dtype=dtype).element_size()
    return size


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


class BufferPool:
    """Recycles the memory of large tensors once nothing references it any more.

    A block is handed out through a numpy array that only the tensor's storage holds; when the last
    view of that memory dies (the consumer wrote the tensor and dropped it), the block goes back to
    the pool and the next request of that size reuses it, already faulted in: no page is zeroed or
    mapped twice. A block still referenced anywhere (a tensor kept by the caller, a numpy view of
    it) is never handed out again. At most ``per_size`` free blocks of each size are kept, none
    larger than ``max_block`` (the two vocabulary tensors of a model are allocated fresh rather
    than held for the whole stream, and asking for one frees the blocks waiting for reuse first: the
    stream's last tensor, ``lm_head``, then does not sit on top of a pool of layer blocks no later
    tensor needs); :meth:`trim` frees them all. Blocks are ALIGN-aligned.
    """

    def __init__(self, *, per_size: int = 2, max_block: int = 256 << 20, min_block: int = 4 << 20) -> None:
        self.per_size, self.max_block, self.min_block = per_size, max_block, min_block
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.reused = 0  # blocks handed out again (for tests and benchmarks)
        self.allocated = 0  # fresh blocks

    def block(self, nbytes: int) -> np.ndarray:
        """An ALIGN-aligned uint8 array of ``nbytes`` (contents undefined); recycled when it dies."""
        raw = None
        pooled = nbytes <= self.max_block
        if pooled:
            with self._lock:
                blocks = self._free.get(nbytes)
                if blocks:
                    raw = blocks.pop()
                    self.reused += 1
        if raw is None:
            if not pooled:
                # a vocabulary tensor (embed_tokens / lm_head, larger than any layer's): the free layer
                # blocks go first, so that its pages take their place instead of adding to the peak
                self.trim()
            raw = np.empty(nbytes + ALIGN, dtype=np.uint8)  # numpy asks for transparent huge pages here
            self.allocated += 1
        pad = -raw.ctypes.data % ALIGN
        owner = raw[pad:pad + nbytes]  # the one object a tensor's storage holds; its death returns the block
        if pooled:
            weakref.finalize(owner, self._give_back, raw, nbytes)
        return owner

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A contiguous CPU tensor with undefined contents (as ``torch.empty``)."""
        nbytes = _numel(shape) * _itemsize(dtype)
        if nbytes < self.min_block:  # small: torch's allocator recycles these itself
            return torch.empty(shape, dtype=dtype)
        return torch.from_numpy(self.block(nbytes)).view(dtype).view(shape)

    def _give_back(self, raw: np.ndarray, nbytes: int) -> None:
        with self._lock:
            blocks = self._free.setdefault(nbytes, [])
            if len(blocks) < self.per_size:
                blocks.append(raw)

    def trim(self) -> None:
        """Free every block waiting for reuse (the end of a stream)."""
        with self._lock:
            self._free.clear()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return sum(n * len(blocks) for n, blocks in self._free.items())


POOL = BufferPool()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous CPU tensor from the process's :data:`POOL` (contents undefined)."""
    return POOL.empty(shape, dtype)


# ------------------------------------------------------------------ reading tensors


def _truncated(what: str, got: int, want: int, offset: int) -> InputError:
    return InputError(f"{what} is truncated: {got} of {want} bytes at offset {offset}",
                      expected="the complete file", fix="re-download the file and check it with `zhllama verify`")


def _read_full(fd: int, view: memoryview, offset: int, *, need: int, what: str) -> int:
    """Read into ``view`` from ``offset`` until it is full or the file ends; at least ``need`` bytes."""
    got, total = 0, len(view)
    while got < total:
        n = os.preadv(fd, [view[got:got + READ_CHUNK]], offset + got)
        if n <= 0:
            break
        got += n
    if got < need:
        raise _truncated(what, got, need, offset)
    return got


class TensorFile:
    """One input file read tensor by tensor (positioned reads: safe from several threads).

    ``read(offset, shape, dtype)`` returns a new tensor with the bytes stored at ``offset``. Large
    tensors go into a recycled aligned block (the tensor views it at the offset's distance from the
    aligned start): copied from the page cache if they are all cached, else read with ``O_DIRECT``
    where the filesystem accepts it; otherwise, and for small tensors, with buffered ``pread``, read
    ahead sequentially and dropped from the page cache once consumed. ``will_need`` starts a buffered read-ahead of a range (a no-op for direct reads,
    which a reading thread overlaps instead).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self._fd: int | None = None
        self._direct_fd: int | None = None  # None: not tried yet; -1: not available here
        self._lock = threading.Lock()

    def _buffered(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                    advise(fd, 0, 0, "SEQUENTIAL")
                    weakref.finalize(self, os.close, fd)
                    self._fd = fd
        return self._fd

    def _direct(self) -> int:
        if self._direct_fd is None:
            with self._lock:
                if self._direct_fd is None:
                    fd = -1
                    if _O_DIRECT:
                        try:
                            fd = os.open(self.path, os.O_RDONLY | _O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                            weakref.finalize(self, os.close, fd)
                        except OSError:  # tmpfs and other filesystems without direct I/O
                            fd = -1
                    self._direct_fd = fd
        return self._direct_fd

    def will_need(self, offset: int, nbytes: int) -> None:
        if nbytes < DIRECT_MIN or self._direct() < 0:
            advise(self._buffered(), offset, nbytes, "WILLNEED")

    def read(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype, *, what: str) -> torch.Tensor:
        nbytes = _numel(shape) * _itemsize(dtype)
        if nbytes >= DIRECT_MIN and offset % _itemsize(dtype) == 0 and self._direct() >= 0:
            t = self._read_direct(offset, nbytes, what)
            if t is not None:
                return t.view(dtype).view(shape)
        t = empty(shape, dtype)
        if nbytes:
            _read_full(self._buffered(), memoryview(t.view(-1).view(torch.uint8).numpy()), offset, need=nbytes,
                       what=what)
            if nbytes >= DROP_MIN:
                advise(self._buffered(), offset, nbytes, "DONTNEED")
        return t

    def _read_direct(self, offset: int, nbytes: int, what: str) -> torch.Tensor | None:
        lo = offset - offset % ALIGN
        span = -(-(offset + nbytes - lo) // ALIGN) * ALIGN
        # the block's size depends on nbytes only (not on the offset's alignment), so every tensor of a
        # shape reuses the same pooled blocks
        size = -(-nbytes // ALIGN) * ALIGN + ALIGN
        block = POOL.block(size)
        start = offset - lo
        if self._cached_into(memoryview(block)[start:start + nbytes], offset):
            return torch.from_numpy(block)[start:start + nbytes]
        try:
            _read_full(self._direct_fd, memoryview(block)[:span], lo, need=offset + nbytes - lo, what=what)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._direct_fd = -1  # the filesystem took the open but not the read: buffered from now on
            return None
        return torch.from_numpy(block)[start:start + nbytes]

    def _cached_into(self, view: memoryview, offset: int) -> bool:
        """Fill ``view`` from the page cache if all of it is there (``RWF_NOWAIT``: no device read).

        A stage that just wrote or read these bytes left them cached: copying them beats reading
        them from the device again, which is all ``O_DIRECT`` can do.
        """
        if not _RWF_NOWAIT:
            return False
        fd, got = self._buffered(), 0
        try:
            while got < len(view):
                n = os.preadv(fd, [view[got:got + READ_CHUNK]], offset + got, _RWF_NOWAIT)
                if n <= 0:
                    return False
                got += n
        except OSError as exc:  # EAGAIN: not (all) in the page cache; EOPNOTSUPP/EINVAL: no such reads here
            if exc.errno not in (errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            return False
        return True


# ------------------------------------------------------------------ reading ahead


class ReadAhead:
    """Loads ``load(key)`` for ``keys`` in order, one ahead, on a thread of its own.

    ``take(i)`` returns the value for ``keys[i]`` (waiting for it if needed) and starts loading
    ``keys[i + 1]``, so a direct read — which blocks, with no kernel read-ahead — overlaps whatever
    the caller does with the value. Take in order; one thread at a time. ``close()`` (or leaving the
    ``with`` block) cancels what was not taken and waits for a read in progress.
    """

    def __init__(self, keys: list, load) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._keys, self._load = keys, load
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhllama-read")
        self._pending: dict[int, object] = {}
        if keys:
            self._pending[0] = self._pool.submit(load, keys[0])

    def take(self, i: int):
        fut = self._pending.pop(i, None)
        if fut is None:
            fut = self._pool.submit(self._load, self._keys[i])
        if i + 1 < len(self._keys) and i + 1 not in self._pending:
            self._pending[i + 1] = self._pool.submit(self._load, self._keys[i + 1])
        return fut.result()

    def close(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ scratch buffers


class Workspace:
    """Scratch tensors for one stream, grown on demand and reused: ``ws.get("delta", shape, torch.float32)``.

    Used by one thread at a time (the stream's worker). A tensor returned by ``get`` is valid until
    the same name is asked for again; it is never handed to a consumer. Memory is the largest size
    asked for under each name, and goes when the workspace is cleared or dropped.
    """

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = _numel(shape)
        buf = self._bufs.get((name, dtype))
        if buf is None or buf.numel() < numel:
            self._bufs.pop((name, dtype), None)  # free the old one before the new one is faulted in
            del buf
            # straight from numpy, not the pool: a grown-out-of buffer must not linger in its free list
            nbytes = max(numel, 1) * _itemsize(dtype)
            buf = self._bufs[(name, dtype)] = torch.from_numpy(np.empty(nbytes, dtype=np.uint8)).view(dtype)
        return buf[:numel].view(shape)

    def reserve(self, name: str, numel: int, dtype: torch.dtype) -> None:
        """Allocate ``name`` at its final size up front (one buffer for the whole stream)."""
        if numel > 0:
            self.get(name, (numel,), dtype)

    def clear(self) -> None:
        self._bufs.clear()
