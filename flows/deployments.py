"""The deployments of zhllama: generated from the catalog, applied to a server in one API pass.

    python -m flows.deployments           # rewrite deployments/prefect.yaml
    python -m flows.deployments --check   # exit 1 if the committed file is out of date

Each catalog model gets ``build-<model>`` (flow ``build-model``) on the process work pool
``zhllama-process``, queue ``builds`` (concurrency 1: one real build at a time), a weekly rebuild
that is **off** until you turn it on (``zhllama schedule NAME on``; the models' slots are spread
over the week so two never start together), and a trigger on the ``zhllama.upstream.changed``
event for its resource ``zhllama.model.<model>`` (emitted by ``check-upstream``, daily).
``build-tiny-demo`` builds the offline demo and has neither schedule nor trigger.

``apply(client)`` creates the work pool, queues and concurrency limit and upserts every deployment
and its automation through the API (what ``zhllama server`` and ``zhllama deploy`` run), keeping
the active/inactive state of schedules a user already switched.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from deployments import PREFECT_YAML
from pipeline_lib import catalog, upstream
from pipeline_lib.buildspec import DEMO_MODEL
from pipeline_lib.demo import demo_spec
from tasks.settings import BUILD_QUEUE, MEMORY_LIMIT, WORK_POOL

# Module paths, not file paths: a worker loads them from the installed package, whatever its cwd.
BUILD_ENTRYPOINT = "flows.build.build_model"
UPSTREAM_ENTRYPOINT = "flows.upstream.check_upstream"
UPSTREAM_CRON = "0 2 * * *"  # daily 02:00 UTC
HEADER = """\
# Prefect deployments of zhllama. GENERATED from pipeline_lib/catalog.py by `python -m flows.deployments`;
# do not edit by hand (tests/test_flow.py checks that this file is in sync).
#
# Deploy everything: `zhllama deploy` (or `zhllama server`, which also starts a server and a worker).
# With Prefect's own CLI (entrypoints are module paths of the installed package, any folder does):
#   prefect work-pool create zhllama-process --type process
#   prefect work-queue create builds --pool zhllama-process --limit 1
#   prefect deploy --all --prefect-file deployments/prefect.yaml
# Model rebuild schedules are inactive: `zhllama schedule alpaca-plus-7b on` turns one on.
# Run one:  prefect deployment run 'build-model/build-alpaca-plus-7b'   (or: zhllama run alpaca-plus-7b)
"""


def weekly_cron(index: int) -> str:
    """The weekly slot of the index-th model: its own day and hour (03:00, 06:00, 09:00 UTC), so
    rebuilds that are on never start together."""
    return f"0 {3 + 3 * (index // 7)} * * {index % 7}"


def _deployment(name: str, *, description: str, tags: list[str], parameters: dict[str, Any],
                entrypoint: str = BUILD_ENTRYPOINT, queue: str = "default", cron: str | None = None,
                active: bool = False, triggers: list[dict] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "description": description,
        "entrypoint": entrypoint,
        "tags": tags,
        "parameters": parameters,
        "work_pool": {"name": WORK_POOL, "work_queue_name": queue, "job_variables": {}},
        "schedules": [{"cron": cron, "timezone": "UTC", "active": active}] if cron else [],
    }
    if triggers:
        d["triggers"] = triggers
    return d


def deployments() -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(catalog.MODELS.values()):
        chain = " + ".join(lo.release_name for lo in m.lora_chain)
        out.append(_deployment(
            m.deployment,
            description=f"Build {m.display}: LLaMA-{m.size} + {chain} LoRA → verified, merged, GGUF f16 + "
                        "q4_0/q8_0, evaluated. Weekly rebuild (off until switched on); rebuilt when a hub repo moves.",
            tags=["zhllama", m.family, m.size],
            parameters={"spec": {"model": m.name}},
            queue=BUILD_QUEUE,
            cron=weekly_cron(i),
            triggers=[{
                "type": "event", "enabled": True,
                "name": f"rebuild {m.name} when upstream changes",
                "description": f"Runs {m.deployment} when check-upstream emits {upstream.EVENT} for "
                               f"{upstream.resource_id(m.name)}: a hub repo {m.display} is built from has a new commit.",
                "match": {"prefect.resource.id": upstream.resource_id(m.name)},
                "expect": [upstream.EVENT],
                "parameters": {"spec": {"model": m.name}},
            }],
        ))
    out.append(_deployment(
        f"build-{DEMO_MODEL}",
        description="Offline demo: a tiny synthetic Chinese-Alpaca-Plus release built locally, then the whole build.",
        tags=["zhllama", "demo"],
        parameters={"spec": demo_spec().model_dump(mode="json", exclude_defaults=True) | {"model": DEMO_MODEL}},
    ))
    out.append(_deployment(
        "check-upstream",
        description="Compare the hub commit of every model's repos with the last seen one; emit "
                    f"{upstream.EVENT} for each model whose sources moved (its build deployment reacts). "
                    "Offline it logs one warning and completes.",
        tags=["zhllama", "upstream"], parameters={}, entrypoint=UPSTREAM_ENTRYPOINT, cron=UPSTREAM_CRON,
        active=True,
    ))
    return out


def render() -> str:
    doc = {"name": "zhllama", "prefect-version": ">=3.4", "build": None, "push": None,
           "pull": None, "deployments": deployments()}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)


# ------------------------------------------------------------------ applying them to a server


def _flow_for(entrypoint: str):
    from prefect.utilities.importtools import import_object

    return import_object(entrypoint)


def apply(client, *, schedule: Iterable[str] = (), memory_slots: int = 1, build_slots: int = 1,
          on_deployment: Callable[[str, str], None] | None = None) -> list[dict[str, Any]]:
    """Create the pool, queues and limit and upsert every deployment of ``deployments/prefect.yaml``
    with its automation, in one pass over the API. ``schedule``: model or deployment names whose
    weekly rebuild is switched on; schedules a user already switched keep their state.
    ``on_deployment(name, what)`` is called as each deployment is created. Returns the deployments."""
    from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events.schemas.deployment_triggers import DeploymentTriggerTypes
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from pydantic import TypeAdapter

    wanted = {_deployment_name(s) for s in schedule}
    unknown = wanted - {d["name"] for d in deployments()}
    if unknown:
        from pipeline_lib.errors import InputError

        raise InputError(f"no deployment to schedule named {', '.join(sorted(unknown))}",
                         fix="use a catalog name (`zhllama catalog`), e.g. --schedule alpaca-plus-7b")
    try:
        client.create_work_pool(WorkPoolCreate(name=WORK_POOL, type="process"))
    except ObjectAlreadyExists:
        pass
    try:
        client.create_work_queue(name=BUILD_QUEUE, work_pool_name=WORK_POOL, concurrency_limit=build_slots)
    except ObjectAlreadyExists:
        pass
    try:
        client.read_global_concurrency_limit_by_name(MEMORY_LIMIT)
    except ObjectNotFound:
        from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=MEMORY_LIMIT, limit=memory_slots))

    doc = yaml.safe_load(PREFECT_YAML.read_text(encoding="utf-8"))
    flows: dict[str, Any] = {}
    for d in doc["deployments"]:
        flow = flows.get(d["entrypoint"]) or flows.setdefault(d["entrypoint"], _flow_for(d["entrypoint"]))
        flow_id = client.create_flow_from_name(flow.name)
        try:
            old = client.read_deployment_by_name(f"{flow.name}/{d['name']}")
            kept = {s.schedule.cron: s.active for s in old.schedules if hasattr(s.schedule, "cron")}
        except ObjectNotFound:
            kept = {}
        schedules = [DeploymentScheduleCreate(
            schedule=CronSchedule(cron=s["cron"], timezone=s.get("timezone", "UTC")),
            active=d["name"] in wanted or kept.get(s["cron"], s.get("active", False)))
            for s in d.get("schedules", [])]
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=d["name"], description=d["description"], tags=d["tags"], entrypoint=d["entrypoint"],
            parameters=d["parameters"], parameter_openapi_schema=flow.parameters.model_dump(exclude_unset=True),
            work_pool_name=d["work_pool"]["name"], work_queue_name=d["work_pool"]["work_queue_name"],
            job_variables=d["work_pool"]["job_variables"], schedules=schedules, enforce_parameter_schema=True,
            pull_steps=[])
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
        for spec in d.get("triggers", []):
            trigger = TypeAdapter(DeploymentTriggerTypes).validate_python(spec)
            trigger.set_deployment_id(deployment_id)
            client.create_automation(trigger.as_automation())
        if on_deployment is not None:
            if not schedules:
                what = "no schedule"
            else:
                what = f"{d['schedules'][0]['cron']} UTC " + ("ON" if any(s.active for s in schedules) else "off")
            on_deployment(f"{flow.name}/{d['name']}", what)
    return doc["deployments"]


def _deployment_name(text: str) -> str:
    """'alpaca-plus-7b' / 'build-alpaca-plus-7b' / 'check-upstream' -> the deployment's name."""
    text = text.split("/")[-1]
    if text == "check-upstream" or text.startswith("build-"):
        return text
    try:
        return catalog.get(text).deployment
    except Exception:
        return f"build-{text}"


def set_schedule(client, name: str, *, active: bool) -> list[str]:
    """Switch the schedules of one deployment on or off; returns its crons."""
    from prefect.exceptions import ObjectNotFound

    from pipeline_lib.errors import InputError

    dep = _deployment_name(name)
    flow = "check-upstream" if dep == "check-upstream" else "build-model"
    try:
        d = client.read_deployment_by_name(f"{flow}/{dep}")
    except ObjectNotFound:
        raise InputError(f"no deployment {flow}/{dep} on the server",
                         fix="deploy them first: `zhllama deploy` (or `zhllama server`)") from None
    for s in d.schedules:
        client.update_deployment_schedule(d.id, s.id, active=active)
    return [getattr(s.schedule, "cron", str(s.schedule)) for s in d.schedules]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed file is current")
    parser.add_argument("--out", type=Path, default=PREFECT_YAML, help="where to write the file")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else ""
        if current != text:
            print(f"{args.out} is out of date; run: python -m flows.deployments", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(deployments())} deployments)")
        return 0
    from pipeline_lib.fsutil import write_text_atomic

    write_text_atomic(args.out, text)
    print(f"wrote {args.out} ({len(deployments())} deployments)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
