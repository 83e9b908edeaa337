"""Streaming multi-LoRA merge: plan every check first, then produce merged tensors one at a time.

Semantics are those of PEFT's ``merge_and_unload`` applied LoRA after LoRA (LLaMA-Plus, then
Alpaca-Plus, ...), computed tensor by tensor:

* a full weight in a LoRA (``modules_to_save``: the enlarged ``embed_tokens`` / ``lm_head``)
  replaces the tensor, so the vocabulary grows 32000 -> 49953 -> 49954;
* a lora_A/lora_B pair adds ``(B @ A) * scale`` with ``scale = alpha / r`` (``alpha / sqrt(r)``
  with rslora), transposed for ``lora_embedding_*``. ``fan_in_fan_out`` is ignored for LLaMA's
  ``nn.Linear`` layers exactly as PEFT ignores it (PEFT resets it to False with a warning);
* all arithmetic is float32, in PEFT's order (``delta = B @ A; delta *= scale; W += delta``), so
  our float32 result is bit-identical to PEFT's float32 merge; the result is cast ONCE to the output
  dtype at the end. For a chain this means the fp16 output equals PEFT's float32 merge cast to fp16.
  (Running PEFT on an fp16 model instead rounds to fp16 after every LoRA; that double rounding
  differs from ours by at most one fp16 ulp in a few elements. We choose the single rounding: it is
  closer to the exact result and does not depend on the dtype the user happened to load PEFT with.)
* tensors no LoRA touches are copied unchanged (cast only if the output dtype differs).

``plan_merge`` reads only headers and configs and raises :class:`InputError` for every problem it
can see before a byte is written: LoRA order reversed, a tokenizer that does not fit its LoRA's
embeddings, a LoRA for another model size, a LoRA targeting a module the base lacks, bad shapes.
The returned :class:`MergePlan` is a :class:`~pipeline_lib.checkpoint.TensorSource`; writers (HF,
pth, GGUF) consume its ``iter_tensors()`` stream, so merge -> GGUF needs no intermediate checkpoint.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import fsutil
from .checkpoint import DTYPE_BY_NAME, Checkpoint, TensorInfo, dtype_name, open_checkpoint
from .errors import InputError
from .lora import LoraAdapter, LoraPair, load_adapter, tokenizer_size

log = logging.getLogger(__name__)

# Hidden size -> how people name the model size; used in error messages only (shapes come from config.json).
SIZE_BY_HIDDEN: dict[int, str] = {4096: "7B", 5120: "13B", 6656: "33B", 8192: "65B"}

EMBED = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
VOCAB_TENSORS = (EMBED, LM_HEAD)


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


@dataclass(frozen=True)
class MergePlan:
    """A checked merge, not yet executed. Implements TensorSource: ``iter_tensors()`` merges."""

    base: Checkpoint
    loras: tuple[LoraAdapter, ...]
    dtype: torch.dtype
    config: dict
    tokenizer_dir: Path | None
    steps: dict[str, TensorStep]
    vocab_before: int
    vocab_after: int
    warnings: tuple[str, ...] = ()

    def tensor_infos(self) -> list[TensorInfo]:
        return [TensorInfo(s.name, s.shape, self.dtype) for s in self.steps.values()]

    @property
    def output_bytes(self) -> int:
        return sum(i.nbytes for i in self.tensor_infos())

    @property
    def n_touched(self) -> int:
        return sum(1 for s in self.steps.values() if s.touched)

    def iter_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter_merged(self)

    def describe(self) -> str:
        chain = " -> ".join(lo.name for lo in self.loras) or "(no LoRA)"
        return (f"{self.base.path} + {chain}: {len(self.steps)} tensors ({self.n_touched} merged), "
                f"vocab {self.vocab_before} -> {self.vocab_after}, {dtype_name(self.dtype)}, "
                f"{fsutil.human_bytes(self.output_bytes)}")


def _lora_hidden(lora: LoraAdapter) -> int | None:
    """The hidden size a LoRA was trained for, read from its tensors."""
    for name in VOCAB_TENSORS:
        if name in lora.full_weights:
            return lora.full_weights[name].shape[-1]
    for pair in lora.pairs.values():
        if pair.target.endswith(("q_proj.weight", "o_proj.weight")):
            return pair.delta_shape[1]
    return None


def plan_merge(base: str | Path | Checkpoint, loras: Sequence[str | Path | LoraAdapter], *,
               dtype: str | torch.dtype = "float16", check_tokenizers: bool = True) -> MergePlan:
    """Check a base model and a LoRA chain; return the plan (nothing is written or loaded in full).

    ``loras`` are applied in the given order. Raises InputError naming the cause and the fix.
    """
    ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    adapters = tuple(lo if isinstance(lo, LoraAdapter) else load_adapter(lo) for lo in loras)
    out_dtype = as_dtype(dtype)
    cfg = ckpt.config
    hidden = int(cfg.get("hidden_size") or ckpt.info(EMBED).shape[1])
    base_vocab = ckpt.info(EMBED).shape[0] if EMBED in ckpt else int(cfg.get("vocab_size", 0))

    shapes = {i.name: i.shape for i in ckpt.tensor_infos()}
    steps = {n: TensorStep(n, s, None) for n, s in shapes.items()}
    vocab, vocab_from = base_vocab, "the base model"
    warnings: list[str] = []

    for idx, lora in enumerate(adapters):
        lh = _lora_hidden(lora)
        if lh is not None and lh != hidden:
            raise InputError(
                f"LoRA {lora.name} was trained for {_size_name(lh)}, but the base model has {_size_name(hidden)}",
                expected=f"a LoRA made for the {SIZE_BY_HIDDEN.get(hidden, 'same-size')} base",
                fix=f"use the {SIZE_BY_HIDDEN.get(hidden, 'matching')} LoRA with this base, "
                    f"or the {SIZE_BY_HIDDEN.get(lh, 'matching')} base with this LoRA")
        if lora.fan_in_fan_out:
            warnings.append(f"{lora.name}: fan_in_fan_out=True ignored for nn.Linear layers (as PEFT does)")
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
            if tuple(pair.delta_shape) != tuple(cur.shape):
                raise InputError(f"LoRA {lora.name}: update of {target} has shape {tuple(pair.delta_shape)}",
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

    out_cfg = dict(cfg)
    out_cfg["vocab_size"] = vocab
    out_cfg["torch_dtype"] = dtype_name(out_dtype)
    if "dtype" in out_cfg:
        out_cfg["dtype"] = dtype_name(out_dtype)
    for w in warnings:
        log.warning(w)
    return MergePlan(base=ckpt, loras=adapters, dtype=out_dtype, config=out_cfg, tokenizer_dir=tok_dir,
                     steps=steps, vocab_before=base_vocab, vocab_after=vocab, warnings=tuple(warnings))


def _merged_tensor(plan: MergePlan, step: TensorStep) -> torch.Tensor:
    if step.source is None:
        t = plan.base.load(step.name)
    else:
        lora = plan.loras[step.source]
        t = lora.load(lora.full_weights[step.name].name)
    if not step.deltas:
        return t.to(plan.dtype)
    w = t.to(torch.float32)
    del t
    for idx, pair in step.deltas:
        lora = plan.loras[idx]
        a = lora.load(pair.a_key).to(torch.float32)
        b = lora.load(pair.b_key).to(torch.float32)
        delta = b @ a  # PEFT's order of operations, so float32 results are bit-identical
        if pair.embedding:
            delta = delta.T
        delta *= pair.scaling
        w += delta
        del delta, a, b
    return w.to(plan.dtype)


def iter_merged(plan: MergePlan, *, prefetch: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged tensors in write order, one at a time (HF names and layout, ``plan.dtype``).

    With ``prefetch`` the next tensor is read and merged in a background thread while the consumer
    writes the current one (torch and file I/O release the GIL), so at most two tensors are alive.
    """
    steps = list(plan.steps.values())
    if not prefetch or len(steps) < 2:
        for step in steps:
            yield step.name, _merged_tensor(plan, step)
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="zhllama-merge") as pool:
        pending = pool.submit(_merged_tensor, plan, steps[0])
        try:
            for i, step in enumerate(steps):
                tensor = pending.result()
                pending = pool.submit(_merged_tensor, plan, steps[i + 1]) if i + 1 < len(steps) else None
                yield step.name, tensor
                del tensor
        finally:  # consumer stopped early or failed: do not leave work running
            if pending is not None:
                pending.cancel()


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


def merge(base: str | Path, loras: Sequence[str | Path], *, out: str | Path, format: str = "hf",
          dtype: str = "float16", max_shard_size: int | str = "2GB", parts: int | None = None,
          overwrite: bool = False, progress=None) -> MergeResult:
    """Merge ``loras`` (in order) into ``base`` and write the model to the folder ``out``.

    ``format`` "hf": sharded safetensors + index + config + tokenizer; "pth": Meta consolidated parts
    (``parts`` defaults to the release's count for the hidden size). Every check runs before the
    first write; the folder appears atomically when complete. ``progress(nbytes)`` is called as
    tensors are written.
    """
    from . import hf_writer, pth_writer

    writers = {"hf": hf_writer.write_hf, "pth": pth_writer.write_pth}
    if format not in writers:
        raise InputError(f"output format {format!r} is not supported", expected=" or ".join(FORMATS))
    out = fsutil.claim_output(out, kind="dir", inputs=[base, *loras], overwrite=overwrite)  # never an input
    if isinstance(max_shard_size, str):
        try:
            max_shard_size = fsutil.parse_size(max_shard_size)
        except ValueError as exc:
            raise InputError(str(exc)) from exc
    t0 = time.perf_counter()
    plan = plan_merge(base, loras, dtype=dtype)
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
                       warnings=plan.warnings)
