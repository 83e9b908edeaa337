"""``zhllama quantize``: quantize a GGUF file with llama.cpp, one output per type."""

from __future__ import annotations

import argparse

from pipeline_lib import fsutil


def register(subparsers) -> None:
    from pipeline_lib.quantize import QUANT_TYPES

    p = subparsers.add_parser(
        "quantize",
        help="quantize a GGUF file with llama.cpp (q4_0, q4_K_M, q8_0, ...)",
        description="Quantize IN.gguf with llama.cpp's own quantizer (through llama-cpp-python), once per "
        "--type, into --out-dir. The outputs are byte-identical to llama-quantize's. Types: "
        + ", ".join(QUANT_TYPES),
    )
    p.add_argument("input", help="GGUF file to quantize (f16/f32/bf16, e.g. from `zhllama convert`)")
    p.add_argument("--type", dest="types", action="append", required=True, metavar="TYPE",
                   help="quantization type; repeat for several outputs")
    p.add_argument("--out-dir", required=True, help="folder for the outputs (<name>.<type>.gguf)")
    p.add_argument("--threads", type=int, default=None, help="threads for llama.cpp (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace existing <name>.<type>.gguf files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.quantize import quantize

    r = quantize(args.input, qtypes=args.types, out_dir=args.out_dir, threads=args.threads, overwrite=args.overwrite)
    print(f"quantized {r.source} ({fsutil.human_bytes(r.source_bytes)})")
    print(f"  {'type':8} {'size':>10} {'bits/weight':>12} {'time':>8}  file")
    for o in r.outputs:
        print(f"  {o.qtype:8} {fsutil.human_bytes(o.file_bytes):>10} {o.bits_per_weight:12.2f} "
              f"{o.seconds:7.1f}s  {o.path}")
    return 0
