"""``zhllama server | deploy | schedule``: a local Prefect server with every deployment, and its schedules.

* ``zhllama server``   — a Prefect server on 127.0.0.1 (SQLite in PREFECT_HOME, analytics off), every
  deployment applied through the API (printed as each is created), a process worker; Ctrl-C stops all.
  Model rebuild schedules are off unless named with ``--schedule``.
* ``zhllama deploy``   — apply the deployments to the server at PREFECT_API_URL (a team's server).
* ``zhllama schedule NAME on|off`` — switch one model's weekly rebuild.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import time

from pipeline_lib.errors import ZhllamaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="local Prefect server + every deployment + a worker; Ctrl-C stops",
                       description="Start a Prefect server on 127.0.0.1 (SQLite in PREFECT_HOME, analytics off), "
                       "create the process work pool, its 'builds' queue (one real build at a time) and the "
                       "memory-heavy concurrency limit, apply every deployment, start a worker, and print the UI "
                       "address. Weekly model rebuilds stay off unless named with --schedule.")
    p.add_argument("--port", type=int, default=4200, help="port on 127.0.0.1 (default 4200)")
    p.add_argument("--memory-slots", type=int, default=1,
                   help="memory-heavy stages (merge, GGUF, quantize, evaluate) allowed at once (default 1)")
    p.add_argument("--build-slots", type=int, default=1, help="real model builds allowed at once (default 1)")
    p.add_argument("--schedule", action="append", default=[], metavar="MODEL",
                   help="switch on the weekly rebuild of MODEL (repeat); all are off by default")
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("deploy", help="apply every deployment to the Prefect server at PREFECT_API_URL",
                       description="Create the work pool, queues and concurrency limit and upsert every deployment "
                       "with its upstream-change automation, in one pass over the API. Schedules a user already "
                       "switched keep their state; new ones are off unless named with --schedule.")
    p.add_argument("--schedule", action="append", default=[], metavar="MODEL",
                   help="switch on the weekly rebuild of MODEL (repeat)")
    p.add_argument("--memory-slots", type=int, default=1, help="memory-heavy stages allowed at once (default 1)")
    p.add_argument("--build-slots", type=int, default=1, help="real model builds allowed at once (default 1)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("schedule", help="switch a model's weekly rebuild on or off",
                       description="Turn the schedule of one deployment on or off on the server at PREFECT_API_URL "
                       "(`zhllama schedule alpaca-plus-7b on`).")
    p.add_argument("name", help="a model (alpaca-plus-7b), its deployment (build-alpaca-plus-7b) or check-upstream")
    p.add_argument("state", choices=["on", "off"], help="on: runs at its weekly slot; off: only when triggered")
    p.set_defaults(func=cmd_schedule)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def deploy_all(*, schedule: list[str], memory_slots: int = 1, build_slots: int = 1, echo: bool = True) -> list[str]:
    """Apply the deployments through the API; print each as it is created. Returns the scheduled ones."""
    from flows.deployments import apply

    scheduled: list[str] = []

    def created(name: str, what: str) -> None:
        if what.endswith(" ON"):
            scheduled.append(f"{name} ({what.removesuffix(' ON')})")
        if echo:
            print(f"  deployed {name:<40} {what}", flush=True)

    with _client() as client:
        apply(client, schedule=schedule, memory_slots=memory_slots, build_slots=build_slots, on_deployment=created)
    return scheduled


def _print_scheduled(scheduled: list[str]) -> None:
    builds = [s for s in scheduled if not s.startswith("check-upstream/")]
    if builds:
        print("scheduled: " + "; ".join(builds))
    else:
        print("scheduled: no model rebuilds (`zhllama schedule MODEL on` adds a weekly one)")
    if len(builds) < len(scheduled):
        print("check-upstream runs daily (02:00 UTC) and triggers the rebuild of a model whose hub repos moved")


def cmd_deploy(args: argparse.Namespace) -> int:
    from .flow import _api_url

    if not _api_url():
        raise ZhllamaError("no Prefect server to deploy to (PREFECT_API_URL is not set)",
                           fix="start one with `zhllama server` (which deploys everything), or export PREFECT_API_URL")
    _print_scheduled(deploy_all(schedule=args.schedule, memory_slots=args.memory_slots, build_slots=args.build_slots))
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows.deployments import set_schedule

    from .flow import _api_url

    if not _api_url():
        raise ZhllamaError("no Prefect server (PREFECT_API_URL is not set)",
                           fix="start one with `zhllama server` and export the PREFECT_API_URL it prints")
    with _client() as client:
        crons = set_schedule(client, args.name, active=args.state == "on")
    print(f"{args.name}: schedule {', '.join(crons) or '(none)'} UTC is {args.state}")
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.settings import WORK_POOL

    from .console import prefect_exe, stop, wait_healthy

    url = f"http://127.0.0.1:{args.port}"
    env = {**os.environ, "PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    server = worker = None

    def interrupt(signum, frame):  # Ctrl-C, and SIGTERM from a process manager: stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # explicit: a shell may start us with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupt)
    t0 = time.monotonic()
    try:
        print(f"starting the Prefect server on {url} (SQLite in {env.get('PREFECT_HOME', '~/.prefect')}) …", flush=True)
        server = subprocess.Popen([prefect_exe(), "server", "start", "--host", "127.0.0.1", "--port", str(args.port)],
                                  env=env, start_new_session=True)
        wait_healthy(f"{url}/api", server, timeout=float(os.environ.get("ZHLLAMA_SERVER_TIMEOUT", "120")))
        print(f"server up after {time.monotonic() - t0:.1f} s; deploying …", flush=True)
        os.environ["PREFECT_API_URL"] = f"{url}/api"
        with temporary_settings(updates={PREFECT_API_URL: f"{url}/api"}):
            scheduled = deploy_all(schedule=args.schedule, memory_slots=args.memory_slots,
                                   build_slots=args.build_slots)
        if not args.no_worker:
            worker = subprocess.Popen([prefect_exe(), "worker", "start", "--pool", WORK_POOL], env=env,
                                      start_new_session=True)
        print(f"ready after {time.monotonic() - t0:.1f} s")
        _print_scheduled(scheduled)
        print(f"\nPrefect UI: {url}\n"
              f"in another shell:  export PREFECT_API_URL={url}/api\n"
              f"                   zhllama run tiny-demo --wait      "
              f"(= prefect deployment run 'build-model/build-tiny-demo')\n"
              f"Ctrl-C stops the worker and the server.", flush=True)
        while server.poll() is None and (worker is None or worker.poll() is None):
            time.sleep(1)
        raise ZhllamaError("the Prefect " + ("server" if server.poll() is not None else "worker") + " stopped")
    except KeyboardInterrupt:
        return 0
    finally:
        for proc, what in ((worker, "the worker"), (server, "the server")):
            if proc is not None and proc.poll() is None:
                print(f"stopping {what} …", flush=True)
                stop(proc)
