"""Atomic outputs, output claims, streaming digests and disk-space checks shared by every stage.

Contract: a finished path is only ever created by ``os.replace`` (or an atomic exchange) of a
fully written, fsynced temporary sibling, so a reader never mistakes a partial file for a finished
one. Temporary names are ``.tmp-<target name>.<random>@<host>:<pid>``: an interrupted run's
leftovers are easy to find, and :func:`claim_output` removes those whose process is gone.

Every command that writes goes through :func:`claim_output` first: it refuses an existing output
unless the caller allows overwriting, never lets an output be (or swallow) one of the command's
inputs, and checks that the path has the right kind (file or folder) before any work starts.

A full disk (ENOSPC, EDQUOT) while writing becomes a :class:`DiskSpaceError` naming the path and
the free space; the partial temporary is removed first, so nothing half-written stays behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import DiskSpaceError, InputError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


HASH_BUFFER = 8 * 1024 * 1024  # large reads: hashlib releases the GIL, so threads hash in parallel
_HOST = "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname())[:64] or "host"


# ------------------------------------------------------------------ temporary names and leftovers


def tmp_name(target_name: str) -> str:
    """A fresh temporary name for ``target_name`` that records which process owns it."""
    return f"{TMP_PREFIX}{target_name}.{secrets.token_hex(4)}@{_HOST}:{os.getpid()}"


def _owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary name made by :func:`tmp_name`, or None."""
    _, at, owner = name.rpartition("@")
    host, colon, pid = owner.rpartition(":")
    if not at or not colon or not pid.isdigit():
        return None
    return host, int(pid)


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree without following links (read-only files included)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return

    def onerror(func, p, exc_info):  # a read-only folder inside: make it writable (never through a link)
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(exc, FileNotFoundError):
            return
        parent = os.path.dirname(p)
        with contextlib.suppress(OSError):
            if stat.S_ISDIR(os.lstat(parent).st_mode):
                os.chmod(parent, 0o755)
            if stat.S_ISDIR(os.lstat(p).st_mode):
                os.chmod(p, 0o755)
        try:
            func(p)
        except FileNotFoundError:
            pass

    shutil.rmtree(path, onerror=onerror)


def sweep_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temporaries of ``target`` left by processes of this host that no longer run.

    Only names made by :func:`tmp_name` for exactly this target are considered; a temporary whose
    process is alive (or that another host made) is never touched. Returns what was removed.
    """
    target = Path(target)
    prefix = f"{target.name}."
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(TMP_PREFIX):
            continue
        while name.startswith(TMP_PREFIX):  # a temporary of a temporary (a staging folder's own)
            name = name[len(TMP_PREFIX):]
        if not name.startswith(prefix):
            continue
        owner = _owner(name[len(prefix):])
        if owner is None or owner[0] != _HOST or owner[1] == os.getpid() or pid_alive(owner[1]):
            continue
        remove_path(Path(entry.path))
        removed.append(Path(entry.path))
        log.info("removed %s, left by an interrupted run (pid %d)", entry.path, owner[1])
    return removed


# ------------------------------------------------------------------ full disk


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is a full disk or exhausted quota."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        # safetensors (Rust) and torch (C++) report it as text, not as an OSError
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


NEARLY_FULL = 1 << 20  # free bytes under which a failed write is taken for a full disk


def write_failed_for_space(exc: BaseException, where: str | os.PathLike[str]) -> int | None:
    """The free bytes at ``where`` when ``exc`` was caused by a full disk, else None.

    Recognises ENOSPC/EDQUOT (also as text, as safetensors and torch report them), and a write that
    failed some other way (torch's "file write failed", a C library's return code) while the
    filesystem has less than :data:`NEARLY_FULL` bytes free. Call it before removing the partial file.
    """
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        return None
    try:
        free = free_bytes(where)
    except OSError:
        return None
    if is_disk_full(exc) or (isinstance(exc, (OSError, RuntimeError)) and free < NEARLY_FULL):
        return free
    return None


def disk_full_error(path: str | os.PathLike[str], free: int | None = None) -> DiskSpaceError:
    free = free_bytes(path) if free is None else free
    return DiskSpaceError(
        f"the disk filled up while writing {path}: {human_bytes(free)} free on that filesystem "
        "(the partial output was removed)",
        fix="free some space, or choose an output folder on a larger disk, then run the command again")


# ------------------------------------------------------------------ claiming an output

OUTPUT_KINDS = ("file", "dir", "into")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _strictly_inside(child: Path, parent: Path) -> bool:
    c, p = os.path.realpath(child), os.path.realpath(parent)
    return c != p and c.startswith(p.rstrip(os.sep) + os.sep)


def input_paths(*sources) -> list[Path]:
    """The files and folders a stage reads, for :func:`claim_output`'s ``inputs``.

    Accepts paths and the library's source records (duck-typed, so this module imports no
    stage): a checkpoint (``path``, ``files``, ``tokenizer_dir``) gives its folder, weight files,
    JSON files and tokenizer files; a LoRA adapter (``path``, ``weights_file``) likewise; a merge
    plan (``base``, ``loras``) gives those of its base and every LoRA.
    """
    out: list[Path] = []

    def folder_files(folder) -> None:
        if folder is None:
            return
        folder = Path(folder)
        out.append(folder)
        for pattern in ("*.json", "tokenizer.model", "*.model"):
            out.extend(p for p in folder.glob(pattern) if p.is_file())

    for src in sources:
        if src is None:
            continue
        if isinstance(src, (str, os.PathLike)):
            out.append(Path(src))
            continue
        if hasattr(src, "base") and hasattr(src, "loras"):  # a merge plan
            out.extend(input_paths(src.base, *src.loras))
            folder_files(getattr(src, "tokenizer_dir", None))
            continue
        path = getattr(src, "path", None)
        if path is not None:
            folder_files(path)
        out.extend(Path(f) for f in getattr(src, "files", ()) or ())
        if getattr(src, "weights_file", None) is not None:
            out.append(Path(src.weights_file))
        folder_files(getattr(src, "tokenizer_dir", None))
    return list(dict.fromkeys(out))


def claim_output(path: str | os.PathLike[str], *, kind: str = "file", inputs: Iterable = (),
                 overwrite: bool = False, what: str = "output", flag: str = "--overwrite") -> Path:
    """Check that a command may write ``path``; call it before any work. Returns ``path`` as a Path.

    ``kind``: ``"file"`` (the output is this file), ``"dir"`` (the output is this folder, replaced
    as a whole) or ``"into"`` (a folder that receives outputs: it may exist, it is never replaced;
    claim each file written into it as well). Raises InputError, whatever ``overwrite`` says, when

    - the path has the wrong kind (a folder where a file is due, or the reverse), or cannot be
      created (a parent is a file, or not writable);
    - the output is one of ``inputs`` (same file or folder, also through a link or a hard link; a
      folder of kind ``"into"`` may be an input folder: the files written into it are claimed);
    - a ``"dir"`` output that exists would be replaced while an input lies inside it, or while it
      lies inside an input folder;

    and, unless ``overwrite``, when a ``"file"`` or ``"dir"`` output already exists. ``inputs``
    takes paths and source records (see :func:`input_paths`). Temporaries of this output left by
    an interrupted run (whose process is gone) are removed. ``what`` names the output in messages
    (e.g. ``"--out"``), ``flag`` the option that allows overwriting.
    """
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, not {kind!r}")
    raw = os.fspath(path)
    p = Path(raw).expanduser()
    folder_word = "folder" if kind != "file" else "file"
    if kind == "file" and raw.endswith(("/", os.sep)):
        raise InputError(f"{what} {raw} ends with '/', so it names a folder", expected="a file path",
                         fix=f"give a file name, e.g. {raw.rstrip('/')}/model.gguf")
    anchor = p.absolute().parent
    while not os.path.lexists(anchor) and anchor != anchor.parent:
        anchor = anchor.parent
    if not anchor.is_dir():
        raise InputError(f"cannot create {what} {p}: {anchor} is a file, not a folder",
                         fix=f"choose a {folder_word} path whose parent folders are folders")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {what} {p}: {anchor} is not writable",
                         fix="choose a folder you can write to")
    exists = os.path.lexists(p)
    if exists:
        if kind == "file" and p.is_dir():
            raise InputError(f"{what} {p} is a folder", expected="a file path (e.g. " f"{p / 'model.gguf'})",
                             fix=f"give the file to write, not a folder, as {what}")
        if kind != "file" and not p.is_dir():
            raise InputError(f"{what} {p} is a file", expected="a folder",
                             fix=f"give a folder as {what} (it is created if missing)")
    for src in input_paths(*inputs):
        if not os.path.lexists(src):
            continue
        if exists and kind != "into" and _same(p, src):  # ("into": its files are claimed one by one)
            raise InputError(f"{what} {p} is an input of this command ({src})",
                             expected="an output path apart from every input",
                             fix=f"choose another {what}; an output never replaces its own input")
        if kind == "dir" and exists:
            if _strictly_inside(src, p):
                raise InputError(f"{what} {p} holds an input of this command ({src}); replacing it would "
                                 "delete that input", expected="an output folder apart from every input",
                                 fix=f"choose another {what}")
            if _strictly_inside(p, src):
                raise InputError(f"{what} {p} lies inside the input folder {src}; replacing it would change "
                                 "that input", expected="an output folder outside every input folder",
                                 fix=f"choose another {what}")
    if exists and kind != "into" and not overwrite:
        raise InputError(f"{what} {p} already exists",
                         expected=f"a {folder_word} that does not exist yet",
                         fix=f"choose another {what}, or add {flag} to replace it")
    sweep_leftovers(p)
    return p


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
    tmp_path = target.with_name(tmp_name(target.name))
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # umask applies
    os.close(fd)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        free = write_failed_for_space(exc, target.parent)
        tmp_path.unlink(missing_ok=True)
        if free is not None:
            raise disk_full_error(target, free) from None
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
    tmp = target.with_name(tmp_name(target.name))
    os.mkdir(tmp, 0o777)  # umask applies
    try:
        yield tmp
        if target.is_dir() and merge:
            for entry in sorted(tmp.iterdir()):
                os.replace(entry, target / entry.name)
            tmp.rmdir()
        elif os.path.lexists(target):
            if not replace:
                raise FileExistsError(f"{target} already exists")
            if not exchange(tmp, target):  # no atomic exchange here: two renames, old kept until the end
                old = target.with_name(tmp_name(target.name))
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)  # put the previous version back
                    raise
                tmp = old
            remove_path(tmp)  # the previous version, now under the temporary name
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException as exc:
        free = write_failed_for_space(exc, target.parent)
        remove_path(tmp)
        if free is not None:
            raise disk_full_error(target, free) from None
        raise


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported.

    Replacing a folder this way never leaves a moment with neither version under the final name.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def sha256_file(path: str | os.PathLike[str], *, progress=None, buffer_size: int = HASH_BUFFER,
                follow_symlinks: bool = True) -> str:
    """Streaming SHA256 of a file. ``progress(nbytes)`` is called after each block if given.

    With ``follow_symlinks=False`` a link (or anything but a regular file) raises OSError
    instead of being read through.
    """
    h = hashlib.sha256()
    buf = bytearray(buffer_size)
    view = memoryview(buf)
    fd = os.open(path, os.O_RDONLY | (0 if follow_symlinks else os.O_NOFOLLOW))
    if not follow_symlinks and not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
    with open(fd, "rb", buffering=0) as fh:
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
