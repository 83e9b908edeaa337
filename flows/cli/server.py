"""``zhllama server | deploy | schedule``: a local Prefect server with every deployment, and its schedules.

* ``zhllama server``   — a Prefect server on 127.0.0.1 (SQLite in PREFECT_HOME, analytics off), every
  deployment applied through the API (printed as each is created), a process worker; Ctrl-C stops all.
  Model rebuild schedules are off unless named with ``--schedule``. A team's server:
  ``--database postgresql+asyncpg://USER:PASSWORD@HOST:5432/prefect`` (or Prefect's own setting
  ``PREFECT_SERVER_DATABASE_CONNECTION_URL``) and ``--host 0.0.0.0`` (docs/team.md).
* ``zhllama deploy``   — apply the deployments to the server at PREFECT_API_URL (a team's server).
* ``zhllama schedule NAME on|off`` — switch one model's weekly rebuild.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from pipeline_lib.errors import InputError, ZhllamaError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("server", help="local Prefect server + every deployment + a worker; Ctrl-C stops",
                       description="Start a Prefect server on 127.0.0.1 (SQLite in PREFECT_HOME, analytics off; "
                       "--host and --database postgresql+asyncpg://… for a team's server), "
                       "create the process work pool, its 'builds' queue (one real build at a time) and the "
                       "memory-heavy concurrency limit, apply every deployment, start a worker, and print the UI "
                       "address. Weekly model rebuilds stay off unless named with --schedule.")
    p.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for a team's server, behind TLS and auth)")
    p.add_argument("--database", metavar="URL",
                   help="the server's database: postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB for a team (checked "
                   "before the server starts); default: PREFECT_SERVER_DATABASE_CONNECTION_URL if set, else SQLite "
                   "in PREFECT_HOME")
    _deploy_options(p)
    p.add_argument("--no-worker", action="store_true", help="do not start a worker")
    p.set_defaults(func=cmd_server)

    p = sub.add_parser("deploy", help="apply every deployment to the Prefect server at PREFECT_API_URL",
                       description="Create the work pool, queues and concurrency limit and upsert every deployment "
                       "with its upstream-change automation, in one pass over the API. Schedules a user already "
                       "switched keep their state; new ones are off unless named with --schedule.")
    _deploy_options(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("schedule", help="switch a model's weekly rebuild on or off",
                       description="Turn the schedule of one deployment on or off on the server at PREFECT_API_URL "
                       "(`zhllama schedule alpaca-plus-7b on`).")
    p.add_argument("name", help="a model (alpaca-plus-7b), its deployment (build-alpaca-plus-7b) or check-upstream")
    p.add_argument("state", choices=["on", "off"], help="on: runs at its weekly slot; off: only when triggered")
    p.set_defaults(func=cmd_schedule)


def _deploy_options(p: argparse.ArgumentParser) -> None:
    """What `server` and `deploy` both set up: schedules switched on, and the two concurrency limits."""
    p.add_argument("--schedule", action="append", default=[], metavar="MODEL",
                   help="switch on the weekly rebuild of MODEL (repeat); all are off by default")
    p.add_argument("--memory-slots", type=int, default=1,
                   help="memory-heavy stages (merge, GGUF, quantize, evaluate) allowed at once (default 1)")
    p.add_argument("--build-slots", type=int, default=1, help="real model builds allowed at once (default 1)")


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


DATABASE_SETTINGS = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")


def _redacted_db(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def database_url(value: str | None) -> str | None:
    """The database the server is to use: ``--database``, else Prefect's own setting, else None (SQLite).

    Raises InputError for a URL Prefect cannot use (it needs the async drivers)."""
    url = value or next((os.environ[k] for k in DATABASE_SETTINGS if os.environ.get(k)), None)
    if url is None:
        return None
    scheme = url.split("://", 1)[0]
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        raise InputError(f"database URL scheme {scheme}://", expected="postgresql+asyncpg:// (Prefect's async driver)",
                         fix="write postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB")
    if scheme not in ("postgresql+asyncpg", "sqlite+aiosqlite"):
        raise InputError(f"database URL {_redacted_db(url)!r}",
                         expected="postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB (or sqlite+aiosqlite:///FILE)")
    return url


def check_postgres(url: str, *, timeout: float = 10) -> None:
    """Connect once with asyncpg (the driver the server uses): a clear error now rather than a crashed server."""
    import asyncio

    import asyncpg

    async def probe() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=timeout)
        await conn.close()

    try:
        asyncio.run(probe())
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ZhllamaError(f"cannot use the database {_redacted_db(url)} ({type(exc).__name__}: {exc})",
                           fix="start PostgreSQL there and create the database and user (docs/team.md), or fix "
                               "--database") from None


def cmd_server(args: argparse.Namespace) -> int:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.settings import WORK_POOL

    from .console import prefect_exe, stop, wait_healthy

    database = database_url(args.database)
    if database is not None and database.startswith("postgresql"):
        check_postgres(database)
    local = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # how this host's processes reach it
    url = f"http://{local}:{args.port}"
    env = {**os.environ, "PREFECT_API_URL": f"{url}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "DO_NOT_TRACK": "1"}
    if database is not None:  # the server process reads it; one name, so an older value cannot win
        env |= dict.fromkeys(DATABASE_SETTINGS, database)
        where = ("PostgreSQL " if database.startswith("postgresql") else "") + _redacted_db(database)
    else:
        where = f"SQLite in {Path(env.get('PREFECT_HOME') or '~/.prefect').expanduser()}"  # made by main()
    server = worker = None

    def interrupt(signum, frame):  # Ctrl-C, and SIGTERM from a process manager: stop cleanly
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # explicit: a shell may start us with SIGINT ignored
    signal.signal(signal.SIGTERM, interrupt)
    t0 = time.monotonic()
    try:
        print(f"starting the Prefect server on {args.host}:{args.port} ({where}) …", flush=True)
        server = subprocess.Popen([prefect_exe(), "server", "start", "--host", args.host, "--port", str(args.port)],
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
        public = url if local == args.host else f"http://{socket.gethostname()}:{args.port}"
        print(f"\nPrefect UI: {public}\n"
              f"in another shell:  export PREFECT_API_URL={public}/api\n"
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
