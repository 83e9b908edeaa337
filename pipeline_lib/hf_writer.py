"""Write a TensorSource as an HF LLaMA folder: sharded safetensors + index + config + tokenizer files.

Streaming: every shard's header is computed from ``tensor_infos()`` up front, so each tensor is
written the moment the stream yields it and then freed; memory is one tensor, whatever the model
size. The folder is built under a temporary name and renamed into place when complete.

Written: ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, ``config.json``
(the source's config: new ``vocab_size`` and ``torch_dtype``), ``generation_config.json`` (the
base's, or LLaMA's defaults), and the tokenizer files of ``source.tokenizer_dir`` copied byte for
byte (``tokenizer.model`` and friends; transformers 5 would write only ``tokenizer.json``, after
which llama.cpp's converter falls back to placeholder scores).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from . import fsutil
from .checkpoint import SAFETENSORS_NAMES, TensorInfo, TensorSource

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json", "special_tokens_map.json")
DEFAULT_GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
INDEX_NAME = "model.safetensors.index.json"


def plan_shards(infos: list[TensorInfo], max_shard_size: int) -> list[list[TensorInfo]]:
    """Greedy packing in write order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return [s for s in shards if s]


def safetensors_header(infos: list[TensorInfo]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for info in infos:
        header[info.name] = {"dtype": SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    return memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _check_tensor(info: TensorInfo, name: str, t: torch.Tensor) -> None:
    if name != info.name or tuple(t.shape) != tuple(info.shape) or t.dtype != info.dtype:
        raise RuntimeError(f"tensor stream out of step with its plan: got {name} {tuple(t.shape)} {t.dtype}, "
                           f"planned {info.name} {info.shape} {info.dtype}")


def _base_folder(source: TensorSource) -> Path | None:
    base = getattr(source, "base", source)
    p = getattr(base, "path", None)
    return Path(p) if p is not None else None


def write_hf(source: TensorSource, *, out: str | Path, max_shard_size: int = 2 * 10**9, overwrite: bool = False,
             progress: Callable[[int], None] | None = None, check_only: bool = False) -> list[Path]:
    """Write ``source`` to the folder ``out``; returns the written files. ``check_only``: validate only."""
    infos = source.tensor_infos()
    bad = [i.name for i in infos if i.dtype not in SAFETENSORS_NAMES]
    if bad:
        raise ValueError(f"cannot write tensors {bad[:3]} to safetensors")
    shards = plan_shards(infos, max_shard_size)
    if check_only:
        return []
    out = Path(out)
    n = len(shards)
    fnames = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    stream = source.iter_tensors()
    with fsutil.atomic_dir(out, replace=overwrite) as tmp:
        weight_map = {}
        for fname, shard in zip(fnames, shards, strict=True):
            with open(tmp / fname, "wb") as fh:
                fh.write(safetensors_header(shard))
                for info in shard:
                    name, t = next(stream)
                    _check_tensor(info, name, t)
                    fh.write(tensor_bytes(t))
                    weight_map[name] = fname
                    del t
                    if progress is not None:
                        progress(info.nbytes)
                fh.flush()
                os.fsync(fh.fileno())
        leftover = next(stream, None)
        if leftover is not None:
            raise RuntimeError(f"tensor stream has more tensors than planned: {leftover[0]}")
        total = sum(i.nbytes for i in infos)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        fsutil.write_text_atomic(tmp / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        fsutil.write_text_atomic(tmp / "config.json", json.dumps(source.config, indent=2) + "\n")
        base = _base_folder(source)
        gen = base / "generation_config.json" if base is not None else None
        if gen is not None and gen.is_file():
            fsutil.write_bytes_atomic(tmp / "generation_config.json", gen.read_bytes())
        else:
            fsutil.write_text_atomic(tmp / "generation_config.json",
                                     json.dumps(DEFAULT_GENERATION_CONFIG, indent=2) + "\n")
        copy_tokenizer_files(source.tokenizer_dir, tmp)
        written = sorted(p.name for p in tmp.iterdir() if not p.name.startswith(fsutil.TMP_PREFIX))
    return [out / name for name in written]


def copy_tokenizer_files(src: Path | None, dst: Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` byte for byte."""
    copied = []
    if src is None:
        return copied
    for fname in TOKENIZER_FILES:
        if (Path(src) / fname).is_file():
            fsutil.write_bytes_atomic(dst / fname, (Path(src) / fname).read_bytes())
            copied.append(fname)
    return copied
