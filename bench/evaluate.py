"""Benchmark: zhllama's perplexity vs the same number computed the naive way, same model, same run.

Usage: python bench/evaluate.py [--model M.gguf] [--ctx 128] [--chunks 8] [--hidden 512] [--layers 4]

There is no ``llama-perplexity`` binary in the llama-cpp-python wheel, so "the tool a user would
pick instead" is what a Python user writes: llama-cpp-python's high-level API with
``logits_all=True``, ``Llama.eval`` per chunk, and a numpy log-softmax over every position.
zhllama decodes through llama.cpp's batch API and asks only for the logits of the scored half
of each chunk (as llama-perplexity does). Both must print the same perplexity.

Each route runs in its own process; wall time (model load included) and peak RSS (wait4) are
per route; routes alternate and the fastest of ``--repeat`` runs is kept (the machine is shared). Without --model a synthetic model (random weights, the merged tiny vocabulary) is
built and converted with zhllama's own GGUF writer. Prints a markdown table with ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]


def worker(route: str, model: str, n_ctx: int, n_chunks: int) -> None:
    sys.path.insert(0, str(REPO))
    import numpy as np

    from pipeline_lib import chat
    from pipeline_lib import evaluate as ev

    text = ev.packaged_text()
    t0 = time.perf_counter()
    if route == "zhllama":
        llm = chat.load_model(model, n_ctx=n_ctx, n_batch=n_ctx)
        tokens = ev.tokenize_text(llm, text)
        res, _ = ev.measure_perplexity(llm, tokens, n_ctx=n_ctx, n_chunks=n_chunks)
        ppl, scored = res.ppl, res.scored_tokens
    else:
        import llama_cpp

        llm = llama_cpp.Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                              logits_all=True, verbose=False)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
        nll, scored = 0.0, 0
        for c in range(min(n_chunks, len(tokens) // n_ctx)):
            chunk = [llm.token_bos()] + tokens[c * n_ctx + 1:(c + 1) * n_ctx]
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
            for pos in range(n_ctx // 2, n_ctx - 1):
                row = logits[pos]
                m = row.max()
                nll += m + math.log(np.exp(row - m).sum()) - row[chunk[pos + 1]]
                scored += 1
        ppl = math.exp(nll / scored)
    print(json.dumps({"ppl": ppl, "scored": scored, "seconds": time.perf_counter() - t0}))


def measure(cmd: list[str]) -> tuple[float, int, dict]:
    """(wall seconds, peak RSS bytes, the JSON the child printed last)."""
    m = run_measured(cmd)
    return m.wall_s, m.rss_bytes, json.loads(m.stdout.strip().splitlines()[-1])


def build_model(tmp: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(REPO))
    from dataclasses import replace

    from pipeline_lib.gguf_export import convert
    from pipeline_lib.synthetic import TinyConfig, make_tokenizers, random_weights, save_hf_base
    from pipeline_lib.tokenizer import piece_count

    toks = make_tokenizers(tmp / "tok")
    cfg = replace(TinyConfig(), vocab_size=piece_count(toks.chinese_alpaca_dir), hidden_size=hidden,
                  intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  num_key_value_heads=hidden // 64)
    hf = save_hf_base(random_weights(cfg, seed=0), cfg, tmp / "hf", tokenizer_dir=toks.chinese_alpaca_dir,
                      shards=1, safetensors=True)
    out = tmp / "bench-f16.gguf"
    convert(hf, out=out, outtype="f16")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a GGUF to use (default: build a synthetic one)")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per route, alternating; the fastest is kept")
    ap.add_argument("--worker", choices=["zhllama", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.ctx, args.chunks)
        return 0
    with tempfile.TemporaryDirectory(prefix="zhllama-bench-eval-") as tmp:
        model = args.model or str(build_model(Path(tmp), args.hidden, args.layers))
        rows = {}
        for _ in range(args.repeat):
            for route in ("naive", "zhllama"):
                cmd = [sys.executable, __file__, "--worker", route, "--model", model, "--ctx", str(args.ctx),
                       "--chunks", str(args.chunks)]
                run = measure(cmd)
                if route not in rows or run[0] < rows[route][0]:
                    rows[route] = run
    rows = {k: rows[k] for k in ("zhllama", "naive")}
    ours, theirs = rows["zhllama"], rows["naive"]
    same = math.isclose(ours[2]["ppl"], theirs[2]["ppl"], rel_tol=1e-4)
    print(f"model: {model if args.model else f'synthetic hidden={args.hidden} layers={args.layers}'}, "
          f"n_ctx={args.ctx}, chunks={args.chunks}, scored tokens={ours[2]['scored']}")
    print()
    print("| route | perplexity | wall s | in-process s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for name, (wall, rss, res) in rows.items():
        label = "zhllama (llama.cpp batch API, scored half only)" if name == "zhllama" else \
            "llama-cpp-python high-level, logits_all + numpy"
        print(f"| {label} | {res['ppl']:.6f} | {wall:.2f} | {res['seconds']:.2f} | {rss / 1e6:.0f} |")
    print(f"| ratio ours/naive | {'same' if same else 'DIFFERENT'} | {ours[0] / theirs[0]:.2f} | "
          f"{ours[2]['seconds'] / theirs[2]['seconds']:.2f} | {ours[1] / theirs[1]:.2f} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
