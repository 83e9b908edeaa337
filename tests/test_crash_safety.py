"""Kill-point harness: SIGKILL the real CLI at the k-th tensor / MiB / committed file, then check nothing is lost.

Each case runs a command in a child process (tests/_crash_harness.py) with ``ZHLLAMA_KILL_AT=KIND:K``
(pipeline_lib/killpoints.py), so the child dies as in a power cut: no cleanup runs. Then:

1. the child really died at that point (killed by SIGKILL, not finished);
2. no file under a final name is incomplete: every output that exists equals the uninterrupted
   run's bytes (so do the download cache's and the HF cache's finished files);
3. no stale lock: every lock file under the store and the HF cache can be taken at once;
4. the same command run again (with ``--overwrite`` where it applies) finishes without waiting and
   gives outputs byte-identical to an uninterrupted run;
5. temporaries are gone: the rerun removed those beside its outputs, and ``zhllama cache gc``
   removes the store's leftovers and its lock files.

A scenario is one row of ``SCENARIOS`` (how to run it, what it writes) and its kill points are rows
of ``KILL_POINTS``. The whole demo build is two scenarios: the plain executor (killed at the k-th
stage, or at the k-th file of the publish) and the Prefect executor against the session server
(killed at the k-th stage: its transaction locks must not outlive it either).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _crash_harness import Runner  # noqa: E402
from fakehub import FakeHub, FileServer  # noqa: E402

MiB = 1 << 20
HTTP_FILE = random.Random(1).randbytes(4 * MiB)  # 4 MiB: mib:1..4
HUB_FILE = random.Random(2).randbytes(12 * MiB)  # the hub client reads 10 MiB chunks: mib:1..10, then 11..12
HUB_REPO = "tester/crash-lora"
RERUN_LIMIT_S = 60  # "without waiting": a rerun that waited for a lock would hit this


@dataclass
class Ctx:
    """What the scenarios share: the tiny release, a float GGUF, the servers, the runner."""

    release: object
    f16: Path
    legacy_f16: Path  # ffn 768 = ceil(8*256/3 / 256) * 256: expressible in ggjt v3
    http: FileServer
    hub: FakeHub
    runner: Runner
    prefect_env: dict[str, str] = field(default_factory=dict)  # the session Prefect server, for build-prefect
    refs: dict[str, dict[str, bytes]] = field(default_factory=dict)  # scenario -> {relpath: bytes}


@dataclass(frozen=True)
class Scenario:
    name: str
    out: str  # the output path's name, in the test's folder
    argv: Callable[[Ctx, Path], list[str]]  # the command line, given the output path
    rerun: tuple[str, ...] = ("--overwrite",)  # added to the command line of the second run
    code: str | None = None  # instead of a command line: Python run in the child (given ARGV)
    env: Callable[[Ctx], dict[str, str]] = lambda ctx: {}
    in_store: bool = False  # its finished outputs are store entries ($ZHLLAMA_HOME/artifacts), not the output path
    whole: bool = False  # a folder output: it appears whole or not at all
    volatile: tuple[str, ...] = ()  # outputs that name this run's paths (lock, card): complete, not equal bytes


def _lora_args(rel) -> list[str]:
    return ["--base", str(rel.base_hf), "--lora", str(rel.llama_lora), "--lora", str(rel.alpaca_lora)]


STORE_CODE = """
from pipeline_lib.store import Store

def produce(d):
    for i in range(4):
        (d / f"part{i}.bin").write_bytes(bytes([i]) * 300_000)
    (d / "sub").mkdir()
    (d / "sub" / "index.json").write_text('{"parts": 4}')

print(Store().get_or_produce("crash-test", version="1", inputs={"x": "1"}, produce=produce).key)
"""

SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("download-http", "dl", lambda c, out: ["download", c.http.file_url("w.bin"), "--out", str(out),
                                              "--sha256", f"w.bin={hashlib.sha256(HTTP_FILE).hexdigest()}"]),
    Scenario("download-hub", "dl", lambda c, out: ["download", HUB_REPO, "--out", str(out)],
             env=lambda c: {"HF_ENDPOINT": c.hub.url}),
    Scenario("merge", "merged", lambda c, out: ["merge", *_lora_args(c.release), "--out", str(out)]),
    Scenario("convert", "model.gguf", lambda c, out: ["convert", *_lora_args(c.release), "--out", str(out)]),
    Scenario("convert-ggml", "model.bin", lambda c, out: ["convert", str(c.legacy_f16), "--format", "ggml", "--outtype", "q8_0",
                                             "--out", str(out)]),
    Scenario("quantize", "q", lambda c, out: ["quantize", str(c.f16), "--type", "q4_0", "--type", "q8_0",
                                         "--out-dir", str(out), "--threads", "1"]),
    Scenario("store-commit", "unused", lambda c, out: [], rerun=(), code=STORE_CODE, in_store=True),
    Scenario("build", "build", lambda c, out: ["build", "tiny-demo", "--no-prefect", "--no-eval", "--out", str(out)],
             rerun=(), whole=True, volatile=("build-lock.json", "README.md")),
    Scenario("build-prefect", "build", lambda c, out: ["build", "tiny-demo", "--no-eval", "--out", str(out)],
             rerun=(), whole=True, volatile=("build-lock.json", "README.md"), env=lambda c: dict(c.prefect_env)),
]}

# (scenario, kill point): sampled over each stage's events (the tiny model has 21 tensors, ~3.8 MB)
KILL_POINTS: list[tuple[str, str]] = [
    *[("download-http", f"mib:{k}") for k in (1, 2, 3)],
    *[("download-hub", f"mib:{k}") for k in (1, 11)],
    *[("merge", f"tensor:{k}") for k in (1, 4, 8, 12, 16, 21)], ("merge", "mib:1"), ("merge", "mib:3"),
    *[("convert", f"tensor:{k}") for k in (1, 5, 10, 15, 21)], ("convert", "mib:2"),
    *[("convert-ggml", f"tensor:{k}") for k in (3, 13)],
    *[("quantize", f"tensor:{k}") for k in (1, 11, 21, 22, 32, 42)],  # two types: 21 tensors each
    *[("store-commit", f"file:{k}") for k in (1, 2, 3, 5)],  # 5 output files
    # the demo build without evaluation: 11 stages, then 8 files published into the staged folder
    *[("build", f"stage:{k}") for k in (1, 5, 6, 8, 10, 11)], *[("build", f"publish:{k}") for k in (1, 4, 8)],
    *[("build-prefect", f"stage:{k}") for k in (2, 8, 11)],
]


def _out_for(scenario: str, root: Path) -> Path:
    return root / SCENARIOS[scenario].out


def _finals(scenario: str, out: Path, home: Path) -> Path:
    """The folder (or file) whose contents are this scenario's finished outputs."""
    return home / "artifacts" if SCENARIOS[scenario].in_store else out


def _snapshot(path: Path) -> dict[str, bytes]:
    """{relpath: bytes} of a file or a folder tree (manifests left out: they hold a timestamp)."""
    if path.is_file():
        return {path.name: path.read_bytes()}
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name != "manifest.json" and not any(x.startswith(".tmp-") for x in p.parts)}


def _temporaries(*roots: Path) -> list[Path]:
    found = []
    for root in roots:
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.name.startswith(".tmp-") or p.name.endswith(".incomplete")]
    return found


def _lock_files(home: Path, hf: Path) -> list[Path]:
    return [p for root in (home / "locks", home / "prefect" / "locks", hf) if root.is_dir() for p in root.rglob("*.lock")]


def _assert_locks_free(home: Path, hf: Path) -> None:
    for p in _lock_files(home, hf):
        fd = os.open(p, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: someone still holds it
        finally:
            os.close(fd)


def _comparable(scenario: str, snap: dict[str, bytes]) -> dict[str, bytes]:
    """A snapshot with the scenario's volatile files replaced by whether they are complete (JSON that
    parses; text that decodes and ends with its final newline)."""
    import json

    out = dict(snap)
    for rel in SCENARIOS[scenario].volatile:
        if rel in out:
            try:
                json.loads(out[rel]) if rel.endswith(".json") else out[rel].decode("utf-8")
                complete = rel.endswith(".json") or out[rel].endswith(b"\n")
            except ValueError:
                complete = False
            out[rel] = b"complete" if complete else b"INCOMPLETE"
    return out


def _assert_finished_files_complete(scenario: str, out: Path, home: Path, hf: Path, ref: dict[str, bytes]) -> None:
    got = _comparable(scenario, _snapshot(_finals(scenario, out, home)))
    for rel, data in got.items():
        assert rel in ref and data == ref[rel], f"{rel} exists under its final name but is not complete"
    if SCENARIOS[scenario].whole and got:  # a folder output appears whole or not at all
        assert set(got) == set(ref)
    cached = home / "downloads"
    for p in cached.rglob("*") if cached.is_dir() else []:
        if p.is_file() and p.name == "w.bin":
            assert p.read_bytes() == HTTP_FILE, "the download cache holds an incomplete file under its final name"
    for p in hf.rglob("blobs/*") if hf.is_dir() else []:
        if len(p.name) == 64 and not p.name.endswith(".incomplete"):
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"HF cache blob {p.name} is incomplete"


@pytest.fixture(scope="module")
def ctx(tiny_release, tmp_path_factory, prefect_server):
    work = tmp_path_factory.mktemp("crash")
    runner = Runner(work / "runs")
    rel = tiny_release
    with FileServer({"w.bin": HTTP_FILE}) as http, \
            FakeHub({HUB_REPO: {"adapter_model.bin": HUB_FILE, "adapter_config.json": b'{"r": 8}'}}) as hub:
        from dataclasses import replace

        from pipeline_lib import synthetic

        cfg = replace(rel.config, vocab_size=rel.alpaca_vocab, intermediate_size=768)
        legacy = synthetic.save_hf_base(synthetic.random_weights(cfg, seed=14), cfg, work / "legacy",
                                        tokenizer_dir=rel.tokenizers.chinese_alpaca_dir, shards=1)
        f16, legacy_f16 = work / "alpaca-plus.f16.gguf", work / "legacy.f16.gguf"
        for argv in (["convert", *_lora_args(rel), "--out", str(f16)], ["convert", str(legacy), "--out", str(legacy_f16)]):
            made = runner.run(argv, env={"ZHLLAMA_HOME": str(work / "h")})
            assert made.rc == 0, made.stderr
        c = Ctx(release=rel, f16=f16, legacy_f16=legacy_f16, http=http, hub=hub, runner=runner,
                prefect_env=dict(prefect_server.env))
        t0 = time.perf_counter()
        for name, sc in SCENARIOS.items():  # the uninterrupted runs: the bytes every rerun must equal
            root = work / "ref" / name
            home, out = root / "home", _out_for(name, root)
            r = runner.run(sc.argv(c, out), env={"ZHLLAMA_HOME": str(home), "HF_HOME": str(root / "hf"),
                                                 **sc.env(c)}, code=sc.code)
            assert r.rc == 0, (name, r.stderr)
            c.refs[name] = _comparable(name, _snapshot(_finals(name, out, home)))
            assert c.refs[name], name
        print(f"\nreference runs: {time.perf_counter() - t0:.1f}s")
        yield c
    runner.close()


def test_kill_points_cover_every_stage():
    assert len(KILL_POINTS) >= 30
    assert {s for s, _ in KILL_POINTS} == set(SCENARIOS)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    assert f"{len(KILL_POINTS)} kill points" in doc, "docs/reliability.md gives another kill-point count"


@pytest.mark.parametrize("scenario, kill_at", KILL_POINTS, ids=[f"{s}-{k}" for s, k in KILL_POINTS])
def test_killed_run_loses_nothing(ctx, tmp_path, scenario, kill_at):
    sc = SCENARIOS[scenario]
    home, hf = tmp_path / "home", tmp_path / "hf"
    out = _out_for(scenario, tmp_path)
    env = {"ZHLLAMA_HOME": str(home), "HF_HOME": str(hf), **sc.env(ctx)}
    argv = sc.argv(ctx, out)
    ref = ctx.refs[scenario]

    killed = ctx.runner.run(argv, env=env, kill_at=kill_at, code=sc.code)
    assert killed.killed, f"{scenario} was not killed at {kill_at} (rc {killed.rc}): {killed.stderr[-2000:]}"
    _assert_finished_files_complete(scenario, out, home, hf, ref)
    _assert_locks_free(home, hf)

    again = ctx.runner.run(argv + list(sc.rerun), env=env, code=sc.code)
    assert again.rc == 0, again.stderr[-3000:]
    assert again.seconds < RERUN_LIMIT_S
    assert _comparable(scenario, _snapshot(_finals(scenario, out, home))) == ref  # = an uninterrupted run
    leftovers = _temporaries(out.parent if not sc.in_store else tmp_path / "none", hf)
    assert leftovers == [], f"the rerun left temporaries of the killed run: {leftovers}"

    gc = ctx.runner.run(["cache", "gc"], env=env)
    assert gc.rc == 0, gc.stderr
    assert _temporaries(home) == [] and _lock_files(home, tmp_path / "no-hf") == []
    assert _comparable(scenario, _snapshot(_finals(scenario, out, home))) == ref  # gc removed leftovers only


def test_kill_points_parse():
    from pipeline_lib import killpoints

    assert killpoints.parse("tensor:7, mib:3") == {"tensor": 7, "mib": 3}
    for bad in ("tensor", "tensor:0", ":3", "mib:x"):
        with pytest.raises(ValueError):
            killpoints.parse(bad)


def test_ticks_are_free_when_unarmed(monkeypatch):
    from pipeline_lib import killpoints

    monkeypatch.delenv(killpoints.ENV, raising=False)
    t0 = time.perf_counter()
    for _ in range(20_000):  # ~40k ticks: well under a second even on a loaded machine
        killpoints.tick("tensor")
        killpoints.tick_bytes(4096)
    assert time.perf_counter() - t0 < 1.0
    assert not killpoints.armed()
