"""`zhllama download SOURCE [--revision REV] [--include GLOB]... --out DIR`: fetch and verify inputs."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from pipeline_lib.errors import InputError
from pipeline_lib.fsutil import human_bytes, write_text_atomic

_SHA_RE = re.compile(r"^[0-9a-fA-F]{64}$")


def register(sub) -> None:
    p = sub.add_parser(
        "download",
        help="fetch a model or LoRA (hub repo, URL, folder, .zip/.tar.gz) and verify every file",
        description="Sources: owner/name or hf://owner/name@rev (hub; HF_TOKEN for gated repos, "
        "HF_ENDPOINT for a mirror), http(s)://... (resumed, retried), a local folder or file, or a "
        ".zip/.tar.gz archive (extracted safely). Every file is checked against the hub's own digest "
        "and the release's official sha256 when known; a mismatch is downloaded once more, then fails.",
    )
    p.add_argument("source", metavar="SOURCE", help="hub repo owner/name (or hf://owner/name@rev), an http(s) URL, "
                   "a local folder or a .zip/.tar.gz archive")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to put the files in")
    p.add_argument("--revision", metavar="REV", help="hub branch, tag or commit sha (default: main)")
    p.add_argument("--include", action="extend", nargs="+", metavar="GLOB",
                   help="only files matching a GLOB (path or file name; repeatable), e.g. --include '*.json' "
                   "adapter_model.bin; put SOURCE before it")
    p.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX",
                   help="expected sha256 of FILE (repeatable); checked in addition to the catalog's")
    p.add_argument("--lock", type=Path, metavar="PATH",
                   help="write the lock record (resolved commit, digests) as JSON to PATH")
    p.add_argument("--overwrite", action="store_true",
                   help="replace files of the same name already in --out (never a source file)")
    p.set_defaults(func=run)


def _expected(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, digest = item.partition("=")
        if not sep or not _SHA_RE.match(digest.strip()):
            raise InputError(f"--sha256 {item!r} is not FILE=HEX", expected="a file name, '=', 64 hex digits")
        out[name.strip()] = digest.strip().lower()
    return out


def run(args) -> int:
    from pipeline_lib.download import download
    from pipeline_lib.fsutil import claim_output

    expected = _expected(args.sha256)
    if args.lock:
        claim_output(args.lock, kind="file", inputs=[args.source], overwrite=True, what="--lock")  # a lock record is rewritten
    result = download(args.source, out=args.out, revision=args.revision, include=args.include,
                      expected=expected, overwrite=args.overwrite)
    for art in result.files:
        print(art.summary(result.out))
    total = sum(a.size for a in result.files)
    pinned = f" at commit {result.commit}" if result.commit else ""
    n = len(result.files)
    print(f"{n} file{'s' if n != 1 else ''}, {human_bytes(total)}, from {result.source}{pinned} -> {result.out}",
          file=sys.stderr)
    if args.lock:
        write_text_atomic(args.lock, result.lock_json() + "\n")
    return 0
