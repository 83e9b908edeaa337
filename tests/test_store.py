"""Artifact store: keys, hits, damaged entries, atomicity, cross-process locking, gc."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from pipeline_lib.store import Store


def _produce_files(d: Path) -> dict:
    (d / "model.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    (d / "sub").mkdir()
    (d / "sub" / "report.json").write_text("{}")
    return {"note": "ok"}


def test_key_depends_on_stage_version_inputs_and_params():
    k = Store.key("merge", version="1", inputs={"base": "aa", "lora": "bb"}, params={"dtype": "float16"})
    assert k == Store.key("merge", version="1", inputs={"lora": "bb", "base": "aa"}, params={"dtype": "float16"})
    others = {
        Store.key("convert", version="1", inputs={"base": "aa", "lora": "bb"}, params={"dtype": "float16"}),
        Store.key("merge", version="2", inputs={"base": "aa", "lora": "bb"}, params={"dtype": "float16"}),
        Store.key("merge", version="1", inputs={"base": "aa", "lora": "cc"}, params={"dtype": "float16"}),
        Store.key("merge", version="1", inputs={"base": "aa", "lora": "bb"}, params={"dtype": "bfloat16"}),
    }
    assert k not in others and len(others) == 4


def test_produce_then_hit_with_manifest(tmp_path):
    store = Store(tmp_path)
    calls = []

    def produce(d):
        calls.append(1)
        return _produce_files(d)

    e = store.get_or_produce("convert", version="1", inputs={"x": "1"}, params={"t": "f16"}, produce=produce)
    assert not e.cached and set(e.outputs) == {"model.gguf", "sub/report.json"}
    assert e.meta == {"note": "ok"} and "produce_s" in e.timings
    assert e.file("model.gguf").read_bytes().startswith(b"GGUF")
    assert (e.path / "manifest.json").is_file()
    again = store.get_or_produce("convert", version="1", inputs={"x": "1"}, params={"t": "f16"}, produce=produce)
    assert again.cached and again.key == e.key and len(calls) == 1


@pytest.mark.parametrize("damage", ["delete", "alter", "truncate"])
def test_missing_or_altered_output_is_never_a_hit(tmp_path, damage):
    store = Store(tmp_path)
    e = store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=_produce_files)
    f = e.file("model.gguf")
    f.chmod(0o644)
    if damage == "delete":
        f.unlink()
    elif damage == "alter":  # same size, different bytes
        data = bytearray(f.read_bytes())
        data[10] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        f.write_bytes(f.read_bytes()[:-1])
    assert store.get(e.key) is None
    rebuilt = store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=_produce_files)
    assert not rebuilt.cached and store.get(e.key) is not None


def test_large_file_altered_is_caught_by_mtime_or_verify(tmp_path, monkeypatch):
    import pipeline_lib.store as st

    monkeypatch.setattr(st, "REHASH_LIMIT", 10)  # treat every file as "large"
    store = Store(tmp_path)
    e = store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=_produce_files)
    f = e.file("model.gguf")
    f.chmod(0o644)
    stat = f.stat()
    data = bytearray(f.read_bytes())
    data[20] ^= 1
    f.write_bytes(bytes(data))
    assert store.get(e.key) is None  # mtime changed: re-hashed
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # a sneaky edit that restores mtime
    assert store.get(e.key, verify=True) is None


def test_failed_producer_leaves_nothing(tmp_path):
    store = Store(tmp_path)

    def boom(d):
        (d / "half.gguf").write_bytes(b"partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=boom)
    assert store.entries() == []
    assert [p for p in (tmp_path / "artifacts").iterdir()] == []


def _racer(root: str, out: str, start: float) -> None:
    while time.time() < start:
        time.sleep(0.001)
    store = Store(root)

    def produce(d):
        with open(out, "a") as fh:  # count how many times the work really ran
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        return _produce_files(d)

    e = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=produce)
    with open(out + ".keys", "a") as fh:
        fh.write(f"{e.key} {e.cached}\n")


def test_two_processes_compute_one_key_once(tmp_path):
    counter = tmp_path / "count"
    ctx = mp.get_context("spawn")
    start = time.time() + 2.0
    procs = [ctx.Process(target=_racer, args=(str(tmp_path / "store"), str(counter), start)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1
    keys = Path(str(counter) + ".keys").read_text().split("\n")[:2]
    assert len({k.split()[0] for k in keys}) == 1
    assert sorted(k.split()[1] for k in keys) == ["False", "True"]


def test_gc_removes_damaged_and_leftovers_and_requested(tmp_path):
    store = Store(tmp_path)
    a = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    b = store.get_or_produce("convert", version="1", inputs={"x": "2"}, produce=_produce_files)
    leftover = tmp_path / "artifacts" / f".tmp-{'f' * 64}.abc"
    leftover.mkdir()
    f = b.file("model.gguf")
    f.chmod(0o644)
    f.unlink()
    assert store.gc(dry_run=True) and leftover.exists()
    removed = store.gc()
    assert any("leftover" in r for r in removed) and any("damaged" in r for r in removed)
    assert [e.key for e in store.entries()] == [a.key]
    assert store.du() == {"merge": a.size}
    store.gc(everything=True)
    assert store.entries() == []


def test_cache_cli(tmp_path, capsys, monkeypatch):
    from flows.cli.main import main

    monkeypatch.setenv("ZHLLAMA_HOME", str(tmp_path))
    Store().get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    assert main(["cache", "ls", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "merge" in out and "ok" in out and "1 entries" in out
    assert main(["cache", "du"]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["cache", "gc", "--all"]) == 0
    assert "1 item(s) removed" in capsys.readouterr().out
