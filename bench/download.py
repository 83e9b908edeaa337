"""Benchmark: `zhllama download` vs plain huggingface_hub `snapshot_download`, same fake hub, same run.

Usage: python bench/download.py [--size-mb 96] [--files 3] [--repeat 2] [--dir /tmp]

A FakeHub (tests/fakehub.py) in a separate process serves one synthetic repo (``--files`` LFS weight
files sharing ``--size-mb`` plus two small JSON files) on 127.0.0.1. Each tool runs in its own
process (wall time and peak RSS from wait4 are per tool):

- cold: empty HF cache, everything downloaded;
- warm: second call, files already in the HF cache (ours still re-hashes every file);
- verify: ``pipeline_lib.verify.sha256_files`` over the downloaded files alone: the cost our
  integrity check adds on top of the client's transfer.

Both tools share the same loopback server, so transfer speed is bounded by that server, not a network:
the ratio shows our overhead (metadata calls, hashing, placing files into --out), not network speed.
Prints a markdown table with ratios (ours / theirs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)
from fakehub import FakeHub  # noqa: E402

REPO = "bench/tiny-llama"

OURS = ("import sys; from pipeline_lib.download import download; "
        "r = download(sys.argv[1], out=sys.argv[2]); print(len(r.files))")
HF = ("import sys; from huggingface_hub import snapshot_download; import os; "
      "p = snapshot_download(sys.argv[1], endpoint=os.environ['HF_ENDPOINT']); print(p)")
VERIFY = ("import sys, pathlib; from pipeline_lib.verify import sha256_files; "
          "fs = [p for p in pathlib.Path(sys.argv[1]).rglob('*') if p.is_file()]; "
          "print(len(sha256_files(fs, progress=False)))")


def measure(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of a child process."""
    m = run_measured(cmd, env=env, cwd=ROOT)
    return m.wall_s, m.rss_bytes, m.stdout


def repo_files(size_mb: float, n: int) -> dict[str, bytes]:
    per = int(size_mb * 1e6 / n)
    files = {f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin": os.urandom(per) for i in range(n)}
    return files | {"config.json": b'{"hidden_size": 4096}', "generation_config.json": b"{}"}


def serve(size_mb: float, n: int) -> int:
    """Serve the repo until stdin closes (a separate process, so the tools' RSS excludes the data)."""
    files = repo_files(size_mb, n)
    with FakeHub({REPO: files}) as hub:
        print(hub.url, sum(len(v) for v in files.values()), len(files), flush=True)
        sys.stdin.read()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=96.0, help="total size of the weight files, MB")
    ap.add_argument("--files", type=int, default=3, help="number of weight files")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args.size_mb, args.files)
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--size-mb", str(args.size_mb), "--files",
                               str(args.files)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url, total, nfiles = server.stdout.readline().split()
    total, nfiles = int(total), int(nfiles)
    tmp = Path(tempfile.mkdtemp(dir=args.dir, prefix="zhllama-bench-download-"))
    results: dict[str, list[tuple[float, int]]] = {}
    try:
        base_env = dict(os.environ, HF_ENDPOINT=url, ZHLLAMA_PROGRESS="0", HF_HUB_DISABLE_PROGRESS_BARS="1",
                        HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=str(ROOT))
        base_env.pop("HF_TOKEN", None)
        for rep in range(args.repeat):
            for tool, code in (("huggingface_hub snapshot_download", HF), ("zhllama download", OURS)):
                home = tmp / f"{tool.split()[0]}-{rep}"
                env = dict(base_env, HF_HOME=str(home / "hf"), ZHLLAMA_HOME=str(home / "zh"))
                cmd = [sys.executable, "-c", code, REPO, str(home / "out")]
                for phase in ("cold", "warm"):
                    wall, rss, _ = measure(cmd, env)
                    results.setdefault(f"{tool} ({phase})", []).append((wall, rss))
                if tool.startswith("zhllama"):
                    wall, rss, _ = measure([sys.executable, "-c", VERIFY, str(home / "out")], env)
                    results.setdefault("sha256 of the files alone (our added check)", []).append((wall, rss))
                shutil.rmtree(home, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stdin.close()
        server.wait(timeout=30)
    best = {k: min(w for w, _ in v) for k, v in results.items()}
    peak = {k: max(r for _, r in v) for k, v in results.items()}
    print(f"\nDownload of {total / 1e6:.0f} MB in {nfiles} files from a loopback fake hub, "
          f"{os.cpu_count()} CPUs, best of {args.repeat}\n")
    print("| tool | wall s | MB/s | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for k in results:
        print(f"| {k} | {best[k]:.2f} | {total / best[k] / 1e6:.0f} | {peak[k] / 1e6:.0f} |")
    for phase in ("cold", "warm"):
        ours, theirs = best[f"zhllama download ({phase})"], best[f"huggingface_hub snapshot_download ({phase})"]
        print(f"\n{phase}: wall time ratio zhllama / snapshot_download = {ours / theirs:.2f} "
              f"(RSS ratio {peak[f'zhllama download ({phase})'] / peak[f'huggingface_hub snapshot_download ({phase})']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
