"""Tensor fingerprints: the sha256 of every tensor's bytes, keyed by GGUF name, for HF, pth and float GGUF.

What is hashed is each tensor as llama.cpp's GGUF holds it, so that one model gives the same
fingerprint whichever format it is in, and two rebuilds can be compared without sharing 13 GB:

* the name is the GGUF name (``blk.0.attn_q.weight``, :mod:`pipeline_lib.names`);
* the layout is GGUF's: q/k in Meta's rotary order (un-permuted from HF's), Meta parts joined;
  the shape is recorded in row-major order (``[rows, cols]``, as HF and numpy write it);
* the bytes are little-endian, in the stored type, except that 1-D tensors (the norms) are hashed
  as float32, which is how llama.cpp's converter stores them (fp16 -> fp32 is exact, so an fp16 HF
  norm and its fp32 GGUF copy give the same digest).

So an fp16 HF folder, its pth and its f16 GGUF give equal fingerprints exactly when their bytes
are equal; an f32 or bf16 GGUF of the same model differs in every 2-D tensor (its bytes differ).
Quantized GGUFs are refused: their bytes are not the model's weights. The overall ``digest`` is
the sha256 of the lines ``name<TAB>dtype<TAB>shape<TAB>sha256`` sorted by name, so it does not
depend on file layout, shard boundaries, tensor order or torch version.

Streaming: one tensor at a time from the checkpoint readers, or straight from the GGUF's mapping.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import names
from .errors import InputError
from .fsutil import write_text_atomic

FORMAT_VERSION = 1

# torch dtype -> GGUF type name used in fingerprints (data, not an if-chain)
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
GGUF_FLOAT_TYPES = frozenset(DTYPE_NAMES.values())


@dataclass(frozen=True)
class TensorPrint:
    name: str  # GGUF name
    dtype: str  # F32 | F16 | BF16
    shape: tuple[int, ...]  # row-major
    sha256: str

    def line(self) -> str:
        return f"{self.name}\t{self.dtype}\t{'x'.join(map(str, self.shape))}\t{self.sha256}\n"


@dataclass(frozen=True)
class Fingerprint:
    source: str
    format: str  # hf-safetensors | hf-bin | meta | gguf | merge
    tensors: dict[str, TensorPrint] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.tensors):
            h.update(self.tensors[name].line().encode("utf-8"))
        return h.hexdigest()

    def to_json(self) -> dict:
        return {"version": FORMAT_VERSION, "source": self.source, "format": self.format, "digest": self.digest,
                "tensors": {n: {"dtype": t.dtype, "shape": list(t.shape), "sha256": t.sha256}
                            for n, t in self.tensors.items()}}

    def write(self, path: str | os.PathLike[str]) -> Path:
        write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def from_json(cls, data: object, *, where: str = "fingerprint") -> Fingerprint:
        try:
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
                raise ValueError(f"not a version-{FORMAT_VERSION} fingerprint")
            tensors = {n: TensorPrint(n, str(t["dtype"]), tuple(int(d) for d in t["shape"]), str(t["sha256"]))
                       for n, t in data["tensors"].items()}
            fp = cls(str(data.get("source", where)), str(data.get("format", "?")), tensors)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InputError(f"{where} is not a zhllama fingerprint ({exc})",
                             expected='the JSON written by `zhllama fingerprint PATH --out F.json`',
                             fix="write it again with zhllama fingerprint") from None
        if "digest" in data and data["digest"] != fp.digest:
            raise InputError(f"{where}: its digest does not match its tensors (edited or damaged)",
                             fix="write it again with zhllama fingerprint")
        return fp

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Fingerprint:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read fingerprint {path}: {exc}", fix="check the path") from None
        return cls.from_json(data, where=str(path))


def _sha256(buf) -> str:
    h = hashlib.sha256()
    view = memoryview(buf).cast("B")
    step = 64 << 20  # large blocks: hashlib releases the GIL on them
    for i in range(0, len(view), step):
        h.update(view[i:i + step])
    return h.hexdigest()


def _le_bytes(t: torch.Tensor) -> memoryview:
    t = t.contiguous()
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian hosts
        return memoryview(t.numpy().byteswap().view(np.uint8).reshape(-1))
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def tensor_print(hf_name: str, t: torch.Tensor, *, n_head: int, n_head_kv: int) -> TensorPrint:
    """The fingerprint of one tensor given in HF naming and layout."""
    found = names.lookup(hf_name, "hf")
    if found is None:
        raise InputError(f"tensor {hf_name} is not a LLaMA tensor", expected="the tensors of LlamaForCausalLM")
    kind, _ = found
    heads = names.heads_for(kind, n_head=n_head, n_head_kv=n_head_kv)
    if heads:
        t = names.hf_to_meta_rotary(t, heads)
    if t.dim() <= 1:
        t = t.to(torch.float32)  # llama.cpp stores 1-D tensors as F32
    if t.dtype not in DTYPE_NAMES:
        raise InputError(f"tensor {hf_name} has dtype {t.dtype}", expected="float16, bfloat16 or float32")
    return TensorPrint(names.rename(hf_name, src="hf", dst="gguf"), DTYPE_NAMES[t.dtype], tuple(t.shape),
                       _sha256(_le_bytes(t)))


def fingerprint_source(source, *, label: str, fmt: str) -> Fingerprint:
    """Fingerprint any TensorSource (a checkpoint, or a merge plan's stream), one tensor at a time."""
    cfg = source.config
    n_head = cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    out: dict[str, TensorPrint] = {}
    for name, t in source.iter_tensors():
        if names.is_ignored(name):
            continue
        tp = tensor_print(name, t, n_head=n_head, n_head_kv=n_kv)
        out[tp.name] = tp
        del t
    return Fingerprint(label, fmt, out)


def _gguf_tensors(path: Path) -> Iterator[TensorPrint]:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
        raise InputError(f"cannot read GGUF {path}: {exc}", fix="check that the file is a complete GGUF") from None
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in GGUF_FLOAT_TYPES:
            raise InputError(f"{path} holds {kind} tensors ({t.name})",
                             expected="a float GGUF (f16, bf16 or f32): quantized bytes are not the model's weights",
                             fix="fingerprint the f16 GGUF that was quantized")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        yield TensorPrint(t.name, kind, shape, _sha256(np.ascontiguousarray(t.data)))


def fingerprint(path: str | os.PathLike[str]) -> Fingerprint:
    """Fingerprint an HF folder, a Meta pth folder or a float GGUF file (see the module doc)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return Fingerprint(str(path), "gguf", {tp.name: tp for tp in _gguf_tensors(path)})
    if path.is_file() and path.suffix == ".json":
        return Fingerprint.read(path)
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    return fingerprint_source(ckpt, label=str(path), fmt=ckpt.format)


@dataclass(frozen=True)
class FingerprintDiff:
    a: Fingerprint
    b: Fingerprint
    same: tuple[str, ...]
    differ: tuple[str, ...]  # same dtype and shape, other bytes
    dtype_or_shape: tuple[str, ...]  # stored differently: not comparable byte for byte
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]

    @property
    def equal(self) -> bool:
        return not (self.differ or self.dtype_or_shape or self.only_a or self.only_b)

    def summary(self) -> str:
        if self.equal:
            return f"equal: all {len(self.same)} tensors have the same bytes (digest {self.a.digest[:16]}…)"
        parts = [f"{len(self.differ)} of {len(self.a.tensors)} tensors differ"]

        def some(xs: tuple[str, ...]) -> str:
            return ", ".join(xs[:4]) + (", …" if len(xs) > 4 else "")

        lines = []
        if self.differ:
            lines.append(f"  bytes differ: {some(self.differ)}")
        if self.dtype_or_shape:
            parts.append(f"{len(self.dtype_or_shape)} stored with another dtype or shape")
            lines.append("  dtype/shape: " + ", ".join(
                f"{n} ({self.a.tensors[n].dtype} {list(self.a.tensors[n].shape)} vs "
                f"{self.b.tensors[n].dtype} {list(self.b.tensors[n].shape)})" for n in self.dtype_or_shape[:3]))
        if self.only_a:
            parts.append(f"{len(self.only_a)} only in {self.a.source}")
            lines.append(f"  only in {self.a.source}: {some(self.only_a)}")
        if self.only_b:
            parts.append(f"{len(self.only_b)} only in {self.b.source}")
            lines.append(f"  only in {self.b.source}: {some(self.only_b)}")
        return "fingerprints differ: " + "; ".join(parts) + f" ({len(self.same)} equal)\n" + "\n".join(lines)


def compare(a: Fingerprint, b: Fingerprint) -> FingerprintDiff:
    same, differ, other = [], [], []
    for name, ta in a.tensors.items():
        tb = b.tensors.get(name)
        if tb is None:
            continue
        if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
            other.append(name)
        elif ta.sha256 == tb.sha256:
            same.append(name)
        else:
            differ.append(name)
    return FingerprintDiff(a, b, tuple(same), tuple(differ), tuple(other),
                           tuple(n for n in a.tensors if n not in b.tensors),
                           tuple(n for n in b.tensors if n not in a.tensors))
