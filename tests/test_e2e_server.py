"""End to end through a real Prefect server: deploy from deployments/prefect.yaml, a process work pool
and a worker subprocess, trigger with the ``prefect deployment run`` CLI, wait, check artifacts.

* two concurrent runs of ``build-tiny-demo`` on an empty store: both complete, every stage is
  computed by exactly one of them, one set of outputs;
* a rerun: every stage reported cached;
* ``check-upstream`` against the fake hub: a changed repo revision fires the deployment trigger
  of the model built from it; an unchanged one does not.

One server for the whole session (tests/_prefect_fixtures.py); one worker for this module.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from _prefect_fixtures import VENV_BIN, stop_process
from fakehub import FakeHub

from pipeline_lib.fsutil import TMP_PREFIX
from pipeline_lib.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROJECT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT = 600  # generous: the machine may be shared; this is a hang guard, not a performance target


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """build-tiny-demo on the process pool with a worker; build-llama-plus-7b on a pool without one."""
    srv = prefect_server
    srv.prefect("work-pool", "create", "zhllama-process", "--type", "process")
    srv.prefect("work-pool", "create", "zhllama-idle", "--type", "process")
    srv.prefect("deploy", "--name", "build-tiny-demo", "--prefect-file", "deployments/prefect.yaml", "--no-prompt",
                cwd=PROJECT, timeout=300)
    srv.prefect("deploy", "--name", "build-llama-plus-7b", "--pool", "zhllama-idle", "--prefect-file",
                "deployments/prefect.yaml", "--no-prompt", cwd=PROJECT, timeout=300)
    home = tmp_path_factory.mktemp("worker-home")
    log = home / "worker.log"
    env = {**os.environ, **srv.env, "ZHLLAMA_HOME": str(home / "zhllama"), "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_LOGGING_LEVEL": "INFO"}
    with open(log, "wb") as fh:
        worker = subprocess.Popen([str(VENV_BIN / "prefect"), "worker", "start", "--pool", "zhllama-process"],
                                  env=env, cwd=PROJECT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield {"server": srv, "home": home, "worker_log": log}
    finally:
        stop_process(worker)


def _trigger(srv, *args: str) -> str:
    """`prefect deployment run ...`; returns the flow run id it prints."""
    res = srv.prefect("deployment", "run", *args, cwd=PROJECT)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", res.stdout)
    assert m, res.stdout + res.stderr
    return m.group(1)


def _wait(flow_run_id: str, worker_log: Path):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_TIMEOUT
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n" + \
                    worker_log.read_text(errors="replace")[-4000:]
                return run
            time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not finish in {RUN_TIMEOUT}s:\n{worker_log.read_text(errors='replace')[-4000:]}")


def _artifacts(flow_run_id: str) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts if a.key}


def _stages(flow_run_id: str) -> list[dict]:
    data = _artifacts(flow_run_id)["tiny-demo-stages"].data
    return json.loads(data) if isinstance(data, str) else data


def test_deployment_runs_concurrent_then_cached(deployed):
    srv, home = deployed["server"], deployed["home"]
    fresh = home / "concurrent-store"
    out = home / "published"
    job_env = json.dumps({"ZHLLAMA_HOME": str(fresh)})
    params = json.dumps({"spec": {"model": "tiny-demo", "out_dir": str(out),
                                  "evaluation": {"n_ctx": 64, "max_chunks": 4, "max_new_tokens": 16}}})
    # two runs of the same build at once, on an empty store
    ids = [_trigger(srv, "build-model/build-tiny-demo", "--params", params, "--job-variable", f"env={job_env}")
           for _ in range(2)]
    for i in ids:
        _wait(i, deployed["worker_log"])
    a, b = (_stages(i) for i in ids)
    assert [s["label"] for s in a] == [s["label"] for s in b]
    for sa, sb in zip(a, b, strict=True):
        assert sa["key"] == sb["key"]
        assert [sa["cached"], sb["cached"]].count(False) == 1, f"{sa['label']} computed {'twice' if not (sa['cached'] or sb['cached']) else 'never'}"
    store = Store(fresh)
    entries = store.entries()
    assert len({e.key for e in entries}) == len(entries) == len(a)  # one set of outputs
    assert not [p for p in store.artifacts.iterdir() if p.name.startswith(TMP_PREFIX)]
    for name in ("tiny-demo-f16.gguf", "tiny-demo-q4_0.gguf", "tiny-demo-q8_0.gguf", "report/report.md"):
        assert (out / name).is_file(), name

    # artifacts of a run: verification table, tokenizer check, report with the plot inlined
    arts = _artifacts(ids[0])
    assert {"tiny-demo-stages", "tiny-demo-verify", "tiny-demo-tokenizer", "tiny-demo-report"} <= set(arts)
    report = _artifacts(ids[0])["tiny-demo-report"].data
    assert "data:image/png;base64," in report and "q4_0" in report
    verify_rows = json.loads(arts["tiny-demo-verify"].data)
    inputs = [r for r in verify_rows if r["role"] != "built"]  # "built": the official check of the outputs
    assert inputs and all(r["status"] == "expected" for r in inputs)

    # a rerun reports every stage cached
    rerun = _trigger(srv, "build-model/build-tiny-demo", "--params", params, "--job-variable", f"env={job_env}")
    _wait(rerun, deployed["worker_log"])
    stages = _stages(rerun)
    assert all(s["cached"] and s["state"] == "Cached" for s in stages), stages

    # the shorthand: `zhllama run build-tiny-demo` triggers the same deployment
    res = subprocess.run([str(VENV_BIN / "zhllama"), "run", "build-tiny-demo", "--wait", "--param",
                          "spec=" + json.dumps(json.loads(params)["spec"]),
                          "--job-variable", f"env={job_env}"], env={**os.environ, **srv.env}, cwd=PROJECT,
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "of build-model/build-tiny-demo: Completed" in res.stdout


def _tiny_repo(tag: bytes) -> dict[str, bytes]:
    return {"config.json": b'{"model_type": "llama"}', "adapter_model.bin": b"weights " + tag}


def test_upstream_change_triggers_only_that_models_rebuild(deployed, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    env = {**os.environ, **deployed["server"].env, "ZHLLAMA_HOME": str(tmp_path / "home")}

    def check_upstream(models: list[str]) -> list[dict]:
        """Run the check-upstream flow in its own process, as its deployment would."""
        code = ("import json, sys; from flows.upstream import check_upstream; "
                "print(json.dumps(check_upstream(models=sys.argv[1:])))")
        res = subprocess.run([str(VENV_BIN / "python"), "-c", code, *models], env=env, cwd=PROJECT,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    def runs_of(name: str) -> list:
        """Runs of a deployment not made by its weekly schedule (the scheduler adds those any time)."""
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        return [r for r in runs if not r.auto_scheduled]

    repos = {"huggyllama/llama-7b": _tiny_repo(b"base"),
             "hfl/chinese-llama-plus-lora-7b": _tiny_repo(b"v1")}
    with FakeHub(repos) as hub:
        env["HF_ENDPOINT"] = hub.url
        before = len(runs_of("build-llama-plus-7b"))
        assert check_upstream(models=["llama-plus-7b"]) == []  # first sighting: the baseline
        assert check_upstream(models=["llama-plus-7b"]) == []  # unchanged
        hub.commit("hfl/chinese-llama-plus-lora-7b", {"adapter_model.bin": b"weights v2"})
        changes = check_upstream(models=["llama-plus-7b"])
        assert [(c["model"], c["repo"]) for c in changes] == [("llama-plus-7b", "hfl/chinese-llama-plus-lora-7b")]
        deadline = time.monotonic() + 120  # the server's trigger service reacts to the event
        while time.monotonic() < deadline and len(runs_of("build-llama-plus-7b")) == before:
            time.sleep(1)
        triggered = runs_of("build-llama-plus-7b")
        assert len(triggered) == before + 1, "the upstream event did not trigger build-llama-plus-7b"
        assert triggered[0].created_by is not None and triggered[0].created_by.type == "AUTOMATION"
        assert triggered[0].parameters == {"spec": {"model": "llama-plus-7b"}}
        assert check_upstream(models=["llama-plus-7b"]) == []  # nothing changed since: nothing emitted


def test_zhllama_server_deploys_everything_and_stops_on_ctrl_c(tmp_path):
    """`zhllama server`: its own server on 127.0.0.1, pool, queue, limit, all deployments (printed as each
    is created; no model rebuild scheduled), worker; SIGINT stops all."""
    import signal

    from _prefect_fixtures import free_port

    from flows.deployments import deployments

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    # a PREFECT_HOME whose parent does not exist yet (Prefect itself creates only the last level)
    env |= {"PREFECT_HOME": str(tmp_path / "new" / "prefect"), "ZHLLAMA_HOME": str(tmp_path / "zh"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false"}
    log = tmp_path / "server.out"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(VENV_BIN / "zhllama"), "server", "--port", str(port)], env=env, cwd=PROJECT,
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and "Prefect UI" not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(1)
        text = log.read_text(errors="replace")
        assert f"Prefect UI: http://127.0.0.1:{port}" in text, text[-3000:]
        api = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/deployments/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert int(r.read()) == len(deployments())  # every model, the demo and check-upstream
        gcl = subprocess.run([str(VENV_BIN / "prefect"), "gcl", "inspect", "zhllama-memory-heavy"], env=api,
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert gcl.returncode == 0, gcl.stdout + gcl.stderr
        # a fresh server schedules no real build: every model's weekly slot is there but inactive
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
            deps = c.read_deployments()
            queue = c.read_work_queue_by_name("builds", work_pool_name="zhllama-process")
            automations = {a.name: a for a in c.read_automations()}
        active = {d.name for d in deps if any(s.active for s in d.schedules)}
        assert active == {"check-upstream"}, active
        models = [d for d in deps if d.name.startswith("build-") and d.name != "build-tiny-demo"]
        assert models and all(d.schedules and d.work_queue_name == "builds" for d in models)
        assert len({d.schedules[0].schedule.cron for d in models}) == len(models)  # staggered: no two together
        assert queue.concurrency_limit == 1  # one real build at a time
        for d in deps:
            assert f"deployed build-model/{d.name}" in text or f"deployed check-upstream/{d.name}" in text
        assert "scheduled: no model rebuilds" in text
        rebuild = automations["rebuild alpaca-plus-7b when upstream changes"]  # named for people, with a why
        assert "zhllama.upstream.changed" in rebuild.description and len(automations) == len(models)
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0
        assert "stopping the worker" in log.read_text(errors="replace")
        with pytest.raises(OSError):  # the server is gone
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=3)
    finally:
        stop_process(proc)


def test_failed_run_wait_prints_the_failed_stage_and_its_error(deployed, tmp_path):
    """`zhllama run --wait` of a run that fails in a stage: the stage's name and its own message."""
    from pipeline_lib import demo

    root = demo.ensure_demo_release(tmp_path / "src")
    src = {role: {"source": str(root / folder)} for role, folder in demo.ROLES.items()}
    spec = {"model": "custom", "name": "reversed", "base": src["base"], "loras": [src["lora-1"], src["lora-0"]],
            "chinese_sp": src["chinese_sp"], "quant_types": ["q4_0"], "evaluation": {"enabled": False},
            "out_dir": str(tmp_path / "out")}
    res = subprocess.run([str(VENV_BIN / "zhllama"), "run", "tiny-demo", "--wait", "--param", f"spec={json.dumps(spec)}"],
                         env={**os.environ, **deployed["server"].env}, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert res.returncode == 1, res.stdout + res.stderr
    assert ": Failed" in res.stdout
    failed = [ln for ln in res.stdout.splitlines() if ln.strip().startswith("failed:")]
    assert failed and failed[0].strip().startswith("failed: gguf f16:"), res.stdout
    assert "LoRA order looks reversed" in failed[0], res.stdout
    assert "Traceback" not in res.stdout + res.stderr


def test_run_of_an_unknown_model_says_which_was_meant(deployed):
    res = subprocess.run([str(VENV_BIN / "zhllama"), "run", "alpaca-plsu-7b"], env={**os.environ, **deployed["server"].env},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert res.stderr.startswith("error: no model or deployment named 'alpaca-plsu-7b'"), res.stderr
    assert "did you mean alpaca-plus-7b" in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 3
