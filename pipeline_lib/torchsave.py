"""``torch.save`` as PyTorch 1.13–2.0 wrote it, written by us, whatever torch is installed.

The release's published SHA256 of the merged ``consolidated.NN.pth`` files are of files written by
``torch.save`` of 2023. Today's torch writes a different zip (extra ``byteorder``,
``.format_version``, ``.storage_alignment`` and serialization-id records), so to reproduce those
bytes the layout is written here, field by field, from this description of the 2023 format
(checked byte for byte against files written by torch 2.0.1, ``tests/data/torch-2.0.1-save/``):

* a zip archive (PyTorch's bundled miniz, zip64 mode always on) of stored (uncompressed) records, in
  this order: ``<stem>/data.pkl``; ``<stem>/data/<key>`` for every storage, keys in *string* order
  (``0, 1, 10, 11, …, 2, …``); ``<stem>/version`` (``3\\n``). ``<stem>`` is the file name without its
  last extension (``consolidated.00``);
* every local header has version 0, flags ``0x0808`` (UTF-8 names, data descriptor follows), no
  time/date, zero CRC and sizes; its extra field is a zip64 block (id 1: the header's offset) when
  the header starts at or beyond 4 GiB, then PyTorch's padding block ``FB`` + length + ``Z``…,
  sized so that the record's data starts on a 64-byte boundary;
* after each non-empty record a data descriptor ``PK\\x07\\x08`` + CRC-32 + sizes (8-byte sizes
  when the record has a zip64 block);
* the central directory (version 0, same flags, the CRC and sizes, a zip64 block with the offset
  where it does not fit 32 bits), then a zip64 end record (made by ``0x031E``, needs ``0x002D``),
  its locator, and the classic end record;
* ``data.pkl``: pickle protocol 2 of a ``dict`` (or ``OrderedDict``) of tensors, each pickled as
  ``torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict())`` with the
  storage a persistent id ``('storage', torch.<Type>Storage, '<key>', 'cpu', numel)``. Keys are
  numbered in the dict's order; one storage per tensor.

Streaming: every size is known from the tensor list, so every record's offset is computed before
a byte is written. The pickle is written first; each storage is then written at its own offset
as it arrives (in any order), with its CRC computed as it is written; the central directory last.
Memory is one tensor. A record of 4 GiB or more is refused: no LLaMA tensor slice comes near it,
and that corner of the format (zip64 sizes) is not covered by the reference files.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError

ALIGNMENT = 64  # PyTorch's kFieldAlignment: record data starts on this boundary
VERSION = b"3\n"  # the "version" record of torch.save files (format version 3)
ZIP64_LIMIT = 0xFFFFFFFF
_UTF8 = 0x0800  # general purpose flag: names are UTF-8
_DESCRIPTOR = 0x0008  # general purpose flag: CRC and sizes follow the data
_PICKLE_BATCH = 1000  # pickle writes dict items in batches of this many (SETITEMS)

# torch dtype -> the storage class name torch.save's pickle references (data, not an if-chain)
STORAGE_TYPES: dict[torch.dtype, str] = {
    torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage",
    torch.float64: "DoubleStorage", torch.int64: "LongStorage", torch.int32: "IntStorage",
    torch.int16: "ShortStorage", torch.int8: "CharStorage", torch.uint8: "ByteStorage",
    torch.bool: "BoolStorage",
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the state dict: its key, dtype and shape (contiguous, its own storage)."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    @property
    def stride(self) -> tuple[int, ...]:
        out, acc = [], 1
        for d in reversed(self.shape):
            out.insert(0, acc)
            acc *= d
        return tuple(out)


def archive_stem(filename: str) -> str:
    """The folder name torch.save puts the records in: the file name without its last extension."""
    name = Path(filename).name
    return name[: name.rindex(".")] if "." in name else name


# ------------------------------------------------------------------ the pickle


class _Pickle2:
    """Just enough of pickle protocol 2 to write a state dict byte for byte as CPython's pickler does.

    The memo is kept the way the pickler keeps it (one entry per memoized object, in order); objects
    torch.save pickles as shared (the ``'storage'``/``'cpu'`` strings, classes and functions) are
    looked up by a token, everything else gets a fresh entry that is never looked up again.
    """

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")
        self._memo: dict[object, int] = {}

    def _put(self, token: object | None = None) -> None:
        idx = len(self._memo)
        self._memo[token if token is not None else object()] = idx
        self.out += b"q" + bytes([idx]) if idx < 256 else b"r" + struct.pack("<I", idx)

    def _get(self, token: object) -> bool:
        idx = self._memo.get(token)
        if idx is None:
            return False
        self.out += b"h" + bytes([idx]) if idx < 256 else b"j" + struct.pack("<I", idx)
        return True

    def global_(self, module: str, name: str) -> None:
        token = ("global", module, name)
        if not self._get(token):
            self.out += b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"
            self._put(token)

    def str_(self, text: str, *, shared: bool = False) -> None:
        token = ("str", text) if shared else None
        if token is not None and self._get(token):
            return
        raw = text.encode("utf-8", "surrogatepass")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw
        self._put(token)

    def int_(self, n: int) -> None:
        if 0 <= n <= 0xFF:
            self.out += b"K" + bytes([n])
        elif 0 <= n <= 0xFFFF:
            self.out += b"M" + struct.pack("<H", n)
        elif -0x80000000 <= n <= 0x7FFFFFFF:
            self.out += b"J" + struct.pack("<i", n)
        else:
            raw = _encode_long(n)
            self.out += (b"\x8a" + bytes([len(raw)]) if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw))) + raw

    def int_tuple(self, values: Sequence[int]) -> None:
        if not values:
            self.out += b")"  # the empty tuple is a singleton: not memoized
            return
        if len(values) > 3:
            self.out += b"("
        for v in values:
            self.int_(v)
        self.out += {1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(values), b"t")
        self._put()

    def tensor(self, entry: TensorEntry, storage_key: str) -> None:
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"("  # the 6 arguments
        self.out += b"("  # the persistent id of the storage
        self.str_("storage", shared=True)
        self.global_("torch", STORAGE_TYPES[entry.dtype])
        self.str_(storage_key)
        self.str_("cpu", shared=True)
        self.int_(entry.numel)
        self.out += b"t"
        self._put()
        self.out += b"Q"  # BINPERSID
        self.int_(0)  # storage offset
        self.int_tuple(entry.shape)
        self.int_tuple(entry.stride)
        self.out += b"\x89"  # requires_grad False
        self.global_("collections", "OrderedDict")  # backward hooks: OrderedDict()
        self.out += b")R"
        self._put()
        self.out += b"t"
        self._put()
        self.out += b"R"
        self._put()


def _encode_long(n: int) -> bytes:
    if n == 0:
        return b""
    raw = n.to_bytes((n.bit_length() >> 3) + 1, "little", signed=True)
    if n < 0 and len(raw) > 1 and raw[-1] == 0xFF and raw[-2] & 0x80:
        raw = raw[:-1]
    return raw


def pickle_state_dict(entries: Sequence[TensorEntry], *, ordered: bool = False) -> bytes:
    """``data.pkl`` of ``torch.save`` (1.13–2.0) for these tensors, storage ``i`` for entry ``i``.

    ``ordered``: the dict was an ``OrderedDict`` (a model's ``state_dict()``); else a plain ``dict``
    (what the release's merge script saved).
    """
    bad = [e.key for e in entries if e.dtype not in STORAGE_TYPES]
    if bad:
        raise InputError(f"tensor {bad[0]} has a dtype torch.save of 2023 cannot store",
                         expected=", ".join(str(d).removeprefix("torch.") for d in STORAGE_TYPES))
    p = _Pickle2()
    if ordered:
        p.global_("collections", "OrderedDict")
        p.out += b")R"
    else:
        p.out += b"}"
    p._put()
    for start in range(0, len(entries), _PICKLE_BATCH):
        batch = entries[start:start + _PICKLE_BATCH]
        if len(batch) > 1:
            p.out += b"("
        for i, e in enumerate(batch, start):
            p.str_(e.key)
            p.tensor(e, str(i))
        p.out += b"u" if len(batch) > 1 else b"s"
    p.out += b"."
    return bytes(p.out)


# ------------------------------------------------------------------ the zip layout


@dataclass(frozen=True)
class Record:
    """Where one zip record goes: its local header (complete) and data, and what follows them."""

    name: bytes  # full name in the archive, "<stem>/data/3"
    offset: int  # of the local header
    header: bytes  # local header + name + extra field
    size: int  # data bytes

    @property
    def zip64(self) -> bool:
        return self.offset >= ZIP64_LIMIT

    @property
    def data_offset(self) -> int:
        return self.offset + len(self.header)

    @property
    def descriptor_size(self) -> int:
        return 0 if not self.size else (24 if self.zip64 else 16)

    @property
    def end(self) -> int:
        return self.data_offset + self.size + self.descriptor_size

    @property
    def flags(self) -> int:
        return _UTF8 | (_DESCRIPTOR if self.size else 0)

    def descriptor(self, crc: int) -> bytes:
        if not self.size:
            return b""
        if self.zip64:
            return struct.pack("<IIQQ", 0x08074B50, crc, self.size, self.size)
        return struct.pack("<IIII", 0x08074B50, crc, self.size, self.size)

    def central(self, crc: int) -> bytes:
        extra = struct.pack("<HHQ", 1, 8, self.offset) if self.zip64 else b""
        head = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 0, 0, self.flags, 0, 0, 0, crc, self.size, self.size,
                           len(self.name), len(extra), 0, 0, 0, 0, min(self.offset, ZIP64_LIMIT))
        return head + self.name + extra


def _record(name: str, offset: int, size: int) -> Record:
    if size >= ZIP64_LIMIT:
        raise InputError(f"record {name} has {size} bytes",
                         expected="records under 4 GiB (every tensor slice of a LLaMA checkpoint is)",
                         fix="write more parts (--parts)")
    raw = name.encode("utf-8")
    zip64 = struct.pack("<HHQ", 1, 8, offset) if offset >= ZIP64_LIMIT else b""
    start = offset + 30 + len(raw) + len(zip64) + 4  # where the data would start with no padding
    pad = -start % ALIGNMENT
    extra = zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad
    flags = _UTF8 | (_DESCRIPTOR if size else 0)
    header = struct.pack("<IHHHHHIIIHH", 0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(raw), len(extra))
    return Record(raw, offset, header + raw + extra, size)


@dataclass(frozen=True)
class Layout:
    """Every record of one file, in file order, plus where the central directory starts."""

    pickle: Record
    storages: dict[int, Record]  # storage index -> its record
    version: Record
    records: tuple[Record, ...]  # file order

    @property
    def central_offset(self) -> int:
        return self.records[-1].end


def plan_layout(stem: str, pickle_size: int, storage_sizes: Sequence[int]) -> Layout:
    """Offsets of every record of a torch.save file with these sizes (storage ``i`` is key ``str(i)``)."""
    order = sorted(range(len(storage_sizes)), key=str)  # torch.save writes sorted(keys): string order
    records, storages = [], {}
    offset = 0
    pkl = _record(f"{stem}/data.pkl", offset, pickle_size)
    records.append(pkl)
    offset = pkl.end
    for i in order:
        rec = _record(f"{stem}/data/{i}", offset, storage_sizes[i])
        storages[i] = rec
        records.append(rec)
        offset = rec.end
    version = _record(f"{stem}/version", offset, len(VERSION))
    records.append(version)
    return Layout(pkl, storages, version, tuple(records))


def _end_records(layout: Layout, central_size: int) -> bytes:
    n = len(layout.records)
    cd_offset = layout.central_offset
    eocd64 = cd_offset + central_size
    return (struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 0x002D, 0, 0, n, n, central_size, cd_offset)
            + struct.pack("<IIQI", 0x07064B50, 0, eocd64, 1)
            + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                          min(central_size, ZIP64_LIMIT), min(cd_offset, ZIP64_LIMIT), 0))


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (made contiguous), as torch.save stores its storage."""
    t = t.contiguous()
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class TorchSaveWriter:
    """One file in the 2023 torch.save layout, written storage by storage at precomputed offsets.

    ``with TorchSaveWriter(path, entries) as w: w.write_storage(i, tensor)`` for every ``i`` (any
    order); leaving the block writes the version record and the central directory and fsyncs. On
    an exception the (partial) file is left for the caller's atomic-output machinery to remove.
    """

    def __init__(self, path: str | os.PathLike[str], entries: Sequence[TensorEntry], *, ordered: bool = False,
                 stem: str | None = None) -> None:
        self.path = Path(path)
        self.entries = tuple(entries)
        self.pickle = pickle_state_dict(self.entries, ordered=ordered)
        self.layout = plan_layout(stem or archive_stem(self.path.name), len(self.pickle),
                                  [e.nbytes for e in self.entries])
        self._crc: dict[bytes, int] = {}
        self._fd: int | None = None

    @property
    def file_size(self) -> int:
        central = sum(46 + len(r.name) + (12 if r.zip64 else 0) for r in self.layout.records)
        return self.layout.central_offset + central + 56 + 20 + 22

    def _write_record(self, rec: Record, data) -> None:
        """Header, data (one buffer, or an iterable of buffers), descriptor; the CRC is computed as it goes."""
        chunks = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        crc, pos = 0, rec.data_offset
        _pwrite_all(self._fd, rec.header, rec.offset)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            if pos + len(view) > rec.data_offset + rec.size:
                raise RuntimeError(f"{rec.name.decode()}: more than the {rec.size} bytes planned")
            crc = zlib.crc32(view, crc)
            _pwrite_all(self._fd, view, pos)
            pos += len(view)
        if pos != rec.data_offset + rec.size:
            raise RuntimeError(f"{rec.name.decode()}: {pos - rec.data_offset} bytes given, {rec.size} planned")
        _pwrite_all(self._fd, rec.descriptor(crc), pos)
        self._crc[rec.name] = crc

    def __enter__(self) -> TorchSaveWriter:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._write_record(self.layout.pickle, self.pickle)
        return self

    def write_storage(self, index: int, data) -> None:
        """Write storage ``index``: entry ``index``'s tensor, its raw bytes, or an iterable of byte chunks."""
        rec = self.layout.storages[index]
        if rec.name in self._crc:
            raise RuntimeError(f"storage {index} of {self.path.name} written twice")
        if isinstance(data, torch.Tensor):
            e = self.entries[index]
            if data.dtype != e.dtype or tuple(data.shape) != e.shape:
                raise RuntimeError(f"{e.key}: got {tuple(data.shape)} {data.dtype}, planned {e.shape} {e.dtype}")
            data = tensor_bytes(data)
        self._write_record(rec, data)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                missing = [r.name.decode() for r in self.layout.storages.values() if r.name not in self._crc]
                if missing:
                    raise RuntimeError(f"{self.path.name}: storages never written: {missing[:3]}")
                self._write_record(self.layout.version, VERSION)
                central = b"".join(r.central(self._crc[r.name]) for r in self.layout.records)
                _pwrite_all(self._fd, central + _end_records(self.layout, len(central)), self.layout.central_offset)
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None


def save(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, ordered: bool | None = None) -> Path:
    """``torch.save(state_dict, path)`` as torch 1.13–2.0 wrote it (every tensor its own storage).

    ``ordered`` defaults to whether ``state_dict`` is an ``OrderedDict``.
    """
    entries = [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in state_dict.items()]
    if ordered is None:
        ordered = isinstance(state_dict, OrderedDict)
    with TorchSaveWriter(path, entries, ordered=ordered) as w:
        for i, t in enumerate(state_dict.values()):
            w.write_storage(i, t)
    return Path(path)
