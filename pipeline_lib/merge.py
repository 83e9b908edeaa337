"""Streaming multi-LoRA merge: plan every check first, then produce merged tensors one at a time.

Two arithmetics, chosen by ``precise`` (see docs/merge.md for the measured difference):

**Release arithmetic (the default)** — the Chinese-LLaMA-Alpaca release's own merge script
(``merge_llama_with_chinese_lora_low_mem.py``), whose outputs the official merged SHA256 values
were made from. For each tensor, base in the output dtype (fp16 for the release), then per LoRA in
chain order:

* a full weight (``embed_tokens``/``lm_head``, the enlarged vocabulary) **replaces** the tensor,
  cast to the output dtype; a later LoRA's copy wins;
* a lora_A/lora_B pair: ``delta = (B.float() @ A.float())``, transposed when the adapter says
  ``fan_in_fan_out``, times ``lora_alpha / r``, in float32; it is added **in place** into the fp16
  tensor, i.e. ``W16 = fp16(fp32(W16) + delta)``: one fp16 rounding *per LoRA*. (Not PEFT's fp16
  path, which rounds the delta to fp16 first.)

**Precise arithmetic** (``precise=True``, ``--precise``): PEFT's sequential ``merge_and_unload`` in
float32 (``delta = B @ A; delta *= scale; W += delta``), bit-identical to PEFT's float32 merge,
cast to the output dtype ONCE at the end; ``fan_in_fan_out`` is ignored for ``nn.Linear`` layers
exactly as PEFT ignores it (PEFT resets it to False with a warning).

In both, ``scale`` is the adapter's (``alpha / r``, ``alpha / sqrt(r)`` with rslora, per-module
``rank_pattern``/``alpha_pattern``: the release's adapters have none of those, so for them it is
``lora_alpha / r``), ``lora_embedding_*`` updates are transposed as PEFT does, and tensors no LoRA
touches are copied unchanged (cast only if the output dtype differs).

**Order.** Tensors come in the release's order, a table, not the reader's: for an HF ``.bin`` base
the shards' own order (files sorted by name, keys in each shard's order), for a safetensors or Meta
base the order of the official HF shards, which is 2023 transformers' module registration order
(:func:`pipeline_lib.names.hf_names`). The same inputs in any base format give the same stream.

``plan_merge`` reads only headers and configs and raises :class:`InputError` for every problem it
can see before a byte is written: LoRA order reversed, a tokenizer that does not fit its LoRA's
embeddings or the merged vocabulary, a LoRA for another model size, a LoRA whose keys match
nothing or target a module the base lacks, the same LoRA twice, bad shapes. The returned
:class:`MergePlan` is a :class:`~pipeline_lib.checkpoint.TensorSource`; writers (HF, pth, GGUF)
consume its ``iter_tensors()`` stream, so merge -> GGUF needs no intermediate checkpoint.

While streaming, every merged tensor is checked for NaN/Inf (naming the tensor and the LoRA) and
audited (:class:`MergeAudit`): per LoRA, how many of the modules it targets changed; whether
``embed_tokens``/``lm_head`` are the last LoRA's full copies. A LoRA that changed nothing fails
the stream at its end, so an atomic writer leaves nothing behind.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fsutil, iobuf
from .checkpoint import DTYPE_BY_NAME, Checkpoint, TensorInfo, dtype_name, open_checkpoint
from .errors import InputError
from .lora import LoraAdapter, LoraPair, load_adapter, tokenizer_size

log = logging.getLogger(__name__)

# Hidden size -> how people name the model size; used in error messages only (shapes come from config.json).
SIZE_BY_HIDDEN: dict[int, str] = {4096: "7B", 5120: "13B", 6656: "33B", 8192: "65B"}

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_TENSORS = (EMBED, LM_HEAD)

# arithmetic name -> what it is (printed by describe(), recorded in results)
ARITHMETIC: dict[bool, str] = {
    False: "release (fp16 rounding after each LoRA, as the release's merge script)",
    True: "precise (float32 accumulate, one rounding at the end, as PEFT's float32 merge)",
}


def _size_name(hidden: int) -> str:
    s = SIZE_BY_HIDDEN.get(hidden)
    return f"hidden {hidden}" + (f", a {s} model" if s else "")


@dataclass(frozen=True)
class TensorStep:
    """How one output tensor is made: base (or a LoRA's full weight), then low-rank updates."""

    name: str
    shape: tuple[int, ...]
    source: int | None  # None: the base tensor; i: full weight of LoRA i replaces it
    deltas: tuple[tuple[int, LoraPair], ...] = ()

    @property
    def touched(self) -> bool:
        return self.source is not None or bool(self.deltas)


def as_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPE_BY_NAME.values():
            return dtype
    elif dtype in DTYPE_BY_NAME:
        return DTYPE_BY_NAME[dtype]
    raise InputError(f"output dtype {dtype!r} is not supported", expected=", ".join(DTYPE_BY_NAME))


def release_order(ckpt: Checkpoint) -> list[str]:
    """The order the release's merge visits (and writes) the base's tensors.

    An HF ``.bin`` base: its shards' own order (files sorted, keys in each shard's order), as the
    release's script reads them. Any other base: the official HF shards' order, which is the table
    :func:`names.hf_names` (the reader's canonical order), then anything unknown in file order.
    """
    if ckpt.format == "hf-bin":
        return ckpt.file_order()
    return ckpt.names()


# ------------------------------------------------------------------ audit


@dataclass(frozen=True)
class AuditResult:
    """What the post-merge audit saw: a summary line and one table row per LoRA (JSON-able)."""

    summary: str
    rows: tuple[dict, ...]
    tensors_checked: int
    ok: bool


class MergeAudit:
    """Collects, while the merge streams, what each LoRA changed; one stream at a time.

    Nothing is read twice: every number comes from tensors the merge has in hand anyway.
    """

    def __init__(self, loras: Sequence[LoraAdapter], steps: dict[str, TensorStep]) -> None:
        self._names = [lo.name for lo in loras]
        self._targets = [len(lo.pairs) for lo in loras]
        self._full = [sorted(lo.full_weights) for lo in loras]
        self._used = [sorted(n for n, st in steps.items() if st.source == i) for i in range(len(loras))]
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            n = len(self._names)
            self._changed = [0] * n
            self._unchanged: list[list[str]] = [[] for _ in range(n)]
            self._copies: dict[str, tuple[int, bool]] = {}  # vocab tensor -> (LoRA, output equals its copy)
            self._checked = 0
            self.result: AuditResult | None = None

    def pair(self, idx: int, target: str, changed: bool) -> None:
        with self._lock:
            if changed:
                self._changed[idx] += 1
            else:
                self._unchanged[idx].append(target.removesuffix(".weight"))

    def copy(self, name: str, idx: int, equal: bool) -> None:
        with self._lock:
            self._copies[name] = (idx, equal)

    def tensor(self) -> None:
        with self._lock:
            self._checked += 1

    def finish(self) -> AuditResult:
        """The result; InputError if a LoRA changed nothing (a silent partial merge)."""
        rows = []
        for i, name in enumerate(self._names):
            rows.append({
                "lora": name,
                "modules_targeted": self._targets[i],
                "modules_changed": self._changed[i],
                "modules_unchanged": self._unchanged[i],
                "full_weights": self._full[i],
                "full_weights_in_output": [n for n, (j, eq) in self._copies.items() if j == i and eq],
                "full_weights_superseded": [n for n in self._full[i] if n not in self._used[i]],
            })
        dead = [r for r in rows if r["modules_changed"] == 0 and not r["full_weights_in_output"]]
        if dead:
            r = dead[0]
            raise InputError(
                f"LoRA {r['lora']} changed nothing: 0 of the {r['modules_targeted']} modules it targets changed"
                + (" and its full weights were all replaced by a later LoRA" if r["full_weights"] else ""),
                expected="every LoRA of the chain changes the modules it targets",
                fix="check that LoRA: an untrained adapter (lora_B all zero) or one too weak to show in float16 "
                    "changes nothing; re-download it (`zhllama verify`), or leave it out of --lora")
        bad_copies = [n for n, (_, eq) in self._copies.items() if not eq]
        parts = []
        for r in rows:
            part = f"{r['lora']} changed {r['modules_changed']}/{r['modules_targeted']} targeted modules"
            if r["full_weights_in_output"]:
                part += " and gave " + "/".join(n.split(".")[-2] for n in r["full_weights_in_output"])
            parts.append(part)
        summary = (f"audit: {self._checked} tensors finite; " + "; ".join(parts or ["no LoRA"])
                   + (f"; NOT equal to their LoRA copies: {bad_copies}" if bad_copies else ""))
        self.result = AuditResult(summary=summary, rows=tuple(rows), tensors_checked=self._checked,
                                  ok=not bad_copies and all(not r["modules_unchanged"] for r in rows))
        return self.result


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class MergePlan:
    """A checked merge, not yet executed. Implements TensorSource: ``iter_tensors()`` merges."""

    base: Checkpoint
    loras: tuple[LoraAdapter, ...]
    dtype: torch.dtype
    config: dict
    tokenizer_dir: Path | None
    steps: dict[str, TensorStep]  # in write order (the release's order)
    vocab_before: int
    vocab_after: int
    warnings: tuple[str, ...] = ()
    precise: bool = False
    audit: MergeAudit | None = field(default=None, compare=False, repr=False)

    def tensor_infos(self) -> list[TensorInfo]:
        return [TensorInfo(s.name, s.shape, self.dtype) for s in self.steps.values()]

    @property
    def output_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensor_infos())

    @property
    def n_touched(self) -> int:
        return sum(1 for s in self.steps.values() if s.touched)

    @property
    def arithmetic(self) -> str:
        return "precise" if self.precise else "release"

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_merged(self)

    def describe(self) -> str:
        chain = " -> ".join(lo.name for lo in self.loras) or "(no LoRA)"
        return (f"{self.base.path} + {chain}: {len(self.steps)} tensors ({self.n_touched} merged), "
                f"vocab {self.vocab_before} -> {self.vocab_after}, {dtype_name(self.dtype)}, "
                f"{self.arithmetic} arithmetic, {fsutil.human_bytes(self.output_bytes)}")


def _lora_hidden(lora: LoraAdapter) -> int | None:
    """The hidden size a LoRA was trained for, read from its tensors."""
    for name in VOCAB_TENSORS:
        if name in lora.full_weights:
            return lora.full_weights[name].shape[-1]
    for pair in lora.pairs.values():
        if pair.target.endswith(("q_proj.weight", "o_proj.weight")):
            return pair.delta_shape[1]
    return None


def _update_shape(lora: LoraAdapter, pair: LoraPair, *, precise: bool) -> tuple[int, ...]:
    """Shape of the update a pair adds: the release transposes it when the adapter says fan_in_fan_out."""
    shape = tuple(pair.delta_shape)
    if lora.fan_in_fan_out and not precise and not pair.embedding:
        shape = shape[::-1]
    return shape


def _refuse_duplicates(adapters: Sequence[LoraAdapter]) -> None:
    """The same LoRA twice (same folder, or the same weights file content) would be applied twice."""
    seen: dict[Path, LoraAdapter] = {}
    for lo in adapters:
        key = lo.path.resolve()
        if key in seen:
            raise InputError(f"LoRA {lo.name} is given twice (--lora {lo.path})",
                             expected="each LoRA of the chain once, in release order",
                             fix="give each LoRA once: --lora <llama-plus-lora> --lora <alpaca-plus-lora>")
        seen[key] = lo
    by_size: dict[int, list[LoraAdapter]] = {}
    for lo in adapters:
        by_size.setdefault(lo.nbytes, []).append(lo)
    for group in by_size.values():  # only files of equal size can be equal: hash just those
        if len(group) < 2:
            continue
        digests: dict[str, LoraAdapter] = {}
        for lo in group:
            d = fsutil.sha256_file(lo.weights_file)
            if d in digests:
                raise InputError(
                    f"LoRA {lo.name} is the same adapter as LoRA {digests[d].name} "
                    f"(their {lo.weights_file.name} files are identical, sha256 {d[:16]}…)",
                    expected="each LoRA of the chain once, in release order",
                    fix="give each LoRA once; check that the folders hold the LoRAs you meant")
            digests[d] = lo


def _refuse_unmatched(lora: LoraAdapter, shapes: dict[str, tuple[int, ...]]) -> None:
    """A LoRA none of whose tensors belongs to the base merges as a silent no-op: refuse it by name."""
    wanted = list(lora.pairs) + list(lora.full_weights)
    if not wanted:
        raise InputError(f"LoRA {lora.name} holds no LoRA tensors ({lora.weights_file.name} has no lora_A/lora_B "
                         "pairs and no full weights)",
                         expected="lora_A/lora_B pairs (and embed_tokens/lm_head for the Chinese LoRAs)",
                         fix="re-download the LoRA; this file is not a LoRA adapter")
    if not any(n in shapes for n in wanted):
        example = next(iter(lora.pairs.values()), None)
        key = example.a_key if example is not None else next(iter(lora.full_weights.values())).name
        raise InputError(
            f"none of the {len(wanted)} tensors of LoRA {lora.name} matches a tensor of the base model "
            f"(e.g. {key} -> {wanted[0]})",
            expected="keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            fix="this adapter was saved for other module names (another architecture, or wrapped twice by PEFT); "
                "use the LoRA made for this LLaMA base")


def plan_merge(base: str | Path | Checkpoint, loras: Sequence[str | Path | LoraAdapter], *,
               dtype: str | torch.dtype = "float16", check_tokenizers: bool = True,
               precise: bool = False) -> MergePlan:
    """Check a base model and a LoRA chain; return the plan (nothing is written or loaded in full).

    ``loras`` are applied in the given order. ``precise``: float32 accumulation, one rounding
    (PEFT's float32 merge) instead of the release's arithmetic. Raises InputError naming the
    cause and the fix.
    """
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    adapters = tuple(lo if isinstance(lo, LoraAdapter) else load_adapter(lo) for lo in loras)
    _refuse_duplicates(adapters)
    out_dtype = as_dtype(dtype)
    cfg = ckpt.config
    hidden = int(cfg.get("hidden_size") or ckpt.info(EMBED).shape[1])
    base_vocab = ckpt.info(EMBED).shape[0] if EMBED in ckpt else int(cfg.get("vocab_size", 0))

    shapes = {i.name: i.shape for i in ckpt.tensor_infos()}
    steps = {n: TensorStep(n, shapes[n], None) for n in release_order(ckpt)}
    vocab, vocab_from = base_vocab, "the base model"
    warnings: list[str] = []

    for idx, lora in enumerate(adapters):
        _refuse_unmatched(lora, shapes)
        lh = _lora_hidden(lora)
        if lh is not None and lh != hidden:
            raise InputError(
                f"LoRA {lora.name} was trained for {_size_name(lh)}, but the base model has {_size_name(hidden)}",
                expected=f"a LoRA made for the {SIZE_BY_HIDDEN.get(hidden, 'same-size')} base",
                fix=f"use the {SIZE_BY_HIDDEN.get(hidden, 'matching')} LoRA with this base, "
                    f"or the {SIZE_BY_HIDDEN.get(lh, 'matching')} base with this LoRA")
        if lora.fan_in_fan_out:
            warnings.append(f"{lora.name}: fan_in_fan_out=True ignored for nn.Linear layers (as PEFT does)" if precise
                            else f"{lora.name}: fan_in_fan_out=True: updates transposed (as the release's script does)")
        rows = lora.embed_rows()
        # vocabulary: full embeddings replace the current ones; the vocabulary may only grow
        if rows is not None:
            if rows < vocab:
                raise InputError(
                    f"LoRA order looks reversed: {lora.name} has a vocabulary of {rows}, smaller than the "
                    f"{vocab} of {vocab_from} applied before it, so the vocabulary would shrink",
                    expected="LoRAs in release order, each vocabulary at least as large as the one before "
                             "(LLaMA-Plus 49953 first, then Alpaca-Plus 49954)",
                    fix="give the LLaMA(-Plus) LoRA first and the Alpaca(-Plus) LoRA last: "
                        "--lora <llama-plus-lora> --lora <alpaca-plus-lora>")
            head = lora.full_weights.get(LM_HEAD)
            if head is not None and head.shape[0] != rows:
                raise InputError(f"LoRA {lora.name}: embed_tokens has {rows} rows but lm_head has {head.shape[0]}",
                                 fix="re-download the LoRA; its files do not belong together")
            if check_tokenizers and lora.tokenizer_dir is not None:
                tok = tokenizer_size(lora.tokenizer_dir)
                if tok != rows:
                    hint = ""
                    if tok == rows + 1:
                        hint = " (this looks like the Chinese-Alpaca tokenizer, with [PAD], next to a Chinese-LLaMA LoRA)"
                    elif tok + 1 == rows:
                        hint = " (this looks like the Chinese-LLaMA tokenizer next to a Chinese-Alpaca LoRA)"
                    raise InputError(
                        f"the tokenizer in {lora.name} has {tok} tokens but the LoRA's embeddings have {rows} rows"
                        + hint,
                        expected=f"a tokenizer of exactly {rows} tokens next to this LoRA",
                        fix="put the tokenizer.model released with this LoRA in its folder "
                            "(Chinese-LLaMA: 49953, Chinese-Alpaca: 49954)")
            vocab, vocab_from = rows, f"LoRA {lora.name}"
        for name, info in lora.full_weights.items():
            if name not in steps:
                raise InputError(f"LoRA {lora.name} carries a full weight {name}, which the base model lacks",
                                 expected="embed_tokens / lm_head of a LLaMA model", fix="check the LoRA matches the base")
            want = (vocab, hidden) if name in VOCAB_TENSORS else steps[name].shape
            if tuple(info.shape) != tuple(want):
                raise InputError(f"LoRA {lora.name}: full weight {name} has shape {tuple(info.shape)}",
                                 expected=f"{tuple(want)}", fix="check the LoRA matches the base model")
            steps[name] = TensorStep(name, tuple(info.shape), idx)  # replaces: earlier deltas are dropped
        for name in VOCAB_TENSORS:  # a vocab tensor this LoRA did not replace must already have the size
            if name in steps and rows is not None and steps[name].shape[0] != vocab:
                raise InputError(f"LoRA {lora.name} enlarges embed_tokens to {vocab} rows but has no {name} "
                                 f"(still {steps[name].shape[0]} rows)",
                                 fix="use the complete LoRA (with both embed_tokens and lm_head)")
        for target, pair in lora.pairs.items():
            if target not in steps:
                layers = cfg.get("num_hidden_layers")
                raise InputError(
                    f"LoRA {lora.name} targets {target.removesuffix('.weight')}, which the base model lacks "
                    f"(base: {layers} layers, hidden {hidden})",
                    expected="LoRA target modules that exist in the base (q/k/v/o/gate/up/down_proj of each layer)",
                    fix="use the LoRA made for this base model")
            cur = steps[target]
            update = _update_shape(lora, pair, precise=precise)
            if update != tuple(cur.shape):
                raise InputError(f"LoRA {lora.name}: update of {target} has shape {update}"
                                 + (" (transposed: the adapter says fan_in_fan_out)"
                                    if update != tuple(pair.delta_shape) else ""),
                                 expected=f"{tuple(cur.shape)} (the base tensor's shape)",
                                 fix="use the LoRA made for this base model")
            steps[target] = TensorStep(target, cur.shape, cur.source, (*cur.deltas, (idx, pair)))

    # tokenizer for the output: the last LoRA that ships one, else the base's
    tok_dir = next((lo.tokenizer_dir for lo in reversed(adapters) if lo.tokenizer_dir is not None),
                   ckpt.tokenizer_dir)
    if tok_dir is None:
        warnings.append("no tokenizer.model found next to the LoRAs or the base; the output has none")
    elif check_tokenizers and not any(lo.tokenizer_dir == tok_dir for lo in adapters) and vocab != base_vocab:
        raise InputError(f"the vocabulary grows to {vocab} but no LoRA folder ships a tokenizer.model",
                         fix="put the release's tokenizer files next to the last LoRA")
    elif check_tokenizers:
        n_tok = tokenizer_size(tok_dir)
        if n_tok != vocab:
            missing = [lo.name for lo in adapters if lo.tokenizer_dir is None]
            raise InputError(
                f"the output's tokenizer would be {Path(tok_dir) / 'tokenizer.model'} with {n_tok} tokens, "
                f"but the merged vocabulary has {vocab} rows"
                + (f" ({', '.join(missing)} ships no tokenizer.model)" if missing else ""),
                expected=f"the tokenizer of the last LoRA ({vocab} tokens) next to it",
                fix=f"put the tokenizer.model released with {adapters[-1].name if adapters else 'the base'} "
                    "into its folder (Chinese-LLaMA: 49953 pieces, Chinese-Alpaca: 49954)")

    out_cfg = dict(cfg)
    out_cfg["vocab_size"] = vocab
    out_cfg["torch_dtype"] = dtype_name(out_dtype)
    if "dtype" in out_cfg:
        out_cfg["dtype"] = dtype_name(out_dtype)
    for w in warnings:
        log.warning(w)
    return MergePlan(base=ckpt, loras=adapters, dtype=out_dtype, config=out_cfg, tokenizer_dir=tok_dir,
                     steps=steps, vocab_before=base_vocab, vocab_after=vocab, warnings=tuple(warnings),
                     precise=precise, audit=MergeAudit(adapters, steps))


# ------------------------------------------------------------------ execute


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _non_finite(t: torch.Tensor) -> str | None:
    """'3 NaN, 1 Inf' if ``t`` holds non-finite values, else None.

    The test is ``aminmax``: NaN propagates into both and an Inf is the max or the min, so one fast pass
    (``isfinite`` on fp16 is ~25x slower on CPU) decides; the counts are only taken when it fails.
    """
    if not t.is_floating_point() or not t.numel():
        return None
    lo, hi = torch.aminmax(t)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return None
    nan = int(torch.isnan(t).sum())
    return f"{nan} NaN, {int(torch.isinf(t).sum())} Inf"


_SAME_SIZE_INT: dict[int, torch.dtype] = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_HALF = (torch.float16, torch.bfloat16)  # output dtypes the release update rounds to chunk by chunk


def _changed(after: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether any element differs bit for bit (compared as integers: NaN-safe, and ``equal`` stops at the
    first difference, so a module that changed costs next to nothing to check)."""
    as_int = _SAME_SIZE_INT[after.element_size()]
    return not torch.equal(after.view(as_int), before.view(as_int))


def _refuse_non_finite_input(t: torch.Tensor, name: str, origin: str) -> None:
    bad = _non_finite(t)
    if bad:
        raise InputError(f"{origin} holds non-finite values in {name} ({bad})",
                         expected="finite weights", fix="re-download the file and check it with `zhllama verify`")


def _delta(plan: MergePlan, idx: int, pair: LoraPair, ws: iobuf.Workspace | None = None) -> torch.Tensor:
    """The float32 update of one pair: ``(B.float() @ A.float())`` [transposed] ``* scale``.

    With a workspace the product is formed in its reused ``delta`` buffer (``mm(..., out=)`` runs the
    same kernel as ``@``: the same bits) and stays valid until the next call.
    """
    lora = plan.loras[idx]
    a = lora.load(pair.a_key).to(torch.float32)
    b = lora.load(pair.b_key).to(torch.float32)
    transpose = pair.embedding or (lora.fan_in_fan_out and not plan.precise)
    if ws is not None and not transpose:
        delta = torch.mm(b, a, out=ws.get("delta", (b.shape[0], a.shape[1]), torch.float32))
    else:
        delta = b @ a  # PEFT's (and the release's) order of operations
    del a, b
    if transpose:
        delta = delta.T.contiguous()  # lora_embedding_*: (B @ A).T as PEFT; fan_in_fan_out: the release's transpose()
    delta *= pair.scaling
    return delta


# Elements per chunk of the release update: no whole-tensor temporary is ever allocated (the chunk buffers
# are 48 MB), and each of the few elementwise ops per chunk is large enough to amortise starting its
# threads (1M-element chunks spent more time waking OpenMP workers than adding on a busy 2-core host).
CHUNK = 1 << 23


def _release_update(w16: torch.Tensor, exact: torch.Tensor, ws: iobuf.Workspace) -> tuple[bool, bool]:
    """``w16 = fp16(fp32(w16) + exact)`` in place, chunk by chunk, leaving the float32 sum in ``exact``.

    Bit for bit the release's ``W16 += delta`` (IEEE addition commutes; every step is elementwise, so
    chunking changes nothing). Returns (any element changed, the result is finite).
    """
    flat16, flat32 = w16.view(-1), exact.view(-1)
    n = flat16.numel()
    as_int = _SAME_SIZE_INT[w16.element_size()]
    widened = ws.get("chunk32", (min(CHUNK, n),), torch.float32)
    rounded = ws.get("chunk16", (min(CHUNK, n),), w16.dtype)
    changed, finite = False, True
    for lo in range(0, n, CHUNK):
        hi = min(lo + CHUNK, n)
        old, s32 = flat16[lo:hi], flat32[lo:hi]
        up, new = widened[:hi - lo], rounded[:hi - lo]
        up.copy_(old)  # exact widening: no rounding
        s32.add_(up)
        new.copy_(s32)  # the one rounding to the output dtype (round to nearest even, as .to())
        if finite and _non_finite(new):
            finite = False
        if not changed:
            changed = not torch.equal(new.view(as_int), old.view(as_int))
        old.copy_(new)
    return changed, finite


def _refuse_bad_update(plan: MergePlan, idx: int, pair: LoraPair, exact: torch.Tensor, result: torch.Tensor) -> None:
    """``result`` (the tensor after LoRA ``idx``'s update) must be finite; ``exact`` is the float32 sum
    before rounding: non-finite there means the LoRA itself holds NaN/Inf, else the rounding overflowed."""
    bad = _non_finite(result)
    if not bad:
        return
    lora = plan.loras[idx]
    module = pair.target.removesuffix(".weight")
    if _non_finite(exact):
        raise InputError(f"LoRA {lora.name} holds non-finite values: its update of {module} has {_non_finite(exact)}",
                         expected="finite lora_A/lora_B weights",
                         fix=f"re-download {lora.weights_file} and check it with `zhllama verify`")
    raise InputError(
        f"merging LoRA {lora.name} into {module} overflows {dtype_name(result.dtype)} ({bad})",
        expected=f"merged weights within {dtype_name(result.dtype)}'s range (±{torch.finfo(result.dtype).max:g})",
        fix="check that this LoRA belongs to this base model (a damaged or foreign LoRA gives huge updates); "
            "if the values are meant to be that large, merge with --dtype float32")


def _load_step(plan: MergePlan, step: TensorStep) -> torch.Tensor:
    """The tensor a step starts from: the base's, or the full weight of the LoRA that replaces it."""
    if step.source is None:
        return plan.base.load(step.name)
    lora = plan.loras[step.source]
    return lora.load(lora.full_weights[step.name].name)


def _merged_tensor(plan: MergePlan, step: TensorStep, ws: iobuf.Workspace | None = None,
                   loaded: torch.Tensor | None = None) -> torch.Tensor:
    audit = plan.audit
    ws = ws if ws is not None else iobuf.Workspace()
    t = loaded if loaded is not None else _load_step(plan, step)
    if step.source is None:
        _refuse_non_finite_input(t, step.name, f"the base model {plan.base.path}")
    else:
        _refuse_non_finite_input(t, step.name, f"LoRA {plan.loras[step.source].name}")
    if plan.precise and step.deltas:
        w = t.to(torch.float32)
        for idx, pair in step.deltas:
            new = _delta(plan, idx, pair)
            new += w  # = PEFT's W += delta (IEEE addition commutes), in the delta's buffer so W stays for the audit
            _refuse_bad_update(plan, idx, pair, new, new)
            if audit is not None:
                audit.pair(idx, pair.target, _changed(new, w))
            w = new
            del new
        out = w.to(plan.dtype)
        if _non_finite(out):  # the single rounding at the end overflows the output dtype
            idx, pair = step.deltas[-1]
            _refuse_bad_update(plan, idx, pair, torch.zeros(()), out)
    else:
        out = t.to(plan.dtype)  # release: the base (or a full weight) in the output dtype first (an owned copy)
        if out is not t and _non_finite(out):
            raise InputError(f"{step.name} does not fit {dtype_name(plan.dtype)} ({_non_finite(out)})",
                             fix="merge with --dtype float32 to keep the values")
        for idx, pair in step.deltas:
            # The release adds in place, W16 += delta, which computes fp32(W16) + delta and rounds it to fp16.
            # The same sum (IEEE addition commutes) formed in the delta's reused buffer and rounded into W
            # chunk by chunk: bit for bit that result (tested against the in-place form), with no
            # whole-tensor temporary and the audit's old-vs-new comparison made on each chunk.
            exact = _delta(plan, idx, pair, ws)
            if exact.shape != out.shape:
                raise RuntimeError(f"update of {step.name} has shape {tuple(exact.shape)}, planned {tuple(out.shape)}")
            if out.dtype in _HALF and exact.dtype == torch.float32 and out.is_contiguous() and exact.is_contiguous():
                # ``out`` is this tensor's own copy (every reader returns a new tensor): updated in place
                changed, finite = _release_update(out, exact, ws)
                if not finite:
                    _refuse_bad_update(plan, idx, pair, exact, out)
            else:  # a float32 output: the plain form (a copy: ``exact`` is the workspace's buffer)
                exact += out
                new = exact.to(plan.dtype, copy=True)
                _refuse_bad_update(plan, idx, pair, exact, new)
                changed = _changed(new, out)
                out = new
            if audit is not None:
                audit.pair(idx, pair.target, changed)
            del exact
    if step.source is not None and audit is not None and step.name in VOCAB_TENSORS and not step.deltas:
        # the release's own check: the enlarged embed_tokens/lm_head are the last LoRA's full copies
        audit.copy(step.name, step.source, out is t or bool(torch.equal(out, t.to(plan.dtype))))
    del t
    if audit is not None:
        audit.tensor()
    return out


def iter_merged(plan: MergePlan, *, prefetch: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors in write order, one at a time (HF names and layout, ``plan.dtype``).

    With ``prefetch`` the next tensor is read and merged in a background thread while the consumer
    writes the current one (torch and file I/O release the GIL), so at most two tensors are alive,
    plus the stream's float32 workspace (the largest merged tensor's update, allocated once). Read
    buffers come from :data:`pipeline_lib.iobuf.POOL` and are recycled as the consumer drops them.
    After the last tensor the audit is finished (``plan.audit.result``); a LoRA that changed nothing
    raises InputError there, so a consumer must exhaust the stream (every writer here does).
    """
    steps = list(plan.steps.values())
    if plan.audit is not None:
        plan.audit.reset()
    # The stream's scratch buffers, used by one worker at a time and reused for every tensor: the float32
    # update sized once for the largest merged tensor, and freed after the last one that needs it (the
    # stream ends with lm_head, the largest tensor of all, which needs none).
    ws = iobuf.Workspace()
    merged = [i for i, st in enumerate(steps) if st.deltas]
    if merged and not plan.precise:
        ws.reserve("delta", max(_numel(steps[i].shape) for i in merged), torch.float32)
    last_merged = merged[-1] if merged else -1

    def work(i: int) -> torch.Tensor:
        if i + 1 < len(steps) and steps[i + 1].source is None:
            plan.base.will_need(steps[i + 1].name)  # buffered reads: the kernel reads the next tensor meanwhile
        tensor = _merged_tensor(plan, steps[i], ws)
        if i == last_merged:
            ws.clear()
        return tensor

    if not prefetch or len(steps) < 2:
        for i, step in enumerate(steps):
            yield step.name, work(i)
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhllama-merge") as pool:
            pending = pool.submit(work, 0)
            try:
                for i, step in enumerate(steps):
                    tensor = pending.result()
                    pending = pool.submit(work, i + 1) if i + 1 < len(steps) else None
                    yield step.name, tensor
                    del tensor
            finally:  # consumer stopped early or failed: do not leave work running
                if pending is not None:
                    pending.cancel()
    ws.clear()
    iobuf.POOL.trim()  # the stream's recycled blocks are not needed by whatever runs next
    if plan.audit is not None:
        result = plan.audit.finish()
        log.info("%s", result.summary)


# ------------------------------------------------------------------ merge to disk

FORMATS = ("hf", "pth")


@dataclass(frozen=True)
class MergeResult:
    out: Path
    format: str
    dtype: str
    files: tuple[Path, ...]
    n_tensors: int
    n_merged: int
    vocab_before: int
    vocab_after: int
    loras: tuple[str, ...]
    bytes_written: int
    seconds: float
    warnings: tuple[str, ...] = field(default=())
    arithmetic: str = "release"  # "release" (the default) or "precise"
    audit: AuditResult | None = None


def parse_shard_size(value: int | str) -> int:
    """``--max-shard-size``: a positive byte count or a size such as ``2GB``, ``500MB``, ``1.5GiB``."""
    if isinstance(value, str):
        try:
            value = fsutil.parse_size(value)
        except (ValueError, OverflowError):
            raise InputError(f"--max-shard-size {value!r} is not a size",
                             expected="a size such as 2GB, 500MB, 1.5GiB or a number of bytes",
                             fix="e.g. --max-shard-size 2GB") from None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InputError(f"--max-shard-size {value!r} is not a positive size", expected="e.g. 2GB",
                         fix="e.g. --max-shard-size 2GB")
    return value


def merge(base: str | Path, loras: Sequence[str | Path], *, out: str | Path, format: str = "hf",
          dtype: str = "float16", max_shard_size: int | str = "2GB", parts: int | None = None,
          overwrite: bool = False, progress=None, precise: bool = False) -> MergeResult:
    """Merge ``loras`` (in order) into ``base`` and write the model to the folder ``out``.

    ``format`` "hf": sharded safetensors + index + config + tokenizer; "pth": Meta consolidated parts
    (``parts`` defaults to the release's count for the hidden size), in the release's byte layout.
    ``precise``: PEFT's float32 arithmetic instead of the release's (see the module doc). Every
    check runs before the first write; the folder appears atomically when complete, and not at all
    if a merged tensor is not finite or a LoRA changed nothing. ``progress(nbytes)`` is called as
    tensors are written. The result carries the post-merge audit.
    """
    from . import hf_writer, pth_writer

    writers = {"hf": hf_writer.write_hf, "pth": pth_writer.write_pth}
    if format not in writers:
        raise InputError(f"output format {format!r} is not supported", expected=" or ".join(FORMATS))
    out = fsutil.claim_output(out, kind="dir", inputs=[base, *loras], overwrite=overwrite)  # never an input
    if isinstance(max_shard_size, str):
        max_shard_size = parse_shard_size(max_shard_size)  # our words for "lots", not float()'s
    parse_shard_size(max_shard_size)  # a positive byte count either way
    t0 = time.perf_counter()
    plan = plan_merge(base, loras, dtype=dtype, precise=precise)
    kwargs = {"max_shard_size": max_shard_size} if format == "hf" else {"parts": parts}
    writers[format](plan, out=out, overwrite=overwrite, progress=progress, check_only=True, **kwargs)
    fsutil.check_disk_space(out.parent if not out.exists() else out, plan.output_bytes + (1 << 20),
                            what=f"the merged model ({format})")
    files = writers[format](plan, out=out, overwrite=overwrite, progress=progress, **kwargs)
    log.info("merged %s into %s", plan.describe(), out)
    return MergeResult(out=out, format=format, dtype=dtype_name(plan.dtype), files=tuple(files),
                       n_tensors=len(plan.steps), n_merged=plan.n_touched, vocab_before=plan.vocab_before,
                       vocab_after=plan.vocab_after, loras=tuple(lo.name for lo in plan.loras),
                       bytes_written=sum(f.stat().st_size for f in files), seconds=time.perf_counter() - t0,
                       warnings=plan.warnings, arithmetic=plan.arithmetic,
                       audit=plan.audit.result if plan.audit is not None else None)
