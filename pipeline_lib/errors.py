"""Exceptions that tell the user what was seen, what was expected and what to do."""

from __future__ import annotations


class ZhllamaError(Exception):
    """Base error. ``str(err)`` is a complete message for a person.

    Built from three parts so that every message has the same shape::

        raise InputError("tokenizer has 49954 pieces", expected="49953 (Chinese-LLaMA)",
                         fix="use the tokenizer shipped with the LLaMA LoRA, not the Alpaca one")
    """

    def __init__(self, seen: str, *, expected: str | None = None, fix: str | None = None) -> None:
        self.seen = seen
        self.expected = expected
        self.fix = fix
        parts = [seen]
        if expected:
            parts.append(f"expected: {expected}")
        if fix:
            parts.append(f"what to do: {fix}")
        super().__init__("\n  ".join(parts))


class InputError(ZhllamaError):
    """An input file or argument is not what the stage needs (checked before any write)."""


class IntegrityError(ZhllamaError):
    """A file's content does not match the digest it must have."""


class DiskSpaceError(ZhllamaError):
    """Not enough free disk space for the planned output."""


class StoreError(ZhllamaError):
    """The artifact store is inconsistent or cannot be used."""
