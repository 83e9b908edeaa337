"""`zhllama eval MODEL.gguf [MORE.gguf ...] [--reference f16.gguf] [--text FILE] [--prompts FILE] --out DIR`."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity, KL divergence vs f16, speed, tokenizer efficiency and samples; report.json/.md/.png",
        description="Evaluate GGUF models through llama.cpp: perplexity (as llama-perplexity computes it), "
        "KL divergence / top-1 agreement / PPL ratio against an f16 reference (as --kl-divergence defines "
        "them), prompt and generation speed, bits per weight, tokenizer efficiency, and greedy samples "
        "for the release's ten prompt categories. Writes report.json, report.md and report.png to --out.",
    )
    p.add_argument("models", nargs="+", type=Path, metavar="MODEL.gguf", help="GGUF file(s) to evaluate")
    p.add_argument("--reference", type=Path, metavar="F16.gguf", help="the f16 GGUF the quants were made from")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for the report files")
    p.add_argument("--text", type=Path, metavar="FILE", help="UTF-8 evaluation text (default: the shipped "
                   "held-out Chinese + English text)")
    p.add_argument("--prompts", type=Path, metavar="FILE", help="prompts JSONL (default: the shipped ten "
                   "categories)")
    p.add_argument("--no-samples", action="store_true", help="skip generation samples")
    p.add_argument("--samples-per-category", type=int, default=1, metavar="N",
                   help="prompts per category to generate for (0 = all; default 1)")
    p.add_argument("--max-tokens", type=int, default=128, metavar="N", help="tokens per sample reply (128)")
    p.add_argument("--template", choices=["alpaca", "plain"], help="prompt template (default: alpaca if the "
                   "vocabulary holds [PAD], else plain)")
    p.add_argument("--ctx", type=int, default=512, metavar="N", help="perplexity chunk size n_ctx (512)")
    p.add_argument("--chunks", type=int, metavar="N", help="evaluate at most N chunks (default all)")
    p.add_argument("--tokenizer", action="append", default=[], type=Path, metavar="tokenizer.model",
                   help="also count tokens with this sentencepiece model (repeatable: LLaMA's and the merged one)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed test")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="display name per model, in order (default: the GGUF file type, e.g. q4_0)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    p.set_defaults(func=run)


REPORT_FILES = ("report.json", "report.md", "report.png")


def run(args) -> int:
    from pipeline_lib.errors import InputError
    from pipeline_lib.evaluate import evaluate_variants, model_facts, variant_name
    from pipeline_lib.fsutil import claim_output

    inputs = [*args.models, args.reference, args.text, args.prompts, *args.tokenizer]
    out = claim_output(args.out, kind="into", inputs=inputs, what="--out")
    for name in REPORT_FILES:
        claim_output(out / name, kind="file", inputs=inputs, overwrite=args.overwrite, what="report")

    if args.name and len(args.name) != len(args.models):
        raise InputError(f"{len(args.name)} --name for {len(args.models)} models",
                         expected="one --name per model, or none")
    variants: dict[str, Path] = {}
    for i, m in enumerate(args.models):
        name = args.name[i] if args.name else variant_name(model_facts(m))
        base, n = name, 2
        while name in variants:
            name, n = f"{base}-{n}", n + 1
        variants[name] = m
    report = evaluate_variants(
        variants, reference=args.reference, out=args.out, text=args.text,
        prompts=False if args.no_samples else args.prompts, template=args.template, n_ctx=args.ctx,
        n_chunks=args.chunks, samples_per_category=args.samples_per_category, max_tokens=args.max_tokens,
        tokenizers=args.tokenizer, speed=not args.no_speed, seed=args.seed, threads=args.threads,
    )
    for v in report.variants:
        p, k = v.perplexity, v.kl
        line = f"{v.name:10} {v.model.file_size / 1e6:9.1f} MB  {v.model.bits_per_weight:5.2f} bpw  PPL {p.ppl:.4f}"
        if k:
            line += f"  KL {k.mean_kld:.6f}  top-1 {100 * k.same_top:.2f}%  PPL ratio {k.ppl_ratio:.4f}"
        print(line)
    print(f"report: {report.md_path}  {report.json_path}  {report.plot_path}")
    return 0
