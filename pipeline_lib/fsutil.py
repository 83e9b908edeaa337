"""Atomic outputs, streaming digests and disk-space checks shared by every stage.

Contract: a finished path is only ever created by ``os.replace`` of a fully written, fsynced
temporary sibling, so a reader never mistakes a partial file for a finished one. Temporary
names start with ``.tmp-`` so an interrupted run's leftovers are easy to find and remove.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import DiskSpaceError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()
HASH_BUFFER = 8 * 1024 * 1024  # large reads: hashlib releases the GIL, so threads hash in parallel


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place.

    On an exception the temporary file is removed and ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; a finished file gets normal permissions
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(target: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temporary sibling of ``target`` for writing; rename it into place on success."""
    with atomic_path(target) as tmp, open(tmp, mode) as fh:
        yield fh
        fh.flush()


def write_bytes_atomic(target: str | os.PathLike[str], data: bytes) -> None:
    with atomic_write(target, "wb") as fh:
        fh.write(data)


def write_text_atomic(target: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(target, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, replace: bool = False, merge: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; rename it to ``target`` on success.

    Files written inside should still be fsynced by their writer (``atomic_write`` does it).
    If ``target`` exists it is an error unless ``replace`` is true, in which case the old
    directory is swapped out only after the new one is complete, or ``merge`` is true, in which
    case each top-level entry is renamed into it (the caller checks that none clashes).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + target.name + ".", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)
    try:
        yield tmp
        if target.is_dir() and merge:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, target / entry.name)
            tmp.rmdir()
        elif target.exists():
            if not replace:
                raise FileExistsError(f"{target} already exists")
            old = target.with_name(TMP_PREFIX + target.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike[str], *, progress=None, buffer_size: int = HASH_BUFFER) -> str:
    """Streaming SHA256 of a file. ``progress(nbytes)`` is called after each block if given."""
    h = hashlib.sha256()
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as fh:
        while True:
            n = fh.readinto(buf)
            if not n:
                break
            h.update(view[:n])
            if progress is not None:
                progress(n)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def free_bytes(path: str | os.PathLike[str]) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def check_disk_space(path: str | os.PathLike[str], needed: int, *, what: str, margin: float = 0.05) -> None:
    """Raise DiskSpaceError unless ``needed`` bytes (plus a margin) fit where ``path`` will be written."""
    free = free_bytes(path)
    want = int(needed * (1 + margin))
    if free < want:
        raise DiskSpaceError(
            f"not enough disk space for {what} at {path}: {human_bytes(free)} free",
            expected=f"at least {human_bytes(want)} ({human_bytes(needed)} plus {margin:.0%} margin)",
            fix="free some space, or choose an output folder on a larger disk",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def parse_size(text: str) -> int:
    """Parse '2GB', '500MB', '1.5GiB' or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    if unit not in units or not num:
        raise ValueError(f"cannot read size {text!r}; write it like 2GB, 500MB or 1.5GiB")
    return int(float(num) * units[unit])
