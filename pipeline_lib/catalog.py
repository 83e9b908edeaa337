"""The Chinese-LLaMA/Alpaca release as data: every model, its LoRA chain, base, tokenizer and hashes.

The official SHA256 values ship in ``pipeline_lib/data/release_sha256.toml`` (a copy of the
release's SHA256.md, as data). Models are rows of ``_FAMILIES`` × ``SIZES``; nothing about a
model is decided by an if-chain. Model *shapes* are not here: they come from ``config.json``.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files

from .errors import InputError

SIZES: tuple[str, ...] = ("7B", "13B", "33B")

# Base LLaMA per size: default hub repo (HF format) and the Meta part count.
BASES: dict[str, dict] = {
    "7B": {"hub_repo": "huggyllama/llama-7b", "meta_parts": 1},
    "13B": {"hub_repo": "huggyllama/llama-13b", "meta_parts": 2},
    "33B": {"hub_repo": "huggyllama/llama-30b", "meta_parts": 4},  # Meta called it 30B; the release 33B
}

# Expected sizes of the finished model, bytes (the release's table: fp16 / q4_0).
EXPECTED_BYTES: dict[str, tuple[int, int]] = {
    "7B": (13_000_000_000, 3_900_000_000),
    "13B": (24_000_000_000, 7_800_000_000),
    "33B": (60_000_000_000, 19_500_000_000),
}

# One LoRA of the release: slug in the hub repo name, release name in SHA256.md, tokenizer it ships,
# and its training hyper-parameters (release facts, used to warn on unexpected adapters).
LORAS: dict[str, dict] = {
    "llama": {"slug": "chinese-llama-lora", "release": "Chinese-LLaMA", "tokenizer": "llama", "r": 8, "alpha": 32},
    "llama-plus": {"slug": "chinese-llama-plus-lora", "release": "Chinese-LLaMA-Plus", "tokenizer": "llama",
                   "r": 8, "alpha": 32},
    "alpaca": {"slug": "chinese-alpaca-lora", "release": "Chinese-Alpaca", "tokenizer": "alpaca",
               "r": 64, "alpha": 128},
    "alpaca-plus": {"slug": "chinese-alpaca-plus-lora", "release": "Chinese-Alpaca-Plus", "tokenizer": "alpaca",
                    "r": 64, "alpha": 128},
    "alpaca-pro": {"slug": "chinese-alpaca-pro-lora", "release": "Chinese-Alpaca-Pro", "tokenizer": "alpaca",
                   "r": 64, "alpha": 128},
}

# Model families: the LoRA chain applied in order on the base. Plus/Pro Alpaca need LLaMA-Plus first.
FAMILIES: dict[str, dict] = {
    "llama": {"display": "Chinese-LLaMA", "chain": ("llama",)},
    "llama-plus": {"display": "Chinese-LLaMA-Plus", "chain": ("llama-plus",)},
    "alpaca": {"display": "Chinese-Alpaca", "chain": ("alpaca",)},
    "alpaca-plus": {"display": "Chinese-Alpaca-Plus", "chain": ("llama-plus", "alpaca-plus")},
    "alpaca-pro": {"display": "Chinese-Alpaca-Pro", "chain": ("llama-plus", "alpaca-pro")},
}

# Vocabulary of the merged tokenizer, by tokenizer kind (LLaMA 32000 + Chinese pieces [+ [PAD]]).
VOCAB_SIZES: dict[str, int] = {"llama": 49953, "alpaca": 49954}
LLAMA_VOCAB_SIZE = 32000

# The hub owner of the release's LoRA repos. They moved from ziqingyang/* to hfl/* (the hub answers
# the old names with a redirect); the old owner stays an alias, so locks, specs and deployment
# parameters written with either name resolve to the same repo.
HUB_OWNER = "hfl"
OLD_HUB_OWNERS: tuple[str, ...] = ("ziqingyang",)


@cache
def release_hashes() -> dict:
    """The official SHA256 table (release_sha256.toml), parsed."""
    text = files("pipeline_lib.data").joinpath("release_sha256.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)


@dataclass(frozen=True)
class LoraRef:
    key: str  # "llama-plus"
    release_name: str  # "Chinese-LLaMA-Plus-7B"
    repo: str  # "hfl/chinese-llama-plus-lora-7b"
    tokenizer: str  # tokenizer kind it ships: "llama" | "alpaca"
    adapter_sha256: str | None
    r: int
    alpha: float


@dataclass(frozen=True)
class BaseRef:
    size: str
    hub_repo: str
    meta_parts: int
    hf_bin_sha256: tuple[str, ...]  # pytorch_model-0000N-of-0000M.bin in shard order
    meta_pth_sha256: tuple[str, ...]  # consolidated.NN.pth in part order

    def hf_bin_files(self) -> dict[str, str]:
        n = len(self.hf_bin_sha256)
        return {f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin": h for i, h in enumerate(self.hf_bin_sha256)}

    def meta_pth_files(self) -> dict[str, str]:
        return {f"consolidated.{i:02d}.pth": h for i, h in enumerate(self.meta_pth_sha256)}


@dataclass(frozen=True)
class ModelEntry:
    name: str  # "alpaca-plus-7b": catalog key, deployment "build-alpaca-plus-7b"
    display: str  # "Chinese-Alpaca-Plus-7B"
    family: str
    size: str
    lora_chain: tuple[LoraRef, ...]
    base: BaseRef
    tokenizer: str  # "llama" | "alpaca"
    vocab_size: int
    tokenizer_sha256: str
    merged_pth_sha256: tuple[str, ...] = ()  # official merged consolidated.NN.pth, when published
    fp16_bytes: int = 0
    q4_bytes: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def deployment(self) -> str:
        return f"build-{self.name}"

    def official_files(self) -> dict[str, list[tuple[str, str]]]:
        """Label -> [(filename, sha256)] of every official file of this build (inputs and outputs)."""
        out = {f"{lora.release_name} LoRA": [("adapter_model.bin", lora.adapter_sha256)]
               for lora in self.lora_chain if lora.adapter_sha256}
        out[f"{self.tokenizer} tokenizer"] = [("tokenizer.model", self.tokenizer_sha256)]
        out[f"LLaMA-{self.size} (HF)"] = list(self.base.hf_bin_files().items())
        out[f"LLaMA-{self.size} (Meta)"] = list(self.base.meta_pth_files().items())
        if self.merged_pth_sha256:
            out[f"{self.display} merged"] = [(f"consolidated.{i:02d}.pth", h)
                                             for i, h in enumerate(self.merged_pth_sha256)]
        return out


def _build() -> dict[str, ModelEntry]:
    h = release_hashes()
    models: dict[str, ModelEntry] = {}
    for size in SIZES:
        s = size.lower()
        meta = tuple(h["meta_llama_consolidated_pth"][k] for k in sorted(h["meta_llama_consolidated_pth"])
                     if k.startswith(f"{size}-"))
        base = BaseRef(size=size, hub_repo=BASES[size]["hub_repo"], meta_parts=BASES[size]["meta_parts"],
                       hf_bin_sha256=tuple(h["hf_llama_pytorch_bin"].get(size, ())), meta_pth_sha256=meta)
        for fam, spec in FAMILIES.items():
            chain = []
            for key in spec["chain"]:
                lora = LORAS[key]
                release_name = f"{lora['release']}-{size}"
                chain.append(LoraRef(
                    key=key, release_name=release_name, repo=f"{HUB_OWNER}/{lora['slug']}-{s}",
                    tokenizer=lora["tokenizer"], adapter_sha256=h["adapter_model_bin"].get(release_name),
                    r=lora["r"], alpha=float(lora["alpha"]),
                ))
            tok = chain[-1].tokenizer
            display = f"{spec['display']}-{size}"
            fp16, q4 = EXPECTED_BYTES[size]
            models[f"{fam}-{s}"] = ModelEntry(
                name=f"{fam}-{s}", display=display, family=fam, size=size, lora_chain=tuple(chain), base=base,
                tokenizer=tok, vocab_size=VOCAB_SIZES[tok], tokenizer_sha256=h["tokenizer_model"][tok],
                merged_pth_sha256=tuple(h["merged_consolidated_pth"].get(display, ())),
                fp16_bytes=fp16, q4_bytes=q4,
            )
    return models


MODELS: dict[str, ModelEntry] = _build()

_ALIASES = {m.display.lower(): m.name for m in MODELS.values()} | {
    m.deployment: m.name for m in MODELS.values()} | {f"chinese-{m.name}": m.name for m in MODELS.values()}


def get(name: str) -> ModelEntry:
    """Look a model up by catalog name ('alpaca-plus-7b'), display name or deployment name."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in MODELS:
        return MODELS[key]
    close = [n for n in MODELS if key.split("-")[0] in n][:6]
    raise InputError(f"no model named {name!r} in the catalog",
                     expected="one of: " + ", ".join(MODELS),
                     fix=f"run `zhllama catalog` to list them{'; did you mean ' + ', '.join(close) + '?' if close else ''}")


@cache
def official_digests() -> dict[str, str]:
    """sha256 -> human label, for every official file of the release (inputs, tokenizers, merged)."""
    h = release_hashes()
    out: dict[str, str] = {}
    for key, digest in h["meta_llama_consolidated_pth"].items():
        size, part = key.split("-")
        out[digest] = f"LLaMA-{size} consolidated.{part}.pth (Meta original)"
    for size, digests in h["hf_llama_pytorch_bin"].items():
        for i, d in enumerate(digests):
            out[d] = f"LLaMA-{size} pytorch_model-{i + 1:05d}-of-{len(digests):05d}.bin (HF format)"
    for kind, d in h["tokenizer_model"].items():
        out[d] = f"Chinese-{'LLaMA' if kind == 'llama' else 'Alpaca'} tokenizer.model ({VOCAB_SIZES[kind]} pieces)"
    for name, d in h["adapter_model_bin"].items():
        out[d] = f"{name} LoRA adapter_model.bin"
    for name, digests in h["merged_consolidated_pth"].items():
        for i, d in enumerate(digests):
            out[d] = f"{name} merged consolidated.{i:02d}.pth"
    inputs = h["inputs_of_tokenizer_merge"]
    out[inputs["llama_tokenizer_model"]] = "LLaMA tokenizer.model (original, 32000 pieces)"
    out[inputs["chinese_sp_model"]] = "chinese_sp.model (Chinese sentencepiece model of the release)"
    return out


def identify(sha256: str) -> str | None:
    """The official file a digest belongs to, or None."""
    return official_digests().get(sha256.lower())


@cache
def _release_repos() -> frozenset[str]:
    return frozenset(lora.repo for m in MODELS.values() for lora in m.lora_chain)


def canonical_repo(repo: str) -> str:
    """The current name of a release repo given by its old name (``ziqingyang/chinese-alpaca-plus-lora-7b``
    -> ``hfl/chinese-alpaca-plus-lora-7b``); any other repo name unchanged. Owner and name compare
    case-insensitively, as the hub does; only the release's own repos are renamed (another repo of
    an old owner is left to the hub's redirect)."""
    owner, sep, name = repo.strip().partition("/")
    if not sep:
        return repo
    if owner.lower() in (o.lower() for o in (HUB_OWNER, *OLD_HUB_OWNERS)):
        current = f"{HUB_OWNER}/{name.lower()}"
        if current in _release_repos():
            return current
    return repo


def canonical_source(source: str) -> str:
    """A source string with a release repo's old name replaced by the current one, in the ``owner/name``
    and ``hf://owner/name[@rev]`` forms. Anything else (an existing local path, which wins over an
    ``owner/name`` look-alike as in ``download.parse_source``; a URL; another repo) is returned as is."""
    from pathlib import Path

    text = source.strip()
    prefix = "hf://" if text.startswith("hf://") else ""
    if not prefix and (text.startswith(("http://", "https://")) or Path(text).expanduser().exists()):
        return source
    repo, at, rev = text[len(prefix):].partition("@")
    models = "models/" if prefix and repo.startswith("models/") else ""
    repo = repo[len(models):]
    if repo.count("/") != 1:
        return source
    new = canonical_repo(repo)
    return source if new == repo else f"{prefix}{models}{new}{at}{rev}"


def repo_aliases(repo: str) -> tuple[str, ...]:
    """Every name a release repo has had, current first (``hfl/x``, ``ziqingyang/x``); other repos: itself."""
    current = canonical_repo(repo)
    if current not in _release_repos():
        return (repo,)
    name = current.split("/", 1)[1]
    return (current, *(f"{o}/{name}" for o in OLD_HUB_OWNERS))


def expected_in_repo(repo: str) -> dict[str, str]:
    """Official sha256 by filename for a hub repo of the release (LoRA repo or base repo; a LoRA repo's
    old name is accepted too)."""
    repo = canonical_repo(repo)
    out: dict[str, str] = {}
    for m in MODELS.values():
        for lora in m.lora_chain:
            if lora.repo == repo:
                if lora.adapter_sha256:
                    out["adapter_model.bin"] = lora.adapter_sha256
                out["tokenizer.model"] = release_hashes()["tokenizer_model"][lora.tokenizer]
        if m.base.hub_repo == repo:
            out.update(m.base.hf_bin_files())
    return out
