"""Safe extraction of ``.zip`` and ``.tar(.gz|.bz2|.xz)`` archives (the 2023 distribution form).

Archives are untrusted data. :func:`plan_extraction` reads every member header and refuses the
whole archive, before a byte is written, if any member:

- has an absolute path, a drive letter, a backslash path or a ``..`` component;
- is a symlink whose target leaves the destination once resolved, or a hard link to something
  outside it (or to a member not seen before it);
- is a device, FIFO or other special file;
- sits below a member that is a link (``a`` → ``/etc`` then ``a/passwd``) or a file, is a link
  where another member is a folder or lies below, or is a file where another member made a folder;
- would exceed the member-count or total-size limits, or a zip member whose compression ratio
  looks like a zip bomb.

:func:`extract_archive` then extracts into a temporary directory beside ``out`` and renames it
into place, so ``out`` never holds a partial extraction. Sizes are re-checked while writing
(headers can lie), and disk space is checked from the declared sizes first.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError
from .fsutil import atomic_dir, check_disk_space, human_bytes

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
DEFAULT_MAX_BYTES = 512 * 10**9  # the largest release archive is ~60 GB; this only stops bombs
DEFAULT_MAX_MEMBERS = 100_000
MAX_ZIP_RATIO = 200  # uncompressed/compressed beyond this (for members over 1 MB) is a zip bomb; weights ~1.1
_COPY_BUFFER = 4 * 1024 * 1024


def is_archive(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(ARCHIVE_SUFFIXES)


@dataclass(frozen=True)
class Member:
    name: str  # normalized relative POSIX path inside the archive
    kind: str  # "file" | "dir" | "symlink" | "hardlink"
    size: int
    target: str | None = None  # link target (symlink: as stored; hardlink: normalized member name)


@dataclass(frozen=True)
class ExtractionPlan:
    archive: Path
    format: str  # "zip" | "tar"
    members: tuple[Member, ...]
    total_bytes: int
    # how often each kept name occurs: only its last occurrence is extracted (as tar itself would leave it)
    occurrences: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtractResult:
    archive: Path
    out: Path
    files: tuple[Path, ...]  # regular files written (absolute), in archive order
    total_bytes: int


def _reject(archive: Path, what: str, *, fix: str = "do not extract this archive; get it again from the "
            "official source") -> InputError:
    return InputError(f"unsafe archive {archive.name}: {what}",
                      expected="relative member paths inside the archive folder, no links leaving it",
                      fix=fix)


def _safe_name(archive: Path, raw: str) -> str:
    """Normalize a member name, refusing anything that could land outside the destination."""
    if not raw or "\x00" in raw:
        raise _reject(archive, f"member with an empty or NUL-containing name {raw!r}")
    if "\\" in raw:
        raise _reject(archive, f"member {raw!r} uses backslashes (a Windows path)")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise _reject(archive, f"member {raw!r} has an absolute path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _reject(archive, f"member {raw!r} contains '..' (path traversal, 'zip-slip')")
    if not parts:
        return ""
    return "/".join(parts)


MAX_LINK_HOPS = 40  # as the kernel's limit for nested symlinks (ELOOP)


def _absolute_target(target: str) -> bool:
    return not target or target.startswith("/") or "\\" in target or (len(target) > 1 and target[1] == ":")


def resolve_planned(name: str, links: dict[str, str], *, max_hops: int = MAX_LINK_HOPS) -> str | None:
    """Where the path ``name`` (relative to the folder) leads once every planned link is followed.

    ``links`` maps each symlink member to its target, as the archive will create them. The
    resolution works like the kernel's, component by component over the *planned* tree: a
    component that is a link is replaced by its target (relative to the link's folder), ``..``
    goes up one level. Returns the resolved relative path (``""`` for the folder itself), or None
    when it leaves the folder at any point, is absolute, or loops (more than ``max_hops`` links).
    A lexical check is not enough: with ``a -> .`` and ``b -> a/a/../../X``, ``b`` normalises to
    ``X`` inside, but really resolves to ``../X`` outside.
    """
    stack: list[str] = []
    todo = [c for c in name.split("/")][::-1]
    hops = 0
    while todo:
        comp = todo.pop()
        if comp in ("", "."):
            continue
        if comp == "..":
            if not stack:
                return None  # above the folder
            stack.pop()
            continue
        path = "/".join([*stack, comp])
        target = links.get(path)
        if target is None:
            stack.append(comp)
            continue
        hops += 1
        if hops > max_hops or _absolute_target(target):
            return None
        todo.extend(target.split("/")[::-1])  # relative to the link's folder: the current stack
    return "/".join(stack)


def _link_stays_inside(name: str, target: str, links: dict[str, str] | None = None) -> bool:
    """True when symlink ``name`` → ``target`` stays inside the root, resolved through ``links``."""
    if _absolute_target(target):
        return False
    return resolve_planned(posixpath.join(posixpath.dirname(name), target), links or {}) is not None


def _zip_members(archive: Path, zf: zipfile.ZipFile) -> list[Member]:
    out = []
    for info in zf.infolist():
        name = _safe_name(archive, info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            target = zf.read(info).decode("utf-8", "replace")
            out.append(Member(name, "symlink", 0, target))
        elif info.is_dir():
            out.append(Member(name, "dir", 0))
        elif mode and not stat.S_ISREG(mode) and stat.S_IFMT(mode):
            raise _reject(archive, f"member {info.filename!r} is a special file (mode {oct(mode)})")
        else:
            if (info.file_size > 10**6 and info.compress_size > 0
                    and info.file_size / info.compress_size > MAX_ZIP_RATIO):
                raise _reject(archive, f"member {info.filename!r} expands {info.compress_size} → "
                              f"{info.file_size} bytes (ratio over {MAX_ZIP_RATIO}: a zip bomb)")
            out.append(Member(name, "file", info.file_size))
    return out


def _tar_members(archive: Path, tf: tarfile.TarFile) -> list[Member]:
    out = []
    for info in tf:  # streams through the archive once
        name = _safe_name(archive, info.name)
        if info.issym():
            out.append(Member(name, "symlink", 0, info.linkname))
        elif info.islnk():
            try:
                target = _safe_name(archive, info.linkname)
            except InputError:
                raise _reject(archive, f"hard link {info.name!r} -> {info.linkname!r} points outside the "
                              "archive folder") from None
            out.append(Member(name, "hardlink", 0, target))
        elif info.isdir():
            out.append(Member(name, "dir", 0))
        elif info.isreg():
            out.append(Member(name, "file", info.size))
        else:
            raise _reject(archive, f"member {info.name!r} is a special file (device, FIFO or socket)")
    return out


def _open(archive: Path):
    if zipfile.is_zipfile(archive):
        return "zip", zipfile.ZipFile(archive)
    try:
        return "tar", tarfile.open(archive, "r:*")
    except tarfile.TarError as exc:
        raise InputError(f"{archive} is not a readable zip or tar archive ({exc})",
                         expected="a .zip or .tar.gz file", fix="download it again; it may be truncated") from exc


def plan_extraction(archive: str | os.PathLike[str], *, include: list[str] | None = None,
                    max_bytes: int = DEFAULT_MAX_BYTES, max_members: int = DEFAULT_MAX_MEMBERS) -> ExtractionPlan:
    """Read and check every member header; raise InputError (nothing written) if anything is unsafe.

    ``include`` (fnmatch globs on the member path) selects the files to extract; links and
    folders are always checked, whether selected or not.
    """
    archive = Path(archive)
    if not archive.is_file():
        raise InputError(f"archive {archive} does not exist", fix="check the path")
    fmt, handle = _open(archive)
    with handle:
        members = _zip_members(archive, handle) if fmt == "zip" else _tar_members(archive, handle)
    if len(members) > max_members:
        raise _reject(archive, f"{len(members)} members (limit {max_members})",
                      fix="raise max_members if this archive is trusted")
    seen: dict[str, Member] = {}
    links: set[str] = set()
    # every symlink as the extraction will leave it (the last member of a name wins): link targets
    # are resolved through all of them, whatever the order of the members
    symlinks = {m.name: m.target or "" for m in members if m.name and m.kind == "symlink"}
    folders: set[str] = set()  # folders made by the members so far (explicit, or parents of a member)
    for m in members:
        if not m.name:
            continue
        parents = m.name.split("/")[:-1]
        for i in range(len(parents)):
            if "/".join(parents[:i + 1]) in links:
                raise _reject(archive, f"member {m.name!r} lies below a link member ({'/'.join(parents[:i + 1])!r})")
            above = seen.get("/".join(parents[:i + 1]))
            if above is not None and above.kind != "dir":
                raise _reject(archive, f"member {m.name!r} lies below the file member {above.name!r}")
        if m.kind in ("file", "hardlink") and m.name in folders:
            raise _reject(archive, f"member {m.name!r} replaces a folder of the archive (other members lie in it)")
        if m.kind == "dir" and m.name in seen and seen[m.name].kind != "dir":
            raise _reject(archive, f"folder member {m.name!r} replaces a file member of the same name")
        if m.kind == "symlink":
            if not _link_stays_inside(m.name, m.target or "", symlinks):
                raise _reject(archive, f"symlink {m.name!r} -> {m.target!r} points outside the archive folder "
                              "(resolved through the archive's links) or loops")
            if m.name in folders:
                raise _reject(archive, f"symlink {m.name!r} replaces a folder of the archive (other members lie "
                              "in it)")
            links.add(m.name)
        elif m.kind == "hardlink":
            tgt = seen.get(m.target or "")
            if tgt is None or tgt.kind != "file":
                raise _reject(archive, f"hard link {m.name!r} -> {m.target!r} does not point to an earlier file "
                              "member of the archive")
            m = Member(m.name, "hardlink", tgt.size, m.target)
            links.add(m.name)
        if m.name in links and m.kind not in ("symlink", "hardlink"):
            raise _reject(archive, f"member {m.name!r} replaces a link member of the same name")
        folders.update("/".join(parents[:i + 1]) for i in range(len(parents)))
        if m.kind == "dir":
            folders.add(m.name)
        seen[m.name] = m
    kept_names = {m.name for m in members if m.name and _selected(m, include)}
    kept_names |= {m.target for m in members if m.kind == "hardlink" and m.name in kept_names}
    kept = [seen[m.name] if m.kind == "hardlink" else m for m in members if m.name in kept_names]
    occurrences: dict[str, int] = {}
    for m in kept:
        occurrences[m.name] = occurrences.get(m.name, 0) + 1
    last = {m.name: m for m in kept}
    total = sum(m.size for m in last.values() if m.kind in ("file", "hardlink"))
    if total > max_bytes:
        raise _reject(archive, f"declares {human_bytes(total)} of content (limit {human_bytes(max_bytes)})",
                      fix="raise max_bytes if this archive is trusted")
    return ExtractionPlan(archive=archive, format=fmt, members=tuple(kept), total_bytes=total,
                          occurrences=occurrences)


def _selected(m: Member, include: list[str] | None) -> bool:
    if not include or m.kind == "dir":
        return True
    return any(fnmatch.fnmatch(m.name, pat) or fnmatch.fnmatch(posixpath.basename(m.name), pat) for pat in include)


def _inside(root: Path, path: Path) -> bool:
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def _copy_limited(src, dst_path: Path, limit: int, archive: Path, name: str) -> int:
    written = 0
    with open(dst_path, "xb") as dst:
        while True:
            buf = src.read(_COPY_BUFFER)
            if not buf:
                break
            written += len(buf)
            if written > limit:
                raise _reject(archive, f"member {name!r} holds more bytes than its header declares ({limit})")
            dst.write(buf)
        dst.flush()
        os.fsync(dst.fileno())
    return written


def extract_archive(archive: str | os.PathLike[str], *, out: str | os.PathLike[str],
                    include: list[str] | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                    max_members: int = DEFAULT_MAX_MEMBERS) -> ExtractResult:
    """Extract ``archive`` into ``out`` safely and atomically.

    Everything is checked first (:func:`plan_extraction`, disk space). Extraction goes to a
    ``.tmp-`` folder beside ``out``; on success it is renamed to ``out`` (or, if ``out`` already
    exists, its top-level entries are moved in, refusing to overwrite anything). On any error the
    temporary folder is removed and ``out`` is untouched.
    """
    plan = plan_extraction(archive, include=include, max_bytes=max_bytes, max_members=max_members)
    archive = plan.archive
    out = Path(out)
    check_disk_space(out.parent if not out.exists() else out, plan.total_bytes, what=f"extracting {archive.name}")
    if out.exists() and not out.is_dir():
        raise InputError(f"output {out} exists and is not a folder", fix="choose another --out")
    if out.is_dir():
        clash = sorted({m.name.split("/")[0] for m in plan.members} & {p.name for p in out.iterdir()})
        if clash:
            raise InputError(f"output folder {out} already holds {', '.join(clash[:5])}",
                             expected="an empty or new output folder",
                             fix="remove those entries or choose another --out")
    written: list[str] = []
    with atomic_dir(out, merge=True) as tmp:
        _extract_into(plan, tmp, written)
    return ExtractResult(archive=archive, out=out, files=tuple(out / n for n in written),
                         total_bytes=plan.total_bytes)


def _extract_into(plan: ExtractionPlan, root: Path, written: list[str]) -> None:
    os.chmod(root, 0o755)
    fmt, handle = _open(plan.archive)
    wanted = {m.name: m for m in plan.members}  # the last occurrence of each name
    seen: dict[str, int] = {}
    with handle:
        if fmt == "zip":
            items = ((info.filename, info) for info in handle.infolist())
        else:
            items = ((info.name, info) for info in handle)
        for raw, info in items:
            name = _safe_name(plan.archive, raw)
            m = wanted.get(name)
            if m is None:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] < plan.occurrences.get(name, 1):
                continue  # a later member of the same name replaces this one: extract only that one
            dest = root / name
            if not _inside(root, dest.parent if m.kind != "dir" else dest):
                raise _reject(plan.archive, f"member {raw!r} would be written outside the folder")
            if m.kind == "dir":
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.is_symlink() or dest.exists():
                if dest.is_dir() and not dest.is_symlink():
                    raise _reject(plan.archive, f"member {raw!r} replaces a folder of the same name")
                dest.unlink()
                if name in written:
                    written.remove(name)
            if m.kind == "symlink":
                os.symlink(m.target, dest)
            elif m.kind == "hardlink":
                src = root / (m.target or "")
                if not src.is_file() or src.is_symlink() or not _inside(root, src):
                    raise _reject(plan.archive, f"hard link {raw!r} -> {m.target!r} has no extracted target")
                shutil.copyfile(src, dest)  # a copy, never a link that could alias outside files
                written.append(name)
            else:
                stream = handle.open(info) if fmt == "zip" else handle.extractfile(info)
                with stream:
                    _copy_limited(stream, dest, m.size, plan.archive, raw)
                os.chmod(dest, 0o644)
                written.append(name)
