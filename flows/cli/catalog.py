"""`zhllama catalog [NAME]`: the release's models, or one model with its chain and hashes."""

from __future__ import annotations

import json

from pipeline_lib import catalog
from pipeline_lib.fsutil import human_bytes


def register(sub) -> None:
    p = sub.add_parser("catalog", help="list the release's models, or show one with its LoRA chain and hashes")
    p.add_argument("name", nargs="?", help="model name, e.g. alpaca-plus-7b (also: Chinese-Alpaca-Plus-7B)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def run(args) -> int:
    if args.name is None:
        models = list(catalog.MODELS.values())
        if args.json:
            print(json.dumps([_as_dict(m) for m in models], indent=2))
            return 0
        rows = [[m.name, m.display, " → ".join(lora.repo.split("/")[1] for lora in m.lora_chain),
                 m.base.hub_repo, f"{m.tokenizer} ({m.vocab_size})", human_bytes(m.fp16_bytes),
                 human_bytes(m.q4_bytes)] for m in models]
        print(_table(rows, ["name", "model", "LoRA chain (in order)", "base", "tokenizer", "fp16", "q4_0"]))
        print(f"\n{len(models)} models. `zhllama catalog NAME` shows one with its official SHA256 values.")
        return 0
    m = catalog.get(args.name)
    if args.json:
        print(json.dumps(_as_dict(m), indent=2))
        return 0
    print(f"{m.display}  (catalog name {m.name}, deployment {m.deployment})")
    print(f"  base:       LLaMA-{m.size}: hub {m.base.hub_repo}, or a local HF folder, or Meta's "
          f"consolidated.*.pth ({m.base.meta_parts} part{'s' if m.base.meta_parts > 1 else ''})")
    print(f"  tokenizer:  {m.tokenizer} ({m.vocab_size} pieces)  sha256 {m.tokenizer_sha256}")
    print(f"  sizes:      fp16 {human_bytes(m.fp16_bytes)}, q4_0 {human_bytes(m.q4_bytes)}")
    print("  LoRA chain, applied in this order:")
    for i, lora in enumerate(m.lora_chain, 1):
        print(f"    {i}. {lora.release_name:26} {lora.repo}  (r={lora.r}, alpha={lora.alpha:g}, "
              f"{lora.tokenizer} tokenizer)")
        print(f"       adapter_model.bin sha256 {lora.adapter_sha256 or 'not published'}")
    print("  official files:")
    for label, pairs in m.official_files().items():
        for fname, digest in pairs:
            print(f"    {label:32} {fname:34} {digest}")
    if not m.merged_pth_sha256:
        print(f"    (no official hash of the merged {m.display} was published)")
    return 0


def _as_dict(m: catalog.ModelEntry) -> dict:
    return {
        "name": m.name, "display": m.display, "family": m.family, "size": m.size, "deployment": m.deployment,
        "tokenizer": m.tokenizer, "vocab_size": m.vocab_size, "tokenizer_sha256": m.tokenizer_sha256,
        "base": {"hub_repo": m.base.hub_repo, "meta_parts": m.base.meta_parts,
                 "hf_bin_sha256": list(m.base.hf_bin_sha256), "meta_pth_sha256": list(m.base.meta_pth_sha256)},
        "lora_chain": [{"release_name": lo.release_name, "repo": lo.repo, "adapter_sha256": lo.adapter_sha256,
                        "r": lo.r, "alpha": lo.alpha, "tokenizer": lo.tokenizer} for lo in m.lora_chain],
        "merged_pth_sha256": list(m.merged_pth_sha256), "fp16_bytes": m.fp16_bytes, "q4_bytes": m.q4_bytes,
    }
