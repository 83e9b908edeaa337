"""Publishing a build: staged beside the folder, swapped in at once; the previous build survives any failure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline_lib.pipeline import publishing as publish_mod
from pipeline_lib.pipeline.publishing import publish
from pipeline_lib.store import Store


def _entries(store: Store, tag: str, n: int = 3) -> dict:
    out = {}
    for i in range(n):
        def produce(tmp, i=i):
            (tmp / f"f{i}.bin").write_bytes(f"{tag}-{i}".encode() * 100)

        out[f"out{i}.bin"] = store.get_or_produce("report", version="t", inputs={"i": f"{tag}{i}"}, produce=produce)

    def folder(tmp):
        (tmp / "tokenizer").mkdir()
        (tmp / "tokenizer" / "tokenizer.model").write_bytes(tag.encode())
        (tmp / "check.json").write_text("{}")

    out["tokenizer/"] = store.get_or_produce("report", version="t", inputs={"dir": tag}, produce=folder)
    return out


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_publish_writes_every_entry_and_the_lock(tmp_path):
    store = Store(tmp_path / "store")
    out = tmp_path / "builds" / "m"
    paths = publish(_entries(store, "v1"), out, lock={"model": "m"})
    assert sorted(p.name for p in paths) == ["build-lock.json", "out0.bin", "out1.bin", "out2.bin", "tokenizer"]
    assert (out / "out1.bin").read_bytes() == b"v1-1" * 100
    assert (out / "tokenizer" / "tokenizer.model").read_bytes() == b"v1" and not (out / "check.json").exists()
    lock = json.loads((out / "build-lock.json").read_text())
    assert lock["model"] == "m" and lock["published"] == ["out0.bin", "out1.bin", "out2.bin", "tokenizer/"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert oct((out / "out0.bin").stat().st_mode & 0o777) == "0o644"  # a copy the user may edit


def test_a_failure_while_publishing_keeps_the_previous_build_whole(tmp_path, monkeypatch):
    store = Store(tmp_path / "store")
    out = tmp_path / "m"
    publish(_entries(store, "v1"), out, lock={"v": 1})
    before = _snapshot(out)
    calls = {"n": 0}
    real = publish_mod._copy_file

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device (simulated)")
        real(src, dst)

    monkeypatch.setattr(publish_mod, "_copy_file", flaky)
    with pytest.raises(OSError, match="No space left"):
        publish(_entries(store, "v2"), out, lock={"v": 2})
    assert _snapshot(out) == before, "the previous build was changed by a failed publish"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_crash_between_the_two_renames_is_repaired_by_the_next_publish(tmp_path, monkeypatch):
    """Without RENAME_EXCHANGE the swap is two renames; a crash between them leaves the old build aside."""
    store = Store(tmp_path / "store")
    out = tmp_path / "m"
    publish(_entries(store, "v1"), out, lock={"v": 1})
    before = _snapshot(out)
    monkeypatch.setattr(publish_mod, "exchange", lambda a, b: False)
    real_rename = os.rename

    def crash_on_second(src, dst):
        if Path(dst) == out:
            raise KeyboardInterrupt("killed between the renames (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(publish_mod.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        publish(_entries(store, "v2"), out, lock={"v": 2})
    assert not out.exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".old-m.")]
    monkeypatch.setattr(publish_mod.os, "rename", real_rename)
    publish_mod._recover(out)  # what every publish does first
    assert _snapshot(out) == before
    publish(_entries(store, "v3"), out, lock={"v": 3})
    assert (out / "out0.bin").read_bytes() == b"v3-0" * 100
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_files_no_build_published_are_carried_over(tmp_path):
    store = Store(tmp_path / "store")
    out = tmp_path / "m"
    publish(_entries(store, "v1"), out, lock={"v": 1})
    (out / "NOTES.txt").write_text("my notes")
    (out / "mine").mkdir()
    (out / "mine" / "a.txt").write_text("a")
    entries = _entries(store, "v2")
    entries.pop("out2.bin")  # the new build no longer publishes out2.bin: it goes, the user's files stay
    publish(entries, out, lock={"v": 2})
    assert (out / "NOTES.txt").read_text() == "my notes" and (out / "mine" / "a.txt").read_text() == "a"
    assert not (out / "out2.bin").exists() and (out / "out0.bin").read_bytes() == b"v2-0" * 100


def test_an_output_folder_that_is_a_file_is_refused_before_any_copy(tmp_path):
    from pipeline_lib.errors import InputError

    target = tmp_path / "m"
    target.write_text("not a folder")
    with pytest.raises(InputError, match="is a file"):
        publish(_entries(Store(tmp_path / "store"), "v1"), target, lock={})
    assert target.read_text() == "not a folder"
