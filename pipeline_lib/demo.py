"""The offline demo: a tiny synthetic Chinese-Alpaca-Plus release, built locally, then the whole build.

``demo_sources(home)`` writes (once) a synthetic release into ``$ZHLLAMA_HOME/demo-source``
laid out like the real sources — a LLaMA base folder, the LLaMA-Plus and Alpaca-Plus LoRA
folders in the 2023 format, and ``chinese_sp.model`` — plus a ``SHA256SUMS`` file that plays
the part of the release's official hash table. The build then treats these folders exactly as
it treats hub repos: download (copy), verify against the table, tokenizer merge + check, merge,
GGUF, quantize (q4_0 and q8_0 by default), evaluate.
"""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock

from .buildspec import DEMO_MODEL, BuildSpec, EvalOptions, SourceSpec
from .fsutil import atomic_dir, sha256_file, write_text_atomic

log = logging.getLogger(__name__)

SOURCE_DIR = "demo-source"
ROLES = {"base": "llama-base", "lora-0": "chinese-llama-plus-lora", "lora-1": "chinese-alpaca-plus-lora",
         "chinese_sp": "chinese-sp"}


def ensure_demo_release(home: Path) -> Path:
    """Build the synthetic release under ``home/demo-source`` unless it is already there (about 2 s)."""
    root = Path(home) / SOURCE_DIR
    if (root / "SHA256SUMS").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root.parent / f".{SOURCE_DIR}.lock")):
        if (root / "SHA256SUMS").is_file():
            return root
        from .synthetic import TinyConfig, make_release

        log.info("building the synthetic demo release in %s", root)
        with atomic_dir(root, replace=True) as tmp:
            # ffn 768 = LLaMA's rule (8/3 · hidden rounded up to 256) for hidden 256: the legacy GGML
            # format can then hold it too, and rows stay multiples of 256 for the K-quants.
            rel = make_release(tmp / "work", config=TinyConfig(intermediate_size=768))
            moves = {"base": rel.base_hf, "lora-0": rel.llama_lora, "lora-1": rel.alpaca_lora}
            for role, src in moves.items():
                src.rename(tmp / ROLES[role])
            (tmp / ROLES["chinese_sp"]).mkdir()
            rel.tokenizers.chinese_sp.rename(tmp / ROLES["chinese_sp"] / "chinese_sp.model")
            import shutil

            shutil.rmtree(tmp / "work")
            lines = []
            for p in sorted(tmp.rglob("*")):
                if p.is_file():
                    lines.append(f"{sha256_file(p)}  {p.relative_to(tmp).as_posix()}")
            write_text_atomic(tmp / "SHA256SUMS", "\n".join(lines) + "\n")
    return root


def _table(root: Path) -> dict[str, dict[str, str]]:
    """SHA256SUMS of the demo release, grouped by folder: folder -> {file name: sha256}."""
    out: dict[str, dict[str, str]] = {}
    for line in (root / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, _, rel = line.partition("  ")
        folder, _, name = rel.partition("/")
        out.setdefault(folder, {})[name] = digest
    return out


def demo_sources(home: Path) -> tuple[SourceSpec, list[SourceSpec], SourceSpec, str]:
    """(base, loras, chinese_sp, tokenizer kind) of the demo, as a catalog entry would give them."""
    root = ensure_demo_release(home)
    table = _table(root)

    def src(role: str) -> SourceSpec:
        folder = ROLES[role]
        return SourceSpec(source=str(root / folder), sha256=table.get(folder, {}))

    return src("base"), [src("lora-0"), src("lora-1")], src("chinese_sp"), "alpaca"


def demo_spec(*, out_dir: str | None = None, quant_types: tuple[str, ...] = ("q4_0", "q8_0"),
              evaluation: bool = True) -> BuildSpec:
    """The demo build: GGUF f16 + q4_0 + q8_0 and a short evaluation."""
    return BuildSpec(model=DEMO_MODEL, outputs=["gguf"], quant_types=list(quant_types), out_dir=out_dir,
                     evaluation=EvalOptions(enabled=evaluation, n_ctx=64, max_chunks=4, samples_per_category=1,
                                            max_new_tokens=16))
