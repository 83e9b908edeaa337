"""Beyond one machine, on the real engines: Dask, Redis, PostgreSQL (docs/team.md).

* a demo build on a ``distributed.LocalCluster`` of 2 worker processes: it completes, quantize and
  evaluate ran in two different worker processes, what Dask carries is small (task specs, results),
  heavy stages asked for the ``memory_heavy`` resource, and a rerun (on a cluster the runner starts
  itself) is all cache hits;
* Redis locks: ``RedisKeyLock`` keeps ``KeyLock``'s contract, a dead holder's lock expires after the
  lease, Prefect's transaction locks (``LeasedRedisLockManager``) too; two build processes on one
  Redis and one store compute every stage once and leave no lock file; a build SIGKILLed inside a
  stage blocks the other only until the lease runs out;
* the end-to-end server test on PostgreSQL: deploy, a process worker, ``prefect deployment run`` ×4
  at once, all Completed with their artifacts, each stage computed once, no ``database is locked``.

Services are started here (tests/_services.py) and skipped, with the reason, only if the binary is
missing. The Prefect server on PostgreSQL is this module's own; the session's SQLite server
(tests/_prefect_fixtures.py) is used by the in-process builds and never started twice.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

import pytest
from _prefect_fixtures import VENV_BIN, stop_process
from _services import missing_postgres, missing_redis, start_postgres, start_redis
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from pipeline_lib import demo
from pipeline_lib.store import Store

pytestmark = [pytest.mark.team, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 600  # a hang guard on a shared machine, not a performance target
WIRE_LIMIT = 64 * 1024  # bytes a task spec or a task result may take on the wire


@pytest.fixture(scope="module")
def redis_url():
    why = missing_redis()
    if why:
        pytest.skip(why)
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_db(redis_url):
    """The module's Redis, emptied for each test."""
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushall()
    yield client
    client.flushall()


def _demo_spec(out: Path, **update):
    return demo.demo_spec(out_dir=str(out)).model_copy(update=update)


# ------------------------------------------------------------------ Dask


class WireLog(SchedulerPlugin):
    """Scheduler plugin: the pickled size and the resource annotation of every task the scheduler receives."""

    name = "zhllama-wire-log"

    def __init__(self) -> None:
        self.specs: dict[str, int] = {}
        self.resources: dict[str, dict] = {}

    def update_graph(self, scheduler, *, keys, tasks, annotations, **kwargs) -> None:
        from distributed.protocol.pickle import dumps

        for key in tasks:
            ts = scheduler.tasks.get(key)
            if ts is not None and ts.run_spec is not None:
                self.specs[str(key)] = len(dumps(ts.run_spec))
        for key, res in annotations.get("resources", {}).items():
            self.resources[str(key)] = dict(res)


class ResultSizes(WorkerPlugin):
    """Worker plugin: the pickled size of every task result as it lands in the worker's memory."""

    name = "zhllama-result-sizes"

    def setup(self, worker) -> None:
        self.worker, self.sizes = worker, {}

    def transition(self, key, start, finish, **kwargs) -> None:
        from distributed.protocol.pickle import dumps

        if finish == "memory" and key in self.worker.data:
            self.sizes[str(key)] = len(dumps(self.worker.data[key]))


def _result_sizes(dask_worker) -> dict[str, int]:
    return dict(dask_worker.plugins[ResultSizes.name].sizes)


def test_dask_build_on_two_worker_processes_then_all_cache_hits(prefect_server, tmp_path):
    import distributed

    from flows.build import build_model
    from pipeline_lib.pipeline import STAGES
    from tasks.runners import HEAVY_RESOURCE, local_cluster_kwargs

    log = WireLog()
    out = tmp_path / "out"
    results: dict[str, int] = {}
    with distributed.LocalCluster(**local_cluster_kwargs(2)) as cluster, distributed.Client(cluster) as client:
        cluster.scheduler.add_plugin(log)
        client.register_plugin(ResultSizes())
        worker_pids = set(client.run(os.getpid).values())
        assert len(worker_pids) == 2 and os.getpid() not in worker_pids
        spec = _demo_spec(out, runner="dask", dask_address=cluster.scheduler_address)
        first = build_model(spec)
        for sizes in client.run(_result_sizes).values():  # what the workers still hold of this run
            results |= sizes
    assert first.stages and not any(s.cached for s in first.stages), [(s.label, s.state) for s in first.stages]
    for name in ("tiny-demo-f16.gguf", "tiny-demo-q4_0.gguf", "tiny-demo-q8_0.gguf", "report/report.md"):
        assert (out / name).is_file(), name
    lock = json.loads((out / "build-lock.json").read_text())
    assert "runner" not in lock["spec"] and "dask_address" not in lock["spec"]  # how it ran is not what it is

    # every stage ran in a Dask worker process, quantize and evaluate in both of them
    store = Store()
    producers = {s.label: store.get(s.key).producer for s in first.stages}
    assert {p["pid"] for p in producers.values()} <= worker_pids, producers
    spread = {p["pid"] for label, p in producers.items() if label.startswith(("quantize", "evaluate"))}
    assert len(spread) == 2, producers

    # what crossed the wire: a few KB per task spec (a StageNode, StageRefs, a path), never a tensor
    gguf_size = (out / "tiny-demo-f16.gguf").stat().st_size
    assert len(log.specs) >= len(first.stages), log.specs
    assert max(log.specs.values()) < min(WIRE_LIMIT, gguf_size), log.specs
    assert results and max(results.values()) < 8 * 1024, results
    heavy = {s.label for s in first.stages if STAGES[s.stage].heavy}
    annotated = [r for r in log.resources.values() if r == {HEAVY_RESOURCE: 1}]
    assert len(annotated) == len(heavy) and len(log.resources) == len(heavy), (log.resources, heavy)

    # a rerun on a LocalCluster the runner starts itself (no address): every stage cached
    again = build_model(_demo_spec(out, runner="dask", dask_workers=2))
    assert [s.label for s in again.stages] == [s.label for s in first.stages]
    assert all(s.cached and s.state == "Cached" for s in again.stages), [(s.label, s.state) for s in again.stages]
    assert [s.key for s in again.stages] == [s.key for s in first.stages]


def test_a_cluster_that_cannot_run_the_build_is_refused_before_any_stage(prefect_server, tmp_path, monkeypatch):
    """Workers without the heavy resource (heavy stages would wait forever), or with other locks."""
    import distributed

    from flows.build import build_model
    from pipeline_lib.errors import InputError
    from tasks.runners import check_cluster

    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(InputError, match="offers the resource 'memory_heavy'"):
            build_model(_demo_spec(tmp_path / "out", runner="dask", dask_address=cluster.scheduler_address))
    assert not Store().entries()
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, resources={"memory_heavy": 1},
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        seen = check_cluster(client, store_root=tmp_path / "store")  # a worker process that sees the store
        assert [w["probe"].startswith("zhllama store probe") for w in seen.values()] == [True]
        assert not list((tmp_path / "store").iterdir())  # the probe file is gone
        monkeypatch.setenv("ZHLLAMA_LOCKS", "redis://127.0.0.1:1/0")  # here, not in the worker started before
        with pytest.raises(InputError, match="uses the locks flock files, this flow redis://127.0.0.1:1/0"):
            check_cluster(client, store_root=tmp_path / "store")


def test_runner_options_reach_the_spec(tmp_path):
    from flows.cli.flow import _spec_from
    from flows.cli.main import build_parser
    from pipeline_lib.errors import InputError
    from pipeline_lib.pipeline import build_graph, plan_build

    def spec(*argv: str):
        argv = ["build", "tiny-demo", *argv]
        return _spec_from("tiny-demo", build_parser(argv).parse_args(argv))

    assert (spec("--dask-address", "tcp://10.0.0.5:8786").runner, spec().runner) == ("dask", "threads")
    assert spec("--dask-address", "tcp://10.0.0.5:8786").dask_address == "tcp://10.0.0.5:8786"
    assert spec("--runner", "dask", "--dask-workers", "3").dask_workers == 3
    with pytest.raises(InputError, match="needs Prefect"):
        spec("--runner", "dask", "--no-prefect")
    with pytest.raises(InputError, match="dask_address needs runner 'dask'"):
        spec("--runner", "threads", "--dask-address", "tcp://h:1")
    with pytest.raises(InputError, match="dask_address"):
        spec("--dask-address", "10.0.0.5:8786")  # no scheme
    # the runner is how, not what: the same graph (and so the same keys)
    plain = demo.demo_spec(out_dir=str(tmp_path / "o"))
    assert build_graph(plan_build(plain)) == build_graph(plan_build(_demo_spec(tmp_path / "o", runner="dask")))


# ------------------------------------------------------------------ Redis locks


_HOLD = """
import os, sys, time
from pipeline_lib.locks import RedisKeyLock
lock = RedisKeyLock(sys.argv[1], url=sys.argv[2], shared=sys.argv[3] == "s", lease=float(sys.argv[4]))
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_child(path: str, url: str, *, shared: bool = False, lease: float = 1.5) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _HOLD, path, url, "s" if shared else "x", str(lease)],
                             stdout=subprocess.PIPE, text=True, cwd=PROJECT,
                             env={**os.environ, "PYTHONPATH": str(PROJECT)})
    assert child.stdout.readline().strip() == "held"
    return child


def test_redis_key_lock_keeps_keylock_contract_and_a_dead_holders_lock_expires(redis_db, redis_url, tmp_path):
    from pipeline_lib.locks import RENEWER, RedisKeyLock

    path = str(tmp_path / "locks" / "k.lock")
    a = RedisKeyLock(path, url=redis_url, timeout=0, lease=1.0)
    b = RedisKeyLock(path, url=redis_url, timeout=0, lease=1.0)
    with a:
        assert a.is_locked
        with pytest.raises(TimeoutError, match="locked by another process"):
            b.acquire()
        time.sleep(2.5)  # more than two leases: the renewer keeps it
        with pytest.raises(TimeoutError):
            b.acquire()
        with pytest.raises(RuntimeError):
            a.acquire()
    with b:  # released: free at once
        pass
    # shared holders together; an exclusive one waits for all of them, and excludes them
    s1, s2 = (RedisKeyLock(path, url=redis_url, shared=True, timeout=0) for _ in range(2))
    with s1, s2:
        with pytest.raises(TimeoutError):
            RedisKeyLock(path, url=redis_url, timeout=0.3).acquire()
    with RedisKeyLock(path, url=redis_url, timeout=0):
        with pytest.raises(TimeoutError):
            RedisKeyLock(path, url=redis_url, shared=True, timeout=0.2).acquire()
    assert not redis_db.keys("zhllama:*")  # every key went with its last hold

    # a holder SIGKILLed: its lock expires one lease later, not before, for exclusive and shared holds
    for shared in (False, True):
        child = _hold_in_child(path, redis_url, shared=shared, lease=1.5)
        time.sleep(2)  # renewed beyond its first lease while alive
        with pytest.raises(TimeoutError):
            RedisKeyLock(path, url=redis_url, timeout=0).acquire()
        child.kill()
        child.wait(timeout=10)
        t0 = time.monotonic()
        with RedisKeyLock(path, url=redis_url, timeout=10):
            waited = time.monotonic() - t0
        assert 0.3 < waited < 3.0, waited
    assert not RENEWER.held()

    # a hold that could not be renewed (here: removed behind its back) is reported lost
    lost = RedisKeyLock(path, url=redis_url, timeout=0, lease=0.6).acquire()
    redis_db.delete(lost.name)
    deadline = time.monotonic() + 5
    while not lost.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost.lost
    lost.release()


def test_store_on_redis_locks_writes_no_lock_files_and_gc_respects_holds(redis_db, redis_url, tmp_path, monkeypatch):
    from pipeline_lib.errors import InputError

    monkeypatch.setenv("ZHLLAMA_LOCKS", redis_url)
    store = Store(tmp_path / "store")
    assert store.lock_url == redis_url
    entry = store.get_or_produce("t", version="1", inputs={}, produce=lambda d: {"n": (d / "x").write_text("x")})
    assert entry.producer == {"host": os.uname().nodename, "pid": os.getpid()}
    with store.hold(entry):
        assert store.gc(everything=True) == []  # held for reading (a shared Redis hold): kept
        assert redis_db.keys("zhllama:lock:*")
    assert [r.split()[0] for r in store.gc(everything=True)] == ["requested"]
    assert not (tmp_path / "store" / "locks").exists()
    with pytest.raises(InputError, match="ZHLLAMA_LOCKS"):
        Store(tmp_path / "store", locks="zookeeper://h")
    from pipeline_lib.store import KeyLock

    assert isinstance(Store(tmp_path / "s2", locks="").lock("a" * 64), KeyLock)  # '' = file locks


def test_prefect_transaction_locks_on_redis_have_a_lease(redis_db, redis_url, tmp_path, monkeypatch):
    from tasks.cache import FlockLockManager, lock_manager
    from tasks.locks import LeasedRedisLockManager

    assert isinstance(lock_manager(tmp_path), FlockLockManager)  # the default: one machine
    monkeypatch.setenv("ZHLLAMA_LOCKS", redis_url)
    monkeypatch.setenv("ZHLLAMA_LOCK_LEASE", "1")
    mgr = lock_manager(tmp_path)
    assert isinstance(mgr, LeasedRedisLockManager) and mgr.lease == 1.0
    other = pickle.loads(pickle.dumps(mgr))  # as a Dask worker receives it: settings, fresh clients
    assert (other.namespace, other.lease, other.connection_url) == (mgr.namespace, 1.0, redis_url)

    assert mgr.acquire_lock("k", "me")
    assert mgr.acquire_lock("k", "me")  # re-entrant for its holder
    assert not other.acquire_lock("k", "you", acquire_timeout=0.2)
    time.sleep(2.2)  # longer than two leases: renewed
    assert other.is_locked("k") and mgr.is_lock_holder("k", "me") and not other.is_lock_holder("k", "you")
    assert not other.wait_for_lock("k", timeout=0.3)
    with pytest.raises(ValueError):
        other.release_lock("k", "you")
    mgr.release_lock("k", "me")
    assert other.wait_for_lock("k", timeout=1)
    assert lock_manager(tmp_path / "elsewhere").acquire_lock("k", "x")  # another store: another name

    # a holder that stops renewing (a killed worker): its lock expires after the lease
    assert mgr.acquire_lock("dead", "gone")
    from pipeline_lib.locks import RENEWER

    for name in RENEWER.held():
        if "dead" in name:
            RENEWER.discard(name)
    t0 = time.monotonic()
    assert other.acquire_lock("dead", "next", acquire_timeout=5)
    assert 0.2 < time.monotonic() - t0 < 2.5


_BUILD = """
import json, os, sys
from flows.build import build_model
from pipeline_lib import demo
spec = demo.demo_spec(out_dir=sys.argv[1], evaluation=False, quant_types=("q4_0",))
r = build_model(spec)
print(json.dumps({"pid": os.getpid(), "stages": [s.to_json() for s in r.stages]}))
"""

_BUILD_STUCK = """
import os, sys, time
from pathlib import Path
import pipeline_lib.quantize as q

def stuck(*args, **kwargs):
    Path(os.environ["MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)

q.quantize = stuck
""" + _BUILD


def _builder(code: str, out: Path, env: dict, log: Path) -> subprocess.Popen:
    fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen([sys.executable, "-c", code, str(out)], env=env, cwd=PROJECT, stdout=subprocess.PIPE,
                            stderr=fh, start_new_session=True)


def _finish(proc: subprocess.Popen, log: Path) -> dict:
    out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, log.read_text(errors="replace")[-4000:]
    return json.loads(out.strip().splitlines()[-1])


def _team_env(prefect_server, home: Path, redis_url: str, **extra: str) -> dict:
    return {**os.environ, **prefect_server.env, "ZHLLAMA_HOME": str(home), "ZHLLAMA_LOCKS": redis_url,
            "PYTHONPATH": str(PROJECT), **extra}


def test_two_builds_on_one_redis_and_one_store_compute_each_stage_once(prefect_server, redis_db, redis_url, tmp_path):
    home = tmp_path / "shared-store"
    env = _team_env(prefect_server, home, redis_url)
    procs = [_builder(_BUILD, tmp_path / f"out{i}", env, tmp_path / f"build{i}.log") for i in range(2)]
    a, b = (_finish(p, tmp_path / f"build{i}.log") for i, p in enumerate(procs))
    assert [s["label"] for s in a["stages"]] == [s["label"] for s in b["stages"]]
    for sa, sb in zip(a["stages"], b["stages"], strict=True):
        assert sa["key"] == sb["key"]
        assert [sa["cached"], sb["cached"]].count(False) == 1, (sa, sb)
    store = Store(home)
    assert {e.producer["pid"] for e in store.entries()} <= {a["pid"], b["pid"]}
    assert len(store.entries()) == len(a["stages"])
    # the locks were Redis leases: no lock file in the store, no key left once both finished
    assert not (home / "locks").exists() and not (home / "prefect" / "locks").exists()
    stats = redis_db.info("commandstats")
    assert stats.get("cmdstat_evalsha", {}).get("calls", 0) > 0 and stats.get("cmdstat_set", {}).get("calls", 0) > 0
    assert not redis_db.keys("zhllama:*")


def test_a_killed_lock_holder_blocks_the_other_build_until_its_lease_expires(prefect_server, redis_db, redis_url,
                                                                             tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    lease = 10.0
    home, marker = tmp_path / "shared-store", tmp_path / "inside-quantize"
    env = _team_env(prefect_server, home, redis_url, ZHLLAMA_LOCK_LEASE=str(lease), MARKER=str(marker))
    from datetime import datetime

    since = datetime.now(UTC)
    holder = _builder(_BUILD_STUCK, tmp_path / "out-a", env, tmp_path / "a.log")
    other = None
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not marker.exists():
            assert holder.poll() is None, (tmp_path / "a.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the holder never reached quantize"
            time.sleep(0.2)
        assert redis_db.keys("zhllama:txn:*zhllama-quantize-*") and redis_db.keys("zhllama:lock:*")
        other = _builder(_BUILD, tmp_path / "out-b", env, tmp_path / "b.log")

        def running_quantize() -> int:  # Running: the task began and waits for its transaction lock
            with get_client(sync_client=True) as client:
                runs = client.read_task_runs(task_run_filter=TaskRunFilter(
                    name=TaskRunFilterName(any_=["quantize q4_0"]), start_time=TaskRunFilterStartTime(after_=since)))
            return sum(1 for r in runs if r.state and r.state.is_running())

        while running_quantize() < 2:
            assert other.poll() is None, (tmp_path / "b.log").read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the second build never reached quantize"
            time.sleep(0.5)
        time.sleep(1)  # it waits, and keeps waiting while the holder lives
        assert other.poll() is None and not (tmp_path / "out-b").exists()
        os.killpg(holder.pid, signal.SIGKILL)
        t_kill = time.time()
        holder.wait(timeout=30)
        b = _finish(other, tmp_path / "b.log")
    finally:
        for p in (holder, other):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)
    quantize = next(s for s in b["stages"] if s["label"] == "quantize q4_0")
    entry = Store(home).get(quantize["key"])
    assert not quantize["cached"] and entry.producer["pid"] == b["pid"]
    # renewed every lease/3 while the holder lived: free between 2/3 of a lease and a lease after the kill
    assert entry.created - t_kill > lease * 2 / 3 - 1.0, entry.created - t_kill
    assert entry.created - t_kill < lease + 60
    assert (tmp_path / "out-b" / "tiny-demo-q4_0.gguf").is_file()


# ------------------------------------------------------------------ the server on PostgreSQL


@pytest.fixture(scope="module")
def pg_server(tmp_path_factory):
    """(server, PostgreSQL): ``zhllama server --database postgresql+asyncpg://…`` with its worker, on a fresh
    PostgreSQL: this module's own server, never the session's SQLite one."""
    from _prefect_fixtures import PrefectServer, free_port

    why = missing_postgres()
    if why:
        pytest.skip(why)
    pg = start_postgres()
    home = tmp_path_factory.mktemp("prefect-pg-home")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1", "ZHLLAMA_HOME": str(home / "zh")}
    log = home / "server.out"
    try:
        with open(log, "wb") as fh:
            proc = subprocess.Popen([str(VENV_BIN / "zhllama"), "server", "--database", pg.url, "--port", str(port)],
                                    env=env, cwd=PROJECT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while "Prefect UI" not in log.read_text(errors="replace"):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                time.sleep(1)
            url = f"http://127.0.0.1:{port}/api"
            yield PrefectServer(url=url, home=home, env={**env, "PREFECT_API_URL": url}, proc=proc, log=log), pg
        finally:
            stop_process(proc)
    finally:
        pg.stop()


def _api(srv):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: srv.url})


def test_e2e_on_postgresql_four_concurrent_deployment_runs(pg_server, tmp_path):
    """Deployed by `zhllama server --database …`, four `prefect deployment run` at once, its worker runs them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    srv, pg = pg_server
    text = srv.log.read_text(errors="replace")
    assert "(PostgreSQL postgresql+asyncpg://zhllama@127.0.0.1:" in text and "deployed build-model/build-tiny-demo" in text
    store, out = tmp_path / "store", tmp_path / "published"
    params = json.dumps({"spec": {"model": "tiny-demo", "out_dir": str(out), "quant_types": ["q4_0"],
                                  "evaluation": {"n_ctx": 64, "max_chunks": 2, "max_new_tokens": 8}}})
    job_env = json.dumps({"ZHLLAMA_HOME": str(store)})
    ids = []
    for _ in range(4):
        res = srv.prefect("deployment", "run", "build-model/build-tiny-demo", "--params", params,
                          "--job-variable", f"env={job_env}", cwd=PROJECT)
        ids.append(re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout).group(1))
    with _api(srv), get_client(sync_client=True) as client:
        deadline = time.monotonic() + RUN_TIMEOUT
        pending = set(ids)
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                run = client.read_flow_run(i)
                if run.state and run.state.is_final():
                    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n" + \
                        srv.log.read_text(errors="replace")[-4000:]
                    pending.discard(i)
            time.sleep(1)
        assert not pending, srv.log.read_text(errors="replace")[-4000:]
        arts = {i: {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[i]))) if a.key} for i in ids}
    for i in ids:
        assert {"tiny-demo-stages", "tiny-demo-verify", "tiny-demo-tokenizer", "tiny-demo-report"} <= set(arts[i])
    assert "data:image/png;base64," in arts[ids[0]]["tiny-demo-report"].data
    tables = [json.loads(arts[i]["tiny-demo-stages"].data) for i in ids]
    for rows in zip(*tables, strict=True):  # each stage computed by exactly one of the four runs
        assert len({r["key"] for r in rows}) == 1 and [r["cached"] for r in rows].count(False) == 1, rows
    assert (out / "tiny-demo-q4_0.gguf").is_file()
    assert "database is locked" not in srv.log.read_text(errors="replace")  # the server's and the worker's output
    assert int(pg.psql(f"select count(*) from flow_run where id in ({', '.join(repr(i) for i in ids)})")) == 4
    assert not list(srv.home.glob("*.db"))  # nothing went to SQLite


def test_server_database_is_checked_before_the_server_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")} | {"PREFECT_HOME": str(tmp_path)}
    for url, message in (("postgresql://u@127.0.0.1:1/db", "expected: postgresql+asyncpg://"),
                         ("postgresql+asyncpg://u:secret@127.0.0.1:1/db", "cannot use the database "
                                                                          "postgresql+asyncpg://u:***@127.0.0.1:1/db")):
        res = subprocess.run([str(VENV_BIN / "zhllama"), "server", "--database", url], env=env, cwd=PROJECT,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and res.stderr.startswith("error: "), res.stdout + res.stderr
        assert message in res.stderr and "secret" not in res.stderr and "Traceback" not in res.stderr
        assert "starting the Prefect server" not in res.stdout
