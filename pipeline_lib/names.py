"""Tensor naming tables: Hugging Face ⇄ Meta (consolidated.pth) ⇄ GGUF, as data.

One row per tensor kind, with a ``{bid}`` placeholder for the block index. Alongside: the axis
on which Meta's model-parallel parts split the tensor (``None`` = replicated in every part) and
whether the tensor is rotary-permuted between the HF and Meta/GGUF layouts (``"q"`` uses the
head count, ``"k"`` the key/value head count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TensorKind:
    hf: str
    meta: str
    gguf: str
    meta_split_axis: int | None
    permute: str | None = None  # "q" or "k": HF layout differs from Meta/GGUF by a rotary permutation


TENSOR_KINDS: tuple[TensorKind, ...] = (
    TensorKind("model.embed_tokens.weight", "tok_embeddings.weight", "token_embd.weight", 1),
    TensorKind("model.norm.weight", "norm.weight", "output_norm.weight", None),
    TensorKind("lm_head.weight", "output.weight", "output.weight", 0),
    TensorKind("model.layers.{bid}.self_attn.q_proj.weight", "layers.{bid}.attention.wq.weight", "blk.{bid}.attn_q.weight", 0, "q"),
    TensorKind("model.layers.{bid}.self_attn.k_proj.weight", "layers.{bid}.attention.wk.weight", "blk.{bid}.attn_k.weight", 0, "k"),
    TensorKind("model.layers.{bid}.self_attn.v_proj.weight", "layers.{bid}.attention.wv.weight", "blk.{bid}.attn_v.weight", 0),
    TensorKind("model.layers.{bid}.self_attn.o_proj.weight", "layers.{bid}.attention.wo.weight", "blk.{bid}.attn_output.weight", 1),
    TensorKind("model.layers.{bid}.mlp.gate_proj.weight", "layers.{bid}.feed_forward.w1.weight", "blk.{bid}.ffn_gate.weight", 0),
    TensorKind("model.layers.{bid}.mlp.down_proj.weight", "layers.{bid}.feed_forward.w2.weight", "blk.{bid}.ffn_down.weight", 1),
    TensorKind("model.layers.{bid}.mlp.up_proj.weight", "layers.{bid}.feed_forward.w3.weight", "blk.{bid}.ffn_up.weight", 0),
    TensorKind("model.layers.{bid}.input_layernorm.weight", "layers.{bid}.attention_norm.weight", "blk.{bid}.attn_norm.weight", None),
    TensorKind("model.layers.{bid}.post_attention_layernorm.weight", "layers.{bid}.ffn_norm.weight", "blk.{bid}.ffn_norm.weight", None),
)

# Buffers some checkpoints carry that are recomputed at load time and never converted.
IGNORED_TENSORS: tuple[str, ...] = (
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",  # HF checkpoints of 2023
    r"rope\.freqs",  # Meta consolidated.pth
)
_IGNORED = re.compile("|".join(f"(?:{p})" for p in IGNORED_TENSORS))

# LoRA target module short names (as in adapter_config.json) -> HF module path inside a block.
LORA_TARGETS: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "down_proj": "mlp.down_proj",
    "up_proj": "mlp.up_proj",
}


def _compile(template: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(template).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$")


_BY_SCHEME: dict[str, list[tuple[re.Pattern[str], TensorKind]]] = {
    scheme: [(_compile(getattr(k, scheme)), k) for k in TENSOR_KINDS] for scheme in ("hf", "meta", "gguf")
}


def is_ignored(name: str) -> bool:
    return _IGNORED.fullmatch(name) is not None


def lookup(name: str, scheme: str = "hf") -> tuple[TensorKind, int | None] | None:
    """Find the kind of ``name`` in naming ``scheme`` ('hf', 'meta', 'gguf') and its block index."""
    for pattern, kind in _BY_SCHEME[scheme]:
        m = pattern.match(name)
        if m:
            bid = m.groupdict().get("bid")
            return kind, (int(bid) if bid is not None else None)
    return None


def rename(name: str, *, src: str = "hf", dst: str = "gguf") -> str:
    """Translate a tensor name between schemes; KeyError if the name is not in the table."""
    found = lookup(name, src)
    if found is None:
        raise KeyError(f"tensor {name!r} is not a known LLaMA tensor in the {src} naming")
    kind, bid = found
    return getattr(kind, dst).replace("{bid}", str(bid)) if bid is not None else getattr(kind, dst)


def hf_names(n_layers: int) -> list[str]:
    """Every HF tensor name of a LLaMA model with ``n_layers`` blocks, in checkpoint order.

    This is the release's key order: the order in which 2023 transformers' ``LlamaForCausalLM``
    registers its parameters (``embed_tokens``; per layer q, k, v, o, gate, down, up,
    input_layernorm, post_attention_layernorm; ``norm``; ``lm_head``), which is the order of the
    official HF ``pytorch_model-*.bin`` shards. The rows of :data:`TENSOR_KINDS` are in that order.
    """
    head = [k.hf for k in TENSOR_KINDS if "{bid}" not in k.hf and k.hf.startswith("model.embed")]
    blocks = [k.hf.format(bid=i) for i in range(n_layers) for k in TENSOR_KINDS if "{bid}" in k.hf]
    tail = [k.hf for k in TENSOR_KINDS if "{bid}" not in k.hf and not k.hf.startswith("model.embed")]
    return head + blocks + tail


def heads_for(kind: TensorKind, *, n_head: int, n_head_kv: int) -> int | None:
    """Head count used by the rotary permutation of this tensor kind (None = not permuted)."""
    return {"q": n_head, "k": n_head_kv}.get(kind.permute or "")


def hf_to_meta_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo HF's rotary permutation (HF layout -> Meta/GGUF layout) of a q or k weight."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_to_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Apply HF's rotary permutation (Meta layout -> HF layout) of a q or k weight."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)
