"""Write a TensorSource in Meta's original layout: ``consolidated.NN.pth`` parts + ``params.json``.

Names become Meta's (names.TENSOR_KINDS), q/k are un-permuted from HF's rotary layout back to
Meta's, and each tensor is split along its model-parallel axis into the release's part count
(replicated where the table says ``None``). The part count comes from the hidden size in
config.json (:data:`PARTS_BY_HIDDEN`: 4096 -> 1 (7B), 5120 -> 2 (13B), 6656 -> 4 (33B),
8192 -> 8 (65B); anything else 1) unless ``parts`` is given.

Streaming: all parts are open at once as PyTorch zip archives (torch's own ``PyTorchFileWriter``,
so the files are ordinary ``torch.save`` files, 64-byte aligned and loadable with
``torch.load(weights_only=True, mmap=True)``); the pickled index is written up front from
``tensor_infos()`` and each tensor's slices are appended as the stream yields it.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

from . import fsutil, names
from .checkpoint import TensorInfo, TensorSource
from .errors import InputError
from .hf_writer import copy_tokenizer_files

PARTS_BY_HIDDEN: dict[int, int] = {4096: 1, 5120: 2, 6656: 4, 8192: 8}

# torch.save's storage class names per dtype (what the pickle references)
_STORAGE_TYPES: dict[torch.dtype, str] = {
    torch.float16: "HalfStorage", torch.bfloat16: "BFloat16Storage", torch.float32: "FloatStorage",
}


def default_parts(config: dict) -> int:
    return PARTS_BY_HIDDEN.get(int(config["hidden_size"]), 1)


class _StorageRef:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.dtype, self.numel = key, dtype, numel


class _TensorRef:
    """Pickles exactly as a contiguous tensor does (``_rebuild_tensor_v2`` over a storage)."""

    def __init__(self, storage: _StorageRef, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = storage, shape

    def __reduce_ex__(self, protocol):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.insert(0, acc)
            acc *= d
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, 0, torch.Size(self.shape), tuple(stride), False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            return ("storage", getattr(torch, _STORAGE_TYPES[obj.dtype]), obj.key, "cpu", obj.numel)
        return None


# Tensors whose split axis may be uneven: the enlarged vocabulary (49953 rows) does not divide by 2.
# Like the release's script, the last part takes the remainder (13B: 24976 + 24977 rows).
UNEVEN_OK = frozenset({"lm_head.weight"})


def split_sizes(name: str, shape: tuple[int, ...], axis: int | None, parts: int) -> list[int] | None:
    """Sizes along ``axis`` of each part (None: replicated); InputError if it cannot be split."""
    if axis is None:
        return None
    n = shape[axis]
    if n % parts and name not in UNEVEN_OK:
        raise InputError(f"cannot split {name} {shape} into {parts} parts along axis {axis}",
                         fix="choose a part count that divides the model's sizes (--parts)")
    sizes = [n // parts] * parts
    sizes[-1] += n % parts
    return sizes


def meta_params(config: dict) -> dict:
    """params.json as Meta's release and the Chinese-LLaMA merge script wrote it."""
    params = {"dim": config["hidden_size"], "multiple_of": 256, "n_heads": config["num_attention_heads"],
              "n_layers": config["num_hidden_layers"], "norm_eps": config.get("rms_norm_eps", 1e-6),
              "vocab_size": -1}
    kv = config.get("num_key_value_heads")
    if kv and kv != config["num_attention_heads"]:
        params["n_kv_heads"] = kv
    return params


def write_pth(source: TensorSource, *, out: str | Path, parts: int | None = None, overwrite: bool = False,
              progress: Callable[[int], None] | None = None, check_only: bool = False) -> list[Path]:
    """Write ``source`` as Meta ``consolidated.NN.pth`` parts + params.json (+ tokenizer.model)."""
    cfg = source.config
    parts = parts or default_parts(cfg)
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    infos = source.tensor_infos()
    plan: list[tuple[TensorInfo, str, names.TensorKind, list[tuple[int, ...]]]] = []
    for info in infos:
        found = names.lookup(info.name, "hf")
        if found is None:
            raise InputError(f"tensor {info.name} has no Meta name", expected="a LLaMA model")
        kind, _ = found
        if info.dtype not in _STORAGE_TYPES:
            raise InputError(f"tensor {info.name} has dtype {info.dtype}", expected="float16, bfloat16 or float32")
        axis = kind.meta_split_axis
        sizes = split_sizes(info.name, info.shape, axis, parts)
        shapes = [info.shape] * parts if sizes is None else [
            tuple(n if i == axis else d for i, d in enumerate(info.shape)) for n in sizes]
        plan.append((info, names.rename(info.name, src="hf", dst="meta"), kind, shapes))
    if check_only:
        return []
    out = Path(out)
    fnames = [f"consolidated.{i:02d}.pth" for i in range(parts)]
    with fsutil.atomic_dir(out, replace=overwrite) as tmp:
        writers = []
        for p, fname in enumerate(fnames):
            w = torch._C.PyTorchFileWriter(str(tmp / fname))
            index = {meta: _TensorRef(_StorageRef(str(k), info.dtype, _numel(shapes[p])), shapes[p])
                     for k, (info, meta, _, shapes) in enumerate(plan)}
            buf = io.BytesIO()
            _Pickler(buf, protocol=2).dump(index)
            data = buf.getvalue()
            w.write_record("data.pkl", data, len(data))
            w.write_record(".format_version", "1", 1)
            w.write_record(".storage_alignment", "64", 2)
            w.write_record("byteorder", "little", 6)
            writers.append(w)
        stream = source.iter_tensors()
        for k, (info, _meta, kind, shapes) in enumerate(plan):
            name, t = next(stream)
            if name != info.name or tuple(t.shape) != info.shape or t.dtype != info.dtype:
                raise RuntimeError(f"tensor stream out of step: got {name}, planned {info.name}")
            heads = names.heads_for(kind, n_head=n_head, n_head_kv=n_kv)
            if heads:
                t = names.hf_to_meta_rotary(t, heads)
            axis = kind.meta_split_axis
            pieces = [t] * parts if axis is None else torch.split(t, [s[axis] for s in shapes], dim=axis)
            for w, piece, shape in zip(writers, pieces, shapes, strict=True):
                piece = piece.contiguous()
                if piece.storage_offset() or piece.untyped_storage().nbytes() != piece.numel() * piece.element_size():
                    piece = piece.clone()  # a record holds exactly this piece, not the whole tensor's storage
                if tuple(piece.shape) != shape:
                    raise RuntimeError(f"{name}: piece {tuple(piece.shape)} != planned {shape}")
                storage = piece.untyped_storage()
                w.write_record(f"data/{k}", storage, storage.nbytes())
            del t, pieces
            if progress is not None:
                progress(info.nbytes)
        for w in writers:
            w.write_end_of_file()
        for fname in fnames:  # PyTorchFileWriter does not fsync
            with open(tmp / fname, "rb") as fh:
                os.fsync(fh.fileno())
        fsutil.write_text_atomic(tmp / "params.json", json.dumps(meta_params(cfg)) + "\n")
        copy_tokenizer_files(source.tokenizer_dir, tmp)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(fsutil.TMP_PREFIX))
    return [out / n for n in written]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
