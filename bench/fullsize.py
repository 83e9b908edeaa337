"""Benchmark: the real build at the real 7B and 13B shapes, stage by stage, against the disk's own speed.

Usage::

    python bench/fullsize.py --size 7b  [--workdir DIR] [--layers N] [--seed 0] [--steps a,b] [--skip a,b]
    python bench/fullsize.py --size 13b [...]
    python bench/fullsize.py --report DIR/results-7b.json [DIR/results-13b.json] [--plot docs/benchmarks.png]

Inputs (``pipeline_lib.synthetic.make_sized_release``): a Chinese-Alpaca-Plus release at the real
widths (7B: hidden 4096, ffn 11008, 32 heads, 32 layers; 13B: 5120/13824/40/40), generated from
``--seed`` with tokenizers (32000 → 49953 → 49954 pieces, merged by the release's own procedure),
the base as huggyllama's two/three ``.bin`` shards in the 2023 layout, the LLaMA-Plus (r 8) and
Alpaca-Plus (r 64) LoRAs, ``chinese_sp.model`` and a ``SHA256SUMS`` table. Generated once into
``--workdir`` and reused (``--layers`` makes a smaller model of the same widths).

Steps (``--steps``/``--skip`` pick; every result lands in ``results-<size>.json`` as it is measured):

* ``floor``: the disk, in this run, on this filesystem: a file written and fsynced, read back cold
  (its pages dropped with ``POSIX_FADV_DONTNEED``), both buffered (what ``dd`` does) and with
  ``O_DIRECT`` (the device itself); measured at the start and again at the end (``floor-end``);
* ``sha256sum``: coreutils on the base shards, cold;
* ``peft``: PEFT ``merge_and_unload`` (bench/merge.py's recipe) on the same inputs, in a child
  killed if its resident set passes ``--peft-cap`` (then: "died of memory at N GB");
* ``build-hf``: ``run_build`` (the code path of ``zhllama build``) of a custom BuildSpec of the local
  sources with ``outputs=[hf]``: download, verify, tokenizer, merge → HF safetensors, official,
  fingerprint, publish — each stage measured;
* ``llama.cpp``: llama.cpp's ``convert_hf_to_gguf.py`` (llama-cpp-python 0.3.36's, via
  tests/_gguf_fixtures.py) on the merged checkpoint; ``convert-hf``: ``zhllama convert`` on the
  same checkpoint; their tensors are compared with the one-pass GGUF's (per-tensor fingerprints);
* ``before``: the same one-pass convert and merge with the code this work started from
  (``--before DIR``: a copy of that commit's tree), for the before/after table;
* ``build-gguf``: ``run_build`` with ``outputs=[gguf]``: one-pass GGUF f16 → q4_0 → evaluation
  (the defaults of EvalOptions); q8_0 and q4_K_M quantizations and the q8_0 evaluation are run
  with the stage functions on the store's f16 (``quantize-more``), because a build publishing f16
  plus three quantizations (a copy of each in the build folder) does not fit this disk with a local
  source also copied into the store: ``preflight-full`` records the build's own refusal;
* 13B (``--size 13b``): ``one-pass`` (``convert(plan_merge(...))``, the gguf stage's call) and
  ``quantize`` q4_0, each in a child, plus the floors.

Per stage: wall, user and system CPU, peak RSS (VmHWM, reset per stage with ``/proc/self/clear_refs``)
with its anonymous and file-backed parts (sampled), bytes read and written at the block layer and by
system calls (``/proc/self/io``), page faults, and how busy the machine was meanwhile (other
processes' CPU seconds from ``/proc/stat``, load average). The floor of
a stage is its input bytes / cold read speed + its output bytes / fsynced write speed. The build runs
as a user runs it (a stage may find what the previous one wrote still cached; ``--cold`` drops every
file of the run from the page cache before each stage); the alternatives and the before/after pairs
each start cold.

Disk: outputs are removed as soon as measured (``df`` is checked before each big write; a step that
would not fit is skipped and says so); every run starts from an empty store; the generated inputs
are kept for the next run (``--clean`` removes them). Never both sizes at once: ``--size 13b``
removes the 7B set first unless ``--keep-other``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
TREE_ENV = "ZHLLAMA_BENCH_TREE"  # a child runs the code of this tree instead (the "before" column)
sys.path.insert(0, str(BENCH))
sys.path.insert(0, os.environ.get(TREE_ENV) or str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # _gguf_fixtures: llama.cpp's reference converter

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

GB = 10**9
GiB = 2**30
STEPS = {
    "7b": ("floor", "sha256sum", "peft", "build-hf", "llama.cpp", "convert-hf", "before", "preflight-full",
           "build-gguf", "quantize-more", "floor-end"),
    "13b": ("floor", "one-pass", "quantize", "before", "floor-end"),
}
STEPS["tiny"] = STEPS["7b"]
QUANTS = ("q4_0", "q8_0", "q4_K_M")


# ------------------------------------------------------------------ machine and quietness


def proc_stat() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine (all CPUs), from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [int(x) for x in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals[:8]) - idle, sum(vals[:8])


def loadavg() -> list[float]:
    return [float(x) for x in open("/proc/loadavg").read().split()[:3]]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "uptime": subprocess.run(["uptime"], capture_output=True,
                                                                          text=True).stdout.strip()}


class Quiet:
    """How busy the machine was during a measurement: load average at both ends, and CPU seconds
    spent by every process but the measured one (machine busy time minus its own CPU time)."""

    def __init__(self) -> None:
        self.load0, self.stat0, self.t0 = loadavg(), proc_stat(), time.perf_counter()

    def done(self, own_cpu_s: float) -> dict:
        busy1, _ = proc_stat()
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self.t0
        others = max((busy1 - self.stat0[0]) / hz - own_cpu_s, 0.0)
        return {"load_start": self.load0, "load_end": loadavg(), "others_cpu_s": round(others, 1),
                "others_cores": round(others / wall, 2) if wall > 0 else 0.0}


# ------------------------------------------------------------------ disk


def du(path: Path) -> int:
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def free(path: Path) -> int:
    p = path
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def drop_tree(*roots: Path) -> None:
    """Flush everything, then drop every file under ``roots`` from the page cache (cold start)."""
    os.sync()
    for root in roots:
        if not root.exists():
            continue
        for p in [root] if root.is_file() else root.rglob("*"):
            if p.is_file() and not p.is_symlink():
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def rm(*paths: Path) -> None:
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            for sub in p.rglob("*"):  # store entries are read-only
                try:
                    sub.chmod(0o755 if sub.is_dir() else 0o644)
                except OSError:
                    pass
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists() or p.is_symlink():
            p.unlink()


# ------------------------------------------------------------------ the I/O floor


def measure_floor(where: Path, nbytes: int) -> dict:
    """Write ``nbytes`` of random data and fsync; read it cold; buffered (dd) and O_DIRECT (the device)."""
    import mmap

    import numpy as np

    chunk = 64 << 20
    n = max(nbytes // chunk, 1)
    data = np.random.default_rng(0).bytes(chunk + 4096 * n)
    buf = mmap.mmap(-1, chunk)  # page-aligned: O_DIRECT needs it
    where.mkdir(parents=True, exist_ok=True)
    out = {"bytes": n * chunk}

    def fill(i: int) -> memoryview:  # a different 4 KiB-shifted window per chunk: no two chunks alike
        buf.seek(0)
        buf.write(data[i * 4096:i * 4096 + chunk])
        return memoryview(buf)

    for mode, flags in (("buffered", 0), ("direct", os.O_DIRECT)):
        path = where / f".floor-{mode}.bin"
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flags, 0o644)
        try:
            for i in range(n):
                os.write(fd, fill(i))
            os.fsync(fd)
        finally:
            os.close(fd)
        out[f"write_{mode}_Bps"] = n * chunk / (time.perf_counter() - t0)
        drop_tree(path)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY | flags)
        try:
            if not flags:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            got = 0
            while (k := os.readv(fd, [buf])) > 0:
                got += k
        finally:
            os.close(fd)
        out[f"read_{mode}_Bps"] = got / (time.perf_counter() - t0)
        path.unlink()
    return out


# ------------------------------------------------------------------ children


def env_for(ctx: dict) -> dict:
    env = dict(os.environ, ZHLLAMA_PROGRESS="0", ZHLLAMA_HOME=str(ctx["store"]), TRANSFORMERS_VERBOSITY="error",
               PYTHONWARNINGS="ignore", PYTHONPATH=str(ROOT))
    return env


def measured(cmd: list[str], ctx: dict, *, env: dict | None = None, rss_limit: int | None = None,
             inputs: tuple[Path, ...] = (), outputs: tuple[Path, ...] = ()) -> dict:
    """Run a child cold (its inputs dropped from the page cache first) and measure it."""
    drop_tree(*inputs)
    q = Quiet()
    m = run_measured(cmd, env=env or env_for(ctx), cwd=ROOT, check=False, rss_limit=rss_limit)
    in_b, out_b = sum(du(p) for p in inputs), sum(du(p) for p in outputs)
    row = {"wall_s": m.wall_s, "user_s": m.user_s, "sys_s": m.sys_s, "peak_rss": m.rss_bytes,
           "peak_anon": m.anon_bytes, "peak_file": m.file_bytes,
           "read_bytes": m.read_bytes, "write_bytes": m.write_bytes, "minflt": m.minflt, "majflt": m.majflt,
           "in_bytes": in_b, "out_bytes": out_b, "rc": m.returncode, "quiet": q.done(m.user_s + m.sys_s)}
    if m.killed_for_memory:
        row["killed_for_memory"] = True
        row["rss_seen"] = m.rss_seen_bytes
    if m.returncode:
        row["error"] = (m.stderr.strip().splitlines() or ["?"])[-1][-400:]
    return row


# ------------------------------------------------------------------ the build child (per-stage monitor)


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _io() -> dict[str, int]:
    with open("/proc/self/io") as fh:
        return {k: int(v) for k, v in (line.split(":") for line in fh)}


def _snap() -> dict:
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    rc = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"t": time.perf_counter(), "user": ru.ru_utime + rc.ru_utime, "sys": ru.ru_stime + rc.ru_stime,
            "minflt": ru.ru_minflt, "majflt": ru.ru_majflt, "io": _io(), "stat": proc_stat()[0], "load": loadavg()}


class StageMonitor:
    """A build Reporter that measures every stage window (from the previous stage's end to its own).

    Between stages (outside the windows) it can make every stage start cold (flush, drop caches) and
    free disk the rest of the build no longer needs (``free_after``: node id -> paths / store stages).
    """

    def __init__(self, *, cold_roots: list[Path], free_after: dict[str, dict], store_root: Path) -> None:
        self.rows: list[dict] = []
        self.cold_roots, self.free_after, self.store_root = cold_roots, free_after, store_root
        self._stop = threading.Event()
        self._peaks = {"RssAnon": 0, "RssFile": 0}
        threading.Thread(target=self._sample, daemon=True).start()
        self._begin()

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            st = _status()
            for k in self._peaks:
                self._peaks[k] = max(self._peaks[k], st.get(k, 0))

    def _begin(self) -> None:
        drop_tree(*self.cold_roots)
        with open("/proc/self/clear_refs", "w") as fh:  # peak RSS of this stage only
            fh.write("5")
        self._peaks = {"RssAnon": 0, "RssFile": 0}
        self.t0 = _snap()

    def progress(self, label: str, fraction: float, text: str) -> None:  # noqa: D102 - Reporter
        pass

    def _row(self, **extra) -> dict:
        s1, s0, st = _snap(), self.t0, _status()
        hz = os.sysconf("SC_CLK_TCK")
        wall = s1["t"] - s0["t"]
        own = (s1["user"] - s0["user"]) + (s1["sys"] - s0["sys"])
        others = max((s1["stat"] - s0["stat"]) / hz - own, 0.0)
        io = {k: s1["io"][k] - s0["io"][k] for k in ("read_bytes", "write_bytes", "rchar", "wchar")}
        return {"wall_s": wall, "user_s": s1["user"] - s0["user"], "sys_s": s1["sys"] - s0["sys"],
                "peak_rss": st.get("VmHWM", 0), "peak_anon": self._peaks["RssAnon"], "peak_file": self._peaks["RssFile"],
                "minflt": s1["minflt"] - s0["minflt"], "majflt": s1["majflt"] - s0["majflt"], **io,
                "quiet": {"load_start": s0["load"], "load_end": s1["load"], "others_cpu_s": round(others, 1),
                          "others_cores": round(others / wall, 2) if wall > 0 else 0.0}, **extra}

    def finished(self, run) -> None:  # noqa: D102 - Reporter
        self.rows.append(self._row(id=run.id, label=run.label, stage=run.stage, key=run.key, cached=run.cached))
        self._free(run.id)
        self._begin()

    def _free(self, node_id: str) -> None:
        what = self.free_after.get(node_id)
        if not what:
            return
        from pipeline_lib.store import Store

        for stage in what.get("store_stages", ()):
            Store(self.store_root).gc(stage=stage)
        for p in what.get("paths", ()):
            rm(Path(p))

    def publish_row(self) -> dict:
        self._stop.set()
        return self._row(id="publish", label="publish", stage="publish", key="", cached=False)


def child_build(args) -> int:
    from pipeline_lib.buildspec import BuildSpec
    from pipeline_lib.errors import ZhllamaError
    from pipeline_lib.pipeline import build_graph, plan_build, run_build
    from pipeline_lib.store import Store

    job = json.loads(Path(args.job).read_text())
    spec = BuildSpec.model_validate(job["spec"])
    store = Store(job["store"])
    mon = StageMonitor(cold_roots=[Path(p) for p in job["cold_roots"]], free_after=job.get("free_after", {}),
                       store_root=Path(job["store"]))
    t0 = time.perf_counter()
    try:
        result = run_build(spec, store=store, reporter=mon)
    except ZhllamaError as exc:
        Path(args.rows).write_text(json.dumps({"error": str(exc), "rows": mon.rows,
                                               "seconds": time.perf_counter() - t0}, indent=1))
        return 3
    rows = [*mon.rows, mon.publish_row()]
    plan = plan_build(spec, store_root=store.root)
    nodes = {n.id: n for n in build_graph(plan)}
    sizes = {}
    for r in rows:
        e = store.get(r["key"]) if r["key"] else None
        sizes[r["id"]] = e.size if e is not None else None
    for r in rows:  # the logical bytes of each stage, for its floor
        node = nodes.get(r["id"])
        r["out_bytes"] = sizes.get(r["id"]) or 0
        if node is None:  # publish: every published entry read and copied
            r["in_bytes"] = r["out_bytes"] = sum(sizes.get(n.id) or 0 for n in nodes.values() if n.publish)
        elif node.stage == "download":
            r["in_bytes"] = r["out_bytes"]
        else:
            r["in_bytes"] = sum(sizes.get(u) or 0 for u in dict.fromkeys(node.upstream())
                                if nodes[u].stage not in ("tokenizer", "verify", "official"))
        r["publish"] = bool(node is not None and node.publish)
    entries = {r["id"]: str(store.get(r["key"]).path) for r in rows if r["key"] and store.get(r["key"]) is not None}
    Path(args.rows).write_text(json.dumps({"rows": rows, "seconds": result.seconds, "entries": entries,
                                           "published": [str(p) for p in result.published]}, indent=1))
    return 0


# ------------------------------------------------------------------ other children


def child_inputs(args) -> int:
    from pipeline_lib.synthetic import make_sized_release

    make_sized_release(Path(args.set_dir), args.size, layers=args.layers or None, seed=args.seed)  # 0: the shape's own
    return 0


def child_call(args) -> int:
    """One stage function, as the build's stage calls it (13B, before/after, more quantizations)."""
    job = json.loads(Path(args.job).read_text())
    kind = job["kind"]
    if kind == "one-pass":
        from pipeline_lib.gguf_export import convert
        from pipeline_lib.merge import plan_merge

        convert(plan_merge(job["base"], job["loras"]), out=job["out"], outtype="f16", name=job["name"])
    elif kind == "merge-hf":
        from pipeline_lib.merge import merge

        merge(job["base"], job["loras"], out=job["out"], format="hf")
    elif kind == "convert":
        from pipeline_lib.gguf_export import convert

        convert(job["src"], out=job["out"], outtype="f16", name=job["name"])
    elif kind == "quantize":
        from pipeline_lib.quantize import quantize

        quantize(job["src"], qtypes=[job["qtype"]], out_dir=job["out"], names={job["qtype"]: job["file"]})
    elif kind == "evaluate":
        from pipeline_lib.buildspec import EvalOptions
        from pipeline_lib.evaluate import evaluate
        from pipeline_lib.pipeline.stages import _pass_options

        options = EvalOptions().model_dump(exclude={"enabled"})  # the evaluate stage's call, with the defaults
        evaluate(job["src"], out=job["out"], reference=job["reference"], name=job["label"],
                 options=_pass_options(options), plot=False)
    elif kind == "fingerprint":
        from pipeline_lib.fingerprint import fingerprint

        fp = fingerprint(job["src"])
        Path(job["out"]).write_text(json.dumps({"digest": fp.digest,
                                                "tensors": {n: t.sha256 for n, t in fp.tensors.items()}}))
    else:
        raise SystemExit(f"unknown call {kind}")
    return 0


def call(ctx: dict, job: dict, **kw) -> dict:
    path = ctx["scratch"] / f".job-{job['kind']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job))
    return measured([sys.executable, __file__, "--child", "call", "--job", str(path)], ctx, **kw)


def fingerprint_of(ctx: dict, gguf: Path) -> dict:
    out = ctx["scratch"] / ".fp.json"
    r = call(ctx, {"kind": "fingerprint", "src": str(gguf), "out": str(out)})
    if r["rc"]:
        return {"error": r.get("error")}
    fp = json.loads(out.read_text())
    out.unlink()
    return fp


# ------------------------------------------------------------------ steps


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def need_disk(ctx: dict, nbytes: int, what: str) -> bool:
    have = free(ctx["set"])
    if have < nbytes * 1.05 + 2 * GB:
        log(f"skip {what}: needs ~{nbytes / GB:.1f} GB, {have / GB:.1f} GB free")
        ctx["results"]["skipped"][what] = f"needs ~{nbytes / GB:.1f} GB, {have / GB:.1f} GB free"
        return False
    return True


def spec_for(ctx: dict, outputs: list[str], *, quants: list[str] | None = None, evaluation: bool = False) -> dict:
    from pipeline_lib.buildspec import BuildSpec, EvalOptions, SourceSpec
    from pipeline_lib.synthetic import SIZED_ROLES, sized_release_table

    root = ctx["inputs"]
    table = sized_release_table(root)

    def src(role: str) -> SourceSpec:
        folder = SIZED_ROLES[role]
        return SourceSpec(source=str(root / folder), sha256=table.get(folder, {}))

    kw = {"quant_types": quants} if quants is not None else {}
    spec = BuildSpec(model="custom", name=f"fullsize-{ctx['size']}", base=src("base"),
                     loras=[src("lora-0"), src("lora-1")], chinese_sp=src("chinese_sp"), tokenizer="alpaca",
                     outputs=outputs, evaluation=EvalOptions(enabled=evaluation), out_dir=str(ctx["build"]), **kw)
    return json.loads(spec.model_dump_json(exclude_unset=True))


def run_build_child(ctx: dict, name: str, spec: dict, free_after: dict | None = None) -> dict:
    job = {"spec": spec, "store": str(ctx["store"]), "cold_roots": [str(ctx["set"])] if ctx["args"].cold else [],
           "free_after": free_after or {}}
    jpath, rpath = ctx["scratch"] / f".job-{name}.json", ctx["scratch"] / f".rows-{name}.json"
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(job))
    q = Quiet()
    m = run_measured([sys.executable, __file__, "--child", "build", "--job", str(jpath), "--rows", str(rpath)],
                     env=env_for(ctx), cwd=ROOT, check=False)
    out = json.loads(rpath.read_text()) if rpath.exists() else {"error": m.stderr[-2000:]}
    out.update(wall_s=m.wall_s, user_s=m.user_s, sys_s=m.sys_s, peak_rss=m.rss_bytes, rc=m.returncode,
               quiet=q.done(m.user_s + m.sys_s))
    if m.returncode and "error" not in out:
        out["error"] = m.stderr[-2000:]
    return out


def measure_read(path: Path, limit: int) -> dict:
    """Cold reads of an existing file (the base's first shard), buffered and O_DIRECT, up to ``limit`` bytes."""
    import mmap

    chunk = 64 << 20
    buf = mmap.mmap(-1, chunk)
    out = {"file": path.name}
    for mode, flags in (("buffered", 0), ("direct", os.O_DIRECT)):
        drop_tree(path)
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY | flags)
        got = 0
        try:
            while got < limit and (k := os.readv(fd, [buf])) > 0:
                got += k
        finally:
            os.close(fd)
        out[f"read_{mode}_Bps"] = got / (time.perf_counter() - t0)
    return out


def step_floor(ctx: dict, name: str) -> dict:
    size = int(ctx["args"].floor_gb * GB)
    if not need_disk(ctx, size, name):
        return {}
    q = Quiet()
    r = measure_floor(ctx["scratch"], size)
    shards = base_files(ctx)
    if shards:
        r["input"] = measure_read(max(shards, key=lambda p: p.stat().st_size), size)
    r["quiet"] = q.done(0.0)
    log(f"{name}: write {r['write_buffered_Bps'] / 1e6:.0f} MB/s buffered, {r['write_direct_Bps'] / 1e6:.0f} direct; "
        f"cold read {r['read_buffered_Bps'] / 1e6:.0f} MB/s buffered, {r['read_direct_Bps'] / 1e6:.0f} direct")
    return r


def base_files(ctx: dict) -> list[Path]:
    return sorted((ctx["inputs"] / "llama-base").glob("pytorch_model-*.bin"))


def loras(ctx: dict) -> list[Path]:
    return [ctx["inputs"] / "chinese-llama-plus-lora", ctx["inputs"] / "chinese-alpaca-plus-lora"]


def step_sha256sum(ctx: dict, name: str) -> dict:
    files = base_files(ctx)
    return measured(["sha256sum", *map(str, files)], ctx, inputs=tuple(files))


def step_peft(ctx: dict, name: str) -> dict:
    out = ctx["scratch"] / "peft"
    rm(out)
    if not need_disk(ctx, du(ctx["inputs"] / "llama-base") * 1.05, name):
        return {}
    avail = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemAvailable"))
    cap = int(ctx["args"].peft_cap * GiB) if ctx["args"].peft_cap else int(min(avail - 2 * GiB, 20 * GiB))
    spec = {"base": str(ctx["inputs"] / "llama-base"), "loras": [str(p) for p in loras(ctx)]}
    r = measured([sys.executable, str(BENCH / "merge.py"), "--worker", "peft", "--spec", json.dumps(spec),
                  "--out", str(out)], ctx, rss_limit=cap, inputs=(ctx["inputs"] / "llama-base", *loras(ctx)),
                 outputs=(out,))
    r["rss_cap"] = cap
    rm(out)
    return r


def step_build_hf(ctx: dict, name: str) -> dict:
    base = du(ctx["inputs"])
    if not need_disk(ctx, base * 3, name):  # the store's copy, the merged checkpoint and its published copy
        return {}
    r = run_build_child(ctx, name, spec_for(ctx, ["hf"]))
    merged = r.get("entries", {}).get("merge:hf")
    ctx["results"]["merged_hf"] = str(Path(merged) / "hf") if merged else None
    rm(ctx["build"])  # the published copy: not needed for anything measured later
    return r


def merged_hf(ctx: dict) -> Path | None:
    p = ctx["results"].get("merged_hf")
    return Path(p) if p and Path(p).is_dir() else None


def _convert_merged(ctx: dict, name: str, out_name: str, fingerprint_key: str, run) -> dict:
    """Convert the build's merged checkpoint with ``run(src, out) -> row``, fingerprint what it wrote
    (for the per-tensor comparison) and remove it: the common frame of the two HF -> GGUF converters."""
    src = merged_hf(ctx)
    if src is None:
        return {"error": "no merged checkpoint (run build-hf first)"}
    out = ctx["scratch"] / out_name
    rm(out)
    if not need_disk(ctx, du(src), name):
        return {}
    r = run(src, out)
    if out.exists():
        ctx["results"]["fingerprints"][fingerprint_key] = fingerprint_of(ctx, out)
    rm(out)
    return r


def step_llamacpp(ctx: dict, name: str) -> dict:
    from _gguf_fixtures import reference_llama_cpp

    def run(src: Path, out: Path) -> dict:
        ref = reference_llama_cpp()
        env = {k: v for k, v in env_for(ctx).items() if k != "NO_LOCAL_GGUF"}
        env["PYTHONPATH"] = str(ref / "gguf-py")
        return measured([sys.executable, str(ref / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
                         "--outtype", "f16"], ctx, env=env, inputs=(src,), outputs=(out,))

    return _convert_merged(ctx, name, "llama.cpp.gguf", "llama.cpp", run)


def step_convert_hf(ctx: dict, name: str) -> dict:
    def run(src: Path, out: Path) -> dict:
        return call(ctx, {"kind": "convert", "src": str(src), "out": str(out), "name": "fullsize"}, inputs=(src,),
                    outputs=(out,))

    return _convert_merged(ctx, name, "ours-hf.gguf", "ours HF->GGUF", run)


def step_before(ctx: dict, name: str) -> dict:
    """The one-pass convert and the merge to HF with the starting code and with this code, each in a
    fresh child starting cold, one after the other: like for like."""
    before = ctx["args"].before
    if not before:
        return {"error": "no --before tree given"}
    trees = {"before": Path(before).resolve(), "after": ROOT}
    out: dict = {}
    inputs = (ctx["inputs"] / "llama-base", *loras(ctx))
    for kind in ("one-pass", "merge-hf") if ctx["size"] != "13b" else ("one-pass",):
        for which, tree in trees.items():
            dest = ctx["scratch"] / f"{which}-{kind}"
            rm(dest)
            if not need_disk(ctx, du(ctx["inputs"] / "llama-base") * 1.05, f"{name} {which} {kind}"):
                continue
            env = dict(env_for(ctx), PYTHONPATH=str(tree), **{TREE_ENV: str(tree)})
            job = {"kind": kind, "base": str(inputs[0]), "loras": [str(p) for p in inputs[1:]], "out": str(dest),
                   "name": "fullsize"}
            out[f"{which} {kind}"] = call(ctx, job, env=env, inputs=inputs, outputs=(dest,))
            rm(dest)
    return out


def _one_pass_row(ctx: dict, out: Path) -> dict:
    inputs = (ctx["inputs"] / "llama-base", *loras(ctx))
    job = {"kind": "one-pass", "base": str(inputs[0]), "loras": [str(p) for p in inputs[1:]], "out": str(out),
           "name": f"fullsize-{ctx['size']}"}
    return call(ctx, job, inputs=inputs, outputs=(out,))


def step_preflight_full(ctx: dict, name: str) -> dict:
    """The full build (f16 + three quantizations, evaluation): does the build's own preflight let it start?"""
    code = ("import json, sys, time; from pipeline_lib.buildspec import BuildSpec; "
            "from pipeline_lib.pipeline import build_graph, plan_build, preflight; "
            "from pipeline_lib.pipeline.execute import prepared_inputs; from pipeline_lib.store import Store; "
            "spec = BuildSpec.model_validate(json.loads(sys.argv[1])); t0 = time.perf_counter(); store = Store(); "
            "plan = plan_build(spec, store_root=store.root); nodes = build_graph(plan); "
            "prep = prepared_inputs(plan, nodes); needs = preflight.estimate(plan, nodes, prep, store)\n"
            "try:\n    preflight.check(plan, nodes, prep, store); msg = None\n"
            "except Exception as exc:\n    msg = str(exc)\n"
            "print(json.dumps({'store': needs.store, 'publish': needs.publish, 'nodes': needs.nodes, "
            "'refused': msg, 'seconds': time.perf_counter() - t0}))")
    spec = spec_for(ctx, ["gguf"], quants=list(QUANTS), evaluation=True)
    m = run_measured([sys.executable, "-c", code, json.dumps(spec)], env=env_for(ctx), cwd=ROOT, check=False)
    try:
        return json.loads(m.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": m.stderr[-1500:]}


def step_build_gguf(ctx: dict, name: str) -> dict:
    from pipeline_lib.store import Store

    Store(ctx["store"]).gc(stage="merge")  # the merged checkpoint of build-hf: measured, no longer needed
    if not need_disk(ctx, du(ctx["inputs"] / "llama-base") * 2.6, name):  # f16 + q4_0, each published too
        return {}
    spec = spec_for(ctx, ["gguf"], quants=["q4_0"], evaluation=not ctx["args"].no_eval)
    r = run_build_child(ctx, name, spec)
    ctx["results"]["entries"] = r.get("entries", {})
    f16 = r.get("entries", {}).get("gguf:f16")
    if f16:
        gguf = next(Path(f16).glob("*.gguf"))
        ctx["results"]["fingerprints"]["one-pass"] = fingerprint_of(ctx, gguf)
    rm(ctx["build"])
    return r


def step_quantize_more(ctx: dict, name: str) -> dict:
    """q8_0 and q4_K_M as the quantize stage makes them (same function, the store's f16), and the q8_0
    evaluation as the evaluate stage makes it (against the build's stored reference)."""
    entries = ctx["results"].get("entries", {})
    if "gguf:f16" not in entries:
        return {"error": "no f16 entry (run build-gguf first)"}
    f16 = next(Path(entries["gguf:f16"]).glob("*.gguf"))
    out: dict = {}
    for q in ("q8_0", "q4_K_M"):
        dest = ctx["scratch"] / f"quant-{q}"
        rm(dest)
        if not need_disk(ctx, du(f16) * 0.6, f"{name} {q}"):
            continue
        out[f"quantize {q}"] = call(ctx, {"kind": "quantize", "src": str(f16), "qtype": q, "out": str(dest),
                                          "file": f"x-{q}.gguf"}, inputs=(f16,), outputs=(dest,))
        if q == "q8_0" and "evaluate:reference" in entries and not ctx["args"].no_eval:
            ev = ctx["scratch"] / "eval-q8_0"
            rm(ev)
            out["evaluate q8_0"] = call(ctx, {"kind": "evaluate", "src": str(dest / f"x-{q}.gguf"), "out": str(ev),
                                              "reference": entries["evaluate:reference"], "label": q},
                                        inputs=(dest,))
            rm(ev)
        rm(dest)
    return out


def step_one_pass(ctx: dict, name: str) -> dict:
    out = ctx["scratch"] / f"one-pass-{ctx['size']}.gguf"
    rm(out)
    if not need_disk(ctx, du(ctx["inputs"] / "llama-base") * 1.05, name):
        return {}
    r = _one_pass_row(ctx, out)
    ctx["results"]["one_pass_file"] = str(out) if out.exists() else None
    return r


def step_quantize(ctx: dict, name: str) -> dict:
    src = Path(ctx["results"].get("one_pass_file") or "/nonexistent")
    if not src.exists():
        return {"error": "no one-pass GGUF (run one-pass first)"}
    dest = ctx["scratch"] / "quant-q4_0"
    rm(dest)
    r = call(ctx, {"kind": "quantize", "src": str(src), "qtype": "q4_0", "out": str(dest), "file": "x-q4_0.gguf"},
             inputs=(src,), outputs=(dest,))
    rm(dest, src)
    return r


STEP_FUNCS = {
    "floor": step_floor, "floor-end": step_floor, "sha256sum": step_sha256sum, "peft": step_peft,
    "build-hf": step_build_hf, "llama.cpp": step_llamacpp, "convert-hf": step_convert_hf, "before": step_before,
    "preflight-full": step_preflight_full, "build-gguf": step_build_gguf, "quantize-more": step_quantize_more,
    "one-pass": step_one_pass, "quantize": step_quantize,
}


def run_size(args) -> Path:
    size = args.size
    tag = f"{size}" + (f"-L{args.layers}" if args.layers else "") + (f"-s{args.seed}" if args.seed else "")
    work = Path(args.workdir).resolve()
    set_dir = work / tag
    ctx = {"args": args, "size": size, "set": set_dir, "inputs": set_dir / "inputs", "store": set_dir / "store",
           "build": set_dir / "build", "scratch": set_dir / "scratch"}
    results_path = Path(args.out) if args.out else work / f"results-{tag}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() and not args.fresh else {}
    results.setdefault("steps", {})
    results.setdefault("skipped", {})
    results.setdefault("fingerprints", {})
    results.update(size=size, layers=args.layers, seed=args.seed, machine=machine(), workdir=str(set_dir),
                   command=" ".join([Path(sys.executable).name, "bench/fullsize.py", *sys.argv[1:]]))
    ctx["results"] = results

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=1, default=str))

    if not args.keep_other:  # never two sets at once
        for other in work.iterdir() if work.exists() else ():
            if other.is_dir() and other != set_dir and (other / "inputs").exists():
                log(f"removing the other set {other}")
                rm(other)
    steps = [s for s in (args.steps.split(",") if args.steps else STEPS[size]) if s not in (args.skip or "").split(",")]
    log(f"{tag}: {', '.join(steps)}; {free(work if work.exists() else work.parent) / GB:.0f} GB free; "
        f"load {loadavg()}")
    if not (ctx["inputs"] / "SHA256SUMS").is_file():
        from pipeline_lib.synthetic import LLAMA_SHAPES

        shape = LLAMA_SHAPES[size]
        layers = args.layers or shape.layers
        est = (2 * 32000 * shape.hidden + layers * (4 * shape.hidden ** 2 + 3 * shape.hidden * shape.ffn)) * 2
        est += 2 * 2 * 49954 * shape.hidden * 2
        if free(work if work.exists() else work.parent) < est * 1.1 + 2 * GB:
            raise SystemExit(f"not enough disk for the {tag} inputs (~{est / GB:.0f} GB)")
        log(f"generating the {tag} inputs (~{est / GB:.1f} GB) in {ctx['inputs']}")
        ctx["inputs"].mkdir(parents=True, exist_ok=True)
        r = measured([sys.executable, __file__, "--child", "inputs", "--set-dir", str(ctx["inputs"]), "--size", size,
                      "--layers", str(args.layers or 0), "--seed", str(args.seed)], ctx)
        if r["rc"]:
            raise SystemExit(f"input generation failed: {r.get('error')}")
        results["steps"]["inputs"] = r
    results["input_bytes"] = {p.name: du(p) for p in sorted(ctx["inputs"].iterdir()) if p.is_dir()}
    rm(ctx["store"], ctx["build"], ctx["scratch"])  # every run computes every stage: an empty store
    save()
    for step in steps:
        log(f"step {step} (load {loadavg()}, {free(set_dir) / GB:.0f} GB free)")
        t0 = time.perf_counter()
        results["steps"][step] = STEP_FUNCS[step](ctx, step)
        results["steps"][step]["step_s"] = time.perf_counter() - t0
        save()
        log(f"  {step} done in {time.perf_counter() - t0:.0f} s")
    rm(ctx["scratch"], ctx["build"], ctx["store"])
    if args.clean:
        rm(set_dir)
    results["machine"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    save()
    print(render(results))
    return results_path


# ------------------------------------------------------------------ report


def _floor(row: dict, fl: dict | None, mode: str) -> float | None:
    """A stage's I/O floor: its input bytes at the cold read speed of the real input file (the base's
    largest shard: a file written long ago reads slower here than one just written) plus its output
    bytes at the fsynced write speed."""
    if not fl or not row.get("in_bytes") and not row.get("out_bytes"):
        return None
    read = (fl.get("input") or fl)[f"read_{mode}_Bps"]
    return row.get("in_bytes", 0) / read + row.get("out_bytes", 0) / fl[f"write_{mode}_Bps"]


def _mib(n: float | None) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "–"


def _row(label: str, r: dict, fl: dict | None, *, io_stage: bool = True) -> str:
    if not r or "wall_s" not in r:
        return f"| {label} | {r.get('error', 'not run') if r else 'not run'} | | | | | | | |"
    if r.get("killed_for_memory"):
        return (f"| {label} | died of memory: killed at {r.get('rss_seen', 0) / GiB:.1f} GiB (cap "
                f"{r.get('rss_cap', 0) / GiB:.1f} GiB) after {r['wall_s']:.0f} s | | | | | | | |")
    if r.get("rc"):
        return f"| {label} | failed: {r.get('error', '?')} | | | | | | | |"
    cpu = r["user_s"] + r["sys_s"]
    fb, fd = (_floor(r, fl, "buffered"), _floor(r, fl, "direct")) if io_stage else (None, None)
    ratio = f"{r['wall_s'] / fb:.2f}× / {r['wall_s'] / fd:.1f}×" if fb and fd else "–"
    sys_share = f"{100 * r['sys_s'] / cpu:.0f}%" if cpu else "–"
    io = f"{r.get('in_bytes', 0) / GB:.1f} / {r.get('out_bytes', 0) / GB:.1f}" if io_stage else "–"
    floor = f"{fb:.0f} / {fd:.0f}" if fb and fd else "–"
    return (f"| {label} | {r['wall_s']:.0f} | {r['user_s']:.0f} + {r['sys_s']:.0f} ({sys_share}) | "
            f"{_mib(r.get('peak_rss'))} | {io} | {floor} | {ratio} | {r['quiet']['others_cores']:.2f} |")


HEAD = ("| step | wall s | CPU s user + sys (sys share) | peak RSS | GB in / out | floor s buffered / direct | "
        "wall ÷ floor buffered / direct | other load (cores) |\n|---|---:|---:|---:|---:|---:|---:|---:|")
IO_STAGES = {"download", "verify", "merge", "gguf", "fingerprint", "quantize", "publish"}


def render(results: dict) -> str:
    steps = results["steps"]
    fl = steps.get("floor") or None
    lines = [f"### {results['size']}" + (f", {results['layers']} layers" if results.get("layers") else ""), ""]
    if fl and "read_buffered_Bps" in fl:
        end = steps.get("floor-end") or {}
        lines.append(f"Disk (this run): cold read {fl['read_buffered_Bps'] / 1e6:.0f} MB/s buffered, "
                     f"{fl['read_direct_Bps'] / 1e6:.0f} MB/s O_DIRECT; fsynced write "
                     f"{fl['write_buffered_Bps'] / 1e6:.0f} MB/s buffered, {fl['write_direct_Bps'] / 1e6:.0f} MB/s "
                     f"O_DIRECT" + (f"; the base's largest shard read cold: {fl['input']['read_buffered_Bps'] / 1e6:.0f} "
                                    f"MB/s buffered, {fl['input']['read_direct_Bps'] / 1e6:.0f} MB/s O_DIRECT"
                                    if fl.get("input") else "")
                     + (f" (at the end: {end['read_buffered_Bps'] / 1e6:.0f} / "
                                    f"{end['read_direct_Bps'] / 1e6:.0f} read, {end['write_buffered_Bps'] / 1e6:.0f} / "
                                    f"{end['write_direct_Bps'] / 1e6:.0f} write)" if end.get("read_direct_Bps") else "")
                     + ".")
        lines.append("")
    lines += [HEAD]
    for name in ("build-hf", "build-gguf"):
        b = steps.get(name) or {}
        for r in b.get("rows", []):
            if r.get("cached"):
                continue
            lines.append(_row(f"{name}: {r['label']}", r, fl, io_stage=r["stage"] in IO_STAGES))
        if b.get("error"):
            lines.append(f"| {name} | failed: {b['error'][:300]} | | | | | | | |")
    for name, label, io in (("one-pass", "one-pass convert (base + 2 LoRAs → f16 GGUF)", True),
                            ("quantize", "quantize q4_0", True)):
        if name in steps:
            lines.append(_row(label, steps[name], fl, io_stage=io))
    for k, r in (steps.get("quantize-more") or {}).items():
        if isinstance(r, dict):
            lines.append(_row(k + " (stage function)", r, fl, io_stage=k.startswith("quantize")))
    lines += ["", "Alternatives, same inputs, same run:", "", HEAD]
    for name, label in (("sha256sum", "sha256sum (coreutils) on the base shards"),
                        ("peft", "PEFT merge_and_unload → save_pretrained"),
                        ("llama.cpp", "llama.cpp convert_hf_to_gguf.py on the merged checkpoint"),
                        ("convert-hf", "zhllama convert on the merged checkpoint")):
        if name in steps:
            lines.append(_row(label, steps[name], fl))
    pairs = {k: r for k, r in (steps.get("before") or {}).items() if isinstance(r, dict)}
    if pairs:
        lines += ["", "Before / after, like for like (the stage function in a fresh child, inputs cold; "
                  "before = the code this work started from):", "", HEAD]
        for kind, r in pairs.items():
            lines.append(_row(kind, r, fl))
    pf = steps.get("preflight-full")
    if pf and "store" in pf:
        lines += ["", f"Preflight of the full build (f16 + {', '.join(QUANTS)} + evaluation): new store entries "
                  f"{pf['store'] / GB:.1f} GB, published copies {pf['publish'] / GB:.1f} GB, decided in "
                  f"{pf['seconds'] * 1000:.0f} ms: " + (f"refused — {pf['refused'].splitlines()[0]}" if pf.get('refused')
                                                       else "allowed")]
    fps = results.get("fingerprints") or {}
    ref = (fps.get("llama.cpp") or {}).get("tensors")
    for key, what in (("one-pass", "the one-pass GGUF (build-gguf)"), ("ours HF->GGUF", "zhllama convert's GGUF")):
        mine = (fps.get(key) or {}).get("tensors")
        if not mine or not ref:
            if key in fps or "llama.cpp" in fps:
                lines += ["", f"Tensors of {what} vs llama.cpp's: not compared ("
                          + str((fps.get(key) or fps.get("llama.cpp") or {}).get("error", "missing"))[:200] + ")"]
            continue
        differ = sorted(k for k in set(mine) | set(ref) if mine.get(k) != ref.get(k))
        lines += ["", f"Tensors of {what} vs llama.cpp's converter on the merged checkpoint: "
                  + (f"identical, all {len(ref)} (per-tensor sha256)" if not differ else
                     f"DIFFER in {len(differ)} of {len(ref)} (e.g. {differ[:3]})")]
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())]
    return "\n".join(lines)


def plot(results_files: list[Path], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = [json.loads(p.read_text()) for p in results_files]
    fig, axes = plt.subplots(len(sets), 2, figsize=(13, 4.2 * len(sets)), squeeze=False)
    for row, res, path in zip(axes, sets, results_files, strict=True):
        steps, fl = res["steps"], res["steps"].get("floor") or None
        title = f"{res['size']} ({path.stem})"
        items = []
        for name in ("build-hf", "build-gguf"):
            for r in (steps.get(name) or {}).get("rows", []):
                if not r.get("cached") and r["wall_s"] > 1:
                    items.append((r["label"], r, r["stage"] in IO_STAGES))
        for name, label in (("one-pass", "one-pass convert"), ("quantize", "quantize q4_0")):
            if steps.get(name, {}).get("wall_s"):
                items.append((label, steps[name], True))
        for name, label in (("peft", "PEFT merge"), ("llama.cpp", "llama.cpp convert"), ("sha256sum", "sha256sum")):
            r = steps.get(name) or {}
            if r.get("wall_s") and not r.get("killed_for_memory") and not r.get("rc"):
                items.append((label, r, True))
        for kind, r in (steps.get("before") or {}).items():
            if isinstance(r, dict) and r.get("wall_s"):
                items.append((kind, r, True))
        labels = [i[0] for i in items]
        y = range(len(items))
        ax = row[0]
        ax.barh(y, [i[1]["wall_s"] for i in items], color="#4c72b0", label="wall")
        floors = [(_floor(i[1], fl, "buffered") if i[2] else None) for i in items]
        dfloors = [(_floor(i[1], fl, "direct") if i[2] else None) for i in items]
        ax.scatter([f or 0 for f in floors], y, marker="|", s=300, color="#c44e52", label="I/O floor (buffered, dd)")
        ax.scatter([f or 0 for f in dfloors], y, marker="|", s=300, color="#55a868", label="I/O floor (O_DIRECT)")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds")
        ax.set_title(f"{title}: time per stage vs the disk's floor")
        ax.legend(fontsize=8)
        ax = row[1]
        # resident memory split as sampled: anonymous (the process's own) and file-backed (mapped model
        # pages, which the kernel can drop); where only the peak is known, all of it drawn as one bar
        anon = [min(i[1].get("peak_anon") or i[1].get("peak_rss", 0), i[1].get("peak_rss", 0)) / GiB for i in items]
        rest = [max(i[1].get("peak_rss", 0) / GiB - a, 0.0) for i, a in zip(items, anon, strict=True)]
        ax.barh(y, anon, color="#8172b2", label="anonymous")
        ax.barh(y, rest, left=anon, color="#c9bfe6", label="file-backed (mapped files)")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        ax.axvline(1.0, color="#c44e52", ls="--", lw=1)
        ax.axvline(2.0, color="#dd8452", ls="--", lw=1)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(left=0.05)  # fixed: an automatic left edge above a bar would hide its anonymous part
        ax.set_xlabel("peak RSS, GiB (log; lines: 1 and 2 GiB targets)")
        ax.set_title(f"{title}: peak resident memory")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=("7b", "13b", "tiny"), default="7b", help="model shape (tiny: real vocabularies, "
                    "small widths, for smoke tests)")
    ap.add_argument("--layers", type=int, default=0, help="blocks (default: the shape's own, 32 for 7B)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated weights")
    ap.add_argument("--workdir", default="/work/fullsize", help="where inputs, store and outputs go (reused)")
    ap.add_argument("--steps", help="comma list of steps to run (default: all of the size's)")
    ap.add_argument("--skip", help="comma list of steps to leave out")
    ap.add_argument("--out", help="results JSON (default: WORKDIR/results-<size>.json)")
    ap.add_argument("--fresh", action="store_true", help="start a new results file instead of updating it")
    ap.add_argument("--floor-gb", type=float, default=4.0, help="bytes written and read to measure the disk")
    ap.add_argument("--peft-cap", type=float, default=0.0, help="GiB at which PEFT is killed (default: "
                    "MemAvailable - 2 GiB, at most 20)")
    ap.add_argument("--before", help="a copy of the starting code's tree (git archive), for the before column")
    ap.add_argument("--no-eval", action="store_true", help="no evaluation stages")
    ap.add_argument("--cold", action="store_true", help="drop every file of the run from the page cache before "
                    "each build stage (default: the build runs as a user runs it; the alternatives and the "
                    "before/after pairs always start cold)")
    ap.add_argument("--clean", action="store_true", help="remove the generated inputs at the end (default: kept "
                    "and reused by the next run)")
    ap.add_argument("--keep-other", action="store_true", help="do not remove another size's set")
    ap.add_argument("--report", nargs="*", help="print the tables of these results files (and --plot)")
    ap.add_argument("--plot", help="PNG of time per stage vs floor, and peak RSS")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--job", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    ap.add_argument("--set-dir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return {"build": child_build, "inputs": child_inputs, "call": child_call}[args.child](args)
    if args.report is not None:
        files = [Path(p) for p in args.report]
        for p in files:
            print(render(json.loads(p.read_text())))
            print()
        if args.plot:
            plot(files, Path(args.plot))
        return 0
    run_size(args)
    if args.plot:
        plot([Path(args.out) if args.out else Path(args.workdir).resolve() / f"results-{args.size}.json"],
             Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
