"""`zhllama eval MODEL.gguf [MORE.gguf ...] [--reference f16.gguf | REF_DIR] [--text FILE] [--prompts FILE] --out DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

SIZING = """\
Defaults are sized so that a 7B evaluation (f16 reference + q4_0 + q8_0) takes about 11 minutes on
a 2-core machine (estimated from per-token costs measured here: docs/evaluate.md, "Sizing"): one
perplexity chunk of 512 tokens, three sample prompts (one from each of the first three categories)
of at most 32 tokens, a speed test of pp32/tg16, one thread per physical core; the f16 reference
runs once and every quant's KL reuses its stored predictions (DIR/reference: 25.5 MB per chunk for
the 49954-token vocabulary). Scale up with (costs for a 7B f16 + q8_0 + q4_0 together):
  --chunks N            perplexity/KL chunks (0 = all the text holds): about +4.5 min per chunk
  --samples N           sample prompts in all (0 = no limit; with --samples-per-category N): +1.6 min each
  --max-tokens N        tokens per sample reply: +2 s per token per sample
  --speed-prompt N / --speed-gen N   the speed test's pp/tg sizes
  --threads N           llama.cpp threads (default: physical cores; 1 can be faster on a busy machine)
Pass DIR/reference as --reference to evaluate more quants against the same f16 pass later."""


def register(sub) -> None:
    from pipeline_lib import evaluate as ev

    p = sub.add_parser(
        "eval",
        help="perplexity, KL divergence vs f16, speed, tokenizer efficiency and samples; report.json/.md/.png",
        description="Evaluate GGUF models through llama.cpp: perplexity (as llama-perplexity computes it), "
        "KL divergence / top-1 agreement / PPL ratio against an f16 reference (as --kl-divergence defines "
        "them), prompt and generation speed, bits per weight, resident vs file-backed memory, tokenizer "
        "efficiency, and greedy samples for the release's prompt categories. Writes report.json, report.md "
        "and report.png to --out (the reference pass to --out/reference, each variant to --out/variants/NAME).",
        epilog=SIZING, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL.gguf", help="GGUF file(s) to evaluate")
    p.add_argument("--reference", type=Path, metavar="F16.gguf|REF_DIR",
                   help="the f16 GGUF the quants were made from (evaluated once), or a stored reference folder "
                   "(an earlier run's --out/reference: the f16 is not loaded again)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 evaluation text (default: the shipped "
                   "held-out Chinese + English text, or a stored reference's own text)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="prompts JSONL (default: the shipped ten "
                   "categories)")
    p.add_argument("--no-samples", action="store_true", help="skip generation samples")
    p.add_argument("--samples", type=int, default=ev.DEFAULT_MAX_SAMPLES, metavar="N",
                   help=f"sample prompts in all, round-robin over the categories (0 = no limit; "
                   f"default {ev.DEFAULT_MAX_SAMPLES})")
    p.add_argument("--samples-per-category", type=int, default=ev.DEFAULT_SAMPLES_PER_CATEGORY, metavar="N",
                   help=f"prompts per category (0 = all; default {ev.DEFAULT_SAMPLES_PER_CATEGORY})")
    p.add_argument("--max-tokens", type=int, default=ev.DEFAULT_MAX_TOKENS, metavar="N",
                   help=f"tokens per sample reply ({ev.DEFAULT_MAX_TOKENS})")
    p.add_argument("--template", choices=["alpaca", "plain"], help="prompt template (default: alpaca if the "
                   "vocabulary holds [PAD], else plain)")
    p.add_argument("--ctx", type=int, metavar="N", help=f"perplexity chunk size n_ctx (default "
                   f"{ev.DEFAULT_N_CTX}, or a stored reference's)")
    p.add_argument("--chunks", type=int, metavar="N", help=f"perplexity/KL chunks (default {ev.DEFAULT_N_CHUNKS}, "
                   "or a stored reference's; 0 = all the text holds)")
    p.add_argument("--tokenizer", action="append", default=[], type=Path, metavar="tokenizer.model",
                   help="also count tokens with this sentencepiece model (repeatable: LLaMA's and the merged one)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed test")
    p.add_argument("--speed-prompt", type=int, default=ev.DEFAULT_SPEED_PROMPT, metavar="N",
                   help=f"speed test: prompt tokens in one batch (pp; {ev.DEFAULT_SPEED_PROMPT})")
    p.add_argument("--speed-gen", type=int, default=ev.DEFAULT_SPEED_GEN, metavar="N",
                   help=f"speed test: generated tokens (tg; {ev.DEFAULT_SPEED_GEN})")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: physical cores)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (greedy samples do not depend on it; default 0)")
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="display name per model, in order (default: the GGUF file type, e.g. q4_0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=run)


REPORT_FILES = ("report.json", "report.md", "report.png")


def run(args) -> int:
    from pipeline_lib.errors import InputError
    from pipeline_lib.evaluate import PassOptions, evaluate_variants
    from pipeline_lib.fsutil import claim_output, human_bytes

    inputs = [*args.models, args.reference, args.text, args.prompts, *args.tokenizer]
    out = claim_output(args.out, kind="into", inputs=inputs, what="--out")
    for name in REPORT_FILES:
        claim_output(out / name, kind="file", inputs=inputs, overwrite=args.overwrite, what="report")

    if args.name and len(args.name) != len(args.models):
        raise InputError(f"{len(args.name)} --name for {len(args.models)} models",
                         expected="one --name per model, or none")
    if args.name and len(set(args.name)) != len(args.name):
        raise InputError(f"--name {' '.join(args.name)}", expected="a different name per model")
    # named by file type inside, after the cheap input checks (reading a GGUF's vocabulary takes seconds)
    variants = dict(zip(args.name, args.models, strict=True)) if args.name else list(args.models)
    options = PassOptions(
        prompts=False if args.no_samples else args.prompts, template=args.template,
        samples_per_category=args.samples_per_category, max_samples=args.samples, max_tokens=args.max_tokens,
        speed=not args.no_speed, speed_prompt=args.speed_prompt, speed_gen=args.speed_gen, seed=args.seed,
        threads=args.threads,
    )
    report = evaluate_variants(variants, reference=args.reference, out=out, text=args.text, n_ctx=args.ctx,
                               n_chunks=args.chunks, tokenizers=args.tokenizer, options=options)
    for v in report.variants:
        p, k = v.perplexity, v.kl
        line = f"{v.name:10} {v.model.file_size / 1e6:9.1f} MB  {v.model.bits_per_weight:5.2f} bpw  PPL {p.ppl:.4f}"
        if k:
            line += f"  KL {k.mean_kld:.6f}  top-1 {100 * k.same_top:.2f}%  PPL ratio {k.ppl_ratio:.4f}"
        if v.memory:
            line += f"  RAM {human_bytes(v.memory.anon_bytes)} + mapped {human_bytes(v.memory.file_bytes)}"
        line += f"  {v.seconds:.1f} s"
        print(line)
    if report.settings.get("reference_bytes"):
        print(f"reference: {args.out / 'reference'} ({human_bytes(report.settings['reference_bytes'])} of stored "
              f"predictions; pass it as --reference to reuse)" if args.reference and args.reference.is_file()
              else f"reference: {args.reference} (stored, reused)")
    print(f"report: {report.md_path}  {report.json_path}  {report.plot_path}")
    return 0
