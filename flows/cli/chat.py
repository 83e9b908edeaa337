"""`zhllama chat MODEL.gguf` (interactive, multi-turn, streaming) and `zhllama generate MODEL.gguf "prompt"`."""

from __future__ import annotations

import sys
from pathlib import Path

HELP_LINE = ("Type a message and press Enter. Ctrl-C stops a reply; /reset clears the history; "
             "/exit or Ctrl-D quits.")


def _common(p, *, temp: float, top_k: int, top_p: float, repeat_penalty: float, max_tokens: int) -> None:
    p.add_argument("model", type=Path, metavar="MODEL.gguf", help="a GGUF model (f16 or quantized)")
    p.add_argument("--template", choices=["alpaca", "plain"],
                   help="prompt template (default: alpaca if the vocabulary holds [PAD], else plain)")
    p.add_argument("--ctx", type=int, default=2048, metavar="N", help="context size (2048, as the release used)")
    p.add_argument("--max-tokens", "-n", type=int, default=max_tokens, metavar="N",
                   help=f"tokens per reply ({max_tokens})")
    p.add_argument("--temp", type=float, default=temp, help=f"temperature, 0 = greedy ({temp})")
    p.add_argument("--top-k", type=int, default=top_k, help=f"({top_k})")
    p.add_argument("--top-p", type=float, default=top_p, help=f"({top_p})")
    p.add_argument("--repeat-penalty", type=float, default=repeat_penalty, help=f"({repeat_penalty})")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0: the same reply each time)")
    p.add_argument("--threads", type=int, help="CPU threads for llama.cpp (default: physical cores)")
    p.add_argument("--show-prompt", action="store_true",
                   help="print the exact model input (with the chat history) to stderr before each reply")


def register(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat with a GGUF model (streaming, Alpaca template)",
                       description="Chat in the terminal the way the release used llama.cpp's -ins mode: the "
                       "conversation stays in the context and each message is wrapped in the model's template. "
                       + HELP_LINE)
    _common(c, temp=0.2, top_k=40, top_p=0.9, repeat_penalty=1.1, max_tokens=512)
    c.set_defaults(func=run_chat)
    g = sub.add_parser("generate", help="one-shot generation from a prompt (greedy by default), streamed")
    _common(g, temp=0.0, top_k=40, top_p=0.9, repeat_penalty=1.0, max_tokens=256)
    g.add_argument("prompt", help="the instruction (Alpaca models) or text to continue (LLaMA models)")
    g.set_defaults(func=run_generate)


def _open(args):
    from pipeline_lib import chat

    template = chat.get_template(args.template) if args.template else chat.detect_template(args.model)
    n_ctx = args.ctx
    trained = chat.gguf_context_length(args.model)
    if trained and n_ctx > trained:
        print(f"note: using --ctx {trained}, the context this model was trained with", file=sys.stderr)
        n_ctx = trained
    llm = chat.load_model(args.model, n_ctx=n_ctx, seed=args.seed, threads=args.threads, progress=f"load {args.model.name}")
    sampling = chat.Sampling(temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                             repeat_penalty=args.repeat_penalty)
    return chat.ChatSession(llm=llm, template=template, sampling=sampling, max_tokens=args.max_tokens)


def _stream(session, text: str, show_prompt: bool) -> None:
    pieces = session.send(text)
    if show_prompt:
        print(f"--- prompt ---\n{session.last_prompt}\n--- end prompt ---", file=sys.stderr, flush=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def run_generate(args) -> int:
    session = _open(args)
    _stream(session, args.prompt, args.show_prompt)
    return 0


def run_chat(args) -> int:
    session = _open(args)
    print(f"zhllama chat: {args.model.name} (template: {session.template.name}). {HELP_LINE}", flush=True)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return 0
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(history cleared)", flush=True)
            continue
        try:
            _stream(session, text, args.show_prompt)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat (as llama.cpp -ins did)
            print("\n(reply interrupted; not kept in the history)", flush=True)
