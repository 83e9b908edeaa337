"""Tiny synthetic Chinese-LLaMA/Alpaca releases, for tests, benchmarks and the offline demo.

Everything is built from seeds, deterministically, in the 2023 release formats:

* a LLaMA-like sentencepiece model (BPE, byte fallback, ``<unk> <s> </s>`` = 0 1 2) trained
  on English text, and a "Chinese" sentencepiece model trained on Chinese text;
* a base model as an HF folder of ``pytorch_model-0000N-of-0000M.bin`` fp16 shards + index
  (2023 layout, with ``rotary_emb.inv_freq`` buffers), as safetensors shards, or as Meta's
  ``consolidated.NN.pth`` + ``params.json`` in 1/2/4/8 parts;
* LoRA adapters as the release published them: ``adapter_model.bin`` (fp16 pickle) with
  lora_A/lora_B pairs plus full ``embed_tokens``/``lm_head`` for the enlarged vocabulary, an
  old-style ``adapter_config.json`` and the tokenizer files; or in current PEFT format.

Shapes default to hidden 256 / ffn 512 so that llama.cpp's K-quants apply (rows of 256).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.resources import files
from pathlib import Path

import torch

from . import names
from .fsutil import write_bytes_atomic, write_text_atomic
from .tokenizer import TokenizerKind, merge_tokenizers, write_hf_tokenizer_files


def corpus(lang: str) -> str:
    """Packaged sample text: 'en' or 'zh' (tokenizer training text)."""
    return files("pipeline_lib.data").joinpath(f"corpus_{lang}.txt").read_text(encoding="utf-8")


# ------------------------------------------------------------------ tokenizers

# LLaMA's sentencepiece trainer settings that matter for behaviour (BPE, byte fallback,
# digits split, identity normalisation, dummy prefix).
LLAMA_SP_SETTINGS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=0.99995,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
    remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
    num_threads=1, minloglevel=2,
)
CHINESE_SP_SETTINGS = dict(LLAMA_SP_SETTINGS, byte_fallback=False, character_coverage=1.0, hard_vocab_limit=False)


def train_sentencepiece(text: str, path: str | Path, *, vocab_size: int, settings: dict | None = None) -> Path:
    """Train a sentencepiece model on ``text`` (one sentence per line) and write it to ``path``."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in text.splitlines() if line.strip()]),
        model_writer=buf, vocab_size=vocab_size, **(settings or LLAMA_SP_SETTINGS),
    )
    path = Path(path)
    write_bytes_atomic(path, buf.getvalue())
    return path


@dataclass(frozen=True)
class TinyTokenizers:
    llama_model: Path  # LLaMA-like tokenizer.model (stands in for the 32000-piece original)
    chinese_sp: Path  # stands in for the release's chinese_sp.model
    chinese_llama_dir: Path  # merged: LLaMA + Chinese pieces (stands in for 49953)
    chinese_alpaca_dir: Path  # merged + [PAD] (stands in for 49954)


def make_tokenizers(root: str | Path, *, llama_vocab: int = 400, chinese_vocab: int = 800) -> TinyTokenizers:
    """Train the two sentencepiece models and merge them as the release did."""
    root = Path(root)
    llama_dir = root / "llama-tokenizer"
    llama_model = train_sentencepiece(corpus("en"), llama_dir / "tokenizer.model", vocab_size=llama_vocab)
    write_hf_tokenizer_files(llama_dir, kind=TokenizerKind.LLAMA)
    chinese_sp = train_sentencepiece(corpus("zh"), root / "chinese_sp.model", vocab_size=chinese_vocab,
                                     settings=CHINESE_SP_SETTINGS)
    zh_llama = root / "chinese-llama-tokenizer"
    zh_alpaca = root / "chinese-alpaca-tokenizer"
    merge_tokenizers(llama_model, chinese_sp, out=zh_llama, kind=TokenizerKind.LLAMA)
    merge_tokenizers(llama_model, chinese_sp, out=zh_alpaca, kind=TokenizerKind.ALPACA)
    return TinyTokenizers(llama_model, chinese_sp, zh_llama, zh_alpaca)


# ------------------------------------------------------------------ base model


@dataclass(frozen=True)
class TinyConfig:
    """The config.json fields of a LLaMA model (defaults: tiny, K-quant friendly)."""

    vocab_size: int = 400
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def shapes(self, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
        """HF tensor name -> shape, in checkpoint order."""
        v = vocab_size or self.vocab_size
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        by_suffix = {
            "embed_tokens.weight": (v, h), "lm_head.weight": (v, h), "norm.weight": (h,),
            "q_proj.weight": (h, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
            "o_proj.weight": (h, h), "gate_proj.weight": (i, h), "up_proj.weight": (i, h),
            "down_proj.weight": (h, i), "layernorm.weight": (h,),
        }
        out = {}
        for name in names.hf_names(self.num_hidden_layers):
            out[name] = next(s for suffix, s in by_suffix.items() if name.endswith(suffix))
        return out

    def hf_config(self, *, torch_dtype: str = "float16") -> dict:
        """config.json as huggyllama/llama-7b has it (2023), with these sizes."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_sequence_length": self.max_position_embeddings,
            "model_type": "llama",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "pad_token_id": 0,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": False,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def meta_params(self) -> dict:
        """params.json of Meta's release (vocab_size -1: taken from the tokenizer)."""
        return {"dim": self.hidden_size, "multiple_of": 256, "n_heads": self.num_attention_heads,
                "n_layers": self.num_hidden_layers, "norm_eps": self.rms_norm_eps, "vocab_size": -1}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weights(cfg: TinyConfig, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Deterministic weights in HF naming and layout (q/k HF-permuted by construction)."""
    g = _gen(seed)
    out = {}
    for name, shape in cfg.shapes().items():
        if len(shape) == 1:  # RMSNorm weights: around 1, not exactly 1, so mistakes show
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) * (1.0 / math.sqrt(shape[1]))
        out[name] = t.to(dtype)
    return out


def inv_freq(cfg: TinyConfig) -> torch.Tensor:
    d = cfg.head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))


GENERATION_CONFIG = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def save_hf_base(
    weights: dict[str, torch.Tensor],
    cfg: TinyConfig,
    out: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    shards: int = 2,
    safetensors: bool = False,
    with_inv_freq: bool = True,
) -> Path:
    """Write an HF LLaMA folder: shards + index + config + generation_config (+ tokenizer files)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = list(weights.items())
    if with_inv_freq and not safetensors:
        # 2023 checkpoints carried the rotary buffer in every layer; insert after each block's norms.
        extra = []
        for name, t in items:
            extra.append((name, t))
            if name.endswith("post_attention_layernorm.weight"):
                bid = name.split(".")[2]
                extra.append((f"model.layers.{bid}.self_attn.rotary_emb.inv_freq", inv_freq(cfg)))
        items = extra
    per = math.ceil(len(items) / shards)
    ext = "safetensors" if safetensors else "bin"
    prefix = "model" if safetensors else "pytorch_model"
    weight_map, total = {}, 0
    for s in range(shards):
        chunk = dict(items[s * per:(s + 1) * per])
        fname = f"{prefix}-{s + 1:05d}-of-{shards:05d}.{ext}"
        path = out / fname
        if safetensors:
            from safetensors.torch import save

            write_bytes_atomic(path, save({k: v.contiguous() for k, v in chunk.items()}, metadata={"format": "pt"}))
        else:
            buf = io.BytesIO()
            torch.save(chunk, buf)
            write_bytes_atomic(path, buf.getvalue())
        for k, v in chunk.items():
            weight_map[k] = fname
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(out / f"{prefix}.{ext}.index.json", json.dumps(index, indent=2) + "\n")
    write_text_atomic(out / "config.json", json.dumps(cfg.hf_config(), indent=2) + "\n")
    write_text_atomic(out / "generation_config.json", json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
    return out


def save_meta_base(
    weights: dict[str, torch.Tensor], cfg: TinyConfig, out: str | Path, *, parts: int = 1,
    tokenizer_model: str | Path | None = None,
) -> Path:
    """Write Meta's layout: ``consolidated.NN.pth`` split in ``parts`` + ``params.json``.

    q/k are un-permuted to Meta's rotary layout; each tensor is split on its model-parallel
    axis (names.TENSOR_KINDS) or replicated.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    part_dicts: list[dict[str, torch.Tensor]] = [{} for _ in range(parts)]
    for name, t in weights.items():
        kind, _ = names.lookup(name, "hf")
        heads = names.heads_for(kind, n_head=cfg.num_attention_heads, n_head_kv=cfg.num_key_value_heads)
        if heads:
            t = names.hf_to_meta_rotary(t, heads)
        meta_name = names.rename(name, src="hf", dst="meta")
        if kind.meta_split_axis is None:
            for d in part_dicts:
                d[meta_name] = t.clone()
        else:
            for d, piece in zip(part_dicts, torch.chunk(t, parts, dim=kind.meta_split_axis), strict=True):
                d[meta_name] = piece.clone()
    for i, d in enumerate(part_dicts):
        d["rope.freqs"] = inv_freq(cfg).to(torch.float16)
        buf = io.BytesIO()
        torch.save(d, buf)
        write_bytes_atomic(out / f"consolidated.{i:02d}.pth", buf.getvalue())
    write_text_atomic(out / "params.json", json.dumps(cfg.meta_params()) + "\n")
    if tokenizer_model is not None:
        write_bytes_atomic(out / "tokenizer.model", Path(tokenizer_model).read_bytes())
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for fname in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        if (src / fname).is_file():
            write_bytes_atomic(dst / fname, (src / fname).read_bytes())


# ------------------------------------------------------------------ LoRA adapters

RELEASE_TARGETS = ("q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj")


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 32.0
    target_modules: tuple[str, ...] = RELEASE_TARGETS
    fan_in_fan_out: bool = False
    use_rslora: bool = False
    seed: int = 1
    fmt: str = "2023"  # "2023": adapter_model.bin + old config; "peft": safetensors + current config
    full_weights: tuple[str, ...] = ("embed_tokens", "lm_head")


def lora_tensors(cfg: TinyConfig, spec: LoraSpec, *, vocab_size: int,
                 base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """LoRA tensors in the 2023 key spelling (``base_model.model.<hf name>.lora_A.weight``)."""
    g = _gen(spec.seed)
    shapes = cfg.shapes()
    out: dict[str, torch.Tensor] = {}
    for bid in range(cfg.num_hidden_layers):
        for target in spec.target_modules:
            module = f"model.layers.{bid}.{names.LORA_TARGETS[target]}"
            rows, cols = shapes[module + ".weight"]
            a = torch.randn(spec.r, cols, generator=g) / math.sqrt(cols)
            b = torch.randn(rows, spec.r, generator=g) * 0.05  # nonzero: a trained LoRA, not a fresh one
            out[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.float16)
            out[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.float16)
    full_names = {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight"}
    for short in spec.full_weights:
        hf = full_names[short]
        t = torch.randn(vocab_size, cfg.hidden_size, generator=g) / math.sqrt(cfg.hidden_size)
        if base is not None:  # the trained rows of the old vocabulary stay close to the base's
            n = min(vocab_size, base[hf].shape[0])
            t[:n] = base[hf][:n].float() + 0.01 * t[:n]
        out[f"base_model.model.{hf}"] = t.to(torch.float16)
    return out


def adapter_config(spec: LoraSpec, *, base_name: str = "decapoda-research/llama-7b-hf") -> dict:
    """adapter_config.json as the release (2023, PEFT 0.2/0.3) or current PEFT writes it."""
    if spec.fmt == "2023":
        return {
            "base_model_name_or_path": base_name,
            "bias": "none",
            "enable_lora": None,
            "fan_in_fan_out": spec.fan_in_fan_out,
            "inference_mode": True,
            "lora_alpha": float(spec.alpha),
            "lora_dropout": 0.05,
            "merge_weights": False,
            "modules_to_save": list(spec.full_weights) or None,
            "peft_type": "LORA",
            "r": spec.r,
            "target_modules": list(spec.target_modules),
            "task_type": "CAUSAL_LM",
        }
    return {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_name, "bias": "none",
        "fan_in_fan_out": spec.fan_in_fan_out, "inference_mode": True, "init_lora_weights": True,
        "layers_pattern": None, "layers_to_transform": None, "lora_alpha": spec.alpha, "lora_dropout": 0.05,
        "modules_to_save": list(spec.full_weights) or None, "peft_type": "LORA", "r": spec.r,
        "rank_pattern": {}, "revision": None, "target_modules": list(spec.target_modules),
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": spec.use_rslora,
    }


def save_lora(tensors: dict[str, torch.Tensor], spec: LoraSpec, out: str | Path, *,
              tokenizer_dir: str | Path | None = None) -> Path:
    """Write a LoRA folder in ``spec.fmt`` with its tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if spec.fmt == "2023":
        buf = io.BytesIO()
        torch.save(tensors, buf)
        write_bytes_atomic(out / "adapter_model.bin", buf.getvalue())
    elif spec.fmt == "peft":
        from safetensors.torch import save

        write_bytes_atomic(out / "adapter_model.safetensors", save({k: v.contiguous() for k, v in tensors.items()}))
    else:
        raise ValueError(f"unknown LoRA format {spec.fmt!r}")
    write_text_atomic(out / "adapter_config.json", json.dumps(adapter_config(spec), indent=2) + "\n")
    if tokenizer_dir is not None:
        _copy_tokenizer(Path(tokenizer_dir), out)
    return out


# ------------------------------------------------------------------ a whole tiny release


@dataclass(frozen=True)
class TinyRelease:
    """Paths of a synthetic release: base + LLaMA-Plus-style LoRA + Alpaca-Plus-style LoRA."""

    root: Path
    config: TinyConfig
    tokenizers: TinyTokenizers
    base_hf: Path
    llama_lora: Path  # r=8 alpha=32 (LLaMA LoRA), vocab = merged Chinese-LLaMA tokenizer
    alpaca_lora: Path  # r=16 alpha=32 (Alpaca LoRA, scaled down from r=64 alpha=128), vocab + [PAD]
    llama_vocab: int
    alpaca_vocab: int
    extra: dict = field(default_factory=dict)


def make_release(root: str | Path, *, config: TinyConfig | None = None, seed: int = 0,
                 shards: int = 2, lora_formats: Sequence[str] = ("2023", "2023")) -> TinyRelease:
    """Build a complete tiny release under ``root`` (a few MB, about a second)."""
    from .tokenizer import piece_count

    root = Path(root)
    toks = make_tokenizers(root / "tokenizers")
    base_vocab = piece_count(toks.llama_model)
    cfg = replace(config or TinyConfig(), vocab_size=base_vocab)
    weights = random_weights(cfg, seed=seed)
    base = save_hf_base(weights, cfg, root / "llama-base", tokenizer_dir=toks.llama_model.parent, shards=shards)
    llama_vocab = piece_count(toks.chinese_llama_dir)
    alpaca_vocab = piece_count(toks.chinese_alpaca_dir)
    llama_spec = LoraSpec(r=8, alpha=32.0, seed=seed + 1, fmt=lora_formats[0])
    alpaca_spec = LoraSpec(r=16, alpha=32.0, seed=seed + 2, fmt=lora_formats[1])
    llama_lora = save_lora(lora_tensors(cfg, llama_spec, vocab_size=llama_vocab, base=weights), llama_spec,
                           root / "chinese-llama-plus-lora", tokenizer_dir=toks.chinese_llama_dir)
    alpaca_lora = save_lora(lora_tensors(cfg, alpaca_spec, vocab_size=alpaca_vocab, base=weights), alpaca_spec,
                            root / "chinese-alpaca-plus-lora", tokenizer_dir=toks.chinese_alpaca_dir)
    return TinyRelease(root=root, config=cfg, tokenizers=toks, base_hf=base, llama_lora=llama_lora,
                       alpaca_lora=alpaca_lora, llama_vocab=llama_vocab, alpaca_vocab=alpaca_vocab,
                       extra={"llama_spec": asdict(llama_spec), "alpaca_spec": asdict(alpaca_spec)})


# ------------------------------------------------------------------ real-size releases (benchmarks)


@dataclass(frozen=True)
class LlamaShape:
    """A LLaMA size as config.json gives it, and how huggyllama's HF copy shards it."""

    name: str
    hidden: int
    ffn: int
    heads: int
    layers: int
    shards: int  # pytorch_model-0000N-of-0000M.bin files of the 2023 HF copy
    lora_r: tuple[int, int] = (8, 64)  # LLaMA-Plus and Alpaca-Plus LoRA ranks of the release

    def config(self, *, layers: int | None = None, vocab: int = 32000) -> TinyConfig:
        return TinyConfig(vocab_size=vocab, hidden_size=self.hidden, intermediate_size=self.ffn,
                          num_hidden_layers=self.layers if layers is None else layers,
                          num_attention_heads=self.heads, num_key_value_heads=self.heads,
                          max_position_embeddings=2048)


# Sizes as data (config.json of LLaMA 7B/13B/33B); "tiny" keeps the real vocabularies with small widths.
LLAMA_SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape("tiny", hidden=256, ffn=768, heads=4, layers=2, shards=2, lora_r=(8, 16)),
    "7b": LlamaShape("7b", hidden=4096, ffn=11008, heads=32, layers=32, shards=2),
    "13b": LlamaShape("13b", hidden=5120, ffn=13824, heads=40, layers=40, shards=3),
    "33b": LlamaShape("33b", hidden=6656, ffn=17920, heads=52, layers=60, shards=7),
}
# The release's vocabularies: LLaMA, Chinese-LLaMA (merged), Chinese-Alpaca (merged + [PAD]).
RELEASE_VOCAB = {"llama": 32000, "chinese-llama": 49953, "chinese-alpaca": 49954}
SIZED_ROLES = {"base": "llama-base", "lora-0": "chinese-llama-plus-lora", "lora-1": "chinese-alpaca-plus-lora",
               "chinese_sp": "chinese-sp"}
SIZED_DONE = "SHA256SUMS"  # written last: its presence means the release is complete


def pad_tokenizer(src: str | Path, n: int, out: str | Path, *, prefix: str) -> Path:
    """``src`` (a sentencepiece model) grown to ``n`` pieces with filler pieces ``▁<prefix><i>``."""
    from .tokenizer import load_proto

    proto = load_proto(src)
    have = {p.piece for p in proto.pieces}
    i = 0
    while len(proto.pieces) < n:
        piece = f"\u2581{prefix}{i}"
        i += 1
        if piece in have:
            continue
        p = proto.pieces.add()
        p.piece = piece
        p.score = -100.0 - i * 1e-3
    write_bytes_atomic(Path(out), proto.SerializeToString())
    return Path(out)


def release_tokenizers(root: str | Path) -> dict[str, Path]:
    """The release's tokenizer chain at its real sizes: a 32000-piece LLaMA-like ``tokenizer.model``,
    a ``chinese_sp.model`` whose merge adds exactly the 17953 pieces of Chinese-LLaMA, and the merged
    Chinese-LLaMA (49953) and Chinese-Alpaca (49954) folders, made by the release's merge itself."""
    from .tokenizer import load_proto

    root = Path(root)
    small = make_tokenizers(root / "src")
    llama_dir = root / "llama"
    llama_dir.mkdir(parents=True, exist_ok=True)
    pad_tokenizer(small.llama_model, RELEASE_VOCAB["llama"], llama_dir / "tokenizer.model", prefix="en")
    write_hf_tokenizer_files(llama_dir, kind=TokenizerKind.LLAMA)
    llama_pieces = {p.piece for p in load_proto(llama_dir / "tokenizer.model").pieces}
    chinese = load_proto(small.chinese_sp)
    new = sum(1 for p in chinese.pieces if p.piece not in llama_pieces)
    want_new = RELEASE_VOCAB["chinese-llama"] - RELEASE_VOCAB["llama"]
    sp = pad_tokenizer(small.chinese_sp, len(chinese.pieces) + want_new - new, root / "chinese_sp.model", prefix="zh")
    out = {"llama": llama_dir, "chinese_sp": sp}
    for kind, key in ((TokenizerKind.LLAMA, "chinese-llama"), (TokenizerKind.ALPACA, "chinese-alpaca")):
        res = merge_tokenizers(llama_dir / "tokenizer.model", sp, out=root / key, kind=kind)
        if res.total_pieces != RELEASE_VOCAB[key]:  # pragma: no cover - the padding above guarantees it
            raise RuntimeError(f"{key} tokenizer has {res.total_pieces} pieces, not {RELEASE_VOCAB[key]}")
        out[key] = root / key
    return out


def _sized_tensor(seed: int, name: str, shape: tuple[int, ...], scale: float | None = None) -> torch.Tensor:
    """One reproducible fp16 tensor: its own generator, seeded by (seed, name), so any order gives the same."""
    import zlib

    g = _gen(seed * 1_000_003 + zlib.crc32(name.encode()))
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=g)).to(torch.float16)
    t = torch.randn(shape, generator=g)
    t *= scale if scale is not None else 1.0 / math.sqrt(shape[-1])
    return t.to(torch.float16)


def _write_torch_file(path: Path, items: list[tuple[str, tuple[int, ...], torch.dtype]], make) -> None:
    """A 2023-layout torch.save file written tensor by tensor (``make(name)`` gives each); memory: one tensor."""
    from . import torchsave
    from .fsutil import atomic_path

    entries = [torchsave.TensorEntry(k, dtype, shape) for k, shape, dtype in items]
    with atomic_path(path) as tmp, torchsave.TorchSaveWriter(tmp, entries, ordered=True) as w:
        for i, (key, _, _) in enumerate(items):
            w.write_storage(i, make(key))


def make_sized_release(root: str | Path, shape: LlamaShape | str, *, layers: int | None = None, seed: int = 0,
                       progress=None) -> dict[str, Path]:
    """A Chinese-Alpaca-Plus release at a real size under ``root``, reproducible from ``seed``.

    Like the demo release, but at LLaMA's own widths: the base as huggyllama's 2023 HF copy
    (``pytorch_model-*.bin`` fp16 shards in the 2023 torch.save layout, with ``inv_freq`` buffers, an
    index, config.json with ``shape``'s sizes and ``layers`` blocks), the LLaMA-Plus (r 8) and
    Alpaca-Plus (r 64) LoRAs with their 49953/49954-row ``embed_tokens``/``lm_head`` and tokenizers,
    ``chinese_sp.model``, and a ``SHA256SUMS`` table (the release's official hashes' stand-in).
    Streamed: one tensor in memory at a time. Reused: a part already present is skipped, and a
    complete release (``SHA256SUMS`` present) is returned as it is. ``progress(what, nbytes)``.
    Returns the role -> folder map of :data:`SIZED_ROLES` plus ``"root"``.
    """
    from .fsutil import atomic_dir, sha256_file

    shape = LLAMA_SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root)
    paths = {role: root / folder for role, folder in SIZED_ROLES.items()} | {"root": root}
    if (root / SIZED_DONE).is_file():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    cfg = shape.config(layers=layers)
    note = progress or (lambda what, n: None)

    toks_dir = root / ".tokenizers"
    if not (toks_dir / "chinese-alpaca" / "tokenizer.model").is_file():
        with atomic_dir(toks_dir, replace=True) as tmp:
            release_tokenizers(tmp)
    toks = {k: toks_dir / k for k in ("llama", "chinese-llama", "chinese-alpaca")}

    if not (paths["chinese_sp"] / "chinese_sp.model").is_file():
        with atomic_dir(paths["chinese_sp"], replace=True) as tmp:
            write_bytes_atomic(tmp / "chinese_sp.model", (toks_dir / "chinese_sp.model").read_bytes())

    # the base: huggyllama's order (module registration, inv_freq after o_proj), split into shape.shards
    base_shapes = cfg.shapes()
    items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name, shp in base_shapes.items():
        items.append((name, shp, torch.float16))
        if name.endswith("self_attn.o_proj.weight"):
            items.append((name.replace("o_proj.weight", "rotary_emb.inv_freq"), (cfg.head_dim // 2,), torch.float32))
    freq = inv_freq(cfg)

    def base_tensor(key: str) -> torch.Tensor:
        t = freq if key.endswith("inv_freq") else _sized_tensor(seed, key, base_shapes[key])
        note(f"base {key}", t.numel() * t.element_size())
        return t

    if not (paths["base"] / "config.json").is_file():
        total = sum(math.prod(s) * 2 for _, s, d in items if d == torch.float16)
        per = -(-total // shape.shards)
        groups: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for it in items:
            if groups[-1] and size >= per and len(groups) < shape.shards and not it[0].endswith("inv_freq"):
                groups.append([])
                size = 0
            groups[-1].append(it)
            size += math.prod(it[1]) * (2 if it[2] == torch.float16 else 4)
        n = len(groups)
        with atomic_dir(paths["base"], replace=True) as tmp:
            weight_map = {}
            for i, group in enumerate(groups):
                fname = f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin"
                _write_torch_file(tmp / fname, group, base_tensor)
                weight_map |= {k: fname for k, _, _ in group}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            write_text_atomic(tmp / "pytorch_model.bin.index.json", json.dumps(index, indent=2) + "\n")
            write_text_atomic(tmp / "config.json", json.dumps(cfg.hf_config(), indent=2) + "\n")
            write_text_atomic(tmp / "generation_config.json", json.dumps(GENERATION_CONFIG, indent=2) + "\n")
            _copy_tokenizer(toks["llama"], tmp)

    # the LoRAs: pairs for every target module of every layer, then the enlarged embed_tokens/lm_head
    for role, (r, alpha, vocab_key, lora_seed) in {
        "lora-0": (shape.lora_r[0], 32.0, "chinese-llama", seed + 1),
        "lora-1": (shape.lora_r[1], 2.0 * shape.lora_r[1], "chinese-alpaca", seed + 2),
    }.items():
        folder = paths[role]
        if (folder / "adapter_config.json").is_file():
            continue
        spec = LoraSpec(r=r, alpha=alpha, seed=lora_seed)
        vocab = RELEASE_VOCAB[vocab_key]
        lora_items: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        shapes_of: dict[str, tuple[tuple[int, ...], float | None, str | None]] = {}
        for bid in range(cfg.num_hidden_layers):
            for target in spec.target_modules:
                module = f"model.layers.{bid}.{names.LORA_TARGETS[target]}"
                rows, cols = base_shapes[module + ".weight"]
                a, b = f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight"
                lora_items += [(a, (r, cols), torch.float16), (b, (rows, r), torch.float16)]
                shapes_of[a] = ((r, cols), None, None)
                shapes_of[b] = ((rows, r), 0.05, None)
        for hf in ("model.embed_tokens.weight", "lm_head.weight"):
            key = f"base_model.model.{hf}"
            lora_items.append((key, (vocab, cfg.hidden_size), torch.float16))
            shapes_of[key] = ((vocab, cfg.hidden_size), None, hf)

        def lora_tensor(key: str, lora_seed=lora_seed, shapes_of=shapes_of, role=role) -> torch.Tensor:
            shp, scale, base_name = shapes_of[key]
            t = _sized_tensor(lora_seed, key, shp, scale)
            if base_name is not None:  # the old vocabulary's rows stay close to the base's (trained rows)
                old = _sized_tensor(seed, base_name, base_shapes[base_name])
                t[:old.shape[0]] = (old.float() + 0.01 * t[:old.shape[0]].float()).to(torch.float16)
            note(f"{role} {key}", t.numel() * 2)
            return t

        with atomic_dir(folder, replace=True) as tmp:
            _write_torch_file(tmp / "adapter_model.bin", lora_items, lora_tensor)
            write_text_atomic(tmp / "adapter_config.json", json.dumps(adapter_config(spec), indent=2) + "\n")
            _copy_tokenizer(toks[vocab_key], tmp)

    lines = []
    for role in SIZED_ROLES:
        for p in sorted(paths[role].iterdir()):
            if p.is_file():
                lines.append(f"{sha256_file(p)}  {paths[role].name}/{p.name}")
                note(f"sha256 {p.name}", p.stat().st_size)
    write_text_atomic(root / SIZED_DONE, "\n".join(lines) + "\n")
    return paths


def sized_release_table(root: str | Path) -> dict[str, dict[str, str]]:
    """``SHA256SUMS`` of a sized release, grouped by folder: folder -> {file name: sha256}."""
    out: dict[str, dict[str, str]] = {}
    for line in (Path(root) / SIZED_DONE).read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        folder, _, name = rel.partition("/")
        out.setdefault(folder, {})[name] = digest
    return out
