"""`zhllama tokenizer merge|stats`."""

from __future__ import annotations

from pathlib import Path

from pipeline_lib.errors import InputError
from pipeline_lib.fsutil import claim_output
from pipeline_lib.tokenizer import TokenizerKind, merge_tokenizers, tokenizer_stats


def register(sub) -> None:
    p = sub.add_parser("tokenizer", help="merge the Chinese vocabulary into LLaMA's tokenizer; compare tokenizers")
    tsub = p.add_subparsers(dest="tok_cmd", metavar="ACTION", required=True)
    m = tsub.add_parser("merge", help="LLaMA tokenizer + Chinese sentencepiece model -> Chinese-LLaMA/Alpaca tokenizer")
    m.add_argument("--llama-tokenizer", required=True, help="LLaMA tokenizer.model (or its folder)")
    m.add_argument("--chinese-sp", required=True, help="the release's chinese_sp.model")
    m.add_argument("--out", required=True, help="output folder (tokenizer.model + HF tokenizer files)")
    m.add_argument("--alpaca", action="store_true", help="append [PAD] as Chinese-Alpaca does (49954 pieces)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists (never an input)")
    m.set_defaults(func=run_merge)
    s = tsub.add_parser("stats", help="tokens and characters per token of a text, per tokenizer")
    s.add_argument("text", help="a UTF-8 text file")
    s.add_argument("--tokenizer", action="append", required=True, help="tokenizer.model or folder (repeat)")
    s.set_defaults(func=run_stats)


def run_merge(args) -> int:
    kind = TokenizerKind.ALPACA if args.alpaca else TokenizerKind.LLAMA
    claim_output(args.out, kind="dir", inputs=[args.llama_tokenizer, args.chinese_sp], overwrite=args.overwrite,
                 what="--out")
    res = merge_tokenizers(args.llama_tokenizer, args.chinese_sp, out=args.out, kind=kind)
    from pipeline_lib.catalog import identify

    official = identify(res.sha256)
    print(f"{res.tokenizer_model}: {res.llama_pieces} + {res.added_pieces} = {res.total_pieces} pieces "
          f"({kind.value})")
    print(f"sha256 {res.sha256}" + (f"  = official {official}" if official else ""))
    return 0


def run_stats(args) -> int:
    path = Path(args.text)
    if not path.is_file():
        raise InputError(f"no text file at {path}", fix="pass a UTF-8 text file")
    stats = tokenizer_stats(path.read_text(encoding="utf-8"), args.tokenizer)
    base = stats[0]
    print(f"{'tokenizer':40} {'vocab':>7} {'tokens':>8} {'chars/token':>11} {'vs first':>9}")
    for s in stats:
        ratio = s.tokens / base.tokens if base.tokens else 0
        print(f"{s.tokenizer[-40:]:40} {s.vocab_size:>7} {s.tokens:>8} {s.chars_per_token:>11.2f} {ratio:>8.2f}x")
    return 0
