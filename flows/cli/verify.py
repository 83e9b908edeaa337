"""`zhllama verify PATH... [--manifest F] [--model NAME] [--lock F]`."""

from __future__ import annotations

from pipeline_lib.fsutil import human_bytes
from pipeline_lib.verify import verify


def register(sub) -> None:
    p = sub.add_parser("verify", help="SHA256-check files against the release's official table, a "
                       "sha256sum file or a manifest")
    p.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    p.add_argument("--manifest", help="sha256sum-format file, zhllama manifest.json or lock file")
    p.add_argument("--model", help="catalog model whose official files these are (e.g. alpaca-plus-7b)")
    p.add_argument("--lock", help="write a lock file recording exactly what was used")
    p.add_argument("--threads", type=int, help="files hashed in parallel (default: CPU count)")
    p.add_argument("--strict", action="store_true", help="fail if any file has no known digest")
    p.set_defaults(func=run)


def run(args) -> int:
    res = verify(args.paths, manifest=args.manifest, model=args.model, lock_file=args.lock, threads=args.threads)
    for f in res.files:
        print(f.summary())
    rate = human_bytes(res.throughput) + "/s"
    print(f"{len(res.files)} file(s), {human_bytes(res.bytes)} in {res.seconds:.2f}s ({rate}); "
          f"{len(res.files) - len(res.unknown)} verified, {len(res.unknown)} unknown")
    if res.unknown:
        print("unknown files are not vouched for: pass --manifest with their expected digests"
              + (f"; recorded in {res.lock_file}" if res.lock_file else "; use --lock to record them"))
        if args.strict:
            return 1
    return 0
