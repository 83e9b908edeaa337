"""Verify stage: streaming SHA256 of many files in parallel, checked against what is known.

A file is checked, in order, against: an explicit expectation (a ``sha256sum`` file, a
manifest, or a mapping passed by the caller); the release's official table (any official file
is recognised by its digest); and, when a catalog model is named, that model's official
files by name. A mismatch raises ``IntegrityError`` naming the file, the expected and the
actual digest, and what to do. A file with no known digest is not silently accepted as
official: it is reported as ``unknown`` and recorded in the lock file of what was used.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from threading import Lock

from . import catalog
from .errors import InputError, IntegrityError
from .fsutil import sha256_file, write_text_atomic
from .progress import bar

log = logging.getLogger(__name__)

_SHA256SUM_LINE = re.compile(r"^(?P<digest>[0-9a-fA-F]{64})\s+\*?(?P<name>.+?)\s*$")


class Status(StrEnum):
    OFFICIAL = "official"  # digest is one of the release's official files
    EXPECTED = "expected"  # matched a digest given by a manifest / sha256sum file / caller
    UNKNOWN = "unknown"  # no digest known for this file: recorded, not vouched for


@dataclass(frozen=True)
class Verified:
    path: Path
    sha256: str
    size: int
    status: Status
    against: str  # what it was checked against, for the summary line

    def summary(self) -> str:
        return f"{self.status.value:8} {self.path}  {self.sha256[:16]}…  ({self.against})"


@dataclass(frozen=True)
class VerifyResult:
    files: tuple[Verified, ...]
    seconds: float
    bytes: int
    lock_file: Path | None = None

    @property
    def unknown(self) -> tuple[Verified, ...]:
        return tuple(f for f in self.files if f.status is Status.UNKNOWN)

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0


def sha256_files(paths: Iterable[str | os.PathLike[str]], *, threads: int | None = None,
                 progress: bool | None = None) -> dict[Path, str]:
    """SHA256 of each file, hashed in parallel (hashlib releases the GIL on large blocks)."""
    paths = [Path(p) for p in paths]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise InputError(f"cannot hash {missing[0]}: no such file" + (f" (and {len(missing) - 1} more)"
                                                                      if len(missing) > 1 else ""),
                         fix="check the path; run `zhllama download` first if it should have been fetched")
    total = sum(p.stat().st_size for p in paths)
    workers = threads or min(len(paths), os.cpu_count() or 1) or 1
    lock = Lock()
    with bar(total, "sha256", enabled=progress) as pbar:
        def update(n: int) -> None:
            with lock:
                pbar.update(n)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = list(pool.map(lambda p: sha256_file(p, progress=update), paths))
    return dict(zip(paths, digests, strict=True))


def read_sha256sum(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a ``sha256sum`` file: ``<digest>  <name>`` (``*name`` for binary mode) per line."""
    out = {}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _SHA256SUM_LINE.match(line)
        if not m:
            raise InputError(f"{path}:{n}: not a sha256sum line: {line[:80]!r}",
                             expected="<64 hex digits>  <file name>",
                             fix="produce the file with `sha256sum FILES > SHA256SUMS`")
        out[m["name"]] = m["digest"].lower()
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, str]:
    """Expected digests from a manifest: sha256sum format, our store manifest.json, a verify
    lock file, or a JSON object ``{name: sha256}``."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith(("{", "[")):
        return read_sha256sum(path)
    data = json.loads(text)
    if isinstance(data, dict) and "outputs" in data:  # store manifest
        return {k: v["sha256"] for k, v in data["outputs"].items()}
    if isinstance(data, dict) and "files" in data:  # verify lock file
        return {f["path"]: f["sha256"] for f in data["files"]}
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return {k: v.lower() for k, v in data.items()}
    raise InputError(f"{path} is not a manifest zhllama can read",
                     expected="a sha256sum file, a zhllama manifest.json or lock file, or {name: sha256}")


def _lookup(expected: Mapping[str, str], path: Path, base: Path | None) -> str | None:
    """Expected digest by relative path, as given, or by file name."""
    candidates = [str(path), path.name]
    if base is not None:
        try:
            candidates.insert(0, path.resolve().relative_to(base.resolve()).as_posix())
        except ValueError:
            pass
    for c in candidates:
        if c in expected:
            return expected[c]
    return None


def verify_file(path: str | os.PathLike[str], expected_sha256: str, *, what: str | None = None) -> Verified:
    """Hash one file and require ``expected_sha256``."""
    return verify([path], expected={Path(path).name: expected_sha256}, what=what).files[0]


def verify(
    paths: Sequence[str | os.PathLike[str]],
    *,
    expected: Mapping[str, str] | None = None,
    manifest: str | os.PathLike[str] | None = None,
    model: str | None = None,
    lock_file: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    progress: bool | None = None,
    what: str | None = None,
) -> VerifyResult:
    """Hash ``paths`` (files, or folders: every file inside) and check each digest.

    Raises IntegrityError listing every mismatching file. Writes ``lock_file`` (JSON: each
    file's path, size, sha256, status) when given, atomically.
    """
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")))
        else:
            files.append(p)
    want: dict[str, str] = dict(expected or {})
    base = None
    if manifest is not None:
        want.update(read_manifest(manifest))
        base = Path(manifest).parent
    model_files: dict[str, set[str]] = {}
    entry = None
    if model is not None:
        entry = catalog.get(model)
        for pairs in entry.official_files().values():
            for fname, digest in pairs:
                model_files.setdefault(fname, set()).add(digest)

    t0 = time.perf_counter()
    digests = sha256_files(files, threads=threads, progress=progress)
    elapsed = time.perf_counter() - t0

    results, errors = [], []
    for path, digest in digests.items():
        size = path.stat().st_size
        exp = _lookup(want, path, base)
        official = catalog.identify(digest)
        if exp is not None:
            if digest != exp.lower():
                errors.append((path, exp, digest, what or "the manifest"))
                continue
            status, against = (Status.OFFICIAL, official) if official else (Status.EXPECTED, what or "manifest")
        elif official:
            status, against = Status.OFFICIAL, official
        elif path.name in model_files:
            errors.append((path, " or ".join(sorted(model_files[path.name])), digest,
                           f"the official {path.name} of {entry.display}"))
            continue
        else:
            status, against = Status.UNKNOWN, "no known digest: recorded in the lock file, not verified"
            log.info("%s: no known sha256; recorded as %s", path, digest)  # the table shows it
        results.append(Verified(path=path, sha256=digest, size=size, status=status, against=against))

    if errors:
        lines = [f"{p}: sha256 {actual}, expected {exp} ({src})" for p, exp, actual, src in errors]
        raise IntegrityError(
            f"{len(errors)} file(s) do not match their expected SHA256:\n    " + "\n    ".join(lines),
            expected="every file byte-identical to the published one",
            fix="delete the file(s) and download them again (`zhllama download`); if it happens again, "
                "the source itself differs from the release: check that you have the right file "
                "(LoRA version, model size, tokenizer kind)",
        )
    lock_path = None
    if lock_file is not None:
        lock_path = Path(lock_file)
        write_lock(results, lock_path)
    return VerifyResult(files=tuple(results), seconds=elapsed, bytes=sum(r.size for r in results),
                        lock_file=lock_path)


def write_lock(results: Iterable[Verified], path: str | os.PathLike[str]) -> None:
    """Record exactly which bytes were used: path, size, sha256 and verification status."""
    data = {"version": 1, "files": [
        {**asdict(r), "path": str(r.path), "status": r.status.value} for r in results]}
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------ what was built vs the official table

OFFICIAL_TABLE_ENV = "ZHLLAMA_RELEASE_TABLE"  # path of a TOML laid out like pipeline_lib/data/release_sha256.toml
_PART_RE = re.compile(r"^consolidated\.(\d+)\.pth$")


class Official(StrEnum):
    MATCHES = "matches"
    NO_HASH = "no official hash"
    DIFFERS = "differs"


@dataclass(frozen=True)
class OfficialFile:
    path: Path
    sha256: str
    status: Official
    official_sha256: str | None
    message: str  # "matches the official Chinese-Alpaca-Plus-7B consolidated.00.pth (8b8f6551…)"
    causes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OfficialCheck:
    """Each built file against the release's published SHA256 (merged_consolidated_pth, tokenizer_model)."""

    model: str | None  # display name, "Chinese-Alpaca-Plus-7B"
    files: tuple[OfficialFile, ...]

    @property
    def matches(self) -> bool:
        """Every file with a published hash matches it, and there was at least one."""
        checked = [f for f in self.files if f.status is not Official.NO_HASH]
        return bool(checked) and all(f.status is Official.MATCHES for f in checked)

    @property
    def differs(self) -> tuple[OfficialFile, ...]:
        return tuple(f for f in self.files if f.status is Official.DIFFERS)

    def summary(self) -> str:
        lines = [f"{f.path.name}: {f.message}" for f in self.files]
        return "\n".join(lines)

    def rows(self) -> list[dict]:
        """One JSON-able dict per file (for the verify artifact and build-lock.json)."""
        return [{"file": f.path.name, "path": str(f.path), "sha256": f.sha256, "status": f.status.value,
                 "official_sha256": f.official_sha256, "message": f.message, "causes": list(f.causes)}
                for f in self.files]


def release_table(table: str | os.PathLike[str] | Mapping | None = None) -> Mapping:
    """The official table: ``table`` (a parsed mapping or a TOML path), else ``$ZHLLAMA_RELEASE_TABLE``,
    else the packaged ``release_sha256.toml``."""
    import tomllib

    if isinstance(table, Mapping):
        return table
    path = table if table is not None else os.environ.get(OFFICIAL_TABLE_ENV)
    if path is None:
        return catalog.release_hashes()
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the official hash table {path}: {exc}",
                         expected="a TOML file laid out like pipeline_lib/data/release_sha256.toml",
                         fix=f"fix or unset {OFFICIAL_TABLE_ENV}") from None


def _input_causes(inputs: Mapping[str, Sequence[Verified]] | None) -> list[str]:
    if inputs is None:
        return ["the inputs' own verification was not given here: a base or LoRA that is not the release's "
                "changes every byte"]
    causes = []
    for role, verified in inputs.items():
        unofficial = [v for v in verified if v.status is not Status.OFFICIAL]
        if unofficial:
            what = "the base" if role == "base" else f"the {role} input"
            causes.append(f"{what} is not the official one: {len(unofficial)} of its {len(verified)} file(s) "
                          f"have no official hash ({unofficial[0].path.name}: {unofficial[0].status.value})")
    return causes


def check_official(files: Iterable[str | os.PathLike[str]], *, model: str | None,
                   table: str | os.PathLike[str] | Mapping | None = None,
                   digests: Mapping[Path, str] | None = None, precise: bool = False, dtype: str = "float16",
                   inputs: Mapping[str, Sequence[Verified]] | None = None) -> OfficialCheck:
    """Check what was built against the release's published hashes; never raises for a mismatch.

    ``files``: built files or folders (every file inside). ``model``: catalog name of what was built
    (``alpaca-plus-7b``), or None (then a file is recognised by its digest alone). ``digests``:
    sha256 already computed (by the build), else the files are hashed here. The build's own
    settings (``precise``, ``dtype``) and the ``inputs``' verify results (role -> Verified, e.g.
    ``{"base": ..., "lora-0": ...}``) become the likely causes of a DIFFERS. ``table``: see
    :func:`release_table` (tests put a built file's hash in a copy).
    """
    paths: list[Path] = []
    for p in map(Path, files):
        paths.extend(sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")) if p.is_dir()
                     else [p])
    known = dict(digests or {})
    todo = [p for p in paths if p not in known]
    known.update(sha256_files(todo) if todo else {})
    h = release_table(table)
    merged_table = h.get("merged_consolidated_pth", {})
    entry = catalog.get(model) if model is not None else None
    display = entry.display if entry is not None else None
    merged = tuple(merged_table.get(display, ())) if display else ()
    by_digest = {d: f"{name} consolidated.{i:02d}.pth" for name, ds in merged_table.items() for i, d in enumerate(ds)}
    by_digest |= {d: f"Chinese-{'LLaMA' if k == 'llama' else 'Alpaca'} tokenizer.model"
                  for k, d in h.get("tokenizer_model", {}).items()}
    n_parts = sum(1 for p in paths if _PART_RE.match(p.name))

    out = []
    for path in paths:
        digest = known[path]
        official, label = None, None
        m = _PART_RE.match(path.name)
        if entry is not None and m and int(m.group(1)) < len(merged):
            official, label = merged[int(m.group(1))], f"{display} {path.name}"
        elif entry is not None and path.name == "tokenizer.model" and entry.tokenizer in h.get("tokenizer_model", {}):
            official = h["tokenizer_model"][entry.tokenizer]
            label = f"Chinese-{'LLaMA' if entry.tokenizer == 'llama' else 'Alpaca'} tokenizer.model"
        elif entry is None and digest in by_digest:
            official, label = digest, by_digest[digest]
        if official is None:
            where = f" for {display} {path.name}" if display and m else ""
            if entry is None and m:
                where = " to compare with (no model named; give the catalog model that was built)"
            out.append(OfficialFile(path, digest, Official.NO_HASH, None, f"no official hash published{where}"))
            continue
        if digest == official:
            out.append(OfficialFile(path, digest, Official.MATCHES, official,
                                    f"matches the official {label} ({official[:8]}…)"))
            continue
        causes = []
        if m:
            if precise:
                causes.append("built with --precise (float32 accumulate, one rounding); the release rounds to "
                              "float16 after each LoRA: rebuild without --precise")
            if dtype not in ("float16", "fp16", "f16"):
                causes.append(f"built in {dtype}; the release's files are float16")
            if n_parts != len(merged):
                causes.append(f"built in {n_parts} part(s); the release has {len(merged)} (--parts)")
        causes += _input_causes(inputs)
        if not causes:
            causes.append("official inputs, release arithmetic and layout should match: compare tensor "
                          "fingerprints (`zhllama fingerprint`) to find the tensors that differ")
        out.append(OfficialFile(path, digest, Official.DIFFERS, official,
                                f"DIFFERS from the official {label} ({official[:8]}…): sha256 {digest[:8]}…; "
                                f"likely causes: " + "; ".join(causes), tuple(causes)))
    return OfficialCheck(model=display, files=tuple(out))
