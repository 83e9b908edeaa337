"""Benchmark: `zhllama convert` vs llama.cpp's convert_hf_to_gguf.py, and one-pass merge->GGUF vs two steps.

Usage: python bench/convert.py [--layers 2] [--repeat 1] [--dir /tmp] [--keep]

Builds a 7B-shaped LLaMA (hidden 4096, ffn 11008, 32 heads, vocab 32000) with ``--layers`` blocks in
the 2023 HF layout (.bin shards), a LLaMA-Plus-style LoRA (r 8, vocab -> 49953) and an
Alpaca-Plus-style LoRA (r 64, vocab -> 49954), then measures, each tool in its own process (wall
time and peak RSS from wait4, so the numbers are per tool), on the same warm page cache:

1. HF folder -> f16 GGUF: ours vs llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36's
   vendored copy, run with its own gguf-py); the outputs are compared byte for byte.
2. base + 2 LoRAs -> f16 GGUF: ours in one pass (merge stream -> GGUF, no intermediate checkpoint)
   vs the usual two steps (merge to an HF folder, then convert_hf_to_gguf.py); time, peak RSS and
   bytes written.

Prints a markdown table with ratios (ours / theirs).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

OURS = ("import sys; from pipeline_lib.gguf_export import convert; "
        "convert(sys.argv[1], out=sys.argv[2], name=sys.argv[3])")
ONE_PASS = ("import sys; from pipeline_lib.merge import plan_merge; from pipeline_lib.gguf_export import convert; "
            "convert(plan_merge(sys.argv[1], sys.argv[2:-2]), out=sys.argv[-2], name=sys.argv[-1])")
MERGE = ("import sys; from pipeline_lib.merge import merge; "
         "merge(sys.argv[1], sys.argv[2:-1], out=sys.argv[-1])")


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of a child process."""
    m = run_measured(cmd, env=env or os.environ.copy(), cwd=ROOT)
    return m.wall_s, m.rss_bytes


def du(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def warm(path: Path) -> None:
    """Read every file once so each tool starts from the same warm page cache."""
    for p in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if p.is_file():
            with open(p, "rb") as fh:
                while fh.read(64 << 20):
                    pass


def padded_tokenizer(src_model: Path, n: int, out: Path, *, prefix: str, kind, pad_last: bool = False) -> Path:
    """A sentencepiece model grown to ``n`` pieces with filler pieces (stands in for 32000/49953/49954)."""
    from pipeline_lib.fsutil import write_bytes_atomic
    from pipeline_lib.tokenizer import PAD_PIECE, load_proto, write_hf_tokenizer_files

    proto = load_proto(src_model)
    i = 0
    while len(proto.pieces) < n - (1 if pad_last else 0):
        p = proto.pieces.add()
        p.piece = f"\u2581{prefix}{i}"
        p.score = -100.0 - i * 1e-3
        i += 1
    if pad_last:
        p = proto.pieces.add()
        p.piece = PAD_PIECE
        p.score = 0
    out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(out / "tokenizer.model", proto.SerializeToString())
    write_hf_tokenizer_files(out, kind=kind)
    return out


def build(root: Path, layers: int) -> tuple[Path, list[Path]]:
    import torch

    from pipeline_lib import synthetic
    from pipeline_lib.tokenizer import TokenizerKind

    toks = synthetic.make_tokenizers(root / "tok-src")
    t32 = padded_tokenizer(toks.llama_model, 32000, root / "tok-32000", prefix="en", kind=TokenizerKind.LLAMA)
    t49953 = padded_tokenizer(t32 / "tokenizer.model", 49953, root / "tok-49953", prefix="zh",
                              kind=TokenizerKind.LLAMA)
    t49954 = padded_tokenizer(t49953 / "tokenizer.model", 49954, root / "tok-49954", prefix="zh",
                              kind=TokenizerKind.ALPACA, pad_last=True)
    cfg = synthetic.TinyConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                               max_position_embeddings=2048)
    with torch.no_grad():
        weights = synthetic.random_weights(cfg, seed=0)
        base = synthetic.save_hf_base(weights, cfg, root / "llama-base", tokenizer_dir=t32, shards=2)
        loras = []
        for name, spec, vocab, tok in (
            ("chinese-llama-plus-lora", synthetic.LoraSpec(r=8, alpha=32.0, seed=1), 49953, t49953),
            ("chinese-alpaca-plus-lora", synthetic.LoraSpec(r=64, alpha=128.0, seed=2), 49954, t49954),
        ):
            tensors = synthetic.lora_tensors(cfg, spec, vocab_size=vocab, base=weights)
            loras.append(synthetic.save_lora(tensors, spec, root / name, tokenizer_dir=tok))
            del tensors
    return base, loras


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="transformer blocks of the 7B-shaped model (7B: 32)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool; the fastest is reported")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.build_only:
        build(Path(args.build_only), args.layers)
        return 0

    from _gguf_fixtures import reference_llama_cpp

    ref_dir = reference_llama_cpp()
    ref_env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    ref_env["PYTHONPATH"] = str(ref_dir / "gguf-py")
    py = sys.executable
    root = Path(tempfile.mkdtemp(prefix="zhllama-bench-convert-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        # built in a child process: a child's peak RSS starts at its parent's RSS at fork (Linux keeps
        # the pre-exec high-water mark), so this process must stay small for the numbers to be per tool
        subprocess.run([py, __file__, "--build-only", str(root), "--layers", str(args.layers)], check=True)
        base = root / "llama-base"
        loras = [root / "chinese-llama-plus-lora", root / "chinese-alpaca-plus-lora"]
        print(f"built a 7B-shaped model with {args.layers} layers ({gib(du(base))}) and 2 LoRAs "
              f"({gib(sum(du(p) for p in loras))}) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        warm(base)
        for p in loras:
            warm(p)

        def best(cmd, env=None, cleanup=()):
            runs = []
            for _ in range(args.repeat):
                for c in cleanup:
                    shutil.rmtree(c, ignore_errors=True) if c.is_dir() else c.unlink(missing_ok=True)
                runs.append(measure(cmd, env))
            return min(r[0] for r in runs), max(r[1] for r in runs)

        out = root / "out"
        out.mkdir()
        ref_gguf, ours_gguf = out / "ref.gguf", out / "ours.gguf"
        ref_t, ref_rss = best([py, str(ref_dir / "convert_hf_to_gguf.py"), str(base), "--outfile", str(ref_gguf),
                               "--outtype", "f16"], ref_env, cleanup=[ref_gguf])
        import gguf

        name = gguf.GGUFReader(ref_gguf).fields["general.name"].contents()
        ours_t, ours_rss = best([py, "-c", OURS, str(base), str(ours_gguf), name], cleanup=[ours_gguf])
        identical = filecmp.cmp(ours_gguf, ref_gguf, shallow=False)  # streamed: keeps this process small
        conv_bytes = du(ours_gguf)
        ref_gguf.unlink()
        ours_gguf.unlink()

        one = out / "one-pass.gguf"
        one_t, one_rss = best([py, "-c", ONE_PASS, str(base), *map(str, loras), str(one), "merged"], cleanup=[one])
        one_bytes = du(one)
        merged, two = out / "merged", out / "two-step.gguf"
        m_t, m_rss = best([py, "-c", MERGE, str(base), *map(str, loras), str(merged)], cleanup=[merged])
        merged_bytes = du(merged)
        c_t, c_rss = best([py, str(ref_dir / "convert_hf_to_gguf.py"), str(merged), "--outfile", str(two),
                           "--outtype", "f16"], ref_env, cleanup=[two])
        two_bytes = merged_bytes + du(two)
        from _gguf_fixtures import gguf_tensors

        same_tensors = gguf_tensors(one) == gguf_tensors(two)

        print(f"\n7B-shaped LLaMA, {args.layers} layers, f16 ({gib(conv_bytes)} GGUF; merged vocab 49954); "
              f"{os.cpu_count()} CPUs; best of {args.repeat}\n")
        print("| task | ours | llama.cpp / two-step | ratio (ours/theirs) |")
        print("|---|---|---|---|")
        print(f"| HF -> GGUF time | {ours_t:.1f} s | {ref_t:.1f} s | {ours_t / ref_t:.2f} |")
        print(f"| HF -> GGUF peak RSS | {gib(ours_rss)} | {gib(ref_rss)} | {ours_rss / ref_rss:.2f} |")
        print(f"| HF -> GGUF output identical | {'yes' if identical else 'NO'} | | |")
        print(f"| base+2 LoRAs -> GGUF time | {one_t:.1f} s (one pass) | {m_t + c_t:.1f} s "
              f"(merge {m_t:.1f} + convert {c_t:.1f}) | {one_t / (m_t + c_t):.2f} |")
        print(f"| base+2 LoRAs -> GGUF peak RSS | {gib(one_rss)} | {gib(max(m_rss, c_rss))} | "
              f"{one_rss / max(m_rss, c_rss):.2f} |")
        print(f"| base+2 LoRAs -> GGUF bytes written | {gib(one_bytes)} | {gib(two_bytes)} "
              f"(HF {gib(merged_bytes)} + GGUF) | {one_bytes / two_bytes:.2f} |")
        print(f"| one-pass tensors == two-step tensors | {'yes' if same_tensors else 'NO'} | | |")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
