"""Benchmarks of the evaluation stage: our perplexity route vs the naive one, the stored reference's
saving, and the time model behind the defaults (a 7B f16 + q4_0 + q8_0 on this machine).

Usage:
  python bench/evaluate.py [--model M.gguf] [--ctx 128] [--chunks 8] [--hidden 512] [--layers 4]
  python bench/evaluate.py --mode reuse [--repeat 2]
  python bench/evaluate.py --mode estimate [--work DIR] [--threads N] [--repeat 2]

``--mode perplexity`` (default): there is no ``llama-perplexity`` binary in the llama-cpp-python
wheel, so "the tool a user would pick instead" is what a Python user writes: llama-cpp-python's
high-level API with ``logits_all=True``, ``Llama.eval`` per chunk, and a numpy log-softmax over
every position. zhllama decodes through llama.cpp's batch API and asks only for the logits of the
scored half of each chunk (as llama-perplexity does). Both must print the same perplexity.

``--mode reuse``: the demo model (the synthetic Chinese-Alpaca-Plus of ``zhllama demo``, converted
and quantized), f16 + q4_0 + q8_0 with the default options, two ways: ``zhllama eval`` (the f16
reference pass once, both quants against its stored predictions) and the way the build evaluated
before the reference was its own node (each variant against the f16 GGUF: the reference pass
again for every variant).

``--mode estimate``: the LLaMA-7B shape (hidden 4096, ffn 11008, 32 heads) with 2 layers, random
weights, f16/q8_0/q4_0: the cost of a 512-token perplexity batch, of a 64-token prompt batch and of
one generated token, scaled to 32 layers + the output layer (counted at the layers' cost per
multiply-add); then the time of a 7B evaluation with the defaults, phase by phase (the load as a
cold read at ``--disk-mb-s``). One thread and CPU seconds by default: an upper bound for two cores
that holds on a busy machine.

Each route runs in its own process; wall time (model load included) and peak RSS (wait4) are per
route; routes alternate and the fastest of ``--repeat`` runs is kept (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# LLaMA-7B and the release's vocabulary
SHAPE_7B = {"hidden": 4096, "ffn": 11008, "layers": 32, "heads": 32, "vocab": 49954}
SIZES_7B = {"f16": 13.5e9, "q8_0": 7.16e9, "q4_0": 3.79e9}  # bytes (llama.cpp's 7B files)
SAMPLE_PROMPT_TOKENS = 64  # Alpaca preamble + a Chinese instruction with the merged 49953 vocabulary: ~55-60


def worker(route: str, model: str, n_ctx: int, n_chunks: int) -> None:
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
                              logits_all=True, verbose=False, n_threads=chat.physical_cores(),
                              n_threads_batch=chat.physical_cores())
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
    """(wall seconds, peak RSS bytes, the JSON the child printed last + its CPU seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    m = run_measured(cmd, env=env)
    return m.wall_s, m.rss_bytes, json.loads(m.stdout.strip().splitlines()[-1]) | {"cpu_s": m.cpu_s}


def build_model(tmp: Path, hidden: int, layers: int, *, ffn: int | None = None, heads: int | None = None,
                ctx: int = 512) -> Path:
    from dataclasses import replace

    from pipeline_lib.gguf_export import convert
    from pipeline_lib.synthetic import TinyConfig, make_tokenizers, random_weights, save_hf_base
    from pipeline_lib.tokenizer import piece_count

    toks = make_tokenizers(tmp / "tok")
    heads = heads or hidden // 64
    cfg = replace(TinyConfig(), vocab_size=piece_count(toks.chinese_alpaca_dir), hidden_size=hidden,
                  intermediate_size=ffn or 2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=heads, max_position_embeddings=ctx)
    hf = save_hf_base(random_weights(cfg, seed=0), cfg, tmp / "hf", tokenizer_dir=toks.chinese_alpaca_dir,
                      shards=1, safetensors=True)
    out = tmp / "bench-f16.gguf"
    convert(hf, out=out, outtype="f16")
    return out


def perplexity_mode(args) -> int:
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


# ------------------------------------------------------------------ --mode reuse


REUSE_CHILD = r"""
import json, sys, time, resource
from pathlib import Path
from pipeline_lib import evaluate as ev
route, f16, q4, q8, out = sys.argv[1:6]
t0 = time.perf_counter()
if route == "once":  # zhllama eval f16 q4_0 q8_0 --reference f16
    ev.evaluate_variants({"f16": f16, "q4_0": q4, "q8_0": q8}, reference=f16, out=out)
else:  # one evaluation per variant, each against the f16 GGUF (the reference pass per variant)
    for name, p in (("f16", f16), ("q4_0", q4), ("q8_0", q8)):
        ev.evaluate(p, out=Path(out) / name, reference=f16, name=name)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def demo_models(tmp: Path) -> tuple[Path, Path, Path]:
    from pipeline_lib.demo import ROLES, ensure_demo_release
    from pipeline_lib.gguf_export import convert
    from pipeline_lib.merge import plan_merge
    from pipeline_lib.quantize import quantize

    src = ensure_demo_release(tmp / "home")
    f16 = tmp / "demo-f16.gguf"
    convert(plan_merge(src / ROLES["base"], [src / ROLES["lora-0"], src / ROLES["lora-1"]]), out=f16, name="demo")
    res = quantize(f16, qtypes=["q4_0", "q8_0"], out_dir=tmp)
    by_type = {o.qtype.lower(): Path(o.path) for o in res.outputs}
    return f16, by_type["q4_0"], by_type["q8_0"]


def reuse_mode(args) -> int:
    with tempfile.TemporaryDirectory(prefix="zhllama-bench-reuse-") as tmp:
        f16, q4, q8 = demo_models(Path(tmp))
        rows: dict[str, tuple[float, int, dict]] = {}
        for i in range(args.repeat):
            for route in ("per-variant", "once"):
                out = Path(tmp) / f"{route}-{i}"
                run = measure([sys.executable, "-c", REUSE_CHILD, route, str(f16), str(q4), str(q8), str(out)])
                if route not in rows or run[0] < rows[route][0]:
                    rows[route] = run
    print(f"demo model (hidden 256, 2 layers, vocab 1197), f16 + q4_0 + q8_0, default options "
          f"(load average {os.getloadavg()[0]:.1f})")
    print()
    print("| route | f16 passes | wall s | in-process s | CPU s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, passes in (("per-variant", 3), ("once", 1)):
        wall, rss, res = rows[name]
        label = "each variant against the f16 GGUF" if name == "per-variant" else "zhllama eval: reference once"
        print(f"| {label} | {passes} | {wall:.2f} | {res['seconds']:.2f} | {res['cpu_s']:.2f} | {rss / 1e6:.0f} |")
    a, b = rows["once"], rows["per-variant"]
    print(f"| ratio once/per-variant | | {a[0] / b[0]:.2f} | {a[2]['seconds'] / b[2]['seconds']:.2f} | "
          f"{a[2]['cpu_s'] / b[2]['cpu_s']:.2f} | |")
    return 0


# ------------------------------------------------------------------ --mode estimate


COST_CHILD = r"""
import json, sys, time
import numpy as np
import llama_cpp as lc
from pipeline_lib import chat
path, threads = sys.argv[1], int(sys.argv[2])
llm = chat.load_model(path, n_ctx=512, n_batch=512, threads=threads, progress="load")
ctx = llm.ctx
toks = np.random.default_rng(0).integers(3, llm.n_vocab(), size=512).tolist()
batch = lc.llama_batch_init(512, 0, 1)

def decode(n, start=0, logits_from=None):
    batch.n_tokens = n
    for k in range(n):
        batch.token[k], batch.pos[k], batch.n_seq_id[k] = toks[(start + k) % 512], start + k, 1
        batch.seq_id[k][0] = 0
        batch.logits[k] = (k >= logits_from) if logits_from is not None else (k == n - 1)
    t0, c0 = time.perf_counter(), time.process_time()
    assert lc.llama_decode(ctx, batch) == 0
    return time.perf_counter() - t0, time.process_time() - c0

res = {}
for name, n, lf in (("pp512", 512, 256), ("pp64", 64, None)):
    runs = []
    for _ in range(2):  # the first run pages the weights in
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        runs.append(decode(n, logits_from=lf))
    res[name], res[name + "_cpu"] = runs[-1]
lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
decode(64)
tg = sorted(decode(1, start=64 + i) for i in range(8))
res["tg"], res["tg_cpu"] = tg[len(tg) // 2]
print(json.dumps(res))
"""


def layer_models(work: Path, layers: int = 2) -> dict[str, Path]:
    """A ``layers``-layer model of the 7B shape, f16/q8_0/q4_0, built once into ``work``."""
    from pipeline_lib.quantize import quantize

    folder = work / f"7b-shape-{layers}-layer"
    f16 = folder / "bench-f16.gguf"
    if not f16.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_model(folder, SHAPE_7B["hidden"], layers, ffn=SHAPE_7B["ffn"], heads=SHAPE_7B["heads"], ctx=2048)
    files = {"f16": f16}
    for q in ("q8_0", "q4_0"):
        p = folder / f"bench.{q}.gguf"
        if not p.is_file():
            res = quantize(f16, qtypes=[q], out_dir=folder)
            Path(res.outputs[0].path).rename(p)
        files[q] = p
    return files


def estimate_mode(args) -> int:
    """Scale the 2-layer model's decode costs to 32 layers + the output layer. With one thread the
    CPU seconds are used: they are what the work costs whatever else the machine runs (on a quiet
    machine, wall = CPU), and the second core only makes a 7B faster than this."""
    from pipeline_lib import evaluate as ev

    threads = args.threads or 1
    work = Path(args.work or tempfile.mkdtemp(prefix="zhllama-bench-7b-"))
    layers = 2
    models = layer_models(work, layers)
    key = "_cpu" if threads == 1 else ""
    costs: dict[str, dict[str, float]] = {}
    load = []
    for _ in range(args.repeat):
        load.append(os.getloadavg()[0])
        for q in ("f16", "q8_0", "q4_0"):
            _, _, res = measure([sys.executable, "-c", COST_CHILD, str(models[q]), str(threads)])
            best = costs.setdefault(q, {})
            for k in ("pp512", "pp64", "tg"):
                best[k] = min(best.get(k, math.inf), res[k + key])
    h, f, v, n_layers = SHAPE_7B["hidden"], SHAPE_7B["ffn"], SHAPE_7B["vocab"], SHAPE_7B["layers"]
    layer_macs = 4 * h * h + 3 * h * f
    out_layers = v * h / layer_macs  # the output matrix, in layers' worth of multiply-adds
    bench_out = ev.model_facts(models["f16"]).vocab_size * h / layer_macs  # the small model's (tiny vocabulary)
    chunks, n_ctx = ev.DEFAULT_N_CHUNKS, ev.DEFAULT_N_CTX
    # output rows computed: the scored half of a perplexity chunk, one per prompt batch, one per token
    rows = {"pp512": (n_ctx - n_ctx // 2) / n_ctx, "pp64": 1 / 64, "tg": 1.0}
    scale = {k: (n_layers + r * out_layers) / (layers + r * bench_out) for k, r in rows.items()}
    t7 = {q: {k: c[k] * scale[k] for k in c} for q, c in costs.items()}
    defaults = ev.PassOptions()  # what every model's pass does by default (zhllama eval, the build)
    samples, max_tokens = defaults.max_samples, defaults.max_tokens
    pp, tg = defaults.speed_prompt, defaults.speed_gen
    what = "CPU s" if threads == 1 else "wall s"
    print(f"LLaMA-7B shape, {layers}-layer models measured ({threads} thread(s), {what}, fastest of {args.repeat}; "
          f"load average {min(load):.1f}-{max(load):.1f}), scaled to {n_layers} layers + the output layer "
          f"({out_layers:.2f} layers' multiply-adds)")
    print()
    print(f"| type | {layers}-layer pp512 | {layers}-layer pp64 | {layers}-layer tg/token | 7B pp512 chunk | "
          "7B prompt s/token | 7B s/generated token |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for q, c in costs.items():
        d = t7[q]
        print(f"| {q} | {c['pp512']:.2f} | {c['pp64']:.3f} | {c['tg']:.4f} | {d['pp512']:.0f} | "
              f"{d['pp64'] / 64:.3f} | {d['tg']:.2f} |")
    print()
    print(f"7B evaluation with the defaults: {chunks} chunk x {n_ctx}, speed pp{pp}/tg{tg}, "
          f"{samples} samples x <= {max_tokens} tokens (prompts ~{SAMPLE_PROMPT_TOKENS} tokens), "
          f"weights read cold at {args.disk_mb_s:.0f} MB/s")
    print()
    print("| model | load s | perplexity s | speed s | samples s | total s |")
    print("|---|---:|---:|---:|---:|---:|")
    grand = 0.0
    for q, d in t7.items():
        load_s = SIZES_7B[q] / (args.disk_mb_s * 1e6)
        ppl_s = chunks * d["pp512"]
        per_prompt_token = d["pp64"] / 64
        speed_s = pp * per_prompt_token + tg * d["tg"]
        samples_s = samples * (SAMPLE_PROMPT_TOKENS * per_prompt_token + max_tokens * d["tg"])
        total = load_s + ppl_s + speed_s + samples_s
        grand += total
        print(f"| {q} | {load_s:.0f} | {ppl_s:.0f} | {speed_s:.0f} | {samples_s:.0f} | {total:.0f} |")
    overhead = 20.0  # GGUF metadata of a 50k vocabulary (~4 s per file), plot, numpy KL per chunk
    grand += overhead
    print(f"| overhead (GGUF metadata, plot, KL arithmetic) | | | | | {overhead:.0f} |")
    print(f"| **f16 + q8_0 + q4_0** | | | | | **{grand:.0f} s = {grand / 60:.1f} min** |")
    print()
    chunk_s = sum(d["pp512"] for d in t7.values())
    token_s = sum(d["tg"] for d in t7.values())
    sample_s = sum(SAMPLE_PROMPT_TOKENS * d["pp64"] / 64 for d in t7.values()) + max_tokens * token_s
    print(f"scale-up, the three models together: +{chunk_s / 60:.1f} min per extra chunk, "
          f"+{sample_s / 60:.1f} min per extra sample, +{token_s:.1f} s per extra generated token per sample")
    print(f"(layer models kept in {work})")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["perplexity", "reuse", "estimate"], default="perplexity")
    ap.add_argument("--model", help="perplexity mode: a GGUF to use (default: build a synthetic one)")
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per route, alternating; the fastest is kept")
    ap.add_argument("--work", help="estimate mode: folder for the 7B-shape layer models (reused)")
    ap.add_argument("--threads", type=int, help="estimate mode: llama.cpp threads (default 1: CPU seconds, "
                    "robust on a shared machine; with more, wall seconds)")
    ap.add_argument("--disk-mb-s", type=float, default=398.0,
                    help="estimate mode: cold read speed for the load (398 MB/s measured here in issue 14)")
    ap.add_argument("--worker", choices=["zhllama", "naive"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.ctx, args.chunks)
        return 0
    return {"perplexity": perplexity_mode, "reuse": reuse_mode, "estimate": estimate_mode}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
