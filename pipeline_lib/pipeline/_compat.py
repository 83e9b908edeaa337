"""Report combining, until it moves into pipeline_lib.evaluate (issue 10/14 work in progress)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any


def combine_reports(paths: Sequence[Path], *, out: Path, title: str):
    """Merge per-variant report.json files (same reference, same text) into one evaluate.Report."""
    from .. import evaluate

    reports = [_from_dict(evaluate.Report, json.loads(Path(p).read_text(encoding="utf-8"))) for p in paths]
    first = reports[0]
    variants, seen = [], set()
    for r in reports:  # the reference once (first), then every variant in the given order
        for v in sorted(r.variants, key=lambda v: not v.is_reference):
            if v.name not in seen:
                seen.add(v.name)
                variants.append(v)
    variants.sort(key=lambda v: not v.is_reference)
    return replace_dc(first, out=out, json_path=out / "report.json", md_path=out / "report.md",
                      plot_path=out / "report.png", variants=tuple(variants),
                      settings={**first.settings, "title": title})


def replace_dc(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


def _from_dict(cls: Any, data: Any) -> Any:
    """Rebuild a (nested, frozen) dataclass from its asdict() form, following the type hints."""
    import types
    import typing
    from dataclasses import fields

    def conv(tp: Any, v: Any) -> Any:
        if v is None:
            return None
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return conv(args[0], v) if len(args) == 1 else v
        if origin is tuple:
            args = typing.get_args(tp)
            inner = args[0] if args else Any
            return tuple(conv(inner, x) for x in v)
        if origin in (list, dict) or tp in (Any, dict, list, str, int, float, bool):
            return v
        if tp is Path:
            return Path(v)
        if is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            names = {f.name for f in fields(tp)}
            return tp(**{k: conv(hints[k], x) for k, x in v.items() if k in names})
        return v

    return conv(cls, data)


