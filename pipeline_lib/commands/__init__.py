"""Subcommands of ``zhllama``; each module has ``register(subparsers)``. See ``pipeline_lib.cli``."""
