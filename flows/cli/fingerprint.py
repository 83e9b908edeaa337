"""``zhllama fingerprint PATH [--out F.json] [--against OTHER]``: per-tensor sha256, comparable across formats."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fingerprint",
        help="sha256 of every tensor (GGUF names and layout) of an HF folder, a pth folder or a float GGUF",
        description="Hash every tensor's bytes as the GGUF holds them (q/k un-permuted, norms as float32), keyed "
        "by GGUF name, so an HF folder, its pth and its f16 GGUF give the same fingerprint when their bytes are "
        "equal. Compare two rebuilds with --against without sharing the weights.",
    )
    p.add_argument("path", help="HF model folder, Meta consolidated.*.pth folder, float GGUF file, or a fingerprint .json")
    p.add_argument("--out", default=None, metavar="F.json", help="write the fingerprint (JSON) here")
    p.add_argument("--against", default=None, metavar="OTHER",
                   help="a fingerprint .json (or another model folder / GGUF) to compare with; exit 1 if they differ")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pipeline_lib.fingerprint import compare, fingerprint

    fp = fingerprint(args.path)
    print(f"{args.path}: {len(fp.tensors)} tensors ({fp.format}), digest {fp.digest}")
    if args.out:
        fp.write(args.out)
        print(f"  written to {args.out}")
    if args.against:
        other = fingerprint(args.against)
        diff = compare(fp, other)
        print(f"against {args.against}: {diff.summary()}")
        return 0 if diff.equal else 1
    return 0
