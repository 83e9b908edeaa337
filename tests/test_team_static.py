"""The team's container files, checked without a container engine: deployments/compose.yaml and the
Kubernetes work-pool job template (deployments/k8s/), against our CLI, our Dockerfile and each other.

Commands in the compose file are parsed with the real ``zhllama`` argument parser and the checks the
CLI runs (``--database``, ``ZHLLAMA_LOCKS``); names that must agree (the Redis and PostgreSQL hosts,
the database credentials, the store's mount path, the work pool, the Dask resource) are compared.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

PROJECT = Path(__file__).resolve().parent.parent
COMPOSE = PROJECT / "deployments" / "compose.yaml"
K8S = PROJECT / "deployments" / "k8s"
ZHLLAMA_SERVICES = {"server", "dask-scheduler", "worker", "dask-worker"}


def _interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR:-default}`` / ``${VAR}`` interpolation, over a parsed document."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: env.get(m.group(1), m.group(2) or ""), value)
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), {})


def _command(service: dict) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _flag(cmd: list[str], name: str) -> str:
    assert name in cmd, (name, cmd)
    return cmd[cmd.index(name) + 1]


def test_compose_services_come_from_our_dockerfile_and_depend_on_what_exists(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "redis", *ZHLLAMA_SERVICES}
    assert services["postgres"]["image"].startswith("postgres:") and services["redis"]["image"].startswith("redis:")
    for name in ZHLLAMA_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == PROJECT / "Dockerfile", name
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no healthcheck"
    assert {"store", "pgdata"} <= set(compose["volumes"])
    dockerfile = (PROJECT / "Dockerfile").read_text()
    assert "'.[team]'" in dockerfile  # the image carries Dask and the Redis locks


def test_compose_server_is_our_cli_on_the_compose_postgres(compose):
    from flows.cli.main import build_parser
    from flows.cli.server import cmd_server, database_url

    services = compose["services"]
    cmd = _command(services["server"])
    assert cmd[0] == "zhllama"
    args = build_parser(cmd[1:]).parse_args(cmd[1:])
    assert args.func is cmd_server and args.host == "0.0.0.0" and args.no_worker
    url = urlsplit(database_url(args.database))
    pg = services["postgres"]["environment"]
    assert url.scheme == "postgresql+asyncpg" and url.hostname == "postgres" and url.port == 5432
    assert (url.username, url.password, url.path.lstrip("/")) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"],
                                                                 pg["POSTGRES_DB"])
    published = {p.split(":")[-1] for p in services["server"]["ports"]}
    assert str(args.port) in published


def test_compose_workers_share_store_locks_and_api(compose):
    from pipeline_lib.locks import lock_url
    from tasks.runners import HEAVY_RESOURCE
    from tasks.settings import WORK_POOL

    services = compose["services"]
    homes, locks, mounts = set(), set(), set()
    for name in ZHLLAMA_SERVICES:
        env = services[name]["environment"]
        homes.add(env["ZHLLAMA_HOME"])
        locks.add(lock_url(env["ZHLLAMA_LOCKS"]))
        mounts |= {v.split(":", 1)[1] for v in services[name]["volumes"] if v.split(":", 1)[0] == "store"}
    assert len(homes) == len(locks) == len(mounts) == 1, (homes, locks, mounts)  # the same path on every "host"
    (home,), (lock,), (mount,) = homes, locks, mounts
    assert home.startswith(mount.rstrip("/") + "/")
    assert urlsplit(lock).hostname == "redis"
    for name in ("worker", "dask-worker"):
        api = urlsplit(services[name]["environment"]["PREFECT_API_URL"])
        assert api.hostname == "server" and str(api.port) in {p.split(":")[-1] for p in services["server"]["ports"]}

    worker = _command(services["worker"])
    assert worker[:3] == ["prefect", "worker", "start"] and _flag(worker, "--pool") == WORK_POOL
    scheduler, dask_worker = _command(services["dask-scheduler"]), _command(services["dask-worker"])
    assert scheduler[:2] == ["dask", "scheduler"] and dask_worker[:2] == ["dask", "worker"]
    address = urlsplit(dask_worker[2])
    assert address.scheme == "tcp" and address.hostname == "dask-scheduler"
    assert str(address.port) == _flag(scheduler, "--port")
    assert _flag(dask_worker, "--resources") == f"{HEAVY_RESOURCE}=1"
    assert _flag(dask_worker, "--memory-limit") == "0"


def _placeholders(value) -> set[str]:
    if isinstance(value, str):
        return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", value))
    if isinstance(value, dict):
        return set().union(*(_placeholders(v) for v in value.values()), set())
    if isinstance(value, list):
        return set().union(*(_placeholders(v) for v in value), set())
    return set()


# What Prefect's Kubernetes worker requires of a job manifest (it refuses a template without these).
K8S_REQUIRED = {
    ("apiVersion",): "batch/v1",
    ("kind",): "Job",
    ("spec", "template", "spec", "parallelism"): 1,
    ("spec", "template", "spec", "completions"): 1,
    ("spec", "template", "spec", "restartPolicy"): "Never",
}


def test_kubernetes_job_template_is_complete_and_matches_the_image_and_store():
    import jsonschema

    template = json.loads((K8S / "base-job-template.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    config, variables = template["job_configuration"], template["variables"]
    props = variables["properties"]
    missing = _placeholders(config) - set(props)
    assert not missing, f"placeholders without a variable: {missing}"
    manifest = config["job_manifest"]
    for path, value in K8S_REQUIRED.items():
        node = manifest
        for part in path:
            node = node[part]
        assert node == value, path
    pod = manifest["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and container["image"] == "{{ image }}"
    # the image's user and the store's mount point
    uid = re.search(r"useradd .*--uid (\d+)", (PROJECT / "Dockerfile").read_text()).group(1)
    assert pod["securityContext"]["runAsUser"] == int(uid) and pod["securityContext"]["runAsNonRoot"]
    (mount,) = container["volumeMounts"]
    (volume,) = pod["volumes"]
    assert volume["name"] == mount["name"] and volume["persistentVolumeClaim"]["claimName"] == "{{ store_claim }}"
    assert props["env"]["default"]["ZHLLAMA_HOME"].startswith(mount["mountPath"].rstrip("/") + "/")
    from pipeline_lib.locks import lock_url

    assert lock_url(props["env"]["default"]["ZHLLAMA_LOCKS"])  # Redis: the jobs run on several nodes
    pvc = yaml.safe_load((K8S / "store.yaml").read_text())
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (props["store_claim"]["default"], props["namespace"]["default"]) == (pvc["metadata"]["name"],
                                                                                 pvc["metadata"]["namespace"])
    # every default is valid for its own variable; the schema itself is valid
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in props.items() if "default" in v}
    jsonschema.validate(defaults, variables)
    assert props["backoff_limit"]["default"] == 0  # Prefect retries stages; a rerun is all cache hits
    assert props["job_watch_timeout_seconds"].get("default") is None  # a 33B build takes hours
