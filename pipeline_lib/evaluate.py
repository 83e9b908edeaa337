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
  One deliberate difference: llama.cpp stores the reference's log-probabilities as 16-bit
  integers on disk (``--kl-divergence-base``); we keep them as float32 in a temporary memory-mapped
  file, so our numbers are slightly *more* exact (self-KL is exactly 0 rather than ~1e-6).
* **Speed** (prompt processing and generation tokens/s), file size, bits per weight
  (tensor bytes x 8 / parameters, parameters counted from the GGUF's tensors with gguf.GGUFReader).
* **Tokenizer efficiency** on the same text: tokens and characters per token for each given
  sentencepiece ``tokenizer.model`` (e.g. LLaMA's vs the merged Chinese one) and for each GGUF's own
  vocabulary as llama.cpp tokenizes it.
* **Generation samples** for the release's ten categories (``data/prompts_zh.jsonl``), greedy by
  default, with the Alpaca template for Alpaca models and plain continuation for LLaMA models.

The report is ``report.json`` (machine-readable, written last), ``report.md`` and ``report.png``
(file size vs perplexity and vs KL), each written atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path

import numpy as np

from . import chat
from .errors import InputError
from .fsutil import TMP_PREFIX, atomic_path, check_disk_space, human_bytes, sha256_bytes, write_text_atomic
from .gguf_check import open_gguf
from .progress import bar

log = logging.getLogger(__name__)

REPORT_VERSION = 1
KL_LOG_PROB_FLOOR = -16.0  # llama.cpp ignores reference entries with log p <= -16 in the KL sum
DEFAULT_N_CTX = 512  # llama-perplexity's default context


def packaged_text() -> str:
    """The held-out Chinese + English evaluation text shipped with zhllama (not tokenizer training text)."""
    return files("pipeline_lib.data").joinpath("eval_text.txt").read_text(encoding="utf-8")


def packaged_prompts_path() -> Path:
    return Path(str(files("pipeline_lib.data").joinpath("prompts_zh.jsonl")))


# ------------------------------------------------------------------ records


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
            })
        return rows

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("out", "json_path", "md_path", "plot_path"):
            d[k] = str(d[k])
        d["version"] = REPORT_VERSION
        d["table"] = self.table()
        return d


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
                      tensor_types=types, vocab_size=vocab, vocab_kind=chat.gguf_vocab_kind(path))


def variant_name(facts: ModelFacts) -> str:
    """'q4_0', 'f16', ... from the GGUF's file type."""
    name = facts.file_type.lower()
    for prefix in ("mostly_", "all_"):
        name = name.removeprefix(prefix)
    return name


# ------------------------------------------------------------------ perplexity and KL (llama.cpp's way)


def tokenize_text(llm, text: str) -> list[int]:
    """Tokens of the whole text with BOS, as llama-perplexity's ``common_tokenize(ctx, text, true)``."""
    return llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)


def _check_tokens(tokens: Sequence[int], n_ctx: int, what: str) -> None:
    if n_ctx < 8 or n_ctx % 2:
        raise InputError(f"context size {n_ctx}", expected="an even number >= 8 (llama.cpp uses 512)",
                         fix="pass --ctx 512 (or 128 for a quick check)")
    if len(tokens) < 2 * n_ctx:
        raise InputError(f"{what} tokenizes to {len(tokens)} tokens", expected=f"at least {2 * n_ctx} "
                         f"(two chunks of n_ctx={n_ctx}), as llama-perplexity requires",
                         fix="use a longer text or a smaller --ctx")


def chunk_logits(llm, tokens: Sequence[int], *, n_ctx: int, n_chunks: int | None = None,
                 desc: str = "perplexity") -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(chunk, targets, logits)`` per chunk, decoded exactly as llama-perplexity does.

    ``logits[j]`` (float32, shape [n_ctx - n_ctx/2 - 1, n_vocab]) is the prediction made at position
    ``n_ctx/2 + j`` of the chunk and ``targets[j]`` the token that follows it.
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
    """The reference model's log-probabilities at every scored position, in a float32 memmap.

    The counterpart of llama-perplexity's ``--kl-divergence-base`` file (which stores them as
    16-bit integers); lives in a temporary file under ``workdir`` and is removed by ``close()``.
    """

    def __init__(self, tokens: Sequence[int], *, n_ctx: int, n_chunks: int, n_vocab: int, workdir: Path) -> None:
        self.tokens = list(tokens)
        self.n_ctx = n_ctx
        self.n_chunks = n_chunks
        self.n_vocab = n_vocab
        self.per_chunk = n_ctx - n_ctx // 2 - 1
        nbytes = n_chunks * self.per_chunk * n_vocab * 4
        check_disk_space(workdir, nbytes, what="reference log-probabilities")
        workdir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "ref-logprobs.", suffix=".f32", dir=workdir)
        os.close(fd)
        self.path = Path(name)
        self.data = np.memmap(self.path, dtype=np.float32, mode="w+",
                              shape=(n_chunks, self.per_chunk, n_vocab))

    def close(self) -> None:
        del self.data
        self.path.unlink(missing_ok=True)


def measure_perplexity(llm, tokens: Sequence[int], *, n_ctx: int, n_chunks: int | None = None,
                       reference: ReferenceLogProbs | None = None, save_reference: ReferenceLogProbs | None = None,
                       desc: str = "perplexity") -> tuple[PerplexityResult, KLResult | None]:
    """Perplexity of ``llm`` on ``tokens`` (and KL against ``reference`` when given).

    ``save_reference`` receives this model's log-probabilities (for later KL runs of other variants).
    """
    _check_tokens(tokens, n_ctx, "the evaluation text")
    if reference is not None:
        if reference.n_vocab != llm.n_vocab():
            raise InputError(f"the model has {llm.n_vocab()} tokens, the reference {reference.n_vocab}",
                             expected="the same vocabulary (a quantization of the reference model)",
                             fix="compare quants only against the f16 GGUF they were made from")
        tokens, n_chunks = reference.tokens, reference.n_chunks
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
            save_reference.data[c] = lp.astype(np.float32)
        if reference is not None:
            ref = reference.data[c].astype(np.float64)
            nll_ref = -ref[rows, targets]
            s.nll_ref += float(nll_ref.sum())
            s.nll_ref2 += float((nll_ref * nll_ref).sum())
            s.nll_nll_ref += float((nll * nll_ref).sum())
            mask = ref > KL_LOG_PROB_FLOOR
            # compare at the precision the reference is stored in: a model against itself gives exactly 0
            lq = lp.astype(np.float32).astype(np.float64)
            kld = np.where(mask, np.exp(ref) * (ref - lq), 0.0).sum(axis=1)
            s.kld += float(kld.sum())
            s.kld2 += float((kld * kld).sum())
            s.kld_values.extend(kld.tolist())
            s.same_top += int((logits.argmax(axis=1) == ref.argmax(axis=1)).sum())
            dp = np.exp(-nll) - np.exp(-nll_ref)
            s.dp2 += float((dp * dp).sum())
            s.dp4 += float((dp ** 4).sum())
        running.append(math.exp(s.nll / s.count))
        n_done = c + 1
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


def measure_speed(llm, tokens: Sequence[int], *, n_prompt: int = 128, n_gen: int = 32,
                  repeats: int = 2) -> SpeedResult:
    """Prompt processing (one batch of ``n_prompt`` tokens, best of ``repeats``) and greedy generation
    (``n_gen`` single-token decodes) in tokens per second, like llama-bench's pp/tg tests but shorter."""
    import llama_cpp as lc

    n_prompt = max(1, min(n_prompt, chat.context_size(llm) - n_gen - 1, llm.n_batch, len(tokens)))
    ctx = llm.ctx
    n_vocab = llm.n_vocab()
    batch = lc.llama_batch_init(max(n_prompt, 1), 0, 1)
    try:
        prompt = list(tokens[:n_prompt])
        t_prompt = math.inf
        for _ in range(repeats):  # best of a few: the first decode after loading also allocates buffers
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
        t_gen = time.perf_counter() - t0
    finally:
        lc.llama_batch_free(batch)
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        llm.reset()
    return SpeedResult(prompt_tokens=n_prompt, prompt_tokens_per_s=n_prompt / t_prompt if t_prompt else 0.0,
                       gen_tokens=n_gen, gen_tokens_per_s=n_gen / t_gen if t_gen else 0.0,
                       threads=llm.n_threads)


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


def pick_prompts(items: Sequence[PromptItem], per_category: int | None) -> list[PromptItem]:
    """The first ``per_category`` prompts of every category (all when None or 0), categories in file order."""
    if not per_category:
        return list(items)
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.category, 0) < per_category:
            out.append(it)
            seen[it.category] = seen.get(it.category, 0) + 1
    return out


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
    a mapping ``{label: path}`` to name the rows."""
    from .tokenizer import tokenizer_stats

    named = _named_tokenizers(tokenizers)
    rows = [TokenizerRow(tokenizer=name, vocab_size=st.vocab_size, chars=st.chars, tokens=st.tokens,
                         chars_per_token=st.chars_per_token)
            for name, st in zip(named, tokenizer_stats(text, list(named.values())), strict=True)]
    lines = [line for line in text.splitlines() if line]
    chars = sum(len(line) for line in lines)
    for name, llm in llms.items():
        n = sum(len(llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)) for line in lines)
        rows.append(TokenizerRow(tokenizer=name, vocab_size=llm.n_vocab(), chars=chars, tokens=n,
                                 chars_per_token=chars / n if n else 0.0))
    return tuple(rows)


# ------------------------------------------------------------------ the stage


def _plan_inputs(variants: Mapping[str, str | Path], reference: str | Path | None,
                 text: str | Path | None, prompts: str | Path | None, template: str | None,
                 tokenizers: Sequence[str | Path]) -> tuple[dict[str, ModelFacts], ModelFacts | None, str, str,
                                                            list[PromptItem] | None]:
    if not variants:
        raise InputError("no model to evaluate", fix="pass at least one .gguf file")
    facts = {name: model_facts(p) for name, p in variants.items()}
    ref_facts = model_facts(reference) if reference is not None else None
    if ref_facts is not None:
        for name, f in facts.items():
            if f.vocab_size != ref_facts.vocab_size:
                raise InputError(f"{name} has {f.vocab_size} tokens, the reference {ref_facts.vocab_size}",
                                 expected="quantizations of the reference model",
                                 fix="pass the f16 GGUF these quants were made from as --reference")
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
    items = load_prompts(prompts) if prompts is not False else None
    if template is not None:
        chat.get_template(template)
    for t in _named_tokenizers(tokenizers).values():
        p = Path(t)
        if not (p.is_file() or (p / "tokenizer.model").is_file()):
            raise InputError(f"no tokenizer at {t}", fix="pass a tokenizer.model file or a folder holding one")
    return facts, ref_facts, body, label, items


def evaluate_variants(
    variants: Mapping[str, str | Path],
    *,
    reference: str | Path | None = None,
    out: str | Path,
    text: str | Path | None = None,
    prompts: str | Path | None | bool = None,
    template: str | None = None,
    n_ctx: int = DEFAULT_N_CTX,
    n_chunks: int | None = None,
    gen_ctx: int = 2048,
    samples_per_category: int | None = 1,
    max_tokens: int = 128,
    tokenizers: Sequence[str | Path] | Mapping[str, str | Path] = (),
    speed: bool = True,
    seed: int = 0,
    threads: int | None = None,
    title: str | None = None,
) -> Report:
    """Evaluate several GGUF variants of one model into one report under ``out``.

    ``variants`` maps a display name (e.g. "q4_0") to a GGUF path. ``reference`` (the f16 GGUF)
    is evaluated first (added to the report as a variant unless one of ``variants`` is that same
    file) and every other variant gets KL / top-1 agreement / PPL ratio against it.
    ``prompts=False`` skips generation samples; ``samples_per_category`` None/0 = all prompts.
    Perplexity uses chunks of ``n_ctx`` tokens; the model is opened with a context of ``gen_ctx`` (capped at
    its training context) or ``n_ctx`` if larger, so that generation prompts fit (the release ran
    llama.cpp with ``-c 2048``).
    ``template`` overrides the automatic choice (alpaca if the vocabulary holds [PAD], else plain).
    All inputs are checked before any model is run; the report files are written atomically.
    """
    out = Path(out)
    facts, ref_facts, body, text_label, items = _plan_inputs(variants, reference, text, prompts, template,
                                                             tokenizers)
    items = pick_prompts(items, samples_per_category) if items is not None else []
    check_disk_space(out, 1_000_000, what="the evaluation report")
    out.mkdir(parents=True, exist_ok=True)

    order: list[tuple[str, Path, ModelFacts, bool]] = []
    ref_path = Path(reference).resolve() if reference is not None else None
    if ref_path is not None:
        ref_name = next((n for n, p in variants.items() if Path(p).resolve() == ref_path), None)
        if ref_name is None:
            ref_name = variant_name(ref_facts)
            while ref_name in variants:
                ref_name += "-ref"
        order.append((ref_name, ref_path, ref_facts, True))
    else:
        ref_name = None
    for name, p in variants.items():
        if name != ref_name:
            order.append((name, Path(p), facts[name], False))

    results: list[VariantReport] = []
    gguf_vocabs: dict[str, object] = {}
    tokens: list[int] | None = None
    ref_lp: ReferenceLogProbs | None = None
    tok_rows: tuple[TokenizerRow, ...] = ()
    try:
        for name, path, f, is_ref in order:
            log.info("evaluating %s (%s, %s)", name, path, human_bytes(f.file_size))
            tpl = chat.get_template(template) if template else chat.TEMPLATES[chat.TEMPLATE_FOR_VOCAB[f.vocab_kind]]
            trained = chat.gguf_context_length(path) or gen_ctx
            with contextlib.closing(chat.load_model(path, n_ctx=max(n_ctx, min(gen_ctx, trained)), n_batch=n_ctx,
                                                    seed=seed,
                                                    threads=threads)) as llm:
                if tokens is None:
                    tokens = tokenize_text(llm, body)
                    _check_tokens(tokens, n_ctx, f"the evaluation text {text_label}")
                vocab_key = f"{f.vocab_kind} vocabulary in GGUF ({f.vocab_size} tokens, llama.cpp)"
                if vocab_key not in gguf_vocabs:
                    gguf_vocabs[vocab_key] = None
                    tok_rows += tokenizer_rows(body, llms={vocab_key: llm})
                save = None
                if is_ref:
                    n_total = len(tokens) // n_ctx
                    ref_lp = ReferenceLogProbs(tokens, n_ctx=n_ctx,
                                               n_chunks=n_total if n_chunks is None else min(n_chunks, n_total),
                                               n_vocab=llm.n_vocab(), workdir=out)
                    save = ref_lp
                ppl, kl = measure_perplexity(llm, tokens, n_ctx=n_ctx, n_chunks=n_chunks,
                                             reference=None if is_ref else ref_lp, save_reference=save,
                                             desc=f"perplexity {name}")
                spd = measure_speed(llm, tokens) if speed else None
                samples = run_samples(llm, items, template=tpl, max_tokens=max_tokens) if items else ()
            results.append(VariantReport(name=name, model=f, template=tpl.name, perplexity=ppl, kl=kl, speed=spd,
                                         samples=samples, is_reference=is_ref))
    finally:
        if ref_lp is not None:
            ref_lp.close()
    tok_rows = tuple(tokenizer_rows(body, tokenizers=tokenizers)) + tok_rows
    settings = {"n_ctx": n_ctx, "n_chunks": n_chunks, "gen_ctx": gen_ctx, "samples_per_category": samples_per_category,
                "max_tokens": max_tokens, "sampling": asdict(chat.Sampling.greedy()), "seed": seed,
                "threads": threads, "template_override": template, "speed": speed,
                "title": title or _default_title(results)}
    report = Report(out=out, json_path=out / "report.json", md_path=out / "report.md", plot_path=out / "report.png",
                    variants=tuple(results), reference=ref_name,
                    text={"source": text_label, "chars": len(body), "sha256": sha256_bytes(body.encode("utf-8")),
                          "tokens": len(tokens or [])},
                    tokenizers=tok_rows, settings=settings)
    write_report(report)
    return report


def evaluate(model_gguf: str | Path, *, out: str | Path, reference: str | Path | None = None,
             text: str | Path | None = None, prompts: str | Path | None | bool = None, template: str | None = None,
             n_ctx: int = DEFAULT_N_CTX, name: str | None = None, **kwargs) -> Report:
    """Evaluate one GGUF (against ``reference`` when given) into ``out``; ``name`` defaults to its file type
    ("q4_0"). See ``evaluate_variants`` for the other options."""
    facts = model_facts(model_gguf)
    return evaluate_variants({name or variant_name(facts): model_gguf}, reference=reference, out=out, text=text,
                             prompts=prompts, template=template, n_ctx=n_ctx, **kwargs)


def _default_title(results: Sequence[VariantReport]) -> str:
    stems = sorted({Path(v.model.path).stem for v in results})
    return "zhllama eval: " + (stems[0] if len(stems) == 1 else ", ".join(v.name for v in results))


# ------------------------------------------------------------------ report files


def write_report(report: Report) -> None:
    """report.png, then report.md, then report.json (last: its presence means the report is complete)."""
    render_plot(report, report.plot_path)
    write_text_atomic(report.md_path, render_markdown(report))
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


def render_markdown(report: Report) -> str:
    s = report.settings
    lines = [f"# {s.get('title', 'zhllama eval')}", ""]
    lines += [f"Evaluation text: `{report.text['source']}` ({report.text['chars']} characters, "
              f"{report.text['tokens']} tokens, sha256 `{report.text['sha256'][:16]}…`). "
              f"Perplexity as llama.cpp's `llama-perplexity` computes it (n_ctx={s['n_ctx']}, second half of each "
              f"chunk scored); KL divergence, top-1 agreement and PPL ratio as its `--kl-divergence` defines them"
              + (f", against **{report.reference}**." if report.reference else " (no reference given)."), ""]
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
    lines += ["", f"![size vs perplexity and KL]({report.plot_path.name})", ""]
    if any(v.speed for v in report.variants):
        lines += ["## Speed", "", "| variant | prompt tokens/s | generation tokens/s | threads |", "|---|---:|---:|---:|"]
        for v in report.variants:
            if v.speed:
                sp = v.speed
                lines.append(f"| {v.name} | {sp.prompt_tokens_per_s:.1f} (pp{sp.prompt_tokens}) | "
                             f"{sp.gen_tokens_per_s:.1f} (tg{sp.gen_tokens}) | {sp.threads} |")
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
