"""Plan a build: a BuildSpec resolved against the catalog (or the demo) into concrete sources.

``plan_build(spec)`` does no I/O beyond checking that local sources exist (the download module's
``parse_source`` classifies each source string once, here). What a source's bytes are right now
(its *fingerprint*: a hub commit, a local folder's stat rows) is found at run time by
``source_fingerprint``, which both executors call once per source before the downloads run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..buildspec import CUSTOM_MODEL, DEMO_MODEL, BuildSpec, SourceSpec
from ..download import Source, parse_source, redact_url
from ..errors import InputError
from ..fsutil import claim_output, sha256_bytes
from ..store import canonical_json, default_root

# The release's chinese_sp.model (input of the tokenizer merge) lives in its GitHub repository.
CHINESE_SP_URL = "https://github.com/ymcui/Chinese-LLaMA-Alpaca/raw/main/scripts/merge_tokenizer/chinese_sp.model"

# Files each kind of source contributes to a build (hub allow_patterns; local folders are filtered too).
INCLUDE: dict[str, tuple[str, ...] | None] = {
    # huggyllama's repos also hold safetensors shards (+ their index) and tokenizer.json: the official
    # hashes are of the .bin shards, and tokenizer.model is the tokenizer that matters.
    "base": ("config.json", "generation_config.json", "pytorch_model.bin.index.json", "pytorch_model-*.bin",
             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "params.json",
             "consolidated.*.pth"),
    "lora": ("adapter_model.bin", "adapter_model.safetensors", "adapter_config.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    "chinese_sp": None,
}


@dataclass(frozen=True)
class SourceRef:
    """One input of a build: its role ('base', 'lora-0', ..., 'chinese_sp') and where it comes from."""

    role: str
    source: str  # as given (may hold credentials in a URL: never log it, use ``display``)
    parsed: Source = field(repr=False)
    revision: str | None = None
    sha256: Mapping[str, str] = field(default_factory=dict)
    include: tuple[str, ...] | None = None
    kind: str = "base"  # key of INCLUDE

    @property
    def display(self) -> str:
        """The source for people and for files: credentials removed."""
        return self.parsed.text

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "source": self.display, "revision": self.revision, "sha256": dict(self.sha256),
                "include": list(self.include) if self.include else None, "kind": self.kind}


@dataclass(frozen=True)
class BuildPlan:
    """A BuildSpec resolved against the catalog (or the demo): concrete sources and settings."""

    spec: BuildSpec
    name: str
    display: str
    sources: tuple[SourceRef, ...]
    tokenizer: str  # "llama" | "alpaca"
    vocab_size: int | None
    out_dir: Path
    store_root: Path
    catalog_model: str | None = None  # the catalog entry the sources come from (None: demo or custom)

    def source(self, role: str) -> SourceRef | None:
        return next((s for s in self.sources if s.role == role), None)

    @property
    def loras(self) -> tuple[SourceRef, ...]:
        return tuple(s for s in self.sources if s.role.startswith("lora-"))


def _ref(role: str, kind: str, spec: SourceSpec) -> SourceRef:
    from ..catalog import canonical_source

    # A release repo under its old hub name (ziqingyang/...) is the same source as under its current
    # one (hfl/...): same download key, same lock entry.
    source = canonical_source(spec.source)
    return SourceRef(role, source, parse_source(source, revision=spec.revision), spec.revision,
                     dict(spec.sha256), INCLUDE[kind], kind)


def _catalog_sources(spec: BuildSpec) -> tuple[SourceSpec, list[SourceSpec], SourceSpec | None, str, str, int]:
    from .. import catalog

    entry = catalog.get(spec.model)
    hashes = catalog.release_hashes()
    base = SourceSpec(source=entry.base.hub_repo, sha256=entry.base.hf_bin_files())
    loras = [SourceSpec(source=lora.repo, sha256={
        **({"adapter_model.bin": lora.adapter_sha256} if lora.adapter_sha256 else {}),
        "tokenizer.model": hashes["tokenizer_model"][lora.tokenizer]}) for lora in entry.lora_chain]
    chinese_sp = SourceSpec(source=CHINESE_SP_URL, sha256={
        "chinese_sp.model": hashes["inputs_of_tokenizer_merge"]["chinese_sp_model"]})
    if spec.loras is not None and len(spec.loras) != len(loras):
        raise InputError(f"{len(spec.loras)} LoRA source(s) given for {entry.display}",
                         expected=f"{len(loras)}, in merge order: "
                         + ", ".join(lora.release_name for lora in entry.lora_chain),
                         fix="give one source per LoRA of the chain, or none to use the hub's")
    return (spec.base or base, list(spec.loras) if spec.loras is not None else loras,
            spec.chinese_sp or chinese_sp, spec.tokenizer or entry.tokenizer, entry.display, entry.vocab_size)


def plan_build(spec: BuildSpec, *, store_root: str | os.PathLike[str] | None = None) -> BuildPlan:
    """Resolve a spec: catalog sources and official hashes, overrides, demo sources, output folder."""
    from .. import catalog

    root = Path(store_root) if store_root is not None else default_root()
    model: str | None = None
    if spec.model == CUSTOM_MODEL:
        base, loras, chinese_sp = spec.base, list(spec.loras or []), spec.chinese_sp
        tokenizer, display, vocab = spec.tokenizer or "alpaca", f"custom build {spec.build_name}", None
    elif spec.model == DEMO_MODEL:
        from ..demo import demo_sources

        base, loras, chinese_sp, tokenizer = demo_sources(root)
        base, loras = spec.base or base, list(spec.loras) if spec.loras is not None else loras
        chinese_sp, tokenizer = spec.chinese_sp or chinese_sp, spec.tokenizer or tokenizer
        display, vocab = "Tiny demo (synthetic Chinese-Alpaca-Plus)", None
    else:
        base, loras, chinese_sp, tokenizer, display, vocab = _catalog_sources(spec)
        model = catalog.get(spec.model).name
    sources = [_ref("base", "base", base)] + [_ref(f"lora-{i}", "lora", s) for i, s in enumerate(loras)]
    if chinese_sp is not None:
        sources.append(_ref("chinese_sp", "chinese_sp", chinese_sp))
    # The build folder is replaced by every build: it must never be (or hold, or lie in) a source.
    claim_output(spec.output_dir(root), kind="dir", overwrite=True, what="the build folder (--out)",
                 inputs=[s.parsed.path for s in sources if s.parsed.path is not None])
    return BuildPlan(spec=spec, name=spec.build_name, display=display, sources=tuple(sources), tokenizer=tokenizer,
                     vocab_size=vocab, out_dir=spec.output_dir(root), store_root=root, catalog_model=model)


# ------------------------------------------------------------------ what a source is right now


def _local_files(root: Path, include: tuple[str, ...] | None) -> list[Path]:
    from fnmatch import fnmatch

    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if include:
        files = [p for p in files if any(fnmatch(p.name, pat) for pat in include)]
    return files


def source_fingerprint(ref: SourceRef) -> str:
    """What identifies a source's bytes without downloading them.

    Local folder/file/archive: each file's relative path, size, mtime, inode and ctime. ctime
    cannot be set from user space, so an edit that restores size and mtime still changes the
    fingerprint (hashing a 13 GB base on every run would cost half a minute; the download stage
    hashes what it copies, and downstream keys are built from those content digests). Hub repo:
    the commit the revision resolves to now. URL: the URL with its secrets redacted (release
    files are immutable).
    """
    src = ref.parsed
    if src.kind in ("local", "archive"):
        root = src.path.expanduser().resolve()
        rows = []
        for p in _local_files(root, ref.include):
            st = p.stat()
            rows.append([p.relative_to(root).as_posix() if root.is_dir() else p.name, st.st_size, st.st_mtime_ns,
                         st.st_ino, st.st_ctime_ns])
        if not rows:
            raise InputError(f"no files for {ref.role} in {root}", expected=f"files matching {ref.include}")
        return "local:" + sha256_bytes(canonical_json([str(root), rows]).encode())
    if src.kind == "http":
        return "url:" + redact_url(src.url or ref.source)
    from ..download import resolve_hub_revision

    return "hub:" + resolve_hub_revision(src.repo, ref.revision or src.revision)
