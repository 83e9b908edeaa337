"""GGUF conversion: a LLaMA tensor stream (HF layout) -> one GGUF file that llama.cpp loads.

Contract: for the same HF folder the file equals what llama.cpp's own ``convert_hf_to_gguf.py``
(llama-cpp-python 0.3.36's vendored copy) writes — tensor for tensor (names, shapes, types,
bytes) and in every ``llama.*`` and ``tokenizer.*`` key — and, given the same ``general.name``
and shards stored in LLaMA's tensor order (2023 ``.bin``), byte for byte. Deliberate differences
(see docs/gguf.md):

* ``general.*`` descriptive keys: we write ``general.name`` (argument or folder name) and
  ``general.size_label``; llama.cpp also guesses basename/finetune/version from folder names.
* Tensor order is LLaMA's canonical order (the source's); llama.cpp follows the shards' storage
  order (alphabetical in safetensors). The loader finds tensors by name.
* We refuse a model whose config ``vocab_size``, embedding rows and tokenizer disagree, where
  llama.cpp silently pads the vocabulary with ``[PADn]`` placeholders or drops tokens.

The input is a TensorSource (pipeline_lib.checkpoint / pipeline_lib.merge): ``config``,
``tokenizer_dir``, ``tensor_infos()``, ``iter_tensors()``. The model is streamed: tensor infos are
planned first, then each tensor is converted and written as it arrives, so peak memory is one
tensor (plus the GGUF header), never the model. The output is atomic (``.tmp-*`` then rename).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import iobuf, names
from .errors import InputError
from .fsutil import atomic_path, check_disk_space, claim_output
from .progress import bar

log = logging.getLogger(__name__)

ARCH = "llama"


@dataclass(frozen=True)
class OutType:
    name: str
    qtype: int  # gguf.GGMLQuantizationType of 2-D weights
    file_type: int  # gguf.LlamaFileType written as general.file_type


def _gguf():
    import gguf  # imported lazily: the CLI's --help stays fast

    return gguf


# outtype name -> (tensor type of the 2-D weights, general.file_type). Values as in gguf.constants.
OUTTYPES: dict[str, OutType] = {
    "f32": OutType("f32", 0, 0),  # GGMLQuantizationType.F32, LlamaFileType.ALL_F32
    "f16": OutType("f16", 1, 1),  # F16, MOSTLY_F16
    "bf16": OutType("bf16", 30, 32),  # BF16, MOSTLY_BF16
    "q8_0": OutType("q8_0", 8, 7),  # Q8_0, MOSTLY_Q8_0
}

# sentencepiece piece kinds -> gguf.TokenType values (the reference's SentencePieceTokenTypes)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
ADDED_TOKEN_SCORE = -1000.0
# Special-token kinds looked up as ``<kind>_token_id`` in config.json, in this order (as gguf.SpecialVocab).
SPECIAL_TOKEN_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
# transformers' LlamaConfig defaults for fields a 2023 config.json may lack (llama.cpp's converter
# reads config.json through AutoConfig, so these defaults reach its output too).
LLAMA_CONFIG_DEFAULTS: dict[str, Any] = {
    "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "bos_token_id": 1, "eos_token_id": 2,
}


# ------------------------------------------------------------------ tokenizer


@dataclass(frozen=True)
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    sp_pieces: int  # pieces in tokenizer.model
    added: dict[str, int]  # added tokens (added_tokens.json / tokenizer_config added_tokens_decoder)

    def __len__(self) -> int:
        return len(self.tokens)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}", fix="check that the file is complete JSON") from exc


def read_vocab(tokenizer_dir: str | Path) -> Vocab:
    """Tokens, scores and types from ``tokenizer.model`` itself, plus the folder's added tokens.

    Scores and types come from sentencepiece (never from tokenizer.json, whose scores are
    placeholders). Added tokens (``added_tokens.json``, ``tokenizer_config.json``'s
    ``added_tokens_decoder``) get score -1000 and type user-defined (control when marked special),
    exactly as llama.cpp's converter does.
    """
    from sentencepiece import SentencePieceProcessor

    tokenizer_dir = Path(tokenizer_dir)
    model = tokenizer_dir / "tokenizer.model"
    if not model.is_file():
        raise InputError(f"no tokenizer.model in {tokenizer_dir}",
                         expected="the sentencepiece tokenizer.model of the model being converted",
                         fix="copy the tokenizer files (tokenizer.model, tokenizer_config.json, ...) into the folder")
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(model))
    except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
        raise InputError(f"{model} is not a readable sentencepiece model ({exc})",
                         fix="check that the file is complete (run `zhllama verify` on it)") from exc
    n_sp = sp.vocab_size()
    tokens: list[bytes] = []
    scores: list[float] = []
    types: list[int] = []
    for i in range(n_sp):
        if sp.IsUnknown(i):
            kind = TOKEN_UNKNOWN
        elif sp.IsControl(i):
            kind = TOKEN_CONTROL
        elif sp.IsUnused(i):
            kind = TOKEN_UNUSED
        elif sp.IsByte(i):
            kind = TOKEN_BYTE
        else:
            kind = TOKEN_NORMAL
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(kind)

    # Added tokens, in the order and with the precedence llama.cpp's converter applies them.
    updates: list[tuple[int, bytes, int]] = []
    added: dict[str, int] = {}
    added_file = tokenizer_dir / "added_tokens.json"
    if added_file.is_file():
        for text, tid in _read_json(added_file).items():
            updates.append((int(tid), text.encode("utf-8"), TOKEN_USER_DEFINED))
            added[text] = int(tid)
    config_file = tokenizer_dir / "tokenizer_config.json"
    if config_file.is_file():
        for tid, data in (_read_json(config_file).get("added_tokens_decoder") or {}).items():
            text = data["content"]
            if data.get("special") or _looks_special(text):
                kind = TOKEN_CONTROL
            else:
                text = text.replace("\u2581", " ")  # user-defined spaces are stored pre-normalised
                kind = TOKEN_USER_DEFINED
            updates.append((int(tid), text.encode("utf-8"), kind))
            added[text] = int(tid)
    n = max([n_sp] + [tid + 1 for tid, _, _ in updates])
    if n > n_sp:
        gaps = sorted(set(range(n_sp, n)) - {tid for tid, _, _ in updates})
        if gaps:
            raise InputError(f"added tokens in {tokenizer_dir} leave ids {gaps[:5]} unassigned",
                             expected=f"added token ids that continue tokenizer.model's {n_sp} pieces without gaps",
                             fix="fix added_tokens.json / tokenizer_config.json")
        tokens += [b""] * (n - n_sp)
        scores += [0.0] * (n - n_sp)
        types += [TOKEN_UNUSED] * (n - n_sp)
    for tid, text, kind in updates:
        tokens[tid], scores[tid], types[tid] = text, ADDED_TOKEN_SCORE, kind
    return Vocab(tokens=tokens, scores=scores, types=types, sp_pieces=n_sp, added=added)


def _looks_special(text: str) -> bool:
    # the converter's heuristic for added tokens that ought to be control tokens
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def special_tokens(config: dict, tokenizer_dir: Path, n_vocab: int) -> tuple[dict[str, int], dict[str, bool], Any]:
    """(special token ids, add_<kind>_token flags, chat template) as llama.cpp's converter derives them.

    Without a tokenizer.json (the 2023 sentencepiece folders) the ids come from config.json's
    ``<kind>_token_id`` fields and the add flags from tokenizer_config.json.
    """
    tok_config = {}
    if (tokenizer_dir / "tokenizer_config.json").is_file():
        tok_config = _read_json(tokenizer_dir / "tokenizer_config.json")
    cfg = {**LLAMA_CONFIG_DEFAULTS, **config}
    ids: dict[str, int] = {}
    for kind in SPECIAL_TOKEN_KINDS:
        tid = cfg.get(f"{kind}_token_id")
        if isinstance(tid, bool) or not isinstance(tid, int):
            continue
        if tid < 0:
            raise InputError(f"config.json has {kind}_token_id = {tid}", expected="a token id >= 0")
        if tid < n_vocab:
            ids[kind] = tid
        else:
            log.warning("config.json %s_token_id %d is outside the vocabulary (%d); not written", kind, tid, n_vocab)
    flags = {kind: tok_config[f"add_{kind}_token"] for kind in SPECIAL_TOKEN_KINDS
             if isinstance(tok_config.get(f"add_{kind}_token"), bool)}
    template = tok_config.get("chat_template")
    if template is None and tok_config and (tokenizer_dir / "chat_template.jinja").is_file():
        template = (tokenizer_dir / "chat_template.jinja").read_text(encoding="utf-8")
    return ids, flags, template


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class TensorPlan:
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]  # numpy (row-major) order, as HF stores it
    qtype: int  # gguf.GGMLQuantizationType written
    nbytes: int
    permute_heads: int | None  # rotary permutation head count (q: heads, k: kv heads)


@dataclass(frozen=True)
class Hparams:
    n_vocab: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    head_dim: int


@dataclass(frozen=True)
class ConvertPlan:
    """Everything checked before a byte is written."""

    hparams: Hparams
    outtype: OutType
    vocab: Vocab
    special_ids: dict[str, int]
    add_flags: dict[str, bool]
    chat_template: Any
    add_space_prefix: bool | None
    tensors: tuple[TensorPlan, ...]
    name: str
    n_params: int

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def hparams_from_config(config: dict) -> Hparams:
    """LLaMA hyperparameters from a config.json dict (shapes come from config.json, never a size table)."""
    cfg = {**LLAMA_CONFIG_DEFAULTS, **config}
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(cfg.get(k), int)]
    if missing:
        raise InputError(f"config.json lacks {', '.join(missing)}", expected="a LLaMA config.json (LlamaForCausalLM)",
                         fix="use the config.json written with the model")
    archs = cfg.get("architectures") or ["LlamaForCausalLM"]
    if cfg.get("model_type", "llama") != "llama" or not any(a in ("LlamaForCausalLM", "LLaMAForCausalLM") for a in archs):
        raise InputError(f"config.json describes {archs} (model_type {cfg.get('model_type')!r})",
                         expected="a LLaMA model (LlamaForCausalLM)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in (None, "default"):
        raise InputError(f"config.json asks for RoPE scaling {rope_type!r}",
                         expected="plain RoPE, as the Chinese-LLaMA/Alpaca models use")
    n_head = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    theta = config.get("rope_theta") or rope.get("rope_theta") or LLAMA_CONFIG_DEFAULTS["rope_theta"]
    return Hparams(
        n_vocab=cfg["vocab_size"], n_embd=cfg["hidden_size"], n_ff=cfg["intermediate_size"],
        n_layer=cfg["num_hidden_layers"], n_head=n_head, n_head_kv=cfg.get("num_key_value_heads") or n_head,
        n_ctx=cfg["max_position_embeddings"], rms_eps=float(cfg["rms_norm_eps"]), rope_theta=float(theta),
        head_dim=head_dim,
    )


def expected_shapes(hp: Hparams) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> HF shape for these hyperparameters."""
    h, kv = hp.n_embd, hp.n_head_kv * hp.head_dim
    by_suffix = {
        "embed_tokens.weight": (hp.n_vocab, h), "lm_head.weight": (hp.n_vocab, h), "norm.weight": (h,),
        "q_proj.weight": (hp.n_head * hp.head_dim, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
        "o_proj.weight": (h, hp.n_head * hp.head_dim), "gate_proj.weight": (hp.n_ff, h),
        "up_proj.weight": (hp.n_ff, h), "down_proj.weight": (h, hp.n_ff), "layernorm.weight": (h,),
    }
    return {n: next(s for suffix, s in by_suffix.items() if n.endswith(suffix)) for n in names.hf_names(hp.n_layer)}


def tensor_qtype(gguf_name: str, shape: Sequence[int], outtype: OutType) -> int:
    """The type llama.cpp's converter gives a tensor: 1-D and norms f32, the rest ``outtype``.

    Q8_0 falls back to f16 for rows that are not a multiple of its 32-element block (as llama.cpp).
    """
    gguf = _gguf()
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return int(gguf.GGMLQuantizationType.F32)
    qtype = outtype.qtype
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    if shape[-1] % block != 0:
        return int(gguf.GGMLQuantizationType.F16)
    return qtype


def tensor_nbytes(shape: Sequence[int], qtype: int) -> int:
    gguf = _gguf()
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    n = int(np.prod(shape, dtype=np.int64))
    return n // block * size


def check_vocab(hp: Hparams, vocab: Vocab, *, embed_rows: int | None, where: str) -> None:
    """config.json vocab_size, embedding rows and tokenizer size must agree."""
    seen = {"config.json vocab_size": hp.n_vocab, "tokenizer": len(vocab)}
    if embed_rows is not None:
        seen["embedding rows"] = embed_rows
    if len(set(seen.values())) != 1:
        detail = ", ".join(f"{k} {v}" for k, v in seen.items())
        raise InputError(
            f"vocabulary sizes disagree in {where}: {detail} (tokenizer.model has {vocab.sp_pieces} pieces"
            + (f" + {len(vocab.added)} added tokens)" if vocab.added else ")"),
            expected="one size everywhere (49953 for Chinese-LLaMA, 49954 for Chinese-Alpaca)",
            fix="use the tokenizer that belongs to these weights (the Alpaca one has [PAD]), "
            "and a config.json whose vocab_size matches",
        )


def plan_convert(source, *, outtype: str = "f16", name: str | None = None) -> ConvertPlan:
    """Check a TensorSource and plan the GGUF (no writes): keys, names, shapes, types, sizes."""
    if outtype not in OUTTYPES:
        raise InputError(f"unknown outtype {outtype!r}", expected=" | ".join(OUTTYPES))
    ot = OUTTYPES[outtype]
    hp = hparams_from_config(source.config)
    if source.tokenizer_dir is None:
        raise InputError("the model has no tokenizer folder", expected="tokenizer.model beside the weights",
                         fix="copy the tokenizer files of the release into the model folder")
    tok_dir = Path(source.tokenizer_dir)
    vocab = read_vocab(tok_dir)
    infos = list(source.tensor_infos())
    by_name = {i.name: i for i in infos}
    embed = by_name.get("model.embed_tokens.weight")
    check_vocab(hp, vocab, embed_rows=embed.shape[0] if embed is not None else None, where=str(tok_dir))

    want = expected_shapes(hp)
    have = [i.name for i in infos if not names.is_ignored(i.name)]
    unknown = [n for n in have if n not in want]
    missing = [n for n in want if n not in by_name]
    if unknown or missing:
        raise InputError(
            f"the checkpoint's tensors do not form a {hp.n_layer}-layer LLaMA: "
            + (f"unexpected {unknown[:3]}{'...' if len(unknown) > 3 else ''} " if unknown else "")
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else ""),
            expected="exactly the tensors of LlamaForCausalLM with config.json's num_hidden_layers",
            fix="check that the checkpoint is complete and that config.json belongs to it",
        )
    plans = []
    for info in infos:
        if names.is_ignored(info.name):
            continue
        shape = tuple(int(d) for d in info.shape)
        if shape != want[info.name]:
            raise InputError(f"tensor {info.name} has shape {list(shape)}",
                             expected=f"{list(want[info.name])} from config.json",
                             fix="check that config.json belongs to these weights")
        kind, _ = names.lookup(info.name, "hf")
        gguf_name = names.rename(info.name, src="hf", dst="gguf")
        qtype = tensor_qtype(gguf_name, shape, ot)
        plans.append(TensorPlan(info.name, gguf_name, shape, qtype, tensor_nbytes(shape, qtype),
                                names.heads_for(kind, n_head=hp.n_head, n_head_kv=hp.n_head_kv)))
    ids, flags, template = special_tokens(source.config, tok_dir, len(vocab))
    space = None
    if (tok_dir / "tokenizer_config.json").is_file():
        space = _read_json(tok_dir / "tokenizer_config.json").get("add_prefix_space")
    n_params = sum(int(np.prod(p.shape)) for p in plans)
    return ConvertPlan(hparams=hp, outtype=ot, vocab=vocab, special_ids=ids, add_flags=flags,
                       chat_template=template, add_space_prefix=space if isinstance(space, bool) else None,
                       tensors=tuple(plans), name=name or "LLaMA", n_params=n_params)


# ------------------------------------------------------------------ write


def add_metadata(writer, plan: ConvertPlan) -> None:
    """Key/values in the order llama.cpp's converter writes them (so equal files are byte-equal)."""
    gguf = _gguf()
    hp = plan.hparams
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(plan.name)
    writer.add_size_label(gguf.size_label(plan.n_params, plan.n_params, 0, 0))
    writer.add_block_count(hp.n_layer)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_file_type(plan.outtype.file_type)
    writer.add_vocab_size(hp.n_vocab)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if plan.add_space_prefix is not None:
        writer.add_add_space_prefix(plan.add_space_prefix)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(plan.vocab.tokens)
    writer.add_token_scores(plan.vocab.scores)
    writer.add_token_types(plan.vocab.types)
    for kind, tid in plan.special_ids.items():
        adder = getattr(writer, f"add_{kind}_token_id", None)
        if adder is None:  # a kind this gguf has no key for (cls in gguf-py >= 0.17): skipped, as llama.cpp does
            log.warning("config.json %s_token_id %d has no GGUF key in this gguf version; not written", kind, tid)
            continue
        adder(tid)
    for kind, value in plan.add_flags.items():
        adder = getattr(writer, f"add_add_{kind}_token", None)
        if adder is not None:
            adder(value)
    if plan.chat_template is not None:
        writer.add_chat_template(plan.chat_template)


def to_gguf_array(t: torch.Tensor, tp: TensorPlan) -> np.ndarray:
    """One HF tensor -> the bytes llama.cpp's converter would write for it."""
    gguf = _gguf()
    if tp.permute_heads:
        t = _unpermuted(t, tp.permute_heads)
    if t.dtype not in (torch.float16, torch.float32):
        t = t.to(torch.float32)  # bf16 etc.: numpy has no bf16; same widening as the reference
    data = t.contiguous().numpy()
    return gguf.quants.quantize(data, gguf.GGMLQuantizationType(tp.qtype))


def _unpermuted(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``names.hf_to_meta_rotary(t, n_heads)`` copied into a recycled buffer (no fresh pages per tensor)."""
    rows = t.shape[0]
    if rows % (2 * n_heads):
        return names.hf_to_meta_rotary(t, n_heads)  # the table's own error/handling for odd shapes
    half = rows // n_heads // 2
    out = iobuf.empty(tuple(t.shape), t.dtype)
    out.view(n_heads, half, 2, *t.shape[1:]).copy_(t.reshape(n_heads, 2, half, *t.shape[1:]).transpose(1, 2))
    return out


class _WriteBehind:
    """Write tensors on a thread while the next one is converted (``threaded``), or in line.

    The thread pays off when converting costs CPU (q8_0: numpy quantizes every block); for float
    outtypes the conversion is a view, and the source stream reads and merges the next tensor in its
    own thread anyway, so writing in line keeps one tensor fewer alive (peak RSS) at the same speed.
    Numpy's ``tofile`` releases the GIL, so a threaded write overlaps the conversion. At most one
    converted tensor waits. A write error is re-raised in the producer; leaving the block joins the
    thread either way.
    """

    def __init__(self, write: Callable[[np.ndarray], None], *, threaded: bool = True) -> None:
        self._write = write
        self._threaded = threaded
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, name="gguf-write-behind", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._abort:
                try:
                    self._write(item)
                except BaseException as exc:  # handed to the producer
                    self._error = exc
            del item

    def submit(self, data: np.ndarray) -> None:
        if not self._threaded:
            self._write(data)
            return
        if self._error is not None:
            raise self._error
        self._queue.put(data)

    def __enter__(self) -> _WriteBehind:
        if self._threaded:
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._threaded:
            return
        self._abort = exc_type is not None
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


# Outtypes whose conversion is real CPU work (numpy quantization): their writes go on a thread.
THREADED_WRITE = frozenset({"q8_0"})


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    outtype: str
    n_tensors: int
    n_params: int
    n_vocab: int
    file_bytes: int
    seconds: float
    tensor_types: dict[str, str] = field(default_factory=dict)


def _as_source(source):
    if isinstance(source, (str, os.PathLike)):
        from .checkpoint import open_checkpoint

        return open_checkpoint(source), Path(source).name
    return source, None


def convert(source, *, out: str | os.PathLike[str], outtype: str = "f16", name: str | None = None,
            on_progress: Callable[[int], None] | None = None, overwrite: bool = False) -> ConvertResult:
    """Write ``source`` (a TensorSource, or an HF/Meta checkpoint folder) as a GGUF file at ``out``.

    Every check (config, tokenizer, vocabulary agreement, tensor names and shapes, disk space)
    runs before the first byte; the file appears only when complete. ``on_progress(nbytes)`` is
    called after each tensor with the bytes written.
    """
    t0 = time.perf_counter()
    src, folder_name = _as_source(source)
    out = claim_output(out, kind="file", inputs=[source, src], overwrite=overwrite)  # before any work
    plan = plan_convert(src, outtype=outtype, name=name or folder_name)
    check_disk_space(out.parent if out.parent.exists() else Path.cwd(), plan.tensor_bytes + 64 * 1024 * 1024,
                     what=f"GGUF file {out.name}")
    gguf = _gguf()
    by_name = {tp.hf_name: tp for tp in plan.tensors}
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        add_metadata(writer, plan)
        for tp in plan.tensors:
            writer.add_tensor_info(tp.gguf_name, tp.shape, np.dtype(np.float32), tp.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(tp.qtype))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        order = [tp.hf_name for tp in plan.tensors]
        done = 0
        with (bar(plan.tensor_bytes, f"convert {out.name}") as pbar,
              _WriteBehind(writer.write_tensor_data, threaded=outtype in THREADED_WRITE) as wb):
            for hf_name, tensor in src.iter_tensors():
                if names.is_ignored(hf_name):
                    continue
                if done >= len(order) or hf_name != order[done]:
                    raise InputError(f"the tensor stream yielded {hf_name} out of order",
                                     expected=f"{order[done] if done < len(order) else 'no more tensors'} "
                                     "(the order of tensor_infos())")
                tp = by_name[hf_name]
                if tuple(tensor.shape) != tp.shape:
                    raise InputError(f"tensor {hf_name} arrived with shape {list(tensor.shape)}",
                                     expected=f"{list(tp.shape)} as announced by tensor_infos()")
                data = to_gguf_array(tensor, tp)
                del tensor
                wb.submit(data)
                done += 1
                pbar.update(tp.nbytes)
                if on_progress is not None:
                    on_progress(tp.nbytes)
                del data
        if done != len(order):
            raise InputError(f"the tensor stream ended after {done} of {len(order)} tensors",
                             fix="check that the checkpoint is complete")
        writer.close()
    log.info("wrote %s: %d tensors, %s", out, len(plan.tensors), plan.outtype.name)
    return ConvertResult(path=out, outtype=outtype, n_tensors=len(plan.tensors), n_params=plan.n_params,
                         n_vocab=len(plan.vocab), file_bytes=out.stat().st_size,
                         seconds=time.perf_counter() - t0,
                         tensor_types={tp.gguf_name: gguf.GGMLQuantizationType(tp.qtype).name for tp in plan.tensors})
