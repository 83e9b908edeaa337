"""Benchmark: zhllama's SHA256 stage vs coreutils `sha256sum`, same files, same run.

Usage: python bench/verify.py [--size-gb 2] [--files 1] [--repeat 2] [--dir /tmp]

Each tool runs in its own process; wall time and peak RSS (from wait4) are per tool. The
files are read once before timing so both tools hash from the page cache (a CPU comparison;
on a cold disk both are bound by the disk). Prints a markdown table with ratios (ours / theirs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a command run as a child process."""
    m = run_measured(cmd)
    return m.wall_s, m.rss_bytes, m.stdout


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as fh:
        for _ in range(size >> 20):
            fh.write(block)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="total bytes to hash, GB")
    ap.add_argument("--files", type=int, default=1, help="split across this many files (parallel hashing)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where to put the test files (default: a temp dir)")
    args = ap.parse_args()
    if not shutil.which("sha256sum"):
        print("sha256sum not found", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="zhllama-bench-verify-"))
    try:
        per = int(args.size_gb * 1e9 / args.files)
        files = [tmp / f"blob{i}.bin" for i in range(args.files)]
        for f in files:
            make_file(f, per)
        for f in files:  # warm the page cache so both tools see the same conditions
            subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
        total = sum(f.stat().st_size for f in files)
        ours_cmd = [sys.executable, "-c",
                    "import sys; from pipeline_lib.verify import sha256_files; "
                    "[print(d, p) for p, d in sha256_files(sys.argv[1:], progress=False).items()]",
                    *map(str, files)]
        theirs_cmd = ["sha256sum", *map(str, files)]
        results = {"zhllama verify": [], "sha256sum": []}
        digests = {}
        for _ in range(args.repeat):
            for name, cmd in (("zhllama verify", ours_cmd), ("sha256sum", theirs_cmd)):
                wall, rss, out = measure(cmd)
                results[name].append((wall, rss))
                digests[name] = sorted(line.split()[0] for line in out.splitlines())
        if digests["zhllama verify"] != digests["sha256sum"]:
            print("digests differ!", digests, file=sys.stderr)
            return 1
        best = {k: min(v) for k, v in results.items()}
        peak = {k: max(r for _, r in v) for k, v in results.items()}
        print(f"\nSHA256 of {total / 1e9:.2f} GB in {args.files} file(s), {os.cpu_count()} CPUs, "
              f"best of {args.repeat}, page cache warm\n")
        print("| tool | wall s | GB/s | peak RSS MB |")
        print("|---|---:|---:|---:|")
        for k in results:
            print(f"| {k} | {best[k][0]:.2f} | {total / best[k][0] / 1e9:.2f} | {peak[k] / 1e6:.0f} |")
        ratio = best["zhllama verify"][0] / best["sha256sum"][0]
        print(f"\nwall time ratio zhllama / sha256sum: {ratio:.2f} (below 1 = faster); "
              f"RSS ratio {peak['zhllama verify'] / peak['sha256sum']:.1f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
