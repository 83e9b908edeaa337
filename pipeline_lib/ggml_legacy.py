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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import names
from .errors import InputError
from .fsutil import atomic_write, check_disk_space, claim_output
from .gguf_check import open_gguf
from .gguf_export import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_UNKNOWN,
    TOKEN_USER_DEFINED,
    Hparams,
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


def legacy_vocab(tokens: Sequence[bytes], types: Sequence[int]) -> list[bytes]:
    """Token texts in the 2023 converter's spelling (scores are unchanged)."""
    texts: list[bytes] = []
    for tok, kind in zip(tokens, types, strict=True):
        piece = tok.decode("utf-8")
        if kind == TOKEN_USER_DEFINED:  # added tokens ([PAD]): text as is
            texts.append(tok)
        elif kind == TOKEN_UNKNOWN:
            texts.append(" \u2047 ".encode())
        elif kind == TOKEN_CONTROL:
            texts.append(b"")
        elif kind == TOKEN_BYTE:
            if len(piece) != 6 or not piece.startswith("<0x"):
                raise InputError(f"byte piece {piece!r} in the vocabulary", expected="<0xNN>")
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


@dataclass(frozen=True)
class _Item:
    meta_name: bytes
    shape: tuple[int, ...]  # numpy (row-major) order
    ggml_type: int
    nbytes: int


@dataclass
class _Plan:
    hp: Hparams
    texts: list[bytes]
    scores: list[float]
    items: list[_Item]
    arrays: Iterator[np.ndarray]  # float arrays in Meta layout, in ``items`` order


def _check_hparams(hp: Hparams) -> int:
    if hp.n_head_kv != hp.n_head:
        raise InputError(f"the model uses grouped-query attention ({hp.n_head_kv} kv heads for {hp.n_head} heads)",
                         expected="LLaMA-1 attention: ggjt v3 has no field for the kv head count",
                         fix="use the GGUF format")
    return find_n_mult(hp.n_ff, hp.n_embd)


def _plan_source(src, lt: LegacyType) -> _Plan:
    """From a TensorSource (HF layout): rename to Meta, permute q/k, as llama.cpp's 2023 converter."""
    hp = hparams_from_config(src.config)
    _check_hparams(hp)
    if src.tokenizer_dir is None:
        raise InputError("the model has no tokenizer folder", fix="copy tokenizer.model next to the weights")
    vocab = read_vocab(Path(src.tokenizer_dir))
    infos = [i for i in src.tensor_infos() if not names.is_ignored(i.name)]
    by_name = {i.name: i for i in infos}
    embed = by_name.get("model.embed_tokens.weight")
    check_vocab(hp, vocab, embed_rows=embed.shape[0] if embed else None, where=str(src.tokenizer_dir))
    want = expected_shapes(hp)
    bad = sorted(set(want) ^ set(by_name)) + [n for n, i in by_name.items() if n in want and tuple(i.shape) != want[n]]
    if bad:
        raise InputError(f"the checkpoint is not a {hp.n_layer}-layer LLaMA matching config.json: {bad[:4]}",
                         fix="check that the checkpoint is complete and that config.json belongs to it")
    items, heads_by_name = [], {}
    for info in infos:
        kind, _ = names.lookup(info.name, "hf")
        shape = tuple(info.shape)
        ggml_type = GGML_F32 if len(shape) == 1 else lt.ggml_type
        items.append(_Item(names.rename(info.name, src="hf", dst="meta").encode(), shape, ggml_type,
                           tensor_nbytes(shape, ggml_type)))
        heads_by_name[info.name] = names.heads_for(kind, n_head=hp.n_head, n_head_kv=hp.n_head_kv)
    order = [i.name for i in infos]

    def arrays() -> Iterator[np.ndarray]:
        done = 0
        for hf_name, tensor in src.iter_tensors():
            if names.is_ignored(hf_name):
                continue
            if done >= len(order) or hf_name != order[done]:
                raise InputError(f"the tensor stream yielded {hf_name} out of order")
            if heads_by_name[hf_name]:
                tensor = names.hf_to_meta_rotary(tensor, heads_by_name[hf_name])
            if tensor.dtype not in (torch.float16, torch.float32):
                tensor = tensor.to(torch.float32)
            done += 1
            yield tensor.contiguous().numpy()

    return _Plan(hp, legacy_vocab(vocab.tokens, vocab.types), list(vocab.scores), items, arrays())


def _plan_gguf(path: Path, lt: LegacyType) -> _Plan:
    """From a float GGUF (ours or llama.cpp's): names and layout are already llama.cpp's."""
    import gguf

    try:
        r = gguf.GGUFReader(path)
    except Exception as exc:
        raise InputError(f"{path} is not a readable GGUF file ({exc})") from exc

    def field(key: str, default=None):
        f = r.fields.get(key)
        return f.contents() if f is not None else default

    if field("general.architecture") != "llama":
        raise InputError(f"{path} holds a {field('general.architecture')!r} model", expected="llama")
    tokens = [t.encode("utf-8") for t in field("tokenizer.ggml.tokens", [])]
    n_head = field("llama.attention.head_count")
    hp = Hparams(n_vocab=len(tokens), n_embd=field("llama.embedding_length"), n_ff=field("llama.feed_forward_length"),
                 n_layer=field("llama.block_count"), n_head=n_head,
                 n_head_kv=field("llama.attention.head_count_kv", n_head),
                 n_ctx=field("llama.context_length", 2048), rms_eps=field("llama.attention.layer_norm_rms_epsilon"),
                 rope_theta=field("llama.rope.freq_base", 10000.0),
                 head_dim=field("llama.rope.dimension_count", field("llama.embedding_length") // n_head))
    _check_hparams(hp)
    float_types = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    items = []
    for t in r.tensors:
        if t.tensor_type not in float_types:
            raise InputError(f"{path}: tensor {t.name} is {t.tensor_type.name}",
                             expected="an f16 or f32 GGUF (re-quantizing a quantized file loses precision)",
                             fix="convert with --outtype f16 and export the legacy file from that")
        if names.lookup(t.name, "gguf") is None:
            raise InputError(f"{path}: unknown tensor {t.name}", expected="a LLaMA GGUF")
        shape = tuple(int(d) for d in reversed(t.shape))
        ggml_type = GGML_F32 if len(shape) == 1 else lt.ggml_type
        items.append(_Item(names.rename(t.name, src="gguf", dst="meta").encode(), shape, ggml_type,
                           tensor_nbytes(shape, ggml_type)))
    emb = next((i for i in items if i.meta_name == b"tok_embeddings.weight"), None)
    if emb is None or emb.shape[0] != hp.n_vocab or len(items) != 2 + 9 * hp.n_layer + 1:
        raise InputError(f"{path} is not a complete LLaMA GGUF with its vocabulary",
                         fix="convert the model again with zhllama convert")

    def arrays() -> Iterator[np.ndarray]:
        for t in r.tensors:
            yield np.asarray(t.data).reshape(tuple(int(d) for d in reversed(t.shape)))

    texts = legacy_vocab(tokens, [int(x) for x in field("tokenizer.ggml.token_type")])
    return _Plan(hp, texts, [float(x) for x in field("tokenizer.ggml.scores")], items, arrays())


def export(source, *, out: str | os.PathLike[str], qtype: str = "f16",
           on_progress: Callable[[int], None] | None = None, overwrite: bool = False) -> GgmlResult:
    """Write ``source`` as a ggjt v3 file of type ``qtype``.

    ``source``: an f16/f32 GGUF file (``*.gguf``), a TensorSource, or a checkpoint folder. The same
    model gives the same file from any of them. Checked before writing (``out`` is claimed first: an
    existing file is refused unless ``overwrite``, an input never); the file appears atomically.
    """
    import gguf

    t0 = time.perf_counter()
    if qtype not in LEGACY_TYPES:
        raise InputError(f"type {qtype!r} is not available in the legacy GGML format",
                         expected=" | ".join(LEGACY_TYPES),
                         fix="K-quants came with GGUF: use --format gguf and `zhllama quantize` for them")
    lt = LEGACY_TYPES[qtype]
    from_gguf = isinstance(source, (str, os.PathLike)) and Path(source).is_file()
    src = None if from_gguf else _as_source(source)[0]
    out = claim_output(out, kind="file", inputs=[source, src], overwrite=overwrite)
    if from_gguf:
        plan = _plan_gguf(open_gguf(source, role="GGUF")[0], lt)
    else:
        plan = _plan_source(src, lt)
    n_mult = _check_hparams(plan.hp)
    total = sum(i.nbytes for i in plan.items)
    check_disk_space(out.parent if out.parent.exists() else Path.cwd(), total + 64 * 1024 * 1024,
                     what=f"GGML file {out.name}")
    with atomic_write(out, "wb") as fh, bar(total, f"ggml {out.name}") as pbar:
        fh.write(_header(plan.hp, n_mult, lt.ftype, plan.texts, plan.scores))
        done = 0
        for array in plan.arrays:
            item = plan.items[done]
            if tuple(array.shape) != item.shape:
                raise InputError(f"tensor {item.meta_name.decode()} has shape {list(array.shape)}",
                                 expected=f"{list(item.shape)}")
            data = gguf.quants.quantize(array, gguf.GGMLQuantizationType(item.ggml_type))
            del array
            if data.nbytes != item.nbytes:
                raise AssertionError(f"{item.meta_name!r}: {data.nbytes} bytes, planned {item.nbytes}")  # our bug
            dims = tuple(reversed(item.shape))  # ggml order: ne[0] is the row length
            fh.write(struct.pack(f"<3i{len(dims)}i", len(dims), len(item.meta_name), item.ggml_type, *dims)
                     + item.meta_name)
            fh.write(b"\0" * (-fh.tell() % ALIGNMENT))
            fh.write(np.ascontiguousarray(data).tobytes())  # one tensor's bytes at a time
            done += 1
            pbar.update(item.nbytes)
            if on_progress is not None:
                on_progress(item.nbytes)
        if done != len(plan.items):
            raise InputError(f"the tensor stream ended after {done} of {len(plan.items)} tensors")
    return GgmlResult(path=out, qtype=qtype, n_tensors=len(plan.items), n_vocab=plan.hp.n_vocab, n_mult=n_mult,
                      file_bytes=out.stat().st_size, seconds=time.perf_counter() - t0)


export_ggml = export  # the name used in docs/tests before the GGUF input existed
