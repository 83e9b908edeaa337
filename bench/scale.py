"""Benchmark: beyond one machine. The demo build with 4 quantization types and evaluation:

1. ``runner``: the Prefect thread pool in the flow's process vs a ``distributed.LocalCluster`` of 2
   worker processes (``BuildSpec.runner = "dask"``), each cold (empty store) in its own process:
   wall time and the per-stage timeline (start and end of every task run, from the server's
   records, relative to the flow run's start; the worker process that produced each entry);
2. ``server``: the same build deployed 4 times at once (4 ``prefect deployment run``, one process
   worker, a store per run so every run computes everything) on a Prefect server backed by SQLite
   vs by PostgreSQL: total time until all four are final, their states, and the API errors in the
   server's and the worker's output (``database is locked``, HTTP 5xx, tracebacks).

Usage: python bench/scale.py [--part runner|server|all] [--repeat N] [--dir /tmp] [--keep]

Needs the team extras (prefect-dask) and, for part 2, PostgreSQL's initdb/pg_ctl
(tests/_services.py finds them). Prints markdown tables (docs/team.md has the last ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

QUANTS = ["q4_0", "q4_1", "q5_0", "q8_0"]
EVAL = {"n_ctx": 64, "max_chunks": 4, "max_new_tokens": 16}

CHILD = r"""
import json, sys, time
if __name__ == "__main__":  # Dask spawns its workers: they import this module, they must not run it
    runner = sys.argv[1]
    from pipeline_lib import demo
    from pipeline_lib.store import default_root
    demo.ensure_demo_release(default_root())
    from flows.build import build_model
    spec = demo.demo_spec(quant_types=tuple(json.loads(sys.argv[2]))).model_copy(update={"runner": runner, "dask_workers": 2})
    t1 = time.perf_counter()
    state = build_model(spec, return_state=True)
    res = state.result()
    print(json.dumps({"run_s": time.perf_counter() - t1, "flow_run_id": str(state.state_details.flow_run_id),
                      "stages": [s.to_json() for s in res.stages]}))
"""

HTTP_5XX = re.compile(r"Internal Server Error|HTTP/1\.1\" 5\d\d|status code 5\d\d|Server error '5\d\d")
CHAINED = ("During handling of the above exception", "The above exception was the direct cause")


def api_errors(text: str) -> tuple[int, int]:
    """(error events, of which ``database is locked``) in a server's or worker's output: each traceback
    counts once (with the exceptions chained to it), and so does each logged HTTP 5xx."""
    events: list[list[str]] = []
    previous = ""
    for line in text.splitlines():
        if line.startswith("Traceback (most recent call last)") and not previous.startswith(CHAINED):
            events.append([line])
        elif HTTP_5XX.search(line):
            events.append([line])
        elif events:
            events[-1].append(line)
        if line.strip():
            previous = line.strip()
    return len(events), sum(any("database is locked" in ln for ln in ev) for ev in events)


def timeline(flow_run_id: str) -> tuple[datetime, dict[str, tuple[float, float]]]:
    """Task label -> (start, end) seconds after the flow run's start, from the server's records."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    t0 = flow_run.start_time
    out = {}
    for r in runs:
        if r.start_time and r.end_time:
            out[r.name] = ((r.start_time - t0).total_seconds(), (r.end_time - t0).total_seconds())
    return t0, out


def _span(times: tuple[float, float] | None) -> str:
    return f"{times[0]:.1f} – {times[1]:.1f}" if times else "–"


def part_runner(work: Path) -> None:
    from _prefect_fixtures import start_server, stop_process

    from pipeline_lib.store import Store

    server = start_server(work / "prefect-runner")
    results = {}
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        for runner in ("threads", "dask"):
            home = work / f"home-{runner}"
            env = {**os.environ, **server.env, "ZHLLAMA_HOME": str(home), "ZHLLAMA_PROGRESS": "0",
                   "PYTHONPATH": str(ROOT)}
            m = run_measured([sys.executable, "-c", CHILD, runner, json.dumps(QUANTS)], env=env, cwd=ROOT)
            data = json.loads(m.stdout.strip().splitlines()[-1])
            with temporary_settings(updates={PREFECT_API_URL: server.url}):
                _, times = timeline(data["flow_run_id"])
            store = Store(home)
            pids = {s["label"]: store.get(s["key"]).producer.get("pid") for s in data["stages"]}
            results[runner] = {**data, "wall_s": m.wall_s, "rss": m.rss_bytes, "times": times, "pids": pids}
            print(f"{runner:7}: build {data['run_s']:.1f} s, process wall {m.wall_s:.1f} s, "
                  f"peak RSS {m.rss_bytes / 1e6:.0f} MB", flush=True)
    finally:
        stop_process(server.proc)

    print("\n| runner | build (s) | process wall (s) | peak RSS of the flow process (MB) | worker processes |")
    print("|---|---:|---:|---:|---:|")
    for runner, r in results.items():
        print(f"| {runner} | {r['run_s']:.1f} | {r['wall_s']:.1f} | {r['rss'] / 1e6:.0f} | "
              f"{len(set(r['pids'].values()))} |")
    print("\n| stage | threads: start – end (s) | dask: start – end (s) | dask worker |")
    print("|---|---:|---:|---:|")
    dask_pids = sorted({p for p in results["dask"]["pids"].values() if p})
    names = {p: f"w{i + 1}" for i, p in enumerate(dask_pids)}
    for s in results["threads"]["stages"]:
        label = s["label"]
        t = results["threads"]["times"].get(label)
        d = results["dask"]["times"].get(label)
        print(f"| {label} | {_span(t)} | {_span(d)} | {names.get(results['dask']['pids'].get(label), '?')} |")


def _concurrent(server, work: Path, label: str, runs: int = 4) -> dict:
    """Deploy build-tiny-demo, start a worker, trigger ``runs`` runs at once; time them and count errors."""
    from _prefect_fixtures import VENV_BIN, stop_process

    server.prefect("work-pool", "create", "zhllama-process", "--type", "process")
    server.prefect("deploy", "--name", "build-tiny-demo", "--prefect-file", "deployments/prefect.yaml", "--no-prompt",
                   cwd=ROOT, timeout=300)
    worker_log = work / f"worker-{label}.log"
    env = {**os.environ, **server.env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(worker_log, "wb") as fh:
        worker = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "zhllama-process"],
                                  env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        params = json.dumps({"spec": {"model": "tiny-demo", "quant_types": QUANTS, "evaluation": EVAL}})
        t0 = time.perf_counter()
        ids = []
        for i in range(runs):
            job_env = json.dumps({"ZHLLAMA_HOME": str(work / f"store-{label}-{i}")})
            res = server.prefect("deployment", "run", "build-model/build-tiny-demo", "--params", params,
                                 "--job-variable", f"env={job_env}", cwd=ROOT)
            ids.append(re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout).group(1))
        states = {}
        with temporary_settings(updates={PREFECT_API_URL: server.url}), get_client(sync_client=True) as client:
            while len(states) < runs and time.perf_counter() - t0 < 1800:
                for i in ids:
                    run = client.read_flow_run(i)
                    if i not in states and run.state and run.state.is_final():
                        states[i] = run.state.name
                time.sleep(1)
        total = time.perf_counter() - t0
    finally:
        stop_process(worker)
    errors, locked = (sum(x) for x in zip(api_errors(server.log.read_text(errors="replace")),
                                          api_errors(worker_log.read_text(errors="replace")), strict=True))
    return {"total_s": total, "states": sorted(states.values()), "errors": errors, "locked": locked}


def part_server(work: Path, *, repeat: int = 1) -> None:
    from _prefect_fixtures import start_server, stop_process
    from _services import missing_postgres, start_postgres

    why = missing_postgres()
    if why:
        print(f"server part skipped: {why}")
        return
    rows: list[tuple[str, int, dict]] = []
    for rep in range(repeat):  # alternating, so a busy moment of a shared machine hits both
        for db in ("sqlite", "postgresql"):
            pg = start_postgres() if db == "postgresql" else None
            try:
                server = start_server(work / f"prefect-{db}-{rep}", database=pg.url if pg else None, timeout=180)
                try:
                    r = _concurrent(server, work, f"{db}-{rep}")
                finally:
                    stop_process(server.proc)
            finally:
                if pg:
                    pg.stop()
            rows.append((db, rep + 1, r))
            print(f"{db:10} #{rep + 1}: 4 runs in {r['total_s']:.1f} s, states {r['states']}, {r['errors']} API "
                  f"errors ({r['locked']} 'database is locked')", flush=True)
    print("\n| server database | round | 4 concurrent runs: total (s) | final states | API errors (tracebacks, 5xx) "
          "| of which `database is locked` |")
    print("|---|---:|---:|---|---:|---:|")
    for db, rep, r in rows:
        states = ", ".join(f"{r['states'].count(s)} {s}" for s in sorted(set(r["states"])))
        print(f"| {db} | {rep} | {r['total_s']:.1f} | {states} | {r['errors']} | {r['locked']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["runner", "server", "all"], default="all")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of the server part (default 1)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-scale-", dir=args.dir))
    try:
        if args.part in ("runner", "all"):
            part_runner(work)
        if args.part in ("server", "all"):
            part_server(work, repeat=args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
