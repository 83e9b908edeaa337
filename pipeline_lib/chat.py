"""Prompt templates (as data), multi-turn chat history and streaming generation through llama.cpp.

Templates are the release's: Chinese-Alpaca models were trained on, and run with, the Stanford
Alpaca prompt; Chinese-LLaMA models are plain language models and just continue the text.
Multi-turn chat reproduces llama.cpp's ``main -ins`` mode that the release documented
(``./main -m ... -f prompts/alpaca.txt -ins -c 2048 --temp 0.2 -n 256 --repeat_penalty 1.1``):
the whole conversation stays in the context, each user turn is wrapped in the instruction
prefix/suffix and the model's reply follows its ``### Response:`` marker, so turn *n*'s prompt
is turn *n-1*'s prompt + the reply + the next instruction. When the history no longer fits the
context, the oldest turns are dropped (the preamble is always kept, as llama.cpp's ``n_keep``).

All model work goes through llama-cpp-python (``llama_cpp.Llama``); library code never prints.
"""

from __future__ import annotations

import codecs
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .progress import bar

log = logging.getLogger(__name__)

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
)


@dataclass(frozen=True)
class PromptTemplate:
    """How user turns become model input.

    ``preamble`` is written once at the start; each turn is ``turn.format(instruction=...)``
    followed by the model's reply; ``reply_separator`` goes after a finished reply before the
    next turn; generation stops at any of ``stop`` (text the model would write to start a new turn).
    """

    name: str
    preamble: str
    turn: str
    reply_separator: str
    stop: tuple[str, ...] = ()
    description: str = ""

    def render(self, history: Sequence[tuple[str, str]], instruction: str) -> str:
        """The full prompt for ``instruction`` after the finished (user, reply) turns in ``history``."""
        parts = [self.preamble]
        for user, reply in history:
            parts.append(self.turn.format(instruction=user))
            parts.append(reply + self.reply_separator)
        parts.append(self.turn.format(instruction=instruction))
        return "".join(parts)


# The templates, as data. "alpaca" = the release's template for Chinese-Alpaca models; its single-turn
# rendering is exactly "Below is an instruction ...\n\n### Instruction:\n\n{instruction}\n\n### Response:\n\n".
TEMPLATES: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        preamble=ALPACA_PREAMBLE,
        turn="### Instruction:\n\n{instruction}\n\n### Response:\n\n",
        reply_separator="\n\n",
        stop=("### Instruction:",),
        description="Alpaca instruction template (Chinese-Alpaca models; llama.cpp -ins)",
    ),
    "plain": PromptTemplate(
        name="plain",
        preamble="",
        turn="{instruction}",
        reply_separator="\n",
        stop=(),
        description="plain continuation (Chinese-LLaMA base models)",
    ),
}

# Which template a model family uses (a table, not a branch).
TEMPLATE_FOR_VOCAB = {"alpaca": "alpaca", "llama": "plain"}

# Sampling presets: deterministic for evaluation; the release's llama.cpp settings for chat.
GREEDY = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "repeat_penalty": 1.0}
RELEASE_CHAT = {"temperature": 0.2, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise InputError(f"unknown prompt template {name!r}", expected=" or ".join(sorted(TEMPLATES)),
                         fix="pass --template alpaca for Chinese-Alpaca models, plain for Chinese-LLaMA") from None


def gguf_vocab_kind(model_gguf: str | Path) -> str:
    """'alpaca' if the GGUF's vocabulary holds the ``[PAD]`` piece Chinese-Alpaca added, else 'llama'."""
    import gguf

    path = _check_gguf(model_gguf)
    return vocab_kind(gguf.GGUFReader(path), path)


def vocab_kind(reader, path: str | Path = "the GGUF") -> str:
    """``gguf_vocab_kind`` for an open ``gguf.GGUFReader`` (parsing a 50k-token vocabulary takes seconds:
    read the file once)."""
    field_ = reader.fields.get("tokenizer.ggml.tokens")
    if field_ is None:
        raise InputError(f"{path} has no tokenizer.ggml.tokens", expected="a GGUF with an embedded vocabulary",
                         fix="convert the model again with `zhllama convert`")
    pad = b"[PAD]"
    # Pieces are stored in order; [PAD] is the last piece in the release, so search from the end.
    for idx in reversed(field_.data):
        if bytes(field_.parts[idx]) == pad:
            return "alpaca"
    return "llama"


def gguf_context_length(model_gguf: str | Path) -> int | None:
    """The context length the model was trained with (``<arch>.context_length``), if the GGUF says."""
    import gguf

    return context_length(gguf.GGUFReader(_check_gguf(model_gguf)))


def context_length(reader) -> int | None:
    """``gguf_context_length`` for an open ``gguf.GGUFReader``."""
    arch = reader.fields.get("general.architecture")
    name = bytes(arch.parts[arch.data[0]]).decode() if arch is not None else "llama"
    f = reader.fields.get(f"{name}.context_length")
    return int(f.parts[f.data[0]][0]) if f is not None else None


def detect_template(model_gguf: str | Path) -> PromptTemplate:
    """The template a model needs, from its vocabulary (see ``gguf_vocab_kind``)."""
    return TEMPLATES[TEMPLATE_FOR_VOCAB[gguf_vocab_kind(model_gguf)]]


def _check_gguf(path: str | Path) -> Path:
    from .gguf_check import check_header

    return check_header(path)


def context_size(llm) -> int:
    """Usable context of a loaded model: the size asked for (llama.cpp may pad its KV cache beyond it,
    but llama-cpp-python's high-level buffers hold exactly the requested size)."""
    return min(llm.n_ctx(), len(llm.input_ids))


def physical_cores(*, sys_root: str | Path = "/sys", proc_root: str | Path = "/proc",
                   cpus: Iterable[int] | None = None) -> int:
    """CPU cores this process can really use: llama.cpp's default thread count.

    Counts distinct (package, core) pairs of the CPUs in the process's affinity mask, so SMT
    siblings count once (two hyperthreads share one core's FMA units: a second thread on the same
    core slows llama.cpp's matrix products down), then caps the count by a cgroup v2 CPU quota
    (``cpu.max``, e.g. a container limited to 2 CPUs). At least 1. ``sys_root``/``proc_root``/``cpus``
    exist for tests.
    """
    if cpus is None:
        try:
            cpus = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            cpus = range(os.cpu_count() or 1)
    cores: set[tuple[str, str]] = set()
    for c in sorted(cpus):
        topo = Path(sys_root) / "devices" / "system" / "cpu" / f"cpu{c}" / "topology"
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:  # no topology (some containers, non-Linux): count the logical CPU
            cores.add(("cpu", str(c)))
    n = max(1, len(cores))
    quota = _cgroup_cpu_limit(Path(sys_root), Path(proc_root))
    return max(1, min(n, quota)) if quota else n


def _cgroup_cpu_limit(sys_root: Path, proc_root: Path) -> int | None:
    """CPUs allowed by this process's cgroup v2 ``cpu.max`` (quota/period, rounded up), or None."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((ln[3:] for ln in lines if ln.startswith("0::")), None)
    if rel is None:
        return None
    try:
        quota, period = (sys_root / "fs" / "cgroup" / rel.lstrip("/") / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


PREFETCH_BUFFER = 16 * 1024 * 1024


def prefetch(model_gguf: str | Path, *, desc: str | None = None) -> bool:
    """Read the model file once, sequentially, into the page cache, with a progress bar in bytes.

    llama.cpp maps the file and its first decode then faults every page in, invisibly and in
    tensor order; a sequential read with large buffers runs at the disk's speed and shows how far
    the load is. Skipped (False) when the file would not fit in the memory available now, where
    the page cache could not keep it anyway.
    """
    path = Path(model_gguf)
    size = path.stat().st_size
    avail = _mem_available()
    if avail is not None and size > 0.8 * avail:
        log.info("not prefetching %s (%d bytes; %d available)", path, size, avail)
        return False
    buf = bytearray(min(PREFETCH_BUFFER, max(size, 1)))
    with open(path, "rb", buffering=0) as fh, bar(size, desc or f"load {path.name}") as pbar:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while n := fh.readinto(buf):
            pbar.update(n)
    return True


def _mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def load_model(model_gguf: str | Path, *, n_ctx: int = 2048, n_batch: int | None = None, seed: int = 0,
               threads: int | None = None, logits_all: bool = False, progress: str | None = None):
    """Open a GGUF with llama.cpp (quietly). ``n_batch`` defaults to ``min(n_ctx, 512)``; ``threads``
    (prompt batches and generation alike) to ``physical_cores()``. ``progress`` names the load's
    progress bar; the file is then read into the page cache first (see ``prefetch``)."""
    import llama_cpp

    from . import llama_log

    llama_log.install()
    path = _check_gguf(model_gguf)
    n_batch = n_batch or min(n_ctx, 512)
    threads = threads or physical_cores()
    if progress is not None:
        prefetch(path, desc=progress)
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                               logits_all=logits_all, verbose=False, seed=seed, n_threads=threads,
                               n_threads_batch=threads)
    except ValueError as exc:  # llama-cpp-python raises ValueError("Failed to load model from file")
        raise InputError(f"llama.cpp cannot load {path} ({exc})", expected="a GGUF model llama.cpp supports",
                         fix="check the file with `zhllama verify`, or convert it again") from exc


def load_vocab(model_gguf: str | Path):
    """The GGUF's vocabulary alone (no weights read: milliseconds even for 33B), for tokenizing and
    checking inputs before a model is loaded."""
    import llama_cpp

    from . import llama_log

    llama_log.install()
    path = _check_gguf(model_gguf)
    try:
        return llama_cpp.Llama(model_path=str(path), vocab_only=True, n_ctx=8, n_batch=8, verbose=False)
    except ValueError as exc:
        raise InputError(f"llama.cpp cannot read the vocabulary of {path} ({exc})",
                         expected="a GGUF model llama.cpp supports",
                         fix="check the file with `zhllama verify`, or convert it again") from exc


# ------------------------------------------------------------------ streaming generation


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    repeat_penalty: float = 1.0

    @classmethod
    def greedy(cls) -> Sampling:
        return cls(**GREEDY)

    @classmethod
    def release_chat(cls) -> Sampling:
        return cls(**RELEASE_CHAT)


@dataclass
class GenerationStats:
    """Filled in while a generation streams; complete once the iterator is exhausted."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_seconds: float = 0.0
    total_seconds: float = 0.0
    stop_reason: str = ""  # "eos" | "stop" | "length" | "context"
    text: str = ""


class _StopFilter:
    """Hold back text that might be the beginning of a stop string, so none of it is ever streamed."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending, self.stopped = self.pending[:i], "", True
                return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(llm, prompt: str, *, max_tokens: int = 256, sampling: Sampling | None = None,
                    stop: Sequence[str] = (), stats: GenerationStats | None = None) -> Iterator[str]:
    """Yield the model's continuation of ``prompt`` as text pieces, as they are decoded.

    The prompt is tokenized with BOS, as llama.cpp's ``main`` does. Multi-byte characters split
    over byte-fallback tokens are only emitted once complete. Stops at EOS, at a ``stop`` string
    (not included), after ``max_tokens`` tokens, or when the context is full.
    """
    sampling = sampling or Sampling.greedy()
    stats = stats if stats is not None else GenerationStats()
    tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False)
    n_ctx = context_size(llm)
    if len(tokens) >= n_ctx:
        raise InputError(f"the prompt is {len(tokens)} tokens, the context holds {n_ctx}",
                         fix="use a larger context (--ctx) or a shorter prompt")
    stats.prompt_tokens = len(tokens)
    eos = llm.token_eos()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    filt = _StopFilter(stop)
    t0 = time.perf_counter()
    budget = min(max_tokens, n_ctx - len(tokens))
    stats.stop_reason = "length" if budget == max_tokens else "context"
    pieces: list[str] = []
    n = 0
    if budget > 0:
        gen = llm.generate(tokens, temp=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                           min_p=0.0, typical_p=1.0, repeat_penalty=sampling.repeat_penalty)
        try:
            for tok in gen:
                if n == 0:
                    stats.first_token_seconds = time.perf_counter() - t0
                if tok == eos:
                    stats.stop_reason = "eos"
                    break
                n += 1
                text = filt.feed(decoder.decode(llm.detokenize([tok])))
                if text:
                    pieces.append(text)
                    yield text
                if filt.stopped:
                    stats.stop_reason = "stop"
                    break
                if n >= budget:
                    break
        finally:
            gen.close()
    tail = "" if filt.stopped else filt.feed(decoder.decode(b"", final=True)) + filt.flush()
    if tail:
        pieces.append(tail)
        yield tail
    stats.completion_tokens = n
    stats.total_seconds = time.perf_counter() - t0
    stats.text = "".join(pieces)


def generate(llm, prompt: str, **kwargs) -> tuple[str, GenerationStats]:
    """Non-streaming ``stream_generate``: the whole continuation and its statistics."""
    stats = GenerationStats()
    text = "".join(stream_generate(llm, prompt, stats=stats, **kwargs))
    return text, stats


# ------------------------------------------------------------------ multi-turn chat


@dataclass
class ChatSession:
    """A conversation with one model, formatted as llama.cpp's ``-ins`` mode did.

    ``send(text)`` streams the reply; when it is exhausted the turn is added to ``history``.
    ``last_prompt`` is the exact text the model saw for the latest turn (for --show-prompt).
    """

    llm: object
    template: PromptTemplate
    sampling: Sampling = field(default_factory=Sampling.release_chat)
    max_tokens: int = 256
    history: list[tuple[str, str]] = field(default_factory=list)
    last_prompt: str = ""
    last_stats: GenerationStats | None = None

    def prompt_for(self, user: str) -> str:
        """The prompt for ``user`` with as much history as fits (oldest turns dropped first)."""
        history = list(self.history)
        n_ctx = context_size(self.llm)
        while True:
            prompt = self.template.render(history, user)
            n = len(self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=False))
            if n + min(self.max_tokens, 16) <= n_ctx or not history:
                if len(history) < len(self.history):
                    log.info("context full: dropped the %d oldest turn(s)", len(self.history) - len(history))
                return prompt
            history.pop(0)

    def send(self, user: str) -> Iterator[str]:
        """Render the prompt now (``last_prompt``), return an iterator streaming the reply."""
        prompt = self.prompt_for(user)
        self.last_prompt = prompt
        stats = GenerationStats()
        self.last_stats = stats
        return self._stream(user, prompt, stats)

    def _stream(self, user: str, prompt: str, stats: GenerationStats) -> Iterator[str]:
        yield from stream_generate(self.llm, prompt, max_tokens=self.max_tokens, sampling=self.sampling,
                                   stop=self.template.stop, stats=stats)
        self.history.append((user, stats.text.strip()))

    def reply(self, user: str) -> str:
        return "".join(self.send(user))

    def reset(self) -> None:
        self.history.clear()
