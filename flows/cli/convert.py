"""``zhllama convert``: an HF LLaMA folder, or a base + LoRA chain merged on the fly, to GGUF (or legacy GGML)."""

from __future__ import annotations

import argparse

from pipeline_lib import fsutil
from pipeline_lib.errors import InputError

GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")
GGML_OUTTYPES = ("f16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert a LLaMA model (or base + LoRAs, merged on the fly) to GGUF or legacy GGML",
        description="Write a llama.cpp file: `zhllama convert MODEL_DIR --out FILE.gguf` converts an HF (or "
        "Meta) LLaMA folder; `zhllama convert --base PATH --lora PATH [--lora PATH ...] --out FILE.gguf` "
        "merges the LoRAs while converting, with no intermediate checkpoint on disk. The GGUF equals "
        "llama.cpp's convert_hf_to_gguf.py output tensor for tensor. --format ggml writes the ggjt v3 "
        "file of 2023 tools (LlamaChat, early text-generation-webui).",
    )
    p.add_argument("model", nargs="?", help="model folder (HF shards + config.json + tokenizer.model, or Meta); "
                   "with --format ggml also an f16/f32 GGUF file")
    p.add_argument("--base", help="base model folder, merged with --lora while converting")
    p.add_argument("--lora", action="append", metavar="PATH", default=[],
                   help="LoRA folder; repeat for a chain, applied in the given order (needs --base)")
    p.add_argument("--out", required=True, help="output file (.gguf, or .bin for --format ggml)")
    p.add_argument("--outtype", default=None,
                   help=f"tensor type: gguf {'|'.join(GGUF_OUTTYPES)} (default f16); "
                   f"ggml {'|'.join(GGML_OUTTYPES)} (default f16)")
    p.add_argument("--format", choices=("gguf", "ggml"), default="gguf", help="gguf (default) or legacy ggml (ggjt v3)")
    p.add_argument("--name", default=None, help="general.name written in the GGUF (default: the folder name)")
    p.add_argument("--precise", action="store_true",
                   help="with --base/--lora: float32 accumulation, one rounding (PEFT's float32 merge) instead of "
                   "the release's fp16 rounding after each LoRA")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                   help="dtype of the merged tensors before conversion (with --base/--lora)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input)")
    p.set_defaults(func=run)


def _source(args: argparse.Namespace):
    if args.base or args.lora:
        if args.model:
            raise InputError("both MODEL_DIR and --base/--lora given", fix="give a model folder, or --base with --lora")
        if not args.base or not args.lora:
            raise InputError("--base and --lora go together", fix="zhllama convert --base BASE --lora LORA --out F.gguf")
        from pipeline_lib.merge import plan_merge

        plan = plan_merge(args.base, args.lora, dtype=args.dtype, precise=args.precise)
        return plan, plan.describe()
    if args.precise:
        raise InputError("--precise applies to merging while converting",
                         fix="use it with --base/--lora, or with `zhllama merge`")
    if not args.model:
        raise InputError("no model given", fix="zhllama convert MODEL_DIR --out FILE.gguf (or --base/--lora)")
    if str(args.model).endswith(".gguf") and args.format == "gguf":
        raise InputError(f"{args.model} is already a GGUF file",
                         fix="quantize it with `zhllama quantize`, or export it with --format ggml")
    return args.model, str(args.model)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    # the output first: a folder, an input or an existing file fails here, before any work
    fsutil.claim_output(args.out, kind="file", inputs=[args.model, args.base, *args.lora],
                        overwrite=args.overwrite, what="--out")
    source, what = _source(args)
    name = args.name
    if name is None:
        name = Path(args.model).name if args.model else Path(args.lora[-1]).name
    if args.format == "ggml":
        from pipeline_lib.ggml_legacy import LEGACY_TYPES, export_ggml

        qtype = args.outtype or "f16"
        if qtype not in LEGACY_TYPES:
            raise InputError(f"--outtype {qtype} is not available with --format ggml", expected=" | ".join(LEGACY_TYPES))
        r = export_ggml(source, out=args.out, qtype=qtype, overwrite=args.overwrite)
        print(f"wrote {r.path} (ggjt v3, {r.qtype}, {r.n_tensors} tensors, vocab {r.n_vocab}, "
              f"{fsutil.human_bytes(r.file_bytes)}) in {r.seconds:.1f} s")
        return 0
    from pipeline_lib.gguf_export import OUTTYPES, convert

    outtype = args.outtype or "f16"
    if outtype not in OUTTYPES:
        raise InputError(f"--outtype {outtype} is not a GGUF conversion type", expected=" | ".join(OUTTYPES),
                         fix="for q4_0, q4_K_M, ... convert to f16 first, then run `zhllama quantize`")
    r = convert(source, out=args.out, outtype=outtype, name=name, overwrite=args.overwrite)
    print(f"converted {what}")
    print(f"  output: {r.path} (GGUF {r.outtype}, {r.n_tensors} tensors, {r.n_params / 1e6:.1f}M parameters, "
          f"vocab {r.n_vocab}, {fsutil.human_bytes(r.file_bytes)})")
    print(f"  time:   {r.seconds:.1f} s")
    audit = getattr(getattr(source, "audit", None), "result", None)
    if audit is not None:
        print(f"  {audit.summary}")
    return 0
