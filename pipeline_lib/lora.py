"""LoRA adapter reader: 2023 release format and current PEFT format, normalised once, read lazily.

Accepted on disk:

* ``adapter_model.bin`` (pickle, loaded with ``weights_only=True`` and mmap) or
  ``adapter_model.safetensors``;
* ``adapter_config.json`` old (PEFT 0.2/0.3: ``enable_lora``, ``merge_weights``, float ``lora_alpha``)
  or current (``use_rslora``, ``rank_pattern``/``alpha_pattern``, ``use_dora``...).

Key spellings normalised here, and nowhere else:

* ``base_model.model.<module>.lora_A.weight`` (2023) and ``...lora_A.default.weight`` (current);
  likewise ``lora_embedding_A``/``lora_embedding_B`` for LoRA on an embedding;
* full weights ``base_model.model.<name>.weight`` (2023), ``<module>.modules_to_save.default.weight``
  and ``<module>.modules_to_save.weight``; ``<module>.original_module.weight`` (a copy of the base
  weight PEFT sometimes saves) is dropped.

The record keeps tensor *locations*; ``load(key)`` reads one tensor when the merge needs it.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import TensorInfo, open_tensor_file
from .errors import InputError

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
_LORA_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?(?:\.weight)?$")
_SAVE_RE = re.compile(r"^(?P<module>.+)\.modules_to_save(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")
_ORIGINAL_RE = re.compile(r"\.original_module\.")

# adapter_config.json keys we understand; anything else is logged (never silently acted upon)
_KNOWN_CONFIG_KEYS = frozenset({
    "base_model_name_or_path", "bias", "enable_lora", "fan_in_fan_out", "inference_mode", "lora_alpha",
    "lora_dropout", "merge_weights", "modules_to_save", "peft_type", "r", "target_modules", "task_type",
    "alpha_pattern", "auto_mapping", "init_lora_weights", "layers_pattern", "layers_to_transform",
    "rank_pattern", "revision", "use_dora", "use_rslora", "megatron_config", "megatron_core", "loftq_config",
    "layer_replication", "runtime_config", "lora_bias", "eva_config", "exclude_modules", "trainable_token_indices",
    "corda_config", "target_parameters", "qalora_group_size", "use_qalora", "peft_version", "lora_ga_config",
    "arrow_config", "ensure_weight_tying",
})


@dataclass(frozen=True)
class LoraPair:
    """One low-rank update of the HF weight ``target`` (``module + ".weight"``)."""

    target: str
    a_key: str  # key in the adapter file
    b_key: str
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    scaling: float  # alpha/r or alpha/sqrt(r), with rank/alpha patterns applied
    embedding: bool = False  # lora_embedding_A/B: delta is (B @ A).T

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.a_shape[1], self.b_shape[0]) if self.embedding else (self.b_shape[0], self.a_shape[1])


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA adapter folder: settings from adapter_config.json plus where every tensor lives."""

    path: Path
    weights_file: Path
    r: int
    alpha: float
    scaling: float  # default scaling (alpha/r, or alpha/sqrt(r) with rslora)
    fan_in_fan_out: bool
    use_rslora: bool
    target_modules: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    pairs: dict[str, LoraPair]  # HF weight name -> update
    full_weights: dict[str, TensorInfo]  # HF weight name -> replacement (info.name = key in file)
    tokenizer_dir: Path | None  # the folder itself when it ships tokenizer.model
    config: dict = field(repr=False)
    _reader: object = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    def embed_rows(self) -> int | None:
        """Rows of the full embedding this LoRA carries (its vocabulary size), if any."""
        info = self.full_weights.get("model.embed_tokens.weight")
        return info.shape[0] if info else None

    def load(self, key: str) -> torch.Tensor:
        """One tensor of the adapter file (an owned copy)."""
        return self._reader.load(key)

    @property
    def nbytes(self) -> int:
        return self.weights_file.stat().st_size


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module name."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter_config(folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise InputError(f"{folder} has no adapter_config.json",
                         expected="a LoRA folder (adapter_config.json + adapter_model.bin/.safetensors)",
                         fix="point --lora at the unpacked LoRA folder")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"cannot read {path}: {exc}", fix="re-download the LoRA") from None
    return check_adapter_config(cfg, path)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# adapter_config.json fields we act on -> (check, what it must be). Anything else is only logged.
_CONFIG_SCHEMA: dict[str, tuple] = {
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (lambda v: v is None or isinstance(v, str)
                       or (isinstance(v, list) and all(isinstance(x, str) for x in v)), "a list of module names"),
    "modules_to_save": (lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v)),
                        "a list of module names"),
    "rank_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) for x in v.values())),
                     "an object of module -> rank"),
    "alpha_pattern": (lambda v: v is None or (isinstance(v, dict) and all(_is_number(x) for x in v.values())),
                      "an object of module -> alpha"),
}


def check_adapter_config(cfg: object, path: Path) -> dict:
    """Schema check of a parsed adapter_config.json: one InputError naming the bad field, never a traceback."""
    if not isinstance(cfg, dict):
        raise InputError(f"{path} holds a JSON {type(cfg).__name__}, not an object",
                         expected='adapter_config.json: {"r": 8, "lora_alpha": 32, "target_modules": [...], ...}',
                         fix="re-download the LoRA; this is not its adapter_config.json")
    r = cfg.get("r")
    if "r" not in cfg or not _is_number(r) or r != int(r) or r < 1:
        raise InputError(f"{path}: the LoRA rank r is {'missing' if 'r' not in cfg else repr(r)}",
                         expected="a positive integer r (8 for the LLaMA LoRAs, 64 for the Alpaca ones)",
                         fix="re-download the LoRA; use the adapter_config.json released with its adapter_model file")
    alpha = cfg.get("lora_alpha")
    if "lora_alpha" not in cfg or not _is_number(alpha):
        raise InputError(f"{path}: lora_alpha is {'missing' if 'lora_alpha' not in cfg else repr(alpha)}",
                         expected="a number (32 for the LLaMA LoRAs, 128 for the Alpaca ones); the merge scales "
                                  "by lora_alpha / r",
                         fix="re-download the LoRA; use the adapter_config.json released with its adapter_model file")
    for key, (ok, what) in _CONFIG_SCHEMA.items():
        if key in cfg and not ok(cfg[key]):
            raise InputError(f"{path}: {key} is {cfg[key]!r}", expected=what,
                             fix="re-download the LoRA; use the adapter_config.json released with it")
    return cfg


def load_adapter(path: str | Path) -> LoraAdapter:
    """Read a LoRA folder's config and tensor index (no tensor data is read)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"LoRA folder {folder} does not exist", fix="check the --lora path")
    cfg = read_adapter_config(folder)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(f"{folder} is a {cfg.get('peft_type')} adapter", expected="a LoRA adapter (peft_type LORA)")
    if cfg.get("use_dora"):
        raise InputError(f"{folder} is a DoRA adapter", expected="plain LoRA",
                         fix="merge DoRA adapters with PEFT's merge_and_unload")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise InputError(f"{folder}: LoRA with trained biases (bias={cfg.get('bias')!r})",
                         expected='bias "none" as in the Chinese-LLaMA/Alpaca release')
    if cfg.get("layers_to_transform") or cfg.get("layer_replication"):
        raise InputError(f"{folder}: layers_to_transform/layer_replication are not supported",
                         fix="merge this adapter with PEFT's merge_and_unload")
    unknown = sorted(set(cfg) - _KNOWN_CONFIG_KEYS)
    if unknown:
        log.info("%s: ignoring adapter_config keys %s", folder, unknown)

    candidates = [folder / "adapter_model.safetensors", folder / "adapter_model.bin"]
    weights_file = next((p for p in candidates if p.is_file()), None)
    if weights_file is None:
        raise InputError(f"{folder} has no adapter_model.safetensors or adapter_model.bin",
                         fix="finish the download of the LoRA")
    reader = open_tensor_file(weights_file)

    r = int(cfg["r"])
    alpha = float(cfg["lora_alpha"])
    rslora = bool(cfg.get("use_rslora", False))
    fifo = bool(cfg.get("fan_in_fan_out", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    target_modules = cfg.get("target_modules") or []
    if isinstance(target_modules, str):
        target_modules = [target_modules]

    halves: dict[str, dict[str, str]] = {}
    emb_flags: dict[str, bool] = {}
    full: dict[str, TensorInfo] = {}
    for key in reader.keys():
        name = key.removeprefix(_PREFIX)
        if _ORIGINAL_RE.search(name):
            continue  # PEFT's copy of the untouched base weight: never needed
        m = _LORA_RE.match(name)
        if m:
            halves.setdefault(m["module"], {})[m["ab"]] = key
            emb_flags[m["module"]] = bool(m["emb"])
            continue
        m = _SAVE_RE.match(name)
        if m:
            name = f"{m['module']}.{m['param']}"
        dtype, shape = reader.info(key)
        full[name] = TensorInfo(key, shape, dtype)

    pairs: dict[str, LoraPair] = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise InputError(f"{weights_file}: {module} has lora_{''.join(ab)} but not both lora_A and lora_B",
                             fix="re-download the LoRA; the file is incomplete")
        _, a_shape = reader.info(ab["A"])
        _, b_shape = reader.info(ab["B"])
        emb = emb_flags[module]
        rank = a_shape[0]  # lora_A is (r, in) and lora_embedding_A is (r, num_embeddings)
        if b_shape[1] != rank:
            raise InputError(f"{weights_file}: {module} lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)} disagree",
                             expected="lora_A (r, in) and lora_B (out, r)", fix="re-download the LoRA")
        mod_r = int(_pattern_value(rank_pattern, module, r))
        mod_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        if mod_r != rank:
            raise InputError(f"{weights_file}: {module} has rank {rank} but adapter_config.json says r={mod_r}",
                             fix="use the adapter_config.json that came with this adapter_model file")
        pairs[module + ".weight"] = LoraPair(module + ".weight", ab["A"], ab["B"], tuple(a_shape), tuple(b_shape),
                                             _scaling(mod_alpha, mod_r, rslora), emb)

    tok = folder if (folder / "tokenizer.model").is_file() else None
    return LoraAdapter(
        path=folder, weights_file=weights_file, r=r, alpha=alpha, scaling=_scaling(alpha, r, rslora),
        fan_in_fan_out=fifo, use_rslora=rslora, target_modules=tuple(target_modules),
        modules_to_save=tuple(cfg.get("modules_to_save") or ()), pairs=pairs, full_weights=full,
        tokenizer_dir=tok, config=cfg, _reader=reader,
    )


def tokenizer_size(folder: Path) -> int:
    """Vocabulary of a tokenizer folder: sentencepiece pieces plus added tokens beyond them."""
    from .tokenizer import piece_count

    n = piece_count(folder / "tokenizer.model")
    added = folder / "added_tokens.json"
    if added.is_file():
        try:
            ids = json.loads(added.read_text(encoding="utf-8")).values()
        except ValueError as exc:
            raise InputError(f"cannot read {added}: {exc}") from exc
        n = max([n, *(int(i) + 1 for i in ids)])
    return n
