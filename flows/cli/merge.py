"""``zhllama merge``: merge a LoRA chain into a LLaMA base, tensor by tensor."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline_lib import fsutil


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge LoRA patches (in order) into a LLaMA base model",
        description="Merge one or more LoRAs into a LLaMA base, tensor by tensor (low memory), with every "
        "check done before anything is written. Give the LoRAs in release order, e.g. "
        "--lora chinese-llama-plus-lora-7b --lora chinese-alpaca-plus-lora-7b.",
    )
    p.add_argument("--base", required=True, help="base model folder: HF (.bin or .safetensors shards) or Meta "
                   "(consolidated.NN.pth + params.json)")
    p.add_argument("--lora", required=True, action="append", metavar="PATH",
                   help="LoRA folder; repeat (or separate with commas) for a chain, applied in the given order")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--format", choices=("hf", "pth"), default="hf", help="hf: safetensors shards (default); "
                   "pth: Meta consolidated.NN.pth")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (hf format), e.g. 2GB")
    p.add_argument("--parts", type=int, default=None,
                   help="pth format: number of consolidated parts (default: the release's, from the hidden size)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.merge import merge, plan_merge
    from pipeline_lib.progress import bar

    # "--lora a,b" as the release's script took it, or "--lora a --lora b"
    # (a path that exists is never split, even if it has a comma in it)
    args.lora = [p.strip() for item in args.lora
                 for p in ([item] if Path(item).exists() else item.split(",")) if p.strip()]
    fsutil.claim_output(args.out, kind="dir", inputs=[args.base, *args.lora], overwrite=args.overwrite,
                        what="--out")  # before reading anything
    plan = plan_merge(args.base, args.lora, dtype=args.dtype)  # fail fast, before the progress bar
    with bar(plan.output_bytes, "merge") as pbar:
        result = merge(args.base, args.lora, out=args.out, format=args.format, dtype=args.dtype,
                       max_shard_size=args.max_shard_size, parts=args.parts, overwrite=args.overwrite,
                       progress=pbar.update)
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"merged {' -> '.join(result.loras)} into {args.base}")
    print(f"  tensors: {result.n_tensors} ({result.n_merged} changed by the LoRAs)")
    print(f"  vocab:   {result.vocab_before} -> {result.vocab_after}")
    print(f"  output:  {result.out} ({result.format}, {result.dtype}, {len(result.files)} files, "
          f"{fsutil.human_bytes(result.bytes_written)})")
    print(f"  time:    {result.seconds:.1f} s")
    return 0
