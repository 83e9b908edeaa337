"""Where a build's stage tasks run: ``BuildSpec.runner``.

* ``threads`` (default): Prefect's thread pool in the flow-run process (one host).
* ``dask``: ``prefect_dask.DaskTaskRunner`` on the Dask cluster at ``BuildSpec.dask_address``
  (``tcp://scheduler:8786``), or on a ``distributed.LocalCluster`` of ``dask_workers`` worker
  processes started for the run. Every memory-heavy stage (``StageDef.heavy``) asks Dask for one
  unit of the worker resource ``memory_heavy``; local workers have one unit each and remote ones
  must be started with ``--resources memory_heavy=1``, so a worker runs at most one merge, GGUF,
  quantization or evaluation at a time. The server's global concurrency limit
  ``zhllama-memory-heavy`` still applies on top, across runs.

What crosses the wire is small: a task gets its ``StageNode``, the upstream results (StageRef
dicts: store keys) and the store path, and returns a StageRef; the bytes stay in the store, which
every worker must see at the same path. :func:`check_cluster` proves that before any stage runs
(a probe file the flow writes must be readable on every worker), and that the workers use the same
lock backend as the flow (``ZHLLAMA_LOCKS``).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline_lib.errors import InputError
from pipeline_lib.locks import LOCKS_ENV, lock_url, redacted

HEAVY_RESOURCE = "memory_heavy"
THREADS_PER_WORKER = 2  # a heavy stage and a light one (a download, a hash) side by side


def local_cluster_kwargs(workers: int) -> dict[str, Any]:
    """``distributed.LocalCluster`` settings for ``workers`` worker processes on this host."""
    return {
        "n_workers": workers, "threads_per_worker": THREADS_PER_WORKER, "processes": True,
        "resources": {HEAVY_RESOURCE: 1},
        "memory_limit": 0,  # no nanny kill on RSS: evaluation mmaps the whole model (page cache counts)
        "host": "127.0.0.1", "dashboard_address": None,
    }


def task_runner(spec) -> Any | None:
    """The Dask task runner a spec asks for (not started), or None for the flow's own thread pool."""
    if spec.runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    import distributed

    return DaskTaskRunner(cluster_class=distributed.LocalCluster,
                          cluster_kwargs=local_cluster_kwargs(spec.dask_workers))


def _quiet(console: bool) -> None:
    if not console:  # as the CLI's quiet_prefect: run logs go to the API only
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).propagate = False


def _follow_console(dask_worker, console: bool) -> None:
    _quiet(console)


def follow_console(runner) -> None:
    """Start the runner's local cluster so that its workers print run logs to the console only if this
    process does (``zhllama build`` keeps them in the API and the UI), and Dask's INFO lines neither."""
    console = logging.getLogger("prefect.task_runs").propagate
    if not console:
        logging.getLogger("distributed").setLevel(logging.WARNING)
        logging.getLogger("prefect.task_runner.dask").setLevel(logging.WARNING)
    runner.client.run(_follow_console, console=console)


def submit(runner, task, parameters: Mapping[str, Any], *, resources: Mapping[str, float]):
    """``runner.submit`` with Dask resource annotations (``dask.annotate``) for this one task."""
    import dask

    if not resources:
        return runner.submit(task, dict(parameters))
    with dask.annotate(resources=dict(resources)):
        return runner.submit(task, dict(parameters))


def _probe(path: str) -> dict[str, Any]:
    """Run on each Dask worker: what it sees of the store and which lock backend it would use."""
    try:
        seen = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        seen = f"unreadable ({exc.strerror or exc})"
    try:
        locks = lock_url()
    except InputError as exc:
        locks = f"invalid ({exc.seen})"
    return {"host": socket.gethostname(), "pid": os.getpid(), "probe": seen, "locks": locks}


def check_cluster(client, *, store_root: str | Path) -> dict[str, dict[str, Any]]:
    """Check the Dask cluster before any stage runs: workers exist, at least one offers the heavy
    resource, every worker sees this store (reads a probe file written here) and uses the same lock
    backend. Returns ``{worker address: probe}``; raises InputError naming the first problem."""
    info = client.scheduler_info(n_workers=-1)
    workers = info.get("workers", {})
    address = getattr(client.scheduler, "address", "?")
    if not workers:
        raise InputError(f"the Dask cluster at {address} has no workers",
                         fix="start some: `dask worker tcp://SCHEDULER:8786 --nthreads 2 --memory-limit 0 "
                             f"--resources {HEAVY_RESOURCE}=1` on each build host")
    if not any(w.get("resources", {}).get(HEAVY_RESOURCE, 0) >= 1 for w in workers.values()):
        raise InputError(f"no worker of the Dask cluster at {address} offers the resource {HEAVY_RESOURCE!r}: "
                         "the memory-heavy stages (merge, GGUF, quantize, evaluate) could never start",
                         fix=f"start the workers with `--resources {HEAVY_RESOURCE}=1`")
    mine = lock_url()
    token = f"zhllama store probe {uuid.uuid4().hex}"
    probe = Path(store_root) / f".probe-{uuid.uuid4().hex[:12]}"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(token, encoding="utf-8")
    try:
        seen = client.run(_probe, str(probe))
    finally:
        probe.unlink(missing_ok=True)
    for worker, got in sorted(seen.items()):
        if got["probe"] != token:
            raise InputError(f"Dask worker {worker} on {got['host']} does not see the artifact store {store_root} "
                             f"(the probe file written there reads {got['probe'][:60]!r})",
                             expected="the store on a shared filesystem at the same path on every host",
                             fix="mount the shared store at the same path on every worker host and set ZHLLAMA_HOME "
                                 "to it (docs/team.md)")
        if got["locks"] != mine:
            raise InputError(f"Dask worker {worker} on {got['host']} uses the locks "
                             f"{redacted(got['locks']) if got['locks'] else 'flock files'}, this flow "
                             f"{redacted(mine) if mine else 'flock files'}",
                             fix=f"set the same {LOCKS_ENV} on every worker host (redis://… for several hosts)")
    return seen
