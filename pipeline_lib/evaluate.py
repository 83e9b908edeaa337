"""Evaluation stage: what each quantized GGUF loses, measured the way llama.cpp users measure it.

For every model variant (f16, q8_0, q4_0, ...), through llama.cpp (llama-cpp-python):

* **Perplexity**, computed as llama.cpp's ``llama-perplexity`` does (tools/perplexity/perplexity.cpp,
  ``perplexity()``): the text is tokenized once with BOS; it is cut into ``len(tokens) // n_ctx``
  chunks of ``n_ctx`` tokens (the tail is dropped); each chunk's first token is *replaced* by BOS;
  the chunk is decoded from an empty KV cache; only the logits at positions ``n_ctx/2 .. n_ctx-2``
  are scored, each against the next token, so every chunk scores ``n_ctx - n_ctx/2 - 1`` tokens
  with at least half a context of history. PPL = exp(mean NLL); its uncertainty is llama.cpp's.
* **KL divergence against the f16 reference**, as ``llama-perplexity --kl-divergence`` defines it:
  on the same tokens and positions, ``KL(P_ref || P_q) = sum_i p_ref_i (log p_ref_i - log p_q_i)``
  over the vocabulary entries with ``log p_ref_i > -16``; mean KL, top-1 agreement ("same top p":
  the argmax token of both models is the same), ln and ratio of PPL(Q)/PPL(ref) with llama.cpp's
  covariance-aware uncertainty, RMS of the change in the probability of the correct token.
* **Speed** (prompt processing and generation tokens/s, a short fixed pp/tg), file size, bits per
  weight (tensor bytes x 8 / parameters, parameters counted from the GGUF's tensors with gguf.GGUFReader),
  and **memory**: resident anonymous memory vs file-backed pages (the mapped GGUF), separately.
* **Tokenizer efficiency** on the same text: tokens and characters per token for each given
  sentencepiece ``tokenizer.model`` (e.g. LLaMA's vs the merged Chinese one) and for each GGUF's own
  vocabulary as llama.cpp tokenizes it.
* **Generation samples** for the release's ten categories (``data/prompts_zh.jsonl``), greedy by
  default, with the Alpaca template for Alpaca models and plain continuation for LLaMA models.

The reference is its own computation (``reference_pass``): the f16 model runs once and leaves, in
its folder, its own one-row report plus the compact record of its predictions that every later
``evaluate(variant, reference=folder)`` compares against without loading the f16 again:

* ``ref-logprobs.npy``: uint16 ``[chunks, n_ctx - n_ctx/2 - 1, n_vocab]``, each log-probability on a
  uniform grid over [-16, 0] nats (step 16/65535, error <= 1.2e-4 nats; code 0 = at or below the
  KL floor, left out of the sum as llama.cpp does). Bytes = chunks x (n_ctx - n_ctx/2 - 1) x n_vocab x 2
  (+128 header): 25.5 MB per 512-token chunk for the 49954-token vocabulary.
* ``ref-positions.npz``: per scored position the exact NLL of the next token (float64), the argmax
  token (int32) and the log of the probability mass on the stored grid (float64), 20 bytes each. With
  these, PPL(ref), the PPL ratio, RMS dp and top-1 agreement are exact; when the KL is summed, the
  decoded log-probabilities are shifted so their mass is the exact one, which cancels the grid's
  first-order error (see ``KL_TOLERANCE``).
* ``ref-text.txt`` (the evaluation text itself) and ``reference.json`` (format, model, text sha256,
  token count and sha256, n_ctx, chunks, vocabulary, file names and bytes), written last: a reuse
  whose text, tokens, context, chunks or vocabulary differ is refused with a message saying which.

The report is ``report.json`` (machine-readable, written last), ``report.md`` and ``report.png``
(file size vs perplexity and vs KL), each written atomically. ``combine_reports`` merges the
reference's and the variants' reports into one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from . import chat
from .errors import InputError
from .fsutil import atomic_path, check_disk_space, human_bytes, sha256_bytes, write_text_atomic
from .gates import GateResult
from .gguf_check import open_gguf
from .progress import bar

log = logging.getLogger(__name__)

REPORT_VERSION = 3  # 2: reference rows from a stored reference pass, memory, bounded speed test; 3: gates
KL_LOG_PROB_FLOOR = -16.0  # llama.cpp ignores reference entries with log p <= -16 in the KL sum

# Defaults sized for a 7B (f16 + q4_0 + q8_0) on a 2-core workstation in under 15 minutes; the
# arithmetic is in docs/evaluate.md ("Sizing"). Scale up with n_chunks, max_samples, max_tokens.
DEFAULT_N_CTX = 512  # llama-perplexity's default context
DEFAULT_N_CHUNKS = 1  # 0 = every chunk the text holds
DEFAULT_GEN_CTX = None  # the model's context: None = what the samples need (the release chatted with -c 2048)
DEFAULT_SAMPLES_PER_CATEGORY = 1
DEFAULT_MAX_SAMPLES = 3  # prompts in all (one per category, in file order); 0 = no limit
DEFAULT_MAX_TOKENS = 32
DEFAULT_SPEED_PROMPT = 32  # pp: one batch of this many tokens
DEFAULT_SPEED_GEN = 16  # tg: this many single-token decodes

# The stored reference (reference_pass's folder).
REFERENCE_FORMAT = "zhllama-eval-reference"
REFERENCE_VERSION = 1
REFERENCE_FILE = "reference.json"
LOGPROBS_FILE = "ref-logprobs.npy"
POSITIONS_FILE = "ref-positions.npz"
TEXT_FILE = "ref-text.txt"
REPORT_FILES = ("report.json", "report.md", "report.png")
LOGPROB_CODES = 65535  # uint16 codes 0..65535 over [KL_LOG_PROB_FLOOR, 0]
LOGPROB_STEP = -KL_LOG_PROB_FLOOR / LOGPROB_CODES
POSITION_BYTES = 8 + 4 + 8  # nll float64, argmax int32, log mass float64
NPY_HEADER_BYTES = 128
# KL from the stored (16-bit) reference vs the exact float64 computation: |difference| of the mean
# KL is below KL_TOLERANCE["abs"] + KL_TOLERANCE["rel"] * KL (tests/test_evaluate.py checks it on
# q8_0 and q4_0); the other KL-report numbers (PPL ratio, top-1, RMS dp) use exact stored values.
KL_TOLERANCE = {"abs": 1e-6, "rel": 5e-4}


def packaged_text() -> str:
    """The held-out Chinese + English evaluation text shipped with zhllama (not tokenizer training text)."""
    return files("pipeline_lib.data").joinpath("eval_text.txt").read_text(encoding="utf-8")


def packaged_prompts_path() -> Path:
    return Path(str(files("pipeline_lib.data").joinpath("prompts_zh.jsonl")))


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class PassOptions:
    """How every model's pass is run, the same for the reference and each variant: the generation
    samples, the speed test, the seed and the threads. ``reference_pass``, ``evaluate`` and
    ``evaluate_variants`` take it as ``options``; what differs per call (the model, ``out``, the
    reference, the text, ``n_ctx``, ``n_chunks``, names, tokenizers, title, plot) stays a keyword of its own.

    * ``prompts`` (None): the prompts JSONL; None or True = the packaged ten categories
      (``data/prompts_zh.jsonl``); False = no generation samples.
    * ``template`` (None): "alpaca" or "plain" forces the prompt template; None = by vocabulary
      (alpaca when it holds the ``[PAD]`` piece, else plain).
    * ``gen_ctx`` (``DEFAULT_GEN_CTX``, None): the context each model is opened with; None = what the
      samples need (longest dialogue + ``max_tokens`` per reply, rounded up to 256), capped at the
      training context; never below ``n_ctx``.
    * ``samples_per_category`` (``DEFAULT_SAMPLES_PER_CATEGORY``, 1): the first N prompts of every
      category; 0 or None = all of them.
    * ``max_samples`` (``DEFAULT_MAX_SAMPLES``, 3): prompts in all, taken round-robin over the
      categories; 0 or None = no limit.
    * ``max_tokens`` (``DEFAULT_MAX_TOKENS``, 32): tokens per sample reply (greedy).
    * ``speed`` (True): run the speed test after the perplexity pass.
    * ``speed_prompt`` (``DEFAULT_SPEED_PROMPT``, 32): the speed test's prompt batch, in tokens (pp).
    * ``speed_gen`` (``DEFAULT_SPEED_GEN``, 16): the speed test's single-token decodes (tg).
    * ``seed`` (0): llama.cpp's sampling seed (greedy samples do not depend on it).
    * ``threads`` (None): llama.cpp threads for prompt batches and generation; None = ``chat.physical_cores()``.

    The report's ``settings`` record these values (``template`` as ``template_override``).
    """

    prompts: str | Path | bool | None = None
    template: str | None = None
    gen_ctx: int | None = DEFAULT_GEN_CTX
    samples_per_category: int | None = DEFAULT_SAMPLES_PER_CATEGORY
    max_samples: int | None = DEFAULT_MAX_SAMPLES
    max_tokens: int = DEFAULT_MAX_TOKENS
    speed: bool = True
    speed_prompt: int = DEFAULT_SPEED_PROMPT
    speed_gen: int = DEFAULT_SPEED_GEN
    seed: int = 0
    threads: int | None = None


@dataclass(frozen=True)
class ModelFacts:
    path: str
    file_size: int
    n_params: int
    tensor_bytes: int
    bits_per_weight: float
    file_type: str  # e.g. "MOSTLY_Q4_0"
    tensor_types: dict[str, int]  # ggml type name -> number of tensors
    vocab_size: int
    vocab_kind: str  # "alpaca" ([PAD] present) | "llama"
    context_length: int | None = None  # the training context (<arch>.context_length), if the GGUF says


@dataclass(frozen=True)
class PerplexityResult:
    n_ctx: int
    n_chunks: int
    text_tokens: int
    scored_tokens: int
    mean_nll: float
    ppl: float
    ppl_uncertainty: float
    chunk_ppl: tuple[float, ...]  # running PPL after each chunk, as llama-perplexity prints it
    seconds: float


@dataclass(frozen=True)
class KLResult:
    scored_tokens: int
    mean_kld: float
    kld_uncertainty: float
    median_kld: float
    p99_kld: float
    max_kld: float
    same_top: float  # top-1 token agreement with the reference
    same_top_uncertainty: float
    ppl: float
    ppl_reference: float
    ln_ppl_ratio: float
    ln_ppl_ratio_uncertainty: float
    ppl_ratio: float
    ppl_ratio_uncertainty: float
    rms_dp: float  # RMS of p(correct token) change


@dataclass(frozen=True)
class SpeedResult:
    prompt_tokens: int
    prompt_tokens_per_s: float
    gen_tokens: int
    gen_tokens_per_s: float
    threads: int
    seconds: float = 0.0  # wall time of the whole speed test


@dataclass(frozen=True)
class MemoryResult:
    """Memory while one model was evaluated (Linux ``/proc/self/status``), highest values seen.

    RSS counts the pages of the memory-mapped GGUF, which are page cache the kernel can drop and
    re-read, so it is split: ``anon_bytes`` (RssAnon: heap, KV cache, logits; what really needs RAM)
    and ``file_bytes`` (RssFile: mapped file pages, mostly the model). ``peak_rss_bytes`` is the
    process's high-water mark (VmHWM, both kinds, since the process started).
    """

    anon_bytes: int
    file_bytes: int
    peak_rss_bytes: int


@dataclass(frozen=True)
class TokenizerRow:
    tokenizer: str
    vocab_size: int
    chars: int
    tokens: int
    chars_per_token: float


@dataclass(frozen=True)
class Sample:
    id: str
    category: str
    category_zh: str
    turns: tuple[str, ...]
    replies: tuple[str, ...]
    prompt: str  # exact model input of the last turn
    completion_tokens: int
    seconds: float


@dataclass(frozen=True)
class VariantReport:
    name: str
    model: ModelFacts
    template: str
    perplexity: PerplexityResult | None
    kl: KLResult | None  # None for the reference itself or without a reference
    speed: SpeedResult | None
    samples: tuple[Sample, ...]
    is_reference: bool = False
    memory: MemoryResult | None = None
    seconds: float = 0.0  # wall time of this variant's evaluation, model load included


@dataclass(frozen=True)
class Report:
    out: Path
    json_path: Path
    md_path: Path
    plot_path: Path
    variants: tuple[VariantReport, ...]
    reference: str | None
    text: dict
    tokenizers: tuple[TokenizerRow, ...]
    settings: dict = field(default_factory=dict)
    gates: tuple[GateResult, ...] = ()  # quality gates and broken-quant flags (apply_gates), pass or fail

    def variant(self, name: str) -> VariantReport:
        return next(v for v in self.variants if v.name == name)

    def table(self) -> list[dict]:
        """One flat row per variant (name, size, bpw, PPL, KL, agreement, speed): for a Prefect table
        artifact or a DataFrame."""
        rows = []
        for v in self.variants:
            p, k, sp = v.perplexity, v.kl, v.speed
            rows.append({
                "variant": v.name, "reference": v.is_reference, "file_bytes": v.model.file_size,
                "bits_per_weight": round(v.model.bits_per_weight, 3),
                "ppl": p.ppl if p else None, "ppl_uncertainty": p.ppl_uncertainty if p else None,
                "ppl_ratio": 1.0 if v.is_reference else (k.ppl_ratio if k else None),
                "mean_kld": 0.0 if v.is_reference else (k.mean_kld if k else None),
                "top1_agreement": 1.0 if v.is_reference else (k.same_top if k else None),
                "prompt_tok_s": sp.prompt_tokens_per_s if sp else None,
                "gen_tok_s": sp.gen_tokens_per_s if sp else None,
                "rss_anon_bytes": v.memory.anon_bytes if v.memory else None,
                "rss_file_bytes": v.memory.file_bytes if v.memory else None,
            })
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("out", "json_path", "md_path", "plot_path"):
            d[k] = str(d[k])
        d["version"] = REPORT_VERSION
        d["table"] = self.table()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """The Report a ``report.json`` holds (``to_dict``'s output; keys this version does not know
        are ignored, fields it adds take their defaults, so version-1 reports load too)."""
        return _from_dict(cls, data)

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read ``report.json`` (or the folder holding it); the paths point at where it is now."""
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        json_path = folder / "report.json"
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the evaluation report {json_path} ({exc})",
                             expected="a report.json written by zhllama eval",
                             fix="run the evaluation again") from exc
        return _relocate(cls.from_dict(data), folder)


def _relocate(report: Report, folder: Path) -> Report:
    return replace(report, out=folder, json_path=folder / "report.json", md_path=folder / "report.md",
                   plot_path=folder / "report.png")


def _from_dict(cls: Any, data: Any) -> Any:
    """Rebuild a (nested, frozen) dataclass from its asdict() form, following the type hints."""
    import types
    import typing
    from dataclasses import fields, is_dataclass

    def conv(tp: Any, v: Any) -> Any:
        if v is None:
            return None
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return conv(args[0], v) if len(args) == 1 else v
        if origin is tuple:
            args = typing.get_args(tp)
            inner = args[0] if args else Any
            return tuple(conv(inner, x) for x in v)
        if origin in (list, dict) or tp in (Any, dict, list, str, int, float, bool):
            return v
        if tp is Path:
            return Path(v)
        if is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            names = {f.name for f in fields(tp)}
            return tp(**{k: conv(hints[k], x) for k, x in v.items() if k in names})
        return v

    return conv(cls, data)


# ------------------------------------------------------------------ GGUF facts


def model_facts(model_gguf: str | Path) -> ModelFacts:
    """File size, parameter count and bits per weight of a GGUF, read with gguf.GGUFReader.

    A missing, truncated or damaged file is an InputError here (:func:`gguf_check.open_gguf`),
    before llama.cpp ever opens it.
    """
    import gguf

    path, reader = open_gguf(model_gguf)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    ft = reader.fields.get("general.file_type")
    if ft is not None:
        value = int(ft.parts[ft.data[0]][0])
        try:
            file_type = gguf.LlamaFileType(value).name
        except ValueError:
            file_type = str(value)
    else:
        file_type = "unknown"
    toks = reader.fields.get("tokenizer.ggml.tokens")
    vocab = len(toks.data) if toks is not None else 0
    return ModelFacts(path=str(path), file_size=path.stat().st_size, n_params=n_params, tensor_bytes=tensor_bytes,
                      bits_per_weight=tensor_bytes * 8 / n_params if n_params else 0.0, file_type=file_type,
                      tensor_types=types, vocab_size=vocab, vocab_kind=chat.vocab_kind(reader, path),
                      context_length=chat.context_length(reader))


@functools.lru_cache(maxsize=32)
def _facts_at(path: str, size: int, mtime_ns: int) -> ModelFacts:
    return model_facts(path)


def cached_model_facts(model_gguf: str | Path) -> ModelFacts:
    """``model_facts``, remembered per file (resolved path, size, modification time) in this process:
    parsing a GGUF with a 50k-token vocabulary takes seconds, and every step of an evaluation needs it."""
    path = chat._check_gguf(model_gguf).resolve()
    st = path.stat()
    return _facts_at(str(path), st.st_size, st.st_mtime_ns)


def variant_name(facts: ModelFacts) -> str:
    """'q4_0', 'f16', ... from the GGUF's file type."""
    name = facts.file_type.lower()
    for prefix in ("mostly_", "all_"):
        name = name.removeprefix(prefix)
    return name


# ------------------------------------------------------------------ perplexity and KL (llama.cpp's way)



def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


# ------------------------------------------------------------------ perplexity and KL (llama.cpp's way)


def tokenize_text(llm, text: str) -> list[int]:
    """Tokens of the whole text with BOS, as llama-perplexity's ``common_tokenize(ctx, text, true)``."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def tokens_sha256(tokens: Sequence[int]) -> str:
    """Digest of a token sequence (int32 little-endian), to match a stored reference's tokens."""
    return sha256_bytes(np.asarray(tokens, dtype="<i4").tobytes())


def _check_tokens(tokens: Sequence[int], n_ctx: int, what: str) -> None:
    _check_ctx(n_ctx)
    if len(tokens) < 2 * n_ctx:
        raise InputError(f"{what} tokenizes to {len(tokens)} tokens", expected=f"at least {2 * n_ctx} "
                         f"(two chunks of n_ctx={n_ctx}), as llama-perplexity requires",
                         fix="use a longer text or a smaller --ctx")


def _check_ctx(n_ctx: int) -> None:
    if n_ctx < 8 or n_ctx % 2:
        raise InputError(f"context size {n_ctx}", expected="an even number >= 8 (llama.cpp uses 512)",
                         fix="pass --ctx 512 (or 128 for a quick check)")


def resolve_chunks(n_tokens: int, n_ctx: int, n_chunks: int | None) -> int:
    """Chunks a perplexity run scores: ``n_chunks`` (None = DEFAULT_N_CHUNKS, 0 = all) capped at what
    the text holds (``n_tokens // n_ctx``)."""
    total = n_tokens // n_ctx
    if n_chunks is None:
        n_chunks = DEFAULT_N_CHUNKS
    if n_chunks < 0:
        raise InputError(f"{n_chunks} chunks", expected="a positive number, or 0 for every chunk of the text")
    return total if n_chunks == 0 else min(n_chunks, total)


def chunk_logits(llm, tokens: Sequence[int], *, n_ctx: int, n_chunks: int | None = None,
                 desc: str = "perplexity") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(chunk, targets, logits)`` per chunk, decoded exactly as llama-perplexity does.

    ``logits[j]`` (float32, shape [n_ctx - n_ctx/2 - 1, n_vocab]) is the prediction made at position
    ``n_ctx/2 + j`` of the chunk and ``targets[j]`` the token that follows it. ``n_chunks`` None = all.
    """
    import llama_cpp as lc

    if chat.context_size(llm) < n_ctx or llm.n_batch < n_ctx:
        raise InputError(f"model opened with n_ctx={chat.context_size(llm)}, n_batch={llm.n_batch}",
                         expected=f"both >= {n_ctx}", fix="open it with load_model(..., n_ctx=n_ctx, n_batch=n_ctx)")
    model, ctx = llm.model, llm.ctx
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    add_bos = lc.llama_vocab_get_add_bos(vocab)
    bos = lc.llama_vocab_bos(vocab)
    first = n_ctx // 2
    total = len(tokens) // n_ctx
    n_chunks = total if n_chunks is None else min(n_chunks, total)
    batch = lc.llama_batch_init(n_ctx, 0, 1)
    try:
        with bar(n_chunks, desc, unit="chunk") as pbar:
            for c in range(n_chunks):
                chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
                if add_bos:
                    chunk[0] = bos  # replaced, not inserted: the chunk stays n_ctx tokens long
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                batch.n_tokens = n_ctx
                for k, tok in enumerate(chunk):
                    batch.token[k] = tok
                    batch.pos[k] = k
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = 0
                    batch.logits[k] = k >= first
                rc = lc.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode failed with code {rc} on chunk {c}")
                n_out = n_ctx - first
                out = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(n_out * n_vocab,))
                logits = out.reshape(n_out, n_vocab)[: n_out - 1].copy()
                targets = np.asarray(tokens[c * n_ctx + first + 1:(c + 1) * n_ctx], dtype=np.int64)
                pbar.update(1)
                yield c, targets, logits
    finally:
        lc.llama_batch_free(batch)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def _masked_logsumexp(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Row-wise log(sum(exp(x))) over the entries where ``mask`` is true."""
    m = np.where(mask, x, -np.inf).max(axis=-1)
    return m + np.log(np.where(mask, np.exp(x - m[:, None]), 0.0).sum(axis=-1))


def encode_logprobs(lp: np.ndarray) -> np.ndarray:
    """Log-probabilities (<= 0) -> uint16 codes on the uniform grid over [KL_LOG_PROB_FLOOR, 0]; 0 = at
    or below the floor (left out of the KL sum, as llama.cpp leaves out log p <= -16)."""
    codes = np.rint((np.maximum(lp, KL_LOG_PROB_FLOOR) - KL_LOG_PROB_FLOOR) / LOGPROB_STEP)
    return np.clip(codes, 0, LOGPROB_CODES).astype(np.uint16)


def decode_logprobs(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.float64) * LOGPROB_STEP + KL_LOG_PROB_FLOOR


def reference_bytes(n_chunks: int, n_ctx: int, n_vocab: int) -> int:
    """Bytes of a stored reference's arrays: the log-prob grid (2 bytes per vocabulary entry per scored
    position) plus 20 bytes per scored position, plus headers (the text and JSON come on top)."""
    positions = n_chunks * (n_ctx - n_ctx // 2 - 1)
    return positions * n_vocab * 2 + NPY_HEADER_BYTES + positions * POSITION_BYTES + 1024


def _mean_and_uncertainty(s: float, s2: float, n: int) -> tuple[float, float]:
    """llama.cpp's mean_and_uncertainty (standard error of the mean)."""
    if n < 1:
        return 0.0, 0.0
    f = s / n
    df = s2 / n - f * f
    return f, (math.sqrt(df / (n - 1)) if df > 0 and n > 10 else 0.0)


@dataclass
class _Sums:
    nll: float = 0.0
    nll2: float = 0.0
    nll_ref: float = 0.0
    nll_ref2: float = 0.0
    nll_nll_ref: float = 0.0
    kld: float = 0.0
    kld2: float = 0.0
    dp2: float = 0.0
    dp4: float = 0.0
    same_top: int = 0
    count: int = 0
    kld_values: list = field(default_factory=list)


class ReferenceLogProbs:
    """The reference model's predictions at every scored position, in the compact stored form.

    ``codes`` (uint16 [chunks, positions, vocab], see ``encode_logprobs``), ``nll`` (exact NLL of the
    next token), ``top`` (argmax token) and ``log_mass`` (exact log of the probability mass on the
    grid's non-zero codes). ``create`` makes a writable one (codes memory-mapped in a file, filled
    chunk by chunk by ``measure_perplexity(save_reference=...)``); ``open`` maps a stored one read-only.
    """

    def __init__(self, codes: np.ndarray, nll: np.ndarray, top: np.ndarray, log_mass: np.ndarray) -> None:
        self.codes, self.nll, self.top, self.log_mass = codes, nll, top, log_mass
        self.n_chunks, self.per_chunk, self.n_vocab = (int(x) for x in codes.shape)

    @classmethod
    def create(cls, codes_path: Path, *, n_chunks: int, per_chunk: int, n_vocab: int) -> ReferenceLogProbs:
        codes = np.lib.format.open_memmap(codes_path, mode="w+", dtype=np.uint16, shape=(n_chunks, per_chunk, n_vocab))
        shape = (n_chunks, per_chunk)
        return cls(codes, np.zeros(shape, np.float64), np.zeros(shape, np.int32), np.zeros(shape, np.float64))

    @classmethod
    def open(cls, folder: Path) -> ReferenceLogProbs:
        codes = np.load(folder / LOGPROBS_FILE, mmap_mode="r", allow_pickle=False)
        with np.load(folder / POSITIONS_FILE, allow_pickle=False) as z:
            return cls(codes, z["nll"], z["top"], z["log_mass"])

    def put(self, chunk: int, lp: np.ndarray, targets: np.ndarray) -> None:
        """Store one chunk's float64 log-probabilities [positions, vocab]."""
        codes = encode_logprobs(lp)
        self.codes[chunk] = codes
        rows = np.arange(len(targets))
        self.nll[chunk] = -lp[rows, targets]
        self.top[chunk] = lp.argmax(axis=1)
        self.log_mass[chunk] = _masked_logsumexp(lp, codes > 0)

    def decoded(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(log-probabilities, mask of the entries above the floor) of one chunk, float64, shifted
        per position so that their probability mass on the mask is the exact stored one."""
        codes = np.asarray(self.codes[chunk])
        mask = codes > 0
        lp = decode_logprobs(codes)
        lp += (self.log_mass[chunk] - _masked_logsumexp(lp, mask))[:, None]
        return lp, mask

    def write_positions(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, nll=self.nll, top=self.top, log_mass=self.log_mass)

    def flush(self) -> None:
        if isinstance(self.codes, np.memmap):
            self.codes.flush()


def measure_perplexity(llm, tokens: Sequence[int], *, n_ctx: int, n_chunks: int | None = None,
                       reference: ReferenceLogProbs | None = None, save_reference: ReferenceLogProbs | None = None,
                       desc: str = "perplexity",
                       on_chunk: Callable[[int], None] | None = None) -> tuple[PerplexityResult, KLResult | None]:
    """Perplexity of ``llm`` on ``tokens`` (and KL against ``reference`` when given).

    ``n_chunks`` None = every chunk (the callers resolve their defaults with ``resolve_chunks``).
    ``save_reference`` receives this model's predictions (for later KL runs of other variants);
    ``on_chunk(c)`` is called after each chunk.
    """
    _check_tokens(tokens, n_ctx, "the evaluation text")
    for what, ref in (("reference", reference), ("reference store", save_reference)):
        if ref is not None and ref.n_vocab != llm.n_vocab():
            raise InputError(f"the model has {llm.n_vocab()} tokens, the {what} {ref.n_vocab}",
                             expected="quantizations of the same model",
                             fix="pass the f16 GGUF these quants were made from as the reference")
    if reference is not None:
        n_chunks = reference.n_chunks if n_chunks is None else n_chunks
        if n_chunks > reference.n_chunks or reference.per_chunk != n_ctx - n_ctx // 2 - 1:
            raise InputError(f"{n_chunks} chunks of n_ctx={n_ctx} asked for", expected=f"at most the reference's "
                             f"{reference.n_chunks} chunks of {reference.per_chunk} scored positions",
                             fix="use the reference's --ctx and --chunks")
    t0 = time.perf_counter()
    s = _Sums()
    running: list[float] = []
    n_done = 0
    for c, targets, logits in chunk_logits(llm, tokens, n_ctx=n_ctx, n_chunks=n_chunks, desc=desc):
        lp = log_softmax(logits)
        rows = np.arange(len(targets))
        nll = -lp[rows, targets]
        s.nll += float(nll.sum())
        s.nll2 += float((nll * nll).sum())
        s.count += len(nll)
        if save_reference is not None:
            save_reference.put(c, lp, targets)
        if reference is not None:
            ref, mask = reference.decoded(c)
            nll_ref = reference.nll[c]
            s.nll_ref += float(nll_ref.sum())
            s.nll_ref2 += float((nll_ref * nll_ref).sum())
            s.nll_nll_ref += float((nll * nll_ref).sum())
            kld = np.where(mask, np.exp(ref) * (ref - lp), 0.0).sum(axis=1)
            s.kld += float(kld.sum())
            s.kld2 += float((kld * kld).sum())
            s.kld_values.extend(kld.tolist())
            s.same_top += int((logits.argmax(axis=1) == reference.top[c]).sum())
            dp = np.exp(-nll) - np.exp(-nll_ref)
            s.dp2 += float((dp * dp).sum())
            s.dp4 += float((dp ** 4).sum())
        running.append(math.exp(s.nll / s.count))
        n_done = c + 1
        if on_chunk is not None:
            on_chunk(c)
    mean, unc = _mean_and_uncertainty(s.nll, s.nll2, s.count)
    ppl = math.exp(mean)
    result = PerplexityResult(n_ctx=n_ctx, n_chunks=n_done, text_tokens=len(tokens), scored_tokens=s.count,
                              mean_nll=mean, ppl=ppl, ppl_uncertainty=ppl * unc, chunk_ppl=tuple(running),
                              seconds=time.perf_counter() - t0)
    if reference is None:
        return result, None
    return result, _kl_result(s, mean, unc)


def _kl_result(s: _Sums, mean: float, unc: float) -> KLResult:
    n = s.count
    mean_ref, unc_ref = _mean_and_uncertainty(s.nll_ref, s.nll_ref2, n)
    cov = 0.0 if n < 10 else (s.nll_nll_ref / n - (s.nll / n) * (s.nll_ref / n)) / (n - 1)
    ln_ratio = mean - mean_ref
    ln_ratio_unc = math.sqrt(max(unc * unc + unc_ref * unc_ref - 2.0 * cov, 0.0))
    kld_mean, kld_unc = _mean_and_uncertainty(s.kld, s.kld2, n)
    vals = np.sort(np.asarray(s.kld_values))
    p_top = s.same_top / n
    dp_mse, _ = _mean_and_uncertainty(s.dp2, s.dp4, n)
    return KLResult(
        scored_tokens=n, mean_kld=kld_mean, kld_uncertainty=kld_unc, median_kld=float(np.median(vals)),
        p99_kld=float(np.quantile(vals, 0.99)), max_kld=float(vals[-1]),
        same_top=p_top, same_top_uncertainty=math.sqrt(p_top * (1 - p_top) / (n - 1)) if n > 1 else 0.0,
        ppl=math.exp(mean), ppl_reference=math.exp(mean_ref), ln_ppl_ratio=ln_ratio,
        ln_ppl_ratio_uncertainty=ln_ratio_unc, ppl_ratio=math.exp(ln_ratio),
        ppl_ratio_uncertainty=math.exp(ln_ratio) * ln_ratio_unc, rms_dp=math.sqrt(dp_mse),
    )


# ------------------------------------------------------------------ speed


def measure_speed(llm, tokens: Sequence[int], *, n_prompt: int = DEFAULT_SPEED_PROMPT,
                  n_gen: int = DEFAULT_SPEED_GEN, repeats: int = 1, desc: str = "speed") -> SpeedResult:
    """Prompt processing (one batch of ``n_prompt`` tokens, best of ``repeats``) and greedy generation
    (``n_gen`` single-token decodes) in tokens per second: llama-bench's pp/tg tests, small and fixed
    so that the test takes seconds even for an f16 7B on two cores (exactly ``repeats * n_prompt +
    n_gen`` tokens are decoded). Run it after the perplexity pass, which has paged the weights in and
    allocated llama.cpp's buffers, so that one repeat measures the steady state."""
    import llama_cpp as lc

    t_start = time.perf_counter()
    n_prompt = max(1, min(n_prompt, chat.context_size(llm) - n_gen - 1, llm.n_batch, len(tokens)))
    ctx = llm.ctx
    n_vocab = llm.n_vocab()
    batch = lc.llama_batch_init(max(n_prompt, 1), 0, 1)
    try:
        with bar(repeats * n_prompt + n_gen, desc, unit="tok") as pbar:
            prompt = list(tokens[:n_prompt])
            t_prompt = math.inf
            for _ in range(repeats):
                lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
                batch.n_tokens = n_prompt
                for k, tok in enumerate(prompt):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = tok, k, 1
                    batch.seq_id[k][0] = 0
                    batch.logits[k] = k == n_prompt - 1
                t0 = time.perf_counter()
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed in the prompt speed test")
                t_prompt = min(t_prompt, time.perf_counter() - t0)
                pbar.update(n_prompt)
            t0 = time.perf_counter()
            pos = n_prompt
            for _ in range(n_gen):
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
                tok = int(row.argmax())
                batch.n_tokens = 1
                batch.token[0], batch.pos[0], batch.n_seq_id[0] = tok, pos, 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = True
                if lc.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama_decode failed in the generation speed test")
                pos += 1
                pbar.update(1)
            t_gen = time.perf_counter() - t0
    finally:
        lc.llama_batch_free(batch)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        llm.reset()
    return SpeedResult(prompt_tokens=n_prompt, prompt_tokens_per_s=n_prompt / t_prompt if t_prompt else 0.0,
                       gen_tokens=n_gen, gen_tokens_per_s=n_gen / t_gen if t_gen and n_gen else 0.0,
                       threads=llm.n_threads, seconds=time.perf_counter() - t_start)


# ------------------------------------------------------------------ memory


def memory_now() -> dict[str, int] | None:
    """RssAnon, RssFile, RssShmem, VmRSS and VmHWM of this process in bytes (Linux), else None."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
            out[key] = int(rest.split()[0]) * 1024
    return out if "RssAnon" in out and "RssFile" in out else None


class _MemoryPeak:
    """The highest RssAnon and RssFile seen at the sample points of one model's evaluation."""

    def __init__(self) -> None:
        self.anon = self.file = 0
        self.seen = False

    def sample(self, *_: object) -> None:
        m = memory_now()
        if m is not None:
            self.seen = True
            self.anon = max(self.anon, m["RssAnon"])
            self.file = max(self.file, m["RssFile"])

    def result(self) -> MemoryResult | None:
        m = memory_now()
        if not self.seen or m is None:
            return None
        return MemoryResult(anon_bytes=self.anon, file_bytes=self.file, peak_rss_bytes=m.get("VmHWM", 0))


# ------------------------------------------------------------------ prompts and samples


@dataclass(frozen=True)
class PromptItem:
    id: str
    category: str
    category_zh: str
    turns: tuple[str, ...]


def load_prompts(path: str | Path | None = None) -> list[PromptItem]:
    """Read a prompts JSONL file: one object per line with ``id``, ``category`` and ``turns`` (list of
    user messages; several = a multi-turn dialogue) or ``prompt`` (one message)."""
    path = Path(path) if path is not None else packaged_prompts_path()
    if not path.is_file():
        raise InputError(f"no prompts file at {path}", expected="a .jsonl file, one prompt object per line")
    items = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            turns = rec.get("turns") or [rec["prompt"]]
            if not all(isinstance(t, str) and t for t in turns):
                raise TypeError("turns must be non-empty strings")
            items.append(PromptItem(id=str(rec.get("id", f"{path.stem}-{n}")),
                                    category=str(rec.get("category", "uncategorised")),
                                    category_zh=str(rec.get("category_zh", "")), turns=tuple(turns)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InputError(f"{path}:{n} is not a prompt record ({exc})",
                             expected='{"id": ..., "category": ..., "turns": ["..."]} or {"prompt": "..."}',
                             fix="fix that line") from exc
    if not items:
        raise InputError(f"{path} holds no prompts", fix="add at least one line")
    return items


def pick_prompts(items: Sequence[PromptItem], per_category: int | None, limit: int | None = None) -> list[PromptItem]:
    """The first ``per_category`` prompts of every category (all when None or 0), at most ``limit`` in
    all (None or 0 = no limit), taken round-robin so that a small limit still spans categories: the
    first prompt of each category in file order, then the second of each, and so on."""
    by_cat: dict[str, list[PromptItem]] = {}
    for it in items:
        by_cat.setdefault(it.category, []).append(it)
    if per_category:
        by_cat = {c: its[:per_category] for c, its in by_cat.items()}
    out: list[PromptItem] = []
    depth = max((len(v) for v in by_cat.values()), default=0)
    for i in range(depth):
        out += [its[i] for its in by_cat.values() if i < len(its)]
    return out[:limit] if limit else out


def run_samples(llm, items: Sequence[PromptItem], *, template: chat.PromptTemplate, max_tokens: int,
                sampling: chat.Sampling | None = None) -> tuple[Sample, ...]:
    """Generate a reply for every prompt (every turn of a dialogue), deterministic by default."""
    sampling = sampling or chat.Sampling.greedy()
    out = []
    with bar(len(items), "samples", unit="prompt") as pbar:
        for it in items:
            session = chat.ChatSession(llm=llm, template=template, sampling=sampling, max_tokens=max_tokens)
            t0 = time.perf_counter()
            replies, n_tok = [], 0
            for turn in it.turns:
                replies.append(session.reply(turn).strip())
                n_tok += session.last_stats.completion_tokens
            out.append(Sample(id=it.id, category=it.category, category_zh=it.category_zh, turns=it.turns,
                              replies=tuple(replies), prompt=session.last_prompt, completion_tokens=n_tok,
                              seconds=time.perf_counter() - t0))
            pbar.update(1)
    return tuple(out)


# ------------------------------------------------------------------ tokenizer efficiency


# ------------------------------------------------------------------ tokenizer efficiency


def _named_tokenizers(tokenizers: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, str | Path]:
    """``{label: path}``; a plain sequence is labelled by its folder ("chinese-alpaca-tokenizer/tokenizer.model")."""
    if isinstance(tokenizers, Mapping):
        return dict(tokenizers)

    def label(t: str | Path) -> str:
        p = Path(t)
        return f"{p.parent.name}/{p.name}" if p.is_file() else f"{p.name}/tokenizer.model"

    return {label(t): t for t in tokenizers}


def tokenizer_rows(text: str, *, tokenizers: Sequence[str | Path] | Mapping[str, str | Path] = (),
                   llms: Mapping[str, object] = {}) -> tuple[TokenizerRow, ...]:
    """Tokens per text for sentencepiece files and for loaded GGUF vocabularies, counted the same way
    (line by line, no BOS, as ``pipeline_lib.tokenizer.tokenizer_stats`` does). ``tokenizers`` may be
    a mapping ``{label: path}`` to name the rows. A file that is missing or not a sentencepiece model
    is an InputError."""
    from .tokenizer import tokenizer_stats

    rows = []
    for name, path in _named_tokenizers(tokenizers).items():
        try:
            (st,) = tokenizer_stats(text, [path])
        except (RuntimeError, OSError) as exc:  # sentencepiece's error for a file that is not a model
            raise InputError(f"{path} is not a sentencepiece tokenizer ({str(exc).strip()[:200]})",
                             expected="a tokenizer.model file or a folder holding one",
                             fix="pass LLaMA's or the merged tokenizer.model with --tokenizer") from exc
        rows.append(TokenizerRow(tokenizer=name, vocab_size=st.vocab_size, chars=st.chars, tokens=st.tokens,
                                 chars_per_token=st.chars_per_token))
    lines = [line for line in text.splitlines() if line]
    chars = sum(len(line) for line in lines)
    for name, llm in llms.items():
        n = sum(len(llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)) for line in lines)
        rows.append(TokenizerRow(tokenizer=name, vocab_size=llm.n_vocab(), chars=chars, tokens=n,
                                 chars_per_token=chars / n if n else 0.0))
    return tuple(rows)


def _gguf_vocab_label(facts: ModelFacts) -> str:
    return f"{facts.vocab_kind} vocabulary in GGUF ({facts.vocab_size} tokens, llama.cpp)"


# ------------------------------------------------------------------ inputs, read and checked before any model


@dataclass(frozen=True)
class _Inputs:
    """Everything an evaluation reads besides the weights, read and checked before a model is loaded."""

    text: str
    text_label: str
    text_sha256: str
    prompts: tuple[PromptItem, ...]
    template: chat.PromptTemplate | None  # an override; None = by vocabulary
    tokenizer_rows: tuple[TokenizerRow, ...]  # the sentencepiece files', counted now

    def text_info(self, n_tokens: int) -> dict:
        return {"source": self.text_label, "chars": len(self.text), "sha256": self.text_sha256, "tokens": n_tokens}


def _read_text(text: str | Path | None) -> tuple[str, str]:
    if text is None:
        body, label = packaged_text(), "pipeline_lib/data/eval_text.txt"
    else:
        tp = Path(text)
        if not tp.is_file():
            raise InputError(f"no text file at {tp}", fix="pass a UTF-8 text file with --text")
        try:
            body = tp.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{tp} is not UTF-8 text ({exc})", fix="convert it to UTF-8") from exc
        label = str(tp)
    if not body.strip():
        raise InputError(f"evaluation text {label} is empty", fix="pass a text with a few thousand characters")
    return body, label


def _read_inputs(*, text: str | Path | None, tokenizers: Sequence[str | Path] | Mapping[str, str | Path],
                 options: PassOptions, reference: ReferenceResult | None = None) -> _Inputs:
    """Read the text (a stored reference's own text when ``text`` is None), the prompts and the
    template of ``options``, and every sentencepiece tokenizer (counted on the text now, so a bad file
    fails before any model)."""
    if reference is not None and text is None:
        body, label = reference.text(), reference.report.text.get("source", TEXT_FILE)
    else:
        body, label = _read_text(text)
    digest = sha256_bytes(body.encode("utf-8"))
    if reference is not None and digest != reference.text_sha256:
        raise InputError(f"the evaluation text {label} (sha256 {digest[:12]}…) is not the reference's "
                         f"({reference.report.text.get('source')}, sha256 {reference.text_sha256[:12]}…)",
                         expected="the text the reference pass ran on",
                         fix="leave --text out to use the reference's own text, or run the reference pass again")
    items: tuple[PromptItem, ...] = ()
    prompts = options.prompts
    if prompts is not False:
        items = tuple(pick_prompts(load_prompts(None if prompts in (None, True) else prompts),
                                   options.samples_per_category, options.max_samples))
    tpl = chat.get_template(options.template) if options.template is not None else None
    rows = tokenizer_rows(body, tokenizers=tokenizers)
    return _Inputs(text=body, text_label=label, text_sha256=digest, prompts=items, template=tpl, tokenizer_rows=rows)


def _template_for(inputs: _Inputs, facts: ModelFacts) -> chat.PromptTemplate:
    return inputs.template or chat.TEMPLATES[chat.TEMPLATE_FOR_VOCAB[facts.vocab_kind]]


def _check_vocab(name: str, vocab_size: int, reference_vocab: int) -> None:
    if vocab_size != reference_vocab:
        raise InputError(f"{name} has {vocab_size} tokens, the reference {reference_vocab}",
                         expected="quantizations of the reference model",
                         fix="pass the f16 GGUF these quants were made from (or its reference folder) as --reference")


@dataclass(frozen=True)
class _Prepared:
    """One model's input checks, done with its vocabulary only (no weights read)."""

    path: Path
    name: str
    facts: ModelFacts
    tokens: list[int]
    vocab_row: TokenizerRow
    ctx: int  # the context the model will be opened with


def _prepare(path: str | Path, *, name: str, facts: ModelFacts, inputs: _Inputs, n_ctx: int, options: PassOptions,
             reference: ReferenceResult | None = None) -> _Prepared:
    """Tokenize the text with the model's own vocabulary (vocabulary-only load: milliseconds) and check
    it against ``n_ctx`` and the reference's tokens; size the model's context and check that every
    sample prompt fits it.

    The context is ``options.gen_ctx`` or, when None, just what the samples need (the longest dialogue
    with ``options.max_tokens`` per reply, rounded up to 256), capped at the training context and never below
    ``n_ctx``: the KV cache is allocated for all of it (1 GB at 2048 for a 7B).
    """
    _check_ctx(n_ctx)
    if reference is not None:
        _check_vocab(name, facts.vocab_size, reference.n_vocab)
    vocab = chat.load_vocab(path)
    try:
        tokens = tokenize_text(vocab, inputs.text)
        _check_tokens(tokens, n_ctx, f"the evaluation text {inputs.text_label}")
        if reference is not None and (len(tokens) != reference.n_tokens
                                      or tokens_sha256(tokens) != reference.tokens_sha256):
            raise InputError(f"{name} tokenizes the evaluation text to {len(tokens)} tokens (sha256 "
                             f"{tokens_sha256(tokens)[:12]}…)", expected=f"the reference's {reference.n_tokens} "
                             f"tokens (sha256 {reference.tokens_sha256[:12]}…): the same vocabulary",
                             fix="evaluate quantizations of the reference model against it")
        tpl = _template_for(inputs, facts)

        def n_tokens(text: str) -> int:
            return len(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False))

        first = {it.id: n_tokens(tpl.render([], it.turns[0])) for it in inputs.prompts}
        need = max((n_tokens(tpl.render([(t, "") for t in it.turns[:-1]], it.turns[-1]))
                    + len(it.turns) * options.max_tokens + 8 for it in inputs.prompts), default=0)
        ctx = options.gen_ctx or -(-need // 256) * 256
        ctx = max(n_ctx, min(ctx, facts.context_length or ctx))
        for pid, n in first.items():
            if n + 1 >= ctx:
                raise InputError(f"sample prompt {pid} is {n} tokens for {name}, the context holds {ctx}",
                                 fix="shorten the prompt, or raise the generation context")
        (row,) = tokenizer_rows(inputs.text, llms={_gguf_vocab_label(facts): vocab})
    finally:
        vocab.close()
    return _Prepared(path=Path(path), name=name, facts=facts, tokens=tokens, vocab_row=row, ctx=ctx)


def _run_model(prep: _Prepared, inputs: _Inputs, *, n_ctx: int, n_chunks: int, reference: ReferenceLogProbs | None,
               save: ReferenceLogProbs | None, options: PassOptions) -> VariantReport:
    """Load one model and measure everything: perplexity (+ KL against ``reference`` / stored into
    ``save``), speed, samples and memory. The only place a model's weights are loaded."""
    t0 = time.perf_counter()
    name, facts = prep.name, prep.facts
    log.info("evaluating %s (%s, %s)", name, prep.path, human_bytes(facts.file_size))
    tpl = _template_for(inputs, facts)
    mem = _MemoryPeak()
    with contextlib.closing(chat.load_model(prep.path, n_ctx=prep.ctx, n_batch=n_ctx, seed=options.seed,
                                            threads=options.threads, progress=f"load {name}")) as llm:
        mem.sample()
        ppl, kl = measure_perplexity(llm, prep.tokens, n_ctx=n_ctx, n_chunks=n_chunks, reference=reference,
                                     save_reference=save, desc=f"perplexity {name}", on_chunk=mem.sample)
        spd = measure_speed(llm, prep.tokens, n_prompt=options.speed_prompt, n_gen=options.speed_gen,
                            desc=f"speed {name}") if options.speed else None
        mem.sample()
        samples = (run_samples(llm, inputs.prompts, template=tpl, max_tokens=options.max_tokens)
                   if inputs.prompts else ())
        mem.sample()
    return VariantReport(name=name, model=facts, template=tpl.name, perplexity=ppl, kl=kl, speed=spd,
                         samples=samples, is_reference=save is not None, memory=mem.result(),
                         seconds=time.perf_counter() - t0)


def _settings(options: PassOptions, *, n_ctx: int, n_chunks: int, title: str) -> dict:
    """The report's ``settings``: the pass's context and chunks, ``options`` and the title."""
    o = options
    return {"n_ctx": n_ctx, "n_chunks": n_chunks, "gen_ctx": o.gen_ctx, "samples_per_category": o.samples_per_category,
            "max_samples": o.max_samples, "max_tokens": o.max_tokens, "sampling": asdict(chat.Sampling.greedy()),
            "seed": o.seed, "threads": o.threads or chat.physical_cores(), "template_override": o.template,
            "speed": {"prompt_tokens": o.speed_prompt, "gen_tokens": o.speed_gen} if o.speed else None,
            "title": title}


# ------------------------------------------------------------------ the reference, computed once


@dataclass(frozen=True)
class ReferenceResult:
    """A stored reference pass: the folder ``reference_pass`` wrote, as ``evaluate`` reuses it.

    ``report`` is the reference's own one-row report (``out/report.json``); the predictions live in
    ``out/ref-logprobs.npy`` and ``out/ref-positions.npz`` (see the module docstring for the format).
    """

    out: Path
    name: str
    model: ModelFacts
    report: Report
    n_ctx: int
    n_chunks: int
    positions: int  # scored positions per chunk, n_ctx - n_ctx/2 - 1
    n_vocab: int
    n_tokens: int
    tokens_sha256: str
    text_sha256: str
    logprob_bytes: int  # the log-prob grid file
    total_bytes: int  # the stored reference data: log-probs, positions and text
    seconds: float

    @property
    def variant(self) -> VariantReport:
        return self.report.variant(self.name)

    def text(self) -> str:
        return (self.out / TEXT_FILE).read_text(encoding="utf-8")

    def logprobs(self) -> ReferenceLogProbs:
        """The stored predictions, memory-mapped read-only."""
        try:
            store = ReferenceLogProbs.open(self.out)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise InputError(f"cannot read the stored predictions in {self.out} ({exc})",
                             fix="run the reference pass again") from exc
        if (store.n_chunks, store.per_chunk, store.n_vocab) != (self.n_chunks, self.positions, self.n_vocab) or \
                store.nll.shape != (self.n_chunks, self.positions):
            raise InputError(f"the stored reference in {self.out} has arrays of shape {store.codes.shape}",
                             expected=f"({self.n_chunks}, {self.positions}, {self.n_vocab}) as {REFERENCE_FILE} says",
                             fix="run the reference pass again")
        return store

    @classmethod
    def load(cls, folder: str | Path) -> ReferenceResult:
        """Read a folder written by ``reference_pass``; refuses one that is incomplete or of another format."""
        folder = Path(folder)
        meta_path = folder / REFERENCE_FILE
        fix = "pass the folder written by the reference pass (zhllama eval F16.gguf --out DIR writes DIR/reference)"
        if not folder.exists():
            raise InputError(f"no reference at {folder}", expected="the f16 GGUF, or a stored reference folder",
                             fix="check the path; " + fix)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"no {REFERENCE_FILE} in {folder}", expected="a complete stored reference pass",
                             fix=fix) from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {meta_path} ({exc})", fix=fix) from exc
        if meta.get("format") != REFERENCE_FORMAT or meta.get("version") != REFERENCE_VERSION:
            raise InputError(f"{meta_path} is format {meta.get('format')!r} version {meta.get('version')!r}",
                             expected=f"{REFERENCE_FORMAT!r} version {REFERENCE_VERSION}",
                             fix="run the reference pass again with this zhllama")
        expected = {LOGPROBS_FILE: meta.get("logprob_bytes")}
        for fname in (LOGPROBS_FILE, POSITIONS_FILE, TEXT_FILE, "report.json"):
            p = folder / fname
            if not p.is_file() or (fname in expected and p.stat().st_size != expected[fname]):
                raise InputError(f"the stored reference in {folder} is incomplete: {fname} "
                                 + ("is missing" if not p.is_file() else f"has {p.stat().st_size} bytes, "
                                    f"{REFERENCE_FILE} says {expected[fname]}"), fix=fix)
        try:
            return cls(out=folder, name=meta["name"], model=_from_dict(ModelFacts, meta["model"]),
                       report=Report.load(folder), n_ctx=meta["n_ctx"], n_chunks=meta["n_chunks"],
                       positions=meta["positions_per_chunk"], n_vocab=meta["n_vocab"], n_tokens=meta["tokens"]["count"],
                       tokens_sha256=meta["tokens"]["sha256"], text_sha256=meta["text"]["sha256"],
                       logprob_bytes=meta["logprob_bytes"], total_bytes=meta["total_bytes"],
                       seconds=meta.get("seconds", 0.0))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{meta_path} lacks {exc}", expected=f"a {REFERENCE_FORMAT} record", fix=fix) from exc


def _as_reference(reference: ReferenceResult | str | Path) -> ReferenceResult:
    return reference if isinstance(reference, ReferenceResult) else ReferenceResult.load(reference)


def _is_gguf_file(p: str | Path | ReferenceResult | None) -> bool:
    return p is not None and not isinstance(p, ReferenceResult) and Path(p).is_file()


def reference_pass(model_gguf: str | Path, *, out: str | Path, text: str | Path | None = None,
                   n_ctx: int | None = None, n_chunks: int | None = None, name: str | None = None,
                   tokenizers: Sequence[str | Path] | Mapping[str, str | Path] = (),
                   options: PassOptions = PassOptions(), title: str | None = None,
                   plot: bool = True) -> ReferenceResult:
    """Evaluate the float reference (the f16 GGUF) once and store what every variant's KL needs.

    Writes into ``out``: the reference's own report (report.json/.md/.png: its perplexity, speed,
    samples, memory, and the tokenizer rows), ``ref-logprobs.npy`` + ``ref-positions.npz`` (its
    predictions in the compact form, ``reference_bytes(chunks, n_ctx, vocab)`` bytes), ``ref-text.txt``
    and ``reference.json`` (written last). ``n_ctx`` None = DEFAULT_N_CTX; ``n_chunks`` None =
    DEFAULT_N_CHUNKS, 0 = every chunk the text holds. ``options`` (``PassOptions``): the samples, the
    speed test, seed and threads. ``plot=False`` leaves report.png out (a report that
    ``combine_reports`` + ``write_report`` will plot). Every input is read and checked, and the disk
    space for the stored predictions checked, before the model is loaded.
    """
    out = Path(out)
    n_ctx = n_ctx or DEFAULT_N_CTX
    inputs = _read_inputs(text=text, tokenizers=tokenizers, options=options)
    facts = cached_model_facts(model_gguf)
    name = name or variant_name(facts)
    prep = _prepare(model_gguf, name=name, facts=facts, inputs=inputs, n_ctx=n_ctx, options=options)
    chunks = resolve_chunks(len(prep.tokens), n_ctx, n_chunks)
    per_chunk = n_ctx - n_ctx // 2 - 1
    nbytes = reference_bytes(chunks, n_ctx, facts.vocab_size)
    check_disk_space(out, nbytes + len(inputs.text.encode("utf-8")) + 2_000_000, what="the evaluation reference")
    out.mkdir(parents=True, exist_ok=True)
    # an earlier pass in the same folder stops being a reference now: its record must not vouch for new files
    (out / REFERENCE_FILE).unlink(missing_ok=True)
    t0 = time.perf_counter()
    with atomic_path(out / LOGPROBS_FILE) as tmp_codes, atomic_path(out / POSITIONS_FILE) as tmp_positions:
        store = ReferenceLogProbs.create(tmp_codes, n_chunks=chunks, per_chunk=per_chunk, n_vocab=facts.vocab_size)
        row = _run_model(prep, inputs, n_ctx=n_ctx, n_chunks=chunks, reference=None, save=store, options=options)
        store.flush()
        store.write_positions(tmp_positions)
        del store  # unmap the codes before they are renamed into place
    write_text_atomic(out / TEXT_FILE, inputs.text)
    logprob_bytes = (out / LOGPROBS_FILE).stat().st_size
    total = sum((out / f).stat().st_size for f in (LOGPROBS_FILE, POSITIONS_FILE, TEXT_FILE))
    settings = _settings(options, n_ctx=n_ctx, n_chunks=chunks, title=title or _default_title([row]))
    settings["reference_bytes"] = total
    report = Report(out=out, json_path=out / "report.json", md_path=out / "report.md", plot_path=out / "report.png",
                    variants=(row,), reference=name, text=inputs.text_info(len(prep.tokens)),
                    tokenizers=inputs.tokenizer_rows + (prep.vocab_row,), settings=settings)
    write_report(report, plot=plot)
    meta = {
        "format": REFERENCE_FORMAT, "version": REFERENCE_VERSION, "name": name, "model": asdict(facts),
        "text": {"source": inputs.text_label, "chars": len(inputs.text), "sha256": inputs.text_sha256},
        "tokens": {"count": len(prep.tokens), "sha256": tokens_sha256(prep.tokens)},
        "n_ctx": n_ctx, "n_chunks": chunks, "positions_per_chunk": per_chunk, "n_vocab": facts.vocab_size,
        "encoding": {"logprobs": "uint16 code = round((max(log p, floor) - floor) / step); 0 = at or below the floor",
                     "floor": KL_LOG_PROB_FLOOR, "step": LOGPROB_STEP,
                     "positions": "nll float64 (exact), top int32 (argmax), log_mass float64 (log of the "
                                  "probability on the non-zero codes, exact)"},
        "files": {"logprobs": LOGPROBS_FILE, "positions": POSITIONS_FILE, "text": TEXT_FILE, "report": "report.json"},
        "logprob_bytes": logprob_bytes, "total_bytes": total, "seconds": time.perf_counter() - t0,
    }
    write_text_atomic(out / REFERENCE_FILE, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    log.info("reference %s: %d chunks of %d, %s of stored predictions", name, chunks, n_ctx, human_bytes(total))
    return ReferenceResult.load(out)


def _ctx_and_chunks(ref: ReferenceResult | None, n_ctx: int | None,
                        n_chunks: int | None) -> tuple[int, int | None]:
    """n_ctx and chunks of an evaluation: against a stored reference the reference's (any asked for must
    match); without one ``n_ctx`` or DEFAULT_N_CTX, and ``n_chunks`` as given (``resolve_chunks`` later)."""
    if ref is None:
        return n_ctx or DEFAULT_N_CTX, n_chunks
    if n_ctx is not None and n_ctx != ref.n_ctx:
        raise InputError(f"n_ctx={n_ctx} asked for; the reference in {ref.out} was computed with n_ctx={ref.n_ctx}",
                         expected="the reference's context (KL compares the same positions)",
                         fix="leave --ctx out, or run the reference pass again with this --ctx")
    if n_chunks is not None and resolve_chunks(ref.n_tokens, ref.n_ctx, n_chunks) != ref.n_chunks:
        raise InputError(f"{n_chunks or 'all'} chunk(s) asked for; the reference in {ref.out} holds {ref.n_chunks}",
                         expected="the reference's chunks (KL compares the same positions)",
                         fix="leave --chunks out, or run the reference pass again with these --chunks")
    return ref.n_ctx, ref.n_chunks


def evaluate(model_gguf: str | Path, *, out: str | Path, reference: ReferenceResult | str | Path | None = None,
             text: str | Path | None = None, n_ctx: int | None = None, n_chunks: int | None = None,
             name: str | None = None, tokenizers: Sequence[str | Path] | Mapping[str, str | Path] = (),
             options: PassOptions = PassOptions(), title: str | None = None, plot: bool = True) -> Report:
    """Evaluate one GGUF into a report under ``out``: perplexity, speed, samples, memory and, against
    ``reference``, KL / top-1 agreement / PPL ratio.

    ``reference`` is a ``ReferenceResult`` or its folder (see ``reference_pass``): the KL comes from its
    stored predictions and the f16 model is not loaded; ``n_ctx``, ``n_chunks`` and ``text`` then
    default to the reference's, and any given must match it. The report holds the reference's row
    (copied) and this variant's. The reference's own model file gives the reference's report as it is.
    ``reference`` may also be the f16 GGUF itself: it is then evaluated first, into
    ``out/reference`` (one reference pass per call; pass the folder to reuse it).
    ``name`` defaults to the GGUF's file type ("q4_0"); ``n_chunks`` 0 = every chunk of the text.
    ``options`` (``PassOptions``): the samples (``prompts=False`` skips them; ``samples_per_category``/
    ``max_samples`` 0 = no limit; ``template`` overrides the automatic choice, alpaca if the vocabulary
    holds [PAD], else plain), the speed test, seed and threads. ``plot=False`` leaves report.png out.
    Every input is read and checked (the text tokenized with the model's vocabulary) before the model's
    weights are loaded; the report files are written atomically.
    """
    if _is_gguf_file(reference):
        return evaluate_variants([model_gguf] if name is None else {name: model_gguf}, reference=reference, out=out,
                                 text=text, n_ctx=n_ctx, n_chunks=n_chunks, tokenizers=tokenizers, options=options,
                                 title=title)
    out = Path(out)
    ref = _as_reference(reference) if reference is not None else None
    n_ctx, n_chunks = _ctx_and_chunks(ref, n_ctx, n_chunks)
    inputs = _read_inputs(text=text, tokenizers=tokenizers, options=options, reference=ref)
    facts = cached_model_facts(model_gguf)
    name = name or variant_name(facts)
    if ref is not None:
        if _same_file(model_gguf, ref.model.path) and facts.file_size == ref.model.file_size:
            check_disk_space(out, 1_000_000, what="the evaluation report")
            report = _relocate(ref.report, out)  # the reference itself: nothing to recompute
            write_report(report, plot=plot)
            return report
        _check_vocab(name, facts.vocab_size, ref.n_vocab)
        if name == ref.name:
            raise InputError(f"variant name {name!r} is the reference's", expected="a name of its own",
                             fix="pass another name (--name)")
    prep = _prepare(model_gguf, name=name, facts=facts, inputs=inputs, n_ctx=n_ctx, options=options, reference=ref)
    chunks = ref.n_chunks if ref is not None else resolve_chunks(len(prep.tokens), n_ctx, n_chunks)
    check_disk_space(out, 1_000_000, what="the evaluation report")
    out.mkdir(parents=True, exist_ok=True)
    row = _run_model(prep, inputs, n_ctx=n_ctx, n_chunks=chunks,
                     reference=ref.logprobs() if ref is not None else None, save=None, options=options)
    if ref is not None:
        variants = (ref.variant, row)
        tok_rows = _merge_rows(ref.report.tokenizers, inputs.tokenizer_rows + (prep.vocab_row,))
    else:
        variants = (row,)
        tok_rows = inputs.tokenizer_rows + (prep.vocab_row,)
    settings = _settings(options, n_ctx=n_ctx, n_chunks=chunks, title=title or _default_title(variants))
    if ref is not None:
        settings["reference_bytes"] = ref.total_bytes
    report = Report(out=out, json_path=out / "report.json", md_path=out / "report.md", plot_path=out / "report.png",
                    variants=variants, reference=ref.name if ref is not None else None,
                    text=inputs.text_info(len(prep.tokens)), tokenizers=tok_rows, settings=settings)
    write_report(report, plot=plot)
    return report


def _merge_rows(*groups: Sequence[TokenizerRow]) -> tuple[TokenizerRow, ...]:
    """Tokenizer rows of several reports, each label once (the first one seen), in order."""
    out: dict[str, TokenizerRow] = {}
    for rows in groups:
        for r in rows:
            out.setdefault(r.tokenizer, r)
    return tuple(out.values())


def evaluate_variants(variants: Mapping[str, str | Path] | Sequence[str | Path], *,
                      reference: ReferenceResult | str | Path | None = None, out: str | Path,
                      text: str | Path | None = None, n_ctx: int | None = None, n_chunks: int | None = None,
                      tokenizers: Sequence[str | Path] | Mapping[str, str | Path] = (),
                      options: PassOptions = PassOptions(), title: str | None = None) -> Report:
    """Evaluate several GGUF variants of one model into one report under ``out`` (``zhllama eval``).

    The same three steps as the build graph's nodes: ``reference_pass`` once (into
    ``out/reference``, when ``reference`` is the f16 GGUF; a ``ReferenceResult`` or stored folder is
    reused as it is), ``evaluate`` of every other variant against it (``out/variants/<name>``), and
    ``combine_reports`` into ``out/report.*`` (reference row first, then the variants in order).
    ``variants`` maps a display name to a GGUF path, or lists paths (named by file type, "q4_0"); a
    variant that is the reference file names the reference's row and is not evaluated twice. Without a reference every variant
    gets perplexity, speed and samples, no KL. Before any model is loaded, every input is read and
    checked for every model (text, prompts, template, tokenizers; each GGUF's vocabulary against the
    reference's and the text's tokens). ``options`` (``PassOptions``) is every model's, the
    reference's included; the other keywords are ``evaluate``'s.
    """
    if not variants:
        raise InputError("no model to evaluate", fix="pass at least one .gguf file")
    out = Path(out)
    ref_gguf = Path(reference) if _is_gguf_file(reference) else None
    stored = _as_reference(reference) if reference is not None and ref_gguf is None else None
    # every input of every model, before any model is loaded: the cheap ones first
    ctx, _ = _ctx_and_chunks(stored, n_ctx, n_chunks)
    inputs = _read_inputs(text=text, tokenizers=tokenizers, options=options, reference=stored)
    variants = _named_variants(variants)
    facts = {n: cached_model_facts(p) for n, p in variants.items()}
    ref_name: str | None = None
    if ref_gguf is not None:
        ref_facts = cached_model_facts(ref_gguf)
        ref_name = next((n for n, p in variants.items() if _same_file(p, ref_gguf)), None)
        if ref_name is None:
            ref_name = variant_name(ref_facts)
            while ref_name in variants:
                ref_name += "-ref"
    elif stored is not None:
        ref_facts, ref_name = stored.model, stored.name
    ref_path = ref_gguf if ref_gguf is not None else (Path(stored.model.path) if stored is not None else None)
    todo = {n: p for n, p in variants.items() if ref_path is None or not _same_file(p, ref_path)}
    for n in todo:
        if ref_name is not None:
            _check_vocab(n, facts[n].vocab_size, ref_facts.vocab_size)
        if n == ref_name:
            raise InputError(f"variant name {n!r} is the reference's", expected="a name of its own",
                             fix="pass another --name")
    ref_tokens = None
    if ref_gguf is not None:
        ref_tokens = _prepare(ref_gguf, name=ref_name, facts=ref_facts, inputs=inputs, n_ctx=ctx,
                              options=options).tokens
    for n, p in todo.items():
        prep = _prepare(p, name=n, facts=facts[n], inputs=inputs, n_ctx=ctx, options=options, reference=stored)
        if ref_tokens is not None and prep.tokens != ref_tokens:
            raise InputError(f"{n} tokenizes the evaluation text to {len(prep.tokens)} tokens, not as the "
                             f"reference does ({len(ref_tokens)})", expected="the reference's vocabulary",
                             fix="evaluate quantizations of the reference model against it")
    if ref_gguf is not None:
        stored = reference_pass(ref_gguf, out=out / "reference", name=ref_name, text=text, n_ctx=ctx,
                                n_chunks=n_chunks, tokenizers=tokenizers, options=options, plot=False)
        n_ctx, n_chunks = None, None  # from the reference from now on
    paths = [stored.report.json_path] if stored is not None else []
    for n, p in todo.items():
        paths.append(evaluate(p, out=out / "variants" / n, reference=stored, name=n, text=text, n_ctx=n_ctx,
                              n_chunks=n_chunks, tokenizers=tokenizers, options=options, plot=False).json_path)
    report = combine_reports(paths, out=out, title=title)
    write_report(report)
    return report


def _named_variants(variants: Mapping[str, str | Path] | Sequence[str | Path]) -> dict[str, str | Path]:
    """``{name: path}``; paths alone are named by their GGUF file type ("q4_0"), "-2", "-3" for repeats."""
    if isinstance(variants, Mapping):
        return dict(variants)
    named: dict[str, str | Path] = {}
    for p in variants:
        base = name = variant_name(cached_model_facts(p))
        n = 2
        while name in named:
            name, n = f"{base}-{n}", n + 1
        named[name] = p
    return named


def combine_reports(paths: Sequence[str | Path], *, out: str | Path, title: str | None = None) -> Report:
    """One Report from the report.json files (or their folders) of one evaluation: the reference's
    and each variant's. The reference row comes first, then every variant in the order of ``paths``;
    a row several reports hold (each variant's report carries the reference's row) appears once.
    Reports measured on different texts, contexts or references are refused. The result's paths point
    into ``out``; nothing is written (``write_report`` does that). ``title`` None = from the variants.
    """
    if not paths:
        raise InputError("no evaluation report to combine", fix="pass the reference's and the variants' reports")
    out = Path(out)
    reports = [Report.load(p) for p in paths]
    for what, key in (("texts", lambda r: r.text.get("sha256")), ("contexts", lambda r: r.settings.get("n_ctx")),
                      ("references", lambda r: r.reference)):
        seen = {key(r) for r in reports if key(r) is not None}
        if len(seen) > 1:
            raise InputError(f"the reports to combine were measured on different {what}: {sorted(map(str, seen))}",
                             expected="the reports of one evaluation (one reference, one text, one n_ctx)",
                             fix="evaluate every variant against the same reference pass")
    variants: list[VariantReport] = []
    paths_by_name: dict[str, str] = {}
    for r in reports:
        for v in sorted(r.variants, key=lambda v: not v.is_reference):
            if v.name in paths_by_name:
                if paths_by_name[v.name] != v.model.path:
                    raise InputError(f"two different models are named {v.name!r} ({paths_by_name[v.name]}, "
                                     f"{v.model.path})", expected="one name per variant", fix="rename one of them")
                continue
            paths_by_name[v.name] = v.model.path
            variants.append(v)
    variants.sort(key=lambda v: not v.is_reference)  # stable: the variants keep their order
    base = next((r for r in reports if r.reference is not None), reports[0])
    return Report(out=out, json_path=out / "report.json", md_path=out / "report.md", plot_path=out / "report.png",
                  variants=tuple(variants), reference=base.reference, text=base.text,
                  tokenizers=_merge_rows(*(r.tokenizers for r in reports)),
                  settings={**base.settings, "title": title or _default_title(variants)})


def apply_gates(report: Report, gates: Mapping[str, Mapping[str, Any]], *, enforce_broken: bool) -> Report:
    """The report with every gate marked pass or fail (``pipeline_lib.gates.check`` on its table): the
    gates in force (``gates.resolve``'s form) and, for every variant, the broken-quantization flag
    (top-1 agreement under half the reference's), which fails the build only when ``enforce_broken``."""
    from .gates import check

    return replace(report, gates=check(report.table(), gates, enforce_broken=enforce_broken))


def _default_title(results: Sequence[VariantReport]) -> str:
    stems = sorted({Path(v.model.path).stem for v in results})
    return "zhllama eval: " + (stems[0] if len(stems) == 1 else ", ".join(v.name for v in results))


# ------------------------------------------------------------------ report files


def write_report(report: Report, *, plot: bool = True) -> None:
    """report.png (unless ``plot`` is false: an intermediate report that a combined one will plot), then
    report.md, then report.json (last: its presence means the report is complete)."""
    report.out.mkdir(parents=True, exist_ok=True)
    if plot:
        render_plot(report, report.plot_path)
    else:
        report.plot_path.unlink(missing_ok=True)
    write_text_atomic(report.md_path, render_markdown(report, plot=plot))
    write_text_atomic(report.json_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")


def render_plot(report: Report, path: Path) -> None:
    """Two panels: file size vs perplexity, file size vs mean KL divergence; one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6), dpi=110)
    axes = fig.subplots(1, 2)
    vs = [v for v in report.variants if v.perplexity is not None]
    sizes = [v.model.file_size / 1e6 for v in vs]
    panels = [
        (axes[0], [v.perplexity.ppl for v in vs], [v.perplexity.ppl_uncertainty for v in vs],
         "perplexity", "Perplexity vs file size (lower is better)"),
        (axes[1], [0.0 if v.is_reference else (v.kl.mean_kld if v.kl else float("nan")) for v in vs],
         [0.0 if v.is_reference else (v.kl.kld_uncertainty if v.kl else 0.0) for v in vs],
         "mean KL divergence from the reference (nats)", "KL divergence vs file size (lower is better)"),
    ]
    colors = matplotlib.colormaps["tab10"]
    for ax, ys, errs, ylabel, subtitle in panels:
        for i, (v, x, y, e) in enumerate(zip(vs, sizes, ys, errs, strict=True)):
            if math.isnan(y):
                continue
            ax.errorbar([x], [y], yerr=[e] if e else None, fmt="o", ms=8, color=colors(i % 10), capsize=3)
            label = f"{v.name}{' (ref)' if v.is_reference else ''}\n{v.model.bits_per_weight:.1f} bpw"
            # alternate above/below so neighbouring points' labels do not collide
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(8, 6 if i % 2 == 0 else -26),
                        fontsize=9, color=colors(i % 10))
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(ylabel)
        ax.set_title(subtitle, fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.3, y=0.3)
    if report.reference is None:
        axes[1].text(0.5, 0.5, "no reference given\n(pass --reference f16.gguf)", transform=axes[1].transAxes,
                     ha="center", va="center", fontsize=11, color="gray")
    settings = report.settings
    fig.suptitle(f"{settings.get('title', 'zhllama eval')} — n_ctx={settings['n_ctx']}, "
                 f"{report.text['tokens']} text tokens", fontsize=12)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _fmt(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"



def render_gates(results: Sequence[GateResult]) -> list[str]:
    """The "Quality gates" section (markdown lines; none without gates)."""
    from .gates import BROKEN, METRICS

    if not results:
        return []
    lines = ["## Quality gates", "",
             "| variant | gate | measured | limit | result | limit from |", "|---|---|---:|---:|---|---|"]
    for g in results:
        if g.metric == BROKEN:
            what, measured = "top-1 agreement ≥ 50% of the reference's", g.measured
            shown = "–" if measured is None else f"{100 * measured:.2f}%"
            limit = f"{100 * g.limit:.0f}%"
        else:
            column, kind, words = METRICS[g.metric]
            what = f"{words} {'≤' if kind == 'max' else '≥'} (`{g.metric}`)"
            shown = "–" if g.measured is None else (f"{100 * g.measured:.2f}%" if column == "top1_agreement"
                                                     else f"{g.measured:.6f}")
            limit = f"{100 * g.limit:.2f}%" if column == "top1_agreement" else f"{g.limit:g}"
        result = {"pass": "pass", "FAIL": "**FAIL**"}.get(g.status, "**flagged** (not enforced)")
        if g.metric == BROKEN and not g.passed:
            result += ": broken"
        lines.append(f"| {g.variant} | {what} | {shown} | {limit} | {result} | {g.source} |")
    return lines + [""]


def render_markdown(report: Report, *, plot: bool = True) -> str:
    s = report.settings
    lines = [f"# {s.get('title', 'zhllama eval')}", ""]
    chunks = s.get("n_chunks")
    lines += [f"Evaluation text: `{report.text['source']}` ({report.text['chars']} characters, "
              f"{report.text['tokens']} tokens, sha256 `{report.text['sha256'][:16]}…`). "
              f"Perplexity as llama.cpp's `llama-perplexity` computes it (n_ctx={s['n_ctx']}"
              + (f", {chunks} chunk{'s' if chunks != 1 else ''}" if chunks else "")
              + ", second half of each chunk scored); KL divergence, top-1 agreement and PPL ratio as its "
              "`--kl-divergence` defines them"
              + (f", against **{report.reference}**" if report.reference else " (no reference given)")
              + (f" (its stored predictions: {human_bytes(s['reference_bytes'])})" if s.get("reference_bytes") else "")
              + ".", ""]
    lines += ["## Quality and size", "",
              "| variant | file size | bits/weight | PPL | PPL(Q)/PPL(ref) | mean KL | top-1 agreement | RMS Δp |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for v in report.variants:
        p, k = v.perplexity, v.kl
        ppl = f"{p.ppl:.4f} ± {p.ppl_uncertainty:.4f}" if p else "–"
        if v.is_reference:
            ratio, kld, top, dp = "1 (reference)", "0", "100%", "0"
        elif k:
            ratio = f"{k.ppl_ratio:.4f} ± {k.ppl_ratio_uncertainty:.4f}"
            kld = f"{k.mean_kld:.6f} ± {k.kld_uncertainty:.6f}"
            top = f"{100 * k.same_top:.2f}% ± {100 * k.same_top_uncertainty:.2f}"
            dp = f"{100 * k.rms_dp:.3f}%"
        else:
            ratio = kld = top = dp = "–"
        lines.append(f"| {v.name} | {human_bytes(v.model.file_size)} | {v.model.bits_per_weight:.2f} | {ppl} | "
                     f"{ratio} | {kld} | {top} | {dp} |")
    lines += ["", f"![size vs perplexity and KL]({report.plot_path.name})", ""] if plot else [""]
    lines += render_gates(report.gates)
    if any(v.speed for v in report.variants):
        lines += ["## Speed", "", "| variant | prompt tokens/s | generation tokens/s | threads |", "|---|---:|---:|---:|"]
        for v in report.variants:
            if v.speed:
                sp = v.speed
                lines.append(f"| {v.name} | {sp.prompt_tokens_per_s:.1f} (pp{sp.prompt_tokens}) | "
                             f"{sp.gen_tokens_per_s:.1f} (tg{sp.gen_tokens}) | {sp.threads} |")
        lines.append("")
    if any(v.memory for v in report.variants):
        lines += ["## Memory and time", "",
                  "Resident memory while each model was evaluated, split as the kernel counts it: anonymous "
                  "(heap, KV cache, logits: what needs RAM) and file-backed (the memory-mapped GGUF: page cache "
                  "that can be dropped and read again, but which RSS counts too).", "",
                  "| variant | resident (anonymous) | file-backed (mapped model) | process peak RSS | wall time |",
                  "|---|---:|---:|---:|---:|"]
        for v in report.variants:
            if v.memory:
                m = v.memory
                lines.append(f"| {v.name} | {human_bytes(m.anon_bytes)} | {human_bytes(m.file_bytes)} | "
                             f"{human_bytes(m.peak_rss_bytes)} | {v.seconds:.1f} s |")
        lines.append("")
    if report.tokenizers:
        lines += ["## Tokenizer efficiency (same text)", "", "| tokenizer | vocabulary | tokens | chars/token |",
                  "|---|---:|---:|---:|"]
        for t in report.tokenizers:
            lines.append(f"| {t.tokenizer} | {t.vocab_size} | {t.tokens} | {t.chars_per_token:.3f} |")
        lines.append("")
    for v in report.variants:
        if not v.samples:
            continue
        lines += [f"## Samples: {v.name} (template: {v.template}, greedy, ≤ {s['max_tokens']} tokens)", ""]
        for smp in v.samples:
            lines.append(f"### {smp.category_zh or smp.category} — `{smp.id}`")
            for q, a in zip(smp.turns, smp.replies, strict=True):
                lines += ["", f"> {q}", "", "```text", a.replace("```", "ʼʼʼ") or "(empty reply)", "```"]
            lines.append("")
    return "\n".join(lines) + "\n"
