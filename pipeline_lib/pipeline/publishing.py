"""Publishing a build: every output lands in the output folder at once, or none does.

The folder is staged beside its final place (``.tmp-<name>.*``): each store entry is copied in
under its publish name, ``build-lock.json`` is written last, everything is fsynced, and then the
staged folder takes the place of the old one in one step (``renameat2(RENAME_EXCHANGE)`` where
the kernel and filesystem have it; else two renames, with the old folder kept aside and put
back by the next publish if a crash came in between). Until that step the previous build is
untouched; after it, the previous build is removed. Files in the folder that no build
published (a user's notes) are carried over. A lock beside the folder serializes publishers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from filelock import FileLock

from .. import killpoints
from ..errors import InputError
from ..fsutil import (
    TMP_PREFIX,
    exchange,
    fsync_dir,
    remove_path,
    sweep_leftovers,
    tmp_name,
    write_text_atomic,
)
from ..store import Entry

log = logging.getLogger(__name__)

LOCK_FILE = "build-lock.json"
_OLD_PREFIX = ".old-"


def _copy_entry(entry: Entry, dest_root: Path, name: str) -> Path:
    """Copy an entry into ``dest_root`` under ``name``: a single file, or a folder for ``name/``
    (only the entry's sub-folder of that name when it has one: ``tokenizer/``, ``hf/``, ``pth/``)."""
    files = sorted(entry.outputs)
    if len(files) == 1 and not name.endswith("/"):
        _copy_file(entry.path / files[0], dest_root / name)
        return dest_root / name
    prefix = name if any(rel.startswith(name) for rel in files) else ""
    target = dest_root / name.rstrip("/")
    for rel in files:
        if rel.startswith(prefix):
            _copy_file(entry.path / rel, target / rel[len(prefix):])
    return target


def _copy_file(src: Path, dst: Path) -> None:
    # A copy, not a hard link: store files are read-only and shared; a user editing a published
    # file must not corrupt the cache.
    killpoints.tick("publish")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)
    with open(dst, "rb") as fh:
        os.fsync(fh.fileno())


def _previously_published(folder: Path) -> set[str]:
    try:
        lock = json.loads((folder / LOCK_FILE).read_text(encoding="utf-8"))
        return {str(n).rstrip("/") for n in lock.get("published", [])} | {LOCK_FILE}
    except (OSError, ValueError, AttributeError):
        return {LOCK_FILE}


def _carry_foreign(old: Path, staged: Path, ours: set[str]) -> None:
    """Hard-link into ``staged`` what the old folder holds that no build published."""
    for p in old.iterdir():
        if p.name in ours or (staged / p.name).exists() or p.name.startswith((TMP_PREFIX, _OLD_PREFIX)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, staged / p.name, symlinks=True, copy_function=os.link)
        else:
            os.link(p, staged / p.name, follow_symlinks=False)


def _recover(out_dir: Path) -> None:
    """Undo what a publish killed midway left (called under the publish lock): put an old build
    back, drop old builds and staged folders of processes that are gone."""
    olds = sorted(out_dir.parent.glob(f"{_OLD_PREFIX}{out_dir.name}.*"))
    if olds and not out_dir.exists():
        log.warning("restoring the previous build %s (a publish was interrupted)", out_dir)
        os.rename(olds.pop(), out_dir)
    for p in olds:
        remove_path(p)
    sweep_leftovers(out_dir)


def publish(entries: Mapping[str, Entry], out_dir: str | os.PathLike[str], *,
            lock: Mapping[str, Any] | None = None) -> tuple[Path, ...]:
    """Publish ``{name: entry}`` (and ``build-lock.json``) into ``out_dir`` as one swap.

    Returns the published paths (under ``out_dir``). On any failure before the swap the old
    folder is untouched and the staged copy is removed.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"the output folder {out_dir} is a file", fix="choose another --out or remove the file")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.parent / f".{out_dir.name}.publish.lock")):
        _recover(out_dir)
        staged = out_dir.parent / tmp_name(out_dir.name)
        os.mkdir(staged, 0o777)  # the umask applies, as for any folder the user makes
        try:
            paths = [_copy_entry(entry, staged, name) for name, entry in entries.items()]
            names = [name for name in entries]
            if lock is not None:
                write_text_atomic(staged / LOCK_FILE, json.dumps({**lock, "published": names}, indent=2,
                                                                 ensure_ascii=False) + "\n")
                paths.append(staged / LOCK_FILE)
            if out_dir.is_dir():
                _carry_foreign(out_dir, staged, _previously_published(out_dir) | {n.rstrip("/") for n in names})
            for d in sorted({p.parent for p in staged.rglob("*")} | {staged}):
                fsync_dir(d)
            _swap_in(staged, out_dir)
        except BaseException:
            remove_path(staged)
            raise
    return tuple(out_dir / p.relative_to(staged) for p in paths)


def _swap_in(staged: Path, out_dir: Path) -> None:
    if not out_dir.exists():
        os.rename(staged, out_dir)
    elif exchange(staged, out_dir):
        remove_path(staged)  # now the previous build
    else:
        old = out_dir.parent / f"{_OLD_PREFIX}{out_dir.name}.{os.getpid()}"
        os.rename(out_dir, old)
        os.rename(staged, out_dir)  # a crash right before this line: _recover puts `old` back
        remove_path(old)
    fsync_dir(out_dir.parent)
