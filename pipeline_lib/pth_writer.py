"""Write a TensorSource in Meta's original layout: ``consolidated.NN.pth`` parts + ``params.json``,
byte for byte as the release's merge script wrote them.

Names become Meta's (names.TENSOR_KINDS), q/k are un-permuted from HF's rotary layout back to
Meta's, rotary ``inv_freq`` buffers are dropped, and each tensor is split along its
model-parallel axis into the release's part count (replicated where the table says ``None``):
``tok_embeddings`` on dim 1; ``output`` on dim 0, the last part taking the remainder when the
vocabulary does not divide (13B: 24976 + 24977); norms replicated; w1/w3/wv/wq/wk on dim 0, w2/wo
on dim 1. The part count comes from the hidden size in config.json (:data:`PARTS_BY_HIDDEN`:
4096 -> 1 (7B), 5120 -> 2 (13B), 6656 -> 4 (33B), 8192 -> 8 (65B); anything else 1) unless
``parts`` is given.

Every part is a plain ``dict`` in the source's order (the release's script builds one dict per
base shard and unions them in base-shard order: the same order, since the shards hold
consecutive runs of it), one storage per tensor, saved in the 2023 ``torch.save`` layout by
:mod:`pipeline_lib.torchsave`, whatever torch is installed. ``params.json`` is written as the
release's ``json.dump`` wrote it (``vocab_size: -1``, no trailing newline).

Streaming: all parts are planned from ``tensor_infos()`` (pickles and every record's offset), the
pickles are written up front and each tensor's slices are written at their offsets as the stream
yields it; memory is one tensor. The files load with ``torch.load(weights_only=True, mmap=True)``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from . import fsutil, names
from .checkpoint import TensorInfo, TensorSource
from .errors import InputError
from .hf_writer import copy_tokenizer_files
from .torchsave import STORAGE_TYPES, TensorEntry, TorchSaveWriter

PARTS_BY_HIDDEN: dict[int, int] = {4096: 1, 5120: 2, 6656: 4, 8192: 8}


def default_parts(config: dict) -> int:
    return PARTS_BY_HIDDEN.get(int(config["hidden_size"]), 1)


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
    """Write ``source`` as Meta ``consolidated.NN.pth`` parts + params.json (+ tokenizer files)."""
    cfg = source.config
    parts = parts or default_parts(cfg)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise InputError(f"--parts {parts!r} is not a part count", expected="a positive integer (7B: 1, 13B: 2)")
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    plan: list[tuple[TensorInfo, str, names.TensorKind, list[tuple[int, ...]]]] = []
    for info in source.tensor_infos():
        if names.is_ignored(info.name):
            continue  # rotary inv_freq: recomputed by every loader, dropped as the release does
        found = names.lookup(info.name, "hf")
        if found is None:
            raise InputError(f"tensor {info.name} has no Meta name", expected="a LLaMA model")
        kind, _ = found
        if info.dtype not in STORAGE_TYPES:
            raise InputError(f"tensor {info.name} has dtype {info.dtype}", expected="float16, bfloat16 or float32")
        axis = kind.meta_split_axis
        sizes = split_sizes(info.name, info.shape, axis, parts)
        shapes = [info.shape] * parts if sizes is None else [
            tuple(n if i == axis else d for i, d in enumerate(info.shape)) for n in sizes]
        plan.append((info, names.rename(info.name, src="hf", dst="meta"), kind, shapes))
    fnames = [f"consolidated.{i:02d}.pth" for i in range(parts)]
    part_entries = [[TensorEntry(meta, info.dtype, shapes[p]) for info, meta, _, shapes in plan] for p in range(parts)]
    if check_only:
        for fname, entries in zip(fnames, part_entries, strict=True):  # plans every record (sizes, offsets)
            TorchSaveWriter(Path(fname), entries)
        return []
    out = Path(out)
    with fsutil.atomic_dir(out, replace=overwrite) as tmp:
        with contextlib.ExitStack() as stack:  # closing writes each part's central directory and fsyncs it
            writers = [stack.enter_context(TorchSaveWriter(tmp / fname, entries))
                       for fname, entries in zip(fnames, part_entries, strict=True)]
            k = 0
            for name, t in source.iter_tensors():  # exhausted: the merge audit runs at its end
                if names.is_ignored(name):
                    continue
                if k >= len(plan):
                    raise RuntimeError(f"tensor stream has more tensors than planned: {name}")
                info, _meta, kind, shapes = plan[k]
                if name != info.name or tuple(t.shape) != info.shape or t.dtype != info.dtype:
                    raise RuntimeError(f"tensor stream out of step: got {name}, planned {info.name}")
                heads = names.heads_for(kind, n_head=n_head, n_head_kv=n_kv)
                if heads:
                    t = names.hf_to_meta_rotary(t, heads)
                axis = kind.meta_split_axis
                pieces = [t] * parts if axis is None else torch.split(t, [s[axis] for s in shapes], dim=axis)
                for w, piece, shape in zip(writers, pieces, shapes, strict=True):
                    if tuple(piece.shape) != shape:
                        raise RuntimeError(f"{name}: piece {tuple(piece.shape)} != planned {shape}")
                    w.write_storage(k, piece)  # its own storage: exactly this piece's bytes
                del t, pieces
                k += 1
                if progress is not None:
                    progress(info.nbytes)
            if k != len(plan):
                raise RuntimeError(f"tensor stream ended after {k} of {len(plan)} tensors")
        # as the release's json.dump(params, f): default separators, no trailing newline
        fsutil.write_text_atomic(tmp / "params.json", json.dumps(meta_params(cfg)))
        copy_tokenizer_files(source.tokenizer_dir, tmp)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(fsutil.TMP_PREFIX))
    return [out / n for n in written]
