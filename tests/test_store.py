"""Artifact store: keys, hits, damaged entries, atomicity, cross-process locking, gc."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import pytest

from pipeline_lib.errors import StoreError
from pipeline_lib.store import KeyLock, Store


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


# --- manifests of the wrong shape are damaged entries, never crashes ------------------------------

def _manifest_variants(good: dict) -> dict[str, object]:
    import copy

    def with_(**kw):
        m = copy.deepcopy(good)
        m.update(kw)
        return m

    first = next(iter(good["outputs"]))
    return {
        "a list": [good],
        "outputs empty": with_(outputs={}),
        "outputs missing": {k: v for k, v in good.items() if k != "outputs"},
        "outputs a list": with_(outputs=[first]),
        "output without sha256": with_(outputs={first: {"size": 1}}),
        "output escaping": with_(outputs={"../../etc/passwd": good["outputs"][first]}),
        "output absolute": with_(outputs={"/etc/passwd": good["outputs"][first]}),
        "size a string": with_(outputs={first: {**good["outputs"][first], "size": "9"}}),
        "inputs a string": with_(inputs="x"),
        "created missing": {k: v for k, v in good.items() if k != "created"},
        "key of another entry": with_(key="0" * 64),
        "meta a list": with_(meta=[1]),
        "not JSON": "{ not json",
    }


def test_wrong_shape_manifests_are_damaged_not_crashes(tmp_path, capsys, monkeypatch):
    import json

    from flows.cli.main import main

    monkeypatch.setenv("ZHLLAMA_HOME", str(tmp_path))
    store = Store()
    e = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    good = json.loads((e.path / "manifest.json").read_text())
    for name, bad in _manifest_variants(good).items():
        m = e.path / "manifest.json"
        m.chmod(0o644)
        m.write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert store.get(e.key) is None, name
        assert store.entries() == [] and store.damaged()[0][0] == e.key, name
        assert "damaged manifest" in store.damaged()[0][1], name
        for cmd in (["cache", "ls"], ["cache", "ls", "--verify"], ["cache", "du"], ["cache", "gc", "--dry-run"]):
            assert main(cmd) == 0, (name, cmd)
        out = capsys.readouterr().out
        assert "1 damaged entry not listed" in out and "would remove damaged manifest" in out, name
    assert main(["cache", "gc"]) == 0
    assert "removed damaged manifest" in capsys.readouterr().out
    assert not e.path.exists()
    again = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    assert not again.cached and store.get(again.key) is not None


# --- links and special files: refused, never followed ---------------------------------------------

def test_producer_leaving_a_link_is_refused_and_nothing_is_followed(tmp_path):
    store = Store(tmp_path / "store")
    private = tmp_path / "private.key"
    private.write_text("secret")
    private.chmod(0o600)

    def links_out(d):
        (d / "model.gguf").write_bytes(b"GGUF")
        os.symlink(private, d / "leak")
        os.symlink(tmp_path, d / "dirlink")

    with pytest.raises(StoreError, match="leak in its output, which is a symbolic link"):
        store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=links_out)
    assert (private.stat().st_mode & 0o777) == 0o600 and private.read_text() == "secret"
    assert store.entries() == [] and list(store.artifacts.iterdir()) == []

    def fifo(d):
        (d / "model.gguf").write_bytes(b"GGUF")
        os.mkfifo(d / "pipe")

    with pytest.raises(StoreError, match="not a regular file"):  # and no hang on open()
        store.get_or_produce("q", version="1", inputs={"x": "2"}, produce=fifo)


def test_output_swapped_for_a_link_is_damaged_and_gc_does_not_chmod_through_it(tmp_path):
    store = Store(tmp_path / "store")
    e = store.get_or_produce("q", version="1", inputs={"x": "1"}, produce=_produce_files)
    f = e.file("model.gguf")
    copy = tmp_path / "same-content.gguf"
    copy.write_bytes(f.read_bytes())
    copy.chmod(0o600)
    f.chmod(0o644)
    f.unlink()
    os.symlink(copy, f)  # same bytes, but a link: never an intact entry
    assert store.problems(e) == ["model.gguf: not a regular file"]
    assert store.get(e.key) is None
    assert any("damaged" in r for r in store.gc())
    assert (copy.stat().st_mode & 0o777) == 0o600 and copy.exists()


def test_planted_lock_link_is_not_followed(tmp_path):
    store = Store(tmp_path / "store")
    target = tmp_path / "victim"
    target.write_text("keep")
    store.locks.mkdir(parents=True)
    os.symlink(target, store.locks / f"{'a' * 64}.lock")
    with pytest.raises(OSError):
        store.lock("a" * 64).acquire()
    assert "stale lock" in " ".join(store.gc())
    assert target.read_text() == "keep" and not (store.locks / f"{'a' * 64}.lock").exists()


# --- locks: die with their process, removed by gc when nobody holds them ---------------------------

_HOLD = """
import sys, time
from pathlib import Path
from pipeline_lib.errors import StoreError
from pipeline_lib.store import KeyLock, Store
store = Store(sys.argv[1])
started, go = Path(sys.argv[2]), Path(sys.argv[3])
inp = store.get(sys.argv[4])

def produce(d):
    (d / "out.bin").write_bytes(b"x" * 1000)
    started.write_text("1")
    while not go.exists():
        time.sleep(0.02)
    return {}

e = store.get_or_produce("convert", version="1", inputs={"merge": "k"}, produce=produce, holding=(inp,))
print(e.key, e.cached)
"""


def _start_holder(tmp_path, store, inp_key):
    import subprocess
    import sys

    started, go = tmp_path / "started", tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(store.root), str(started), str(go), inp_key],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while not started.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline
        time.sleep(0.02)
    return proc, go


def test_gc_all_during_a_running_produce(tmp_path, capsys, monkeypatch):
    """gc --all while another process produces an entry (reading an input it holds): neither side
    fails, the producer keeps its lock and its input, its entry commits intact."""
    from flows.cli.main import main

    monkeypatch.setenv("ZHLLAMA_HOME", str(tmp_path / "store"))
    store = Store()
    inp = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    other = store.get_or_produce("tokenizer", version="1", inputs={"x": "2"}, produce=_produce_files)
    proc, go = _start_holder(tmp_path, store, inp.key)
    try:
        running_lock = [p for p in store.locks.iterdir() if p.suffix == ".lock" and p.stem not in (inp.key, other.key)]
        assert len(running_lock) == 1
        assert main(["cache", "gc", "--all"]) == 0
        out = capsys.readouterr().out
        assert f"requested {other.key[:12]}" in out  # what nobody uses goes
        assert store.get(inp.key) is not None  # held by the running stage: kept
        assert running_lock[0].exists()  # the running one keeps its lock
        assert [p for p in store.artifacts.iterdir() if p.name.startswith(".tmp-")]  # and its temporary
    finally:
        go.write_text("1")
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    key, cached = stdout.split()
    assert cached == "False" and store.get(key) is not None
    assert main(["cache", "gc", "--all"]) == 0
    assert store.entries() == [] and list(store.locks.iterdir()) == []


def test_killed_holder_frees_its_lock_and_gc_removes_the_file(tmp_path):
    import signal

    store = Store(tmp_path / "store")
    inp = store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=_produce_files)
    proc, _ = _start_holder(tmp_path, store, inp.key)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    locks = sorted(p.name for p in store.locks.iterdir())
    assert locks  # the files stay behind ...
    for name in locks:  # ... but nobody holds them: no wait
        with KeyLock(store.locks / name, timeout=0):
            pass
    removed = store.gc()
    assert any(r.startswith("leftover .tmp-") for r in removed)
    assert sum(r.startswith("stale lock") for r in removed) >= len(locks)
    assert list(store.locks.iterdir()) == [] and not [p for p in store.artifacts.iterdir() if p.name != inp.key]


def test_lock_file_removed_while_waiting_is_relocked(tmp_path):
    """A waiter that got the lock on a file gc removed meanwhile locks the new file instead."""
    import threading

    path = tmp_path / "k.lock"
    first = KeyLock(path).acquire()
    got = []
    waiter = threading.Thread(target=lambda: got.append(KeyLock(path, timeout=10).acquire()))
    waiter.start()
    time.sleep(0.2)
    path.unlink()  # as gc would (while the lock is held)
    third = KeyLock(path, timeout=0).acquire()  # a newcomer locks the new file
    first.release()
    time.sleep(0.3)
    assert not got  # the waiter did not take the old, unlinked file: the newcomer holds the lock
    third.release()
    waiter.join(10)
    assert got and os.fstat(got[0]._fd).st_ino == os.stat(path).st_ino
    got[0].release()
