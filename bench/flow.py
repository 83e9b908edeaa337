"""Benchmark: the demo build through Prefect vs the same stages run sequentially without it, cold and warm.

Usage: python bench/flow.py [--no-eval] [--dir /tmp] [--keep]

The alternative a user would pick instead of an orchestrator is a plain script calling the stages
in order: that is the plain executor ``pipeline_lib.pipeline.run_build`` (same stage functions, same artifact store,
same cache keys). Each run happens in its own process (wall time and peak RSS from wait4):

* cold: empty artifact store (the synthetic demo sources are prepared beforehand, untimed);
* warm: the same build again: every stage a cache hit.

Per stage it reports the wall time of the sequential runner and of the Prefect task (from the
server's task-run records: start to end), and overall the Prefect overhead (flow − sequential)
and the warm/cold ratio. A local Prefect server (SQLite, 127.0.0.1) is started once for the flow
runs; its start-up time is reported separately and not counted in any run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from _measure import run_measured  # noqa: E402  (bench/ is the script's folder)

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
mode, no_eval = sys.argv[1], sys.argv[2] == "1"
from pipeline_lib import demo
from pipeline_lib.pipeline import run_build
spec = demo.demo_spec(evaluation=not no_eval)
if mode == "prepare":
    from pipeline_lib.store import default_root
    demo.ensure_demo_release(default_root())
    print(json.dumps({}))
elif mode == "seq":
    t1 = time.perf_counter()
    r = run_build(spec)
    print(json.dumps({"import_s": t1 - t0, "run_s": time.perf_counter() - t1,
                      "stages": [{"label": s.label, "seconds": s.seconds, "cached": s.cached} for s in r.stages]}))
else:
    from flows.build import build_model
    t1 = time.perf_counter()
    state = build_model(spec, return_state=True)
    res = state.result()
    print(json.dumps({"import_s": t1 - t0, "run_s": time.perf_counter() - t1,
                      "flow_run_id": str(state.state_details.flow_run_id),
                      "stages": [s.to_json() for s in res.stages]}))
"""


def run_child(mode: str, env: dict, no_eval: bool) -> tuple[dict, float, int]:
    m = run_measured([sys.executable, "-c", CHILD, mode, "1" if no_eval else "0"], env=env, cwd=ROOT)
    lines = m.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{mode} run printed nothing:\n{m.stderr[-4000:]}")
    return json.loads(lines[-1]), m.wall_s, m.rss_bytes


def task_times(flow_run_id: str) -> dict[str, float]:
    """Task name+label -> seconds, from the server's records (start to end of each task run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out: dict[str, float] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    for r in runs:
        if r.start_time and r.end_time:
            out[r.name] = (r.end_time - r.start_time).total_seconds()
        else:  # cached runs never start: they go straight to a final state
            out[r.name] = r.total_run_time.total_seconds() if r.total_run_time else 0.0
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-eval", action="store_true", help="leave the evaluation stage out")
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)

    from _prefect_fixtures import start_server, stop_process

    work = Path(tempfile.mkdtemp(prefix="zhllama-bench-flow-", dir=args.dir))
    t0 = time.perf_counter()
    server = start_server(work / "prefect-home")
    server_s = time.perf_counter() - t0
    os.environ.update(server.env)
    results: dict[str, dict] = {}
    try:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        for runner in ("seq", "flow"):
            env = {**os.environ, **server.env, "ZHLLAMA_HOME": str(work / f"home-{runner}"), "ZHLLAMA_PROGRESS": "0"}
            run_child("prepare", env, args.no_eval)
            for phase in ("cold", "warm"):
                data, wall, rss = run_child(runner, env, args.no_eval)
                results[f"{runner}-{phase}"] = {**data, "wall_s": wall, "rss": rss}
                print(f"{runner:4} {phase}: {wall:6.1f} s wall ({data['run_s']:.1f} s in the build), "
                      f"peak RSS {rss / 1e6:.0f} MB", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            for phase in ("cold", "warm"):
                times = task_times(results[f"flow-{phase}"]["flow_run_id"])
                by_label = {}
                for s in results[f"flow-{phase}"]["stages"]:  # task runs are named after their label
                    by_label[s["label"]] = times.get(s["label"], float("nan"))
                results[f"flow-{phase}"]["task_s"] = by_label
    finally:
        stop_process(server.proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nPrefect server start-up (not counted below): {server_s:.1f} s\n")
    print("| stage | sequential cold (s) | Prefect task cold (s) | sequential warm (s) | Prefect task warm (s) |")
    print("|---|---:|---:|---:|---:|")
    seq_c = {s["label"]: s["seconds"] for s in results["seq-cold"]["stages"]}
    seq_w = {s["label"]: s["seconds"] for s in results["seq-warm"]["stages"]}
    for label in seq_c:
        print(f"| {label} | {seq_c[label]:.2f} | {results['flow-cold']['task_s'].get(label, float('nan')):.2f} | "
              f"{seq_w[label]:.3f} | {results['flow-warm']['task_s'].get(label, float('nan')):.3f} |")
    print("\n| run | build time (s) | process wall (s) | peak RSS (MB) | warm / cold (build time) |")
    print("|---|---:|---:|---:|---:|")
    for runner, name in (("seq", "sequential (no Prefect)"), ("flow", "Prefect flow")):
        c, w = results[f"{runner}-cold"], results[f"{runner}-warm"]
        for phase, r in (("cold", c), ("warm", w)):
            ratio = f"{w['run_s'] / c['run_s']:.3f}" if phase == "warm" else ""
            print(f"| {name}, {phase} | {r['run_s']:.2f} | {r['wall_s']:.2f} | {r['rss'] / 1e6:.0f} | {ratio} |")
    for phase in ("cold", "warm"):
        f, s = results[f"flow-{phase}"]["run_s"], results[f"seq-{phase}"]["run_s"]
        print(f"\nPrefect overhead, {phase}: {f - s:+.2f} s (flow {f:.2f} s vs sequential {s:.2f} s, ratio {f / s:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
