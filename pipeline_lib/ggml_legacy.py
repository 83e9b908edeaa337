"""Legacy GGML export: the ggjt v3 file llama.cpp read until August 2023 (before GGUF).

Some 2023 tools (LlamaChat, early text-generation-webui, old llama.cpp builds) only read this
format. Layout (little-endian)::

    uint32 magic 'ggjt' (0x67676a74), uint32 version 3
    int32  n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    n_vocab x (uint32 len, bytes text, float32 score)
    per tensor: int32 n_dims, int32 name_len, int32 ggml_type, int32 ne[n_dims] (ne[0] = row length),
                name bytes, zero padding to a 32-byte file offset, tensor data

Tensors use Meta's names (``layers.0.attention.wq.weight``) and Meta's rotary layout (the same q/k
permutation as GGUF). 2-D weights are stored in the chosen type, 1-D norms in f32 (a "pure"
quantization: every 2-D tensor, embeddings and output included, has the same type). The quant
block layouts of ggjt v3 (f16, q4_0, q4_1, q5_0, q5_1, q8_0) are those of today's ggml, so the
blocks are computed with gguf-py's reference quantizers, which equal llama.cpp's C code bit for bit
(tests check this against ``llama_model_quantize(pure=True)``).

The vocabulary is written as the 2023 converter wrote it: spaces instead of ``▁``, byte pieces as
the raw byte, control pieces empty, ``<unk>`` as `` ⁇ ``, added tokens (``[PAD]``) score -1000.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import names
from .errors import InputError
from .fsutil import atomic_write, check_disk_space
from .gguf_export import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_UNKNOWN,
    Hparams,
    Vocab,
    _as_source,
    check_vocab,
    expected_shapes,
    hparams_from_config,
    read_vocab,
    tensor_nbytes,
)
from .progress import bar

log = logging.getLogger(__name__)

GGJT_MAGIC = 0x67676A74
GGJT_VERSION = 3
ALIGNMENT = 32
GGML_F32 = 0


@dataclass(frozen=True)
class LegacyType:
    ggml_type: int  # enum ggml_type (same numbers in ggjt v3 and GGUF)
    ftype: int  # enum llama_ftype of the 2023 loader


# type name -> (ggml type of the 2-D weights, file ftype), as data
LEGACY_TYPES: dict[str, LegacyType] = {
    "f16": LegacyType(1, 1),
    "q4_0": LegacyType(2, 2),
    "q4_1": LegacyType(3, 3),
    "q5_0": LegacyType(6, 8),
    "q5_1": LegacyType(7, 9),
    "q8_0": LegacyType(8, 7),
}


def find_n_mult(n_ff: int, n_embd: int) -> int:
    """The ``n_mult`` from which a 2023 loader recomputes n_ff: ceil(8*n_embd/3 / n_mult) * n_mult.

    LLaMA's own 256 is preferred; InputError when no value reproduces ``n_ff`` (the 2023 loader
    would then build a model of the wrong shape).
    """
    def calc(m: int) -> int:
        return ((8 * n_embd) // 3 + m - 1) // m * m

    for m in (256, *range(8192, 0, -1)):
        if calc(m) == n_ff:
            return m
    raise InputError(f"feed-forward size {n_ff} cannot be written in a ggjt v3 file for hidden size {n_embd}",
                     expected="n_ff = ceil(8*hidden/3 / n_mult) * n_mult for some n_mult (11008 for 7B, 13824 for 13B)",
                     fix="use the GGUF format (zhllama convert without --format ggml)")


def legacy_vocab(vocab: Vocab) -> list[bytes]:
    """Token texts in the 2023 converter's spelling (scores are unchanged)."""
    texts: list[bytes] = []
    for i, (tok, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True)):
        piece = tok.decode("utf-8")
        if i >= vocab.sp_pieces:  # added token: text as is
            texts.append(tok)
        elif kind == TOKEN_UNKNOWN:
            texts.append(" \u2047 ".encode())
        elif kind == TOKEN_CONTROL:
            texts.append(b"")
        elif kind == TOKEN_BYTE:
            if len(piece) != 6 or not piece.startswith("<0x"):
                raise InputError(f"byte piece {piece!r} in tokenizer.model", expected="<0xNN>")
            texts.append(bytes([int(piece[3:-1], 16)]))
        else:
            texts.append(piece.replace("\u2581", " ").encode("utf-8"))
    return texts


@dataclass(frozen=True)
class GgmlResult:
    path: Path
    qtype: str
    n_tensors: int
    n_vocab: int
    n_mult: int
    file_bytes: int
    seconds: float


def _header(hp: Hparams, n_mult: int, ftype: int, texts: list[bytes], scores: list[float]) -> bytes:
    parts = [struct.pack("<II", GGJT_MAGIC, GGJT_VERSION),
             struct.pack("<7i", hp.n_vocab, hp.n_embd, n_mult, hp.n_head, hp.n_layer, hp.head_dim, ftype)]
    for text, score in zip(texts, scores, strict=True):
        parts.append(struct.pack("<I", len(text)) + text + struct.pack("<f", score))
    return b"".join(parts)


def export_ggml(source, *, out: str | os.PathLike[str], qtype: str = "f16",
                on_progress: Callable[[int], None] | None = None) -> GgmlResult:
    """Write ``source`` (TensorSource or checkpoint folder) as a ggjt v3 file of type ``qtype``."""
    import gguf

    t0 = time.perf_counter()
    if qtype not in LEGACY_TYPES:
        raise InputError(f"type {qtype!r} is not available in the legacy GGML format",
                         expected=" | ".join(LEGACY_TYPES),
                         fix="K-quants came with GGUF: use --format gguf and `zhllama quantize` for them")
    lt = LEGACY_TYPES[qtype]
    src, _ = _as_source(source)
    hp = hparams_from_config(src.config)
    if hp.n_head_kv != hp.n_head:
        raise InputError(f"the model uses grouped-query attention ({hp.n_head_kv} kv heads for {hp.n_head} heads)",
                         expected="LLaMA-1 attention: ggjt v3 has no field for the kv head count",
                         fix="use the GGUF format")
    n_mult = find_n_mult(hp.n_ff, hp.n_embd)
    if src.tokenizer_dir is None:
        raise InputError("the model has no tokenizer folder", fix="copy tokenizer.model next to the weights")
    vocab = read_vocab(Path(src.tokenizer_dir))
    texts, scores = legacy_vocab(vocab), list(vocab.scores)
    infos = [i for i in src.tensor_infos() if not names.is_ignored(i.name)]
    by_name = {i.name: i for i in infos}
    embed = by_name.get("model.embed_tokens.weight")
    check_vocab(hp, vocab, embed_rows=embed.shape[0] if embed else None,
                where=str(src.tokenizer_dir))
    want = expected_shapes(hp)
    bad = sorted(set(want) ^ set(by_name)) + [n for n, i in by_name.items() if n in want and tuple(i.shape) != want[n]]
    if bad:
        raise InputError(f"the checkpoint is not a {hp.n_layer}-layer LLaMA matching config.json: {bad[:4]}",
                         fix="check that the checkpoint is complete and that config.json belongs to it")
    plan = []
    for info in infos:
        kind, _ = names.lookup(info.name, "hf")
        shape = tuple(info.shape)
        ggml_type = GGML_F32 if len(shape) == 1 else lt.ggml_type
        plan.append((info.name, names.rename(info.name, src="hf", dst="meta").encode(), shape, ggml_type,
                     tensor_nbytes(shape, ggml_type), names.heads_for(kind, n_head=hp.n_head, n_head_kv=hp.n_head_kv)))
    total = sum(p[4] for p in plan)
    out = Path(out)
    check_disk_space(out.parent if out.parent.exists() else Path.cwd(), total + 64 * 1024 * 1024,
                     what=f"GGML file {out.name}")
    with atomic_write(out, "wb") as fh, bar(total, f"ggml {out.name}") as pbar:
        fh.write(_header(hp, n_mult, lt.ftype, texts, scores))
        done = 0
        for hf_name, tensor in src.iter_tensors():
            if names.is_ignored(hf_name):
                continue
            if done >= len(plan) or hf_name != plan[done][0]:
                raise InputError(f"the tensor stream yielded {hf_name} out of order")
            _, meta_name, shape, ggml_type, nbytes, heads = plan[done]
            if heads:
                tensor = names.hf_to_meta_rotary(tensor, heads)
            if tensor.dtype not in (torch.float16, torch.float32):
                tensor = tensor.to(torch.float32)
            data = gguf.quants.quantize(tensor.contiguous().numpy(), gguf.GGMLQuantizationType(ggml_type))
            del tensor
            if data.nbytes != nbytes:
                raise AssertionError(f"{hf_name}: {data.nbytes} bytes, planned {nbytes}")  # our bug, not input
            dims = tuple(reversed(shape))  # ggml order: ne[0] is the row length
            fh.write(struct.pack(f"<3i{len(dims)}i", len(dims), len(meta_name), ggml_type, *dims) + meta_name)
            pad = -fh.tell() % ALIGNMENT
            fh.write(b"\0" * pad)
            fh.write(np.ascontiguousarray(data).tobytes())  # one tensor's bytes at a time
            done += 1
            pbar.update(nbytes)
            if on_progress is not None:
                on_progress(nbytes)
        if done != len(plan):
            raise InputError(f"the tensor stream ended after {done} of {len(plan)} tensors")
    return GgmlResult(path=out, qtype=qtype, n_tensors=len(plan), n_vocab=hp.n_vocab, n_mult=n_mult,
                      file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0)
