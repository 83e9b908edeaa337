"""Lazy, tensor-at-a-time readers for LLaMA checkpoints: HF .bin / safetensors shards, Meta .pth parts.

Contract (see CONTRACTS.md "Tensor stream"): ``open_checkpoint(path)`` returns a :class:`Checkpoint`
that implements :class:`TensorSource`: ``config`` (an HF ``config.json`` dict), ``tokenizer_dir``,
``tensor_infos()`` (HF names, shapes and dtypes in write order, ignored buffers such as rotary
``inv_freq`` left out) and ``iter_tensors()`` (the same tensors, HF layout, one at a time), plus
``load(name)`` for random access.

Memory and speed: no reader holds more than one tensor. ``.bin`` shards and ``.pth`` parts are opened
with ``torch.load(mmap=True, weights_only=True)`` for their names, shapes and storage locations only
(mapping costs nothing until touched); a tensor's bytes are then read with ``pread`` at its offset in
the zip into a new buffer (:mod:`pipeline_lib.iobuf`), never faulted in page by page from the
mapping. The file is read with the sequential read-ahead hint, and each range read is dropped from
the page cache (it is streamed once), so the output just written stays cached for the next stage.
Where a storage's offset cannot be found (an unusual zip), the tensor is copied out of the mapping
and the mapped pages are dropped (``madvise(MADV_DONTNEED)`` on the private, never-written mapping).
Safetensors data is read the same way at the offsets of its header (safe_open is used for names,
shapes and dtypes only), which never maps the file at all.
"""

from __future__ import annotations

import ctypes
import json
import logging
import mmap
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from . import iobuf, names
from .errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorInfo:
    name: str  # HF tensor name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * dtype_size(self.dtype)


@runtime_checkable
class TensorSource(Protocol):
    """What every writer consumes (HF writer, pth writer, GGUF writer)."""

    config: dict  # HF config.json dict describing the OUTPUT (vocab_size correct, torch_dtype)
    tokenizer_dir: Path | None  # folder holding tokenizer.model (+ added_tokens.json etc.) for the output

    def tensor_infos(self) -> list[TensorInfo]: ...

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]: ...


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# torch dtype <-> names used in config.json and safetensors headers (data, not if-chains)
DTYPE_BY_NAME: dict[str, torch.dtype] = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
}
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------ page dropping

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
try:  # Linux/glibc; elsewhere page dropping is a no-op (correct, only uses more memory)
    _libc = ctypes.CDLL(None, use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _madvise.restype = ctypes.c_int
except (OSError, AttributeError):  # pragma: no cover
    _madvise = None


def drop_pages(t: torch.Tensor) -> None:
    """Release the resident pages of a tensor that views a private, read-only file mapping.

    Only ever called on tensors returned by ``torch.load(mmap=True)`` that nobody wrote to: for
    such pages MADV_DONTNEED just forgets them and a later read faults them in from the file again.
    """
    if _madvise is None:
        return
    nbytes = t.untyped_storage().nbytes()
    if nbytes < _PAGE:
        return
    start = t.untyped_storage().data_ptr()
    lo = (start + _PAGE - 1) // _PAGE * _PAGE  # whole pages inside this storage only
    hi = (start + nbytes) // _PAGE * _PAGE
    if hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)


def load_mmap(path: Path) -> tuple[dict, bool]:
    """``torch.load(mmap=True, weights_only=True)``: names and lazily mapped tensors, no data read.

    Returns the state dict and whether it is mapped (legacy non-zip files are read into memory).
    """
    # legacy (pre-zip) pickles cannot be mapped; they are small in practice (old adapter files)
    use_mmap = zipfile.is_zipfile(path)
    if not use_mmap:
        log.warning("%s is a legacy (non-zip) PyTorch file: read into memory, not mapped", path)
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols are noise here; failures are reported
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", mmap=use_mmap, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" not in str(exc).lower():
            raise InputError(f"cannot read {path}: {_first_line(exc)}",
                             expected="a complete PyTorch checkpoint of tensors",
                             fix="re-download the file; it is damaged or truncated") from None
        # torch's own text advises re-running with weights_only=False, i.e. running the file's code: never
        # pass that on. Name what was refused instead.
        found = _UNSAFE_GLOBAL.search(str(exc)) or _UNSUPPORTED.search(str(exc))
        what = f" ({found.group(0)})" if found else ""
        raise InputError(f"{path} is refused as unsafe: its pickle holds code or objects other than tensors{what}",
                         expected="a checkpoint of plain tensors (torch.save of a state dict, or .safetensors)",
                         fix="use the release's original file (check it with `zhllama verify`) or a .safetensors "
                             "copy; zhllama never runs code from a checkpoint") from None
    except Exception as exc:  # noqa: BLE001 — any other unpickling failure is an input problem
        raise InputError(f"cannot read {path}: {_first_line(exc)}",
                         expected="a PyTorch checkpoint of tensors (zip format, loadable with weights_only=True)",
                         fix="re-download the file; it is damaged or not a PyTorch checkpoint") from exc
    if not isinstance(obj, dict):
        raise InputError(f"{path} holds a {type(obj).__name__}, not a dict of tensors",
                         expected="a state dict", fix="point at the checkpoint file itself")
    return obj, use_mmap


_UNSAFE_GLOBAL = re.compile(r"GLOBAL [\w.]+")
_UNSUPPORTED = re.compile(r"Unsupported operand \d+")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


COPY_CHUNK = 32 * 1024 * 1024  # bytes copied between page drops


def _drop_range(ptr: int, nbytes: int) -> None:
    lo = (ptr + _PAGE - 1) // _PAGE * _PAGE  # whole pages only
    hi = (ptr + nbytes) // _PAGE * _PAGE
    if _madvise is not None and hi > lo:
        _madvise(lo, hi - lo, _MADV_DONTNEED)


def copy_out(t: torch.Tensor, *, mapped: bool) -> torch.Tensor:
    """An owned copy of a tensor; if it views a file mapping, the mapped pages are dropped as it is copied.

    The copy goes in chunks, dropping each chunk's pages right after, so a large tensor is never resident
    twice (mapped and copied). Never drop pages of anonymous memory (``mapped=False``): MADV_DONTNEED
    would zero them.
    """
    if not mapped or not t.is_contiguous():
        out = t.clone()
        if mapped:
            drop_pages(t)
        return out
    out = torch.empty_like(t, memory_format=torch.contiguous_format)
    src, dst = t.reshape(-1), out.view(-1)
    step = max(COPY_CHUNK // max(t.element_size(), 1), 1)
    for i in range(0, src.numel(), step):
        piece = src[i:i + step]
        dst[i:i + step].copy_(piece)
        _drop_range(piece.data_ptr(), piece.numel() * piece.element_size())
    drop_pages(t)  # the partial pages at the edges
    return out


# ------------------------------------------------------------------ safetensors without mmap


class SafetensorsFile:
    """One safetensors file: header via safe_open, data via positioned reads (no mapping)."""

    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
            with open(path, "rb") as fh:
                (hlen,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(hlen))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read safetensors file {path}: {exc}",
                             fix="re-download the file") from exc
        self.data_start = 8 + hlen
        self._file = iobuf.TensorFile(path)  # opened on the first read, closed with the reader
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for k in keys:
            e = header[k]
            if e["dtype"] not in SAFETENSORS_DTYPES:
                raise InputError(f"{path}: tensor {k} has dtype {e['dtype']}",
                                 expected="F16, BF16 or F32", fix="use an unquantized checkpoint")
            start, end = e["data_offsets"]
            self.entries[k] = (SAFETENSORS_DTYPES[e["dtype"]], tuple(e["shape"]), start, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _, _ = self.entries[key]
        return dtype, shape

    def will_need(self, key: str) -> None:
        """Start reading ``key``'s bytes in the background (buffered reads only)."""
        _, _, start, end = self.entries[key]
        self._file.will_need(self.data_start + start, end - start)

    def load(self, key: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[key]
        n = 1
        for d in shape:
            n *= d
        if n * dtype_size(dtype) != end - start:
            raise InputError(f"{self.path}: tensor {key} has {end - start} bytes for shape {list(shape)}",
                             fix="re-download the file")
        return self._file.read(self.data_start + start, shape, dtype, what=f"{self.path} (tensor {key})")


# ------------------------------------------------------------------ the checkpoint


class _Reader(Protocol):
    def keys(self) -> list[str]: ...
    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]: ...
    def load(self, key: str) -> torch.Tensor: ...
    def will_need(self, key: str) -> None: ...


class _BinFile:
    """One ``.bin``/``.pth`` (zip pickle) file: names from ``torch.load(mmap=True)``, bytes by ``pread``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._sd, self._mapped = load_mmap(path)
        bad = [k for k, v in self._sd.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"{path}: entries {bad[:3]} are not tensors", expected="a state dict of tensors")
        self._offsets = storage_offsets(path, self._sd) if self._mapped else {}
        self._file = iobuf.TensorFile(path)

    def keys(self) -> list[str]:
        return list(self._sd)

    def info(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self._sd[key]
        return t.dtype, tuple(t.shape)

    def will_need(self, key: str) -> None:
        """Start reading ``key``'s bytes in the background (buffered reads only)."""
        t, offset = self._sd[key], self._offsets.get(key)
        if offset is not None:
            self._file.will_need(offset, t.numel() * t.element_size())

    def load(self, key: str) -> torch.Tensor:
        t = self._sd[key]
        offset = self._offsets.get(key)
        if offset is None or not t.is_contiguous():
            return copy_out(t, mapped=self._mapped)
        return self._file.read(offset, tuple(t.shape), t.dtype, what=f"{self.path} (tensor {key})")


def _record_data_offsets(path: Path) -> dict[int, int]:
    """Data offset -> size of every ``<stem>/data/<key>`` record of a torch zip (stored, uncompressed)."""
    offsets = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if len(parts) != 3 or parts[1] != "data" or info.compress_type != zipfile.ZIP_STORED:
                continue
            fh.seek(info.header_offset)
            local = fh.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return {}
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            offsets[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return offsets


def storage_offsets(path: Path, state_dict: dict) -> dict[str, int]:
    """Where each tensor's first byte lies in the file, for tensors ``torch.load(mmap=True)`` mapped.

    torch maps the whole file once and every storage is the slice at its record's data offset, so
    storage address minus record offset is the same for all of them: the mapping's base. Found from
    the lowest storage and lowest record, then checked for every storage (a record at that offset,
    of that size, whose first bytes in the file are the storage's); anything that does not fit
    returns ``{}`` and the reader copies out of the mapping instead.
    """
    try:
        records = _record_data_offsets(path)
    except (OSError, zipfile.BadZipFile, struct.error):
        return {}
    storages: dict[int, tuple[torch.UntypedStorage, list[str]]] = {}
    for key, t in state_dict.items():
        if t.numel():
            st = t.untyped_storage()
            storages.setdefault(st.data_ptr(), (st, []))[1].append(key)
    if not records or not storages or len(records) < len(storages):
        return {}
    base = min(storages) - min(records)
    out = {}
    with open(path, "rb") as fh:
        for ptr, (st, keys) in storages.items():
            offset = ptr - base
            if records.get(offset) != st.nbytes():
                return {}
            head = min(st.nbytes(), 64)
            fh.seek(offset)
            if fh.read(head) != bytes(st[:head]):  # one page of the mapping touched per storage
                return {}
            for key in keys:
                t = state_dict[key]
                out[key] = offset + t.storage_offset() * t.element_size()
    return out


def open_tensor_file(path: Path) -> _Reader:
    """Reader for one ``.safetensors`` or ``.bin``/``.pth`` file."""
    return SafetensorsFile(path) if path.suffix == ".safetensors" else _BinFile(path)


class Checkpoint:
    """A LLaMA checkpoint on disk, read lazily. Implements :class:`TensorSource` plus ``load(name)``.

    ``format`` is ``"hf-safetensors"``, ``"hf-bin"`` or ``"meta"``. Names are always HF names and
    tensors always HF layout (Meta parts are joined and q/k permuted on load).
    """

    def __init__(self, path: Path, fmt: str, config: dict, tokenizer_dir: Path | None,
                 layout: dict[str, list[tuple[_Reader, str]]], files: list[Path],
                 stored_order: list[str] | None = None) -> None:
        self.path = path
        self.format = fmt
        self.config = config
        self.tokenizer_dir = tokenizer_dir
        self.files = files
        self._layout = layout  # HF name -> [(reader, key in that file)] (several for Meta parts)
        self._stored_order = stored_order if stored_order is not None else list(layout)
        self._infos = self._make_infos()

    # -- TensorSource
    def tensor_infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor in order; the next one is read on a thread while the consumer uses this one."""
        names_ = list(self._infos)
        with iobuf.ReadAhead(names_, self.load) as reads:
            for i, name in enumerate(names_):
                yield name, reads.take(i)
        iobuf.POOL.trim()

    # -- extras
    def names(self) -> list[str]:
        return list(self._infos)

    def file_order(self) -> list[str]:
        """HF names in the order they are stored: files sorted by name, keys in each file's own order.

        (Buffers such as ``inv_freq`` left out; for Meta parts, the order of the first part.)
        """
        return list(self._stored_order)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def will_need(self, name: str) -> None:
        """Hint that ``name`` is read next: its bytes are read ahead in the background."""
        for reader, key in self._layout[name]:
            reader.will_need(key)

    def load(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (HF naming and layout), an owned copy."""
        parts = self._layout[name]
        if self.format != "meta":
            reader, key = parts[0]
            return reader.load(key)
        kind, _ = names.lookup(name, "hf")
        pieces = [r.load(k) for r, k in parts]
        t = pieces[0] if kind.meta_split_axis is None else torch.cat(pieces, dim=kind.meta_split_axis)
        heads = names.heads_for(kind, n_head=self.config["num_attention_heads"],
                                n_head_kv=self.config.get("num_key_value_heads", self.config["num_attention_heads"]))
        if heads:
            t = names.meta_to_hf_rotary(t, heads).contiguous()
        return t

    def _make_infos(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for name, parts in self._layout.items():
            dtype, shape = parts[0][0].info(parts[0][1])
            if self.format == "meta" and len(parts) > 1:
                kind, _ = names.lookup(name, "hf")
                if kind.meta_split_axis is not None:
                    ax = kind.meta_split_axis
                    shape = tuple(sum(r.info(k)[1][ax] for r, k in parts) if i == ax else d
                                  for i, d in enumerate(shape))
            infos[name] = TensorInfo(name, tuple(shape), dtype)
        # canonical LLaMA order first, then anything unknown in file order
        order = names.hf_names(int(self.config.get("num_hidden_layers", 0)))
        known = [n for n in order if n in infos]
        rest = [n for n in infos if n not in set(order)]
        return {n: infos[n] for n in known + rest}

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, tensors={len(self._infos)})"


def _find_tokenizer_dir(*candidates: Path) -> Path | None:
    for d in candidates:
        if (d / "tokenizer.model").is_file():
            return d
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}", fix="check the file is complete JSON") from exc


def _index_files(folder: Path, index_name: str, pattern: str) -> list[Path]:
    index = folder / index_name
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise InputError(f"{index} lists shards that are missing: {', '.join(missing)}",
                             expected="every shard named in the index next to it",
                             fix="finish the download (zhllama download) or copy the missing shards")
        return [folder / f for f in files]
    return sorted(p for p in folder.glob(pattern) if not p.name.startswith("."))


# Which files make up which format (data; tried in this order: safetensors preferred, it needs no pickle).
_HF_FORMATS: tuple[tuple[str, str, str], ...] = (
    ("hf-safetensors", "model.safetensors.index.json", "*.safetensors"),
    ("hf-bin", "pytorch_model.bin.index.json", "pytorch_model*.bin"),
)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open an HF folder (.safetensors or .bin shards, with or without index) or a Meta folder
    (``consolidated.NN.pth`` + ``params.json``). Reads headers only."""
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"base model folder {path} does not exist",
                         expected="a folder with config.json + weight shards, or consolidated.*.pth + params.json",
                         fix="check the --base path")
    if (path / "params.json").is_file() and list(path.glob("consolidated.*.pth")):
        return _open_meta(path)
    for fmt, index_name, pattern in _HF_FORMATS:
        files = _index_files(path, index_name, pattern)
        if files:
            return _open_hf(path, fmt, files)
    raise InputError(f"no model weights found in {path}",
                     expected="model*.safetensors, pytorch_model*.bin (+ index), or consolidated.*.pth + params.json",
                     fix="point --base at the folder that holds the weight files")


# What config.json must say for the checkpoint to be read as LLaMA (a table: 2023 and current spellings).
LLAMA_MODEL_TYPES = frozenset({"llama"})
LLAMA_ARCHITECTURES = frozenset({"LlamaForCausalLM", "LLaMAForCausalLM"})


def require_llama_config(config: object, where: Path) -> dict:
    """Refuse a config.json that is not a JSON object or does not describe a LLaMA causal LM."""
    if not isinstance(config, dict):
        raise InputError(f"{where} is not a JSON object", expected="an HF config.json",
                         fix="use the config.json written with the model")
    model_type = config.get("model_type")
    archs = config.get("architectures")
    if model_type is None and archs is None:
        raise InputError(f"{where} names neither model_type nor architectures",
                         expected='a LLaMA config.json ("model_type": "llama", "architectures": ["LlamaForCausalLM"])',
                         fix="use the config.json of the LLaMA base model")
    if model_type is not None and model_type not in LLAMA_MODEL_TYPES:
        raise InputError(f"{where} describes a {model_type!r} model, not LLaMA",
                         expected='"model_type": "llama"', fix="point --base at a LLaMA base model")
    if archs is not None and (not isinstance(archs, list) or not LLAMA_ARCHITECTURES & set(map(str, archs))):
        raise InputError(f"{where} describes architectures {archs}, not LLaMA",
                         expected='"architectures": ["LlamaForCausalLM"]', fix="point --base at a LLaMA base model")
    return config


def _open_hf(path: Path, fmt: str, files: list[Path]) -> Checkpoint:
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has weight shards but no config.json", fix="download config.json with the model")
    config = require_llama_config(_read_json(path / "config.json"), path / "config.json")
    layout: dict[str, list[tuple[_Reader, str]]] = {}
    readers: dict[Path, _Reader] = {}
    for f in files:
        reader = readers[f] = open_tensor_file(f)
        for key in reader.keys():
            if names.is_ignored(key):
                continue
            if key in layout:
                raise InputError(f"tensor {key} appears in two shards of {path}", fix="re-download the model")
            layout[key] = [(reader, key)]
    stored = [k for f in sorted(files, key=lambda p: p.name) for k in readers[f].keys() if not names.is_ignored(k)]
    config = dict(config)
    if "torch_dtype" not in config and layout:
        first = next(iter(layout.values()))[0]
        config["torch_dtype"] = dtype_name(first[0].info(first[1])[0])
    return Checkpoint(path, fmt, config, _find_tokenizer_dir(path, path.parent), layout, files, stored)


_PART_RE = re.compile(r"consolidated\.(\d+)\.pth$")


def _open_meta(path: Path) -> Checkpoint:
    params = _read_json(path / "params.json")
    bad = [k for k in ("dim", "n_heads", "n_layers") if not isinstance(params, dict)
           or isinstance(params.get(k), bool) or not isinstance(params.get(k), int)]
    if bad:
        raise InputError(f"{path / 'params.json'} lacks integer {', '.join(bad)}",
                         expected='Meta\'s params.json ({"dim": 4096, "n_heads": 32, "n_layers": 32, ...})',
                         fix="use the params.json released with the consolidated.*.pth files")
    files = sorted(path.glob("consolidated.*.pth"), key=lambda p: int(_PART_RE.search(p.name).group(1)))
    readers = [_BinFile(f) for f in files]
    layout: dict[str, list[tuple[_Reader, str]]] = {}
    for key in readers[0].keys():
        if names.is_ignored(key):
            continue
        found = names.lookup(key, "meta")
        if found is None:
            raise InputError(f"{files[0]}: unknown tensor {key}", expected="a LLaMA consolidated checkpoint")
        missing = [str(r.path.name) for r in readers if key not in r.keys()]
        if missing:
            raise InputError(f"tensor {key} is missing from {', '.join(missing)}",
                             fix="all consolidated.NN.pth parts must come from the same model")
        layout[names.rename(key, src="meta", dst="hf")] = [(r, key) for r in readers]
    ckpt = Checkpoint(path, "meta", {}, None, layout, files)
    ckpt.config = meta_hf_config(params, ckpt._infos)
    ckpt._infos = ckpt._make_infos()  # now ordered by the real layer count
    ckpt.tokenizer_dir = _find_tokenizer_dir(path, path.parent)
    return ckpt


def meta_hf_config(params: dict, infos: dict[str, TensorInfo]) -> dict:
    """HF config.json for a Meta checkpoint; sizes the params omit are read from tensor shapes."""
    emb = infos["model.embed_tokens.weight"]
    dtype = emb.dtype
    vocab = params.get("vocab_size", -1)
    vocab = emb.shape[0] if vocab in (-1, None) else vocab
    heads = params["n_heads"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": params["dim"],
        "initializer_range": 0.02,
        "intermediate_size": infos["model.layers.0.mlp.gate_proj.weight"].shape[0],
        "max_position_embeddings": params.get("max_seq_len", 2048),
        "model_type": "llama",
        "num_attention_heads": heads,
        "num_hidden_layers": params["n_layers"],
        "num_key_value_heads": params.get("n_kv_heads") or heads,
        "pad_token_id": 0,
        "rms_norm_eps": params.get("norm_eps", 1e-6),
        "rope_theta": params.get("rope_theta", 10000.0),
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(dtype),
        "use_cache": True,
        "vocab_size": vocab,
    }
