"""The ``zhllama`` command line: one subcommand per stage plus build/demo/run/server.

Each subcommand lives in ``flows/cli/<module>.py`` and exposes
``register(subparsers) -> None``; the parser it adds sets ``func(args) -> int``.
Modules are imported lazily per subcommand so ``zhllama --help`` stays fast (no torch import).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from pipeline_lib import __version__
from pipeline_lib.errors import ZhllamaError

# subcommand name -> module under flows.cli (a table, not an if-chain)
COMMANDS: dict[str, str] = {
    "catalog": "catalog",
    "cache": "cache",
    "verify": "verify",
    "tokenizer": "tokenizer",
    "download": "download",
    "merge": "merge",
    "convert": "convert",
    "fingerprint": "fingerprint",
    "quantize": "quantize",
    "eval": "evaluate",
    "generate": "chat",
    "chat": "chat",
    "export": "export",
    "demo": "flow",
    "build": "flow",
    "run": "flow",
    "server": "server",
    "deploy": "server",
    "schedule": "server",
}


def _module_for(argv: list[str]) -> list[str]:
    """Modules to import: only the one named on the command line, or all for --help."""
    for arg in argv:
        if not arg.startswith("-"):
            return [COMMANDS[arg]] if arg in COMMANDS else []
    return list(dict.fromkeys(COMMANDS.values()))


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zhllama",
        description="Rebuild Chinese-LLaMA/Alpaca models: download, verify, tokenizer merge, "
        "LoRA merge, GGUF conversion, quantization, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"zhllama {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _module_for(argv if argv is not None else sys.argv[1:])
    for module in wanted:
        try:
            mod = importlib.import_module(f"flows.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"flows.cli.{module}":
                continue  # stage not built yet
            raise
        mod.register(sub)
    return parser


def _prefect_home() -> None:
    """Create a configured PREFECT_HOME with its parents before Prefect is imported: Prefect makes only
    the last level (warning at import when the parent is missing) and then cannot open its database."""
    home = os.environ.get("PREFECT_HOME")
    if home:
        try:
            os.makedirs(os.path.expanduser(home), exist_ok=True)
        except OSError:
            pass  # Prefect's own warning and error then say why


def main(argv: list[str] | None = None) -> int:
    _prefect_home()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * args.verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    if "HF_TOKEN" in os.environ or "HUGGING_FACE_HUB_TOKEN" in os.environ:
        from pipeline_lib.download import SecretFilter  # a token never reaches the console, whoever logs it

        for handler in logging.getLogger().handlers:
            handler.addFilter(SecretFilter())
    # huggingface_hub installs its own stderr handler; without this its warnings print twice.
    logging.getLogger("huggingface_hub").propagate = False
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ZhllamaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
