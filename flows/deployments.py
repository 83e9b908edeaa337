"""Generate ``deployments/prefect.yaml`` from the catalog: one deployment per model, plus demo and upstream check.

    python -m flows.deployments           # rewrite deployments/prefect.yaml
    python -m flows.deployments --check   # exit 1 if the committed file is out of date

Each catalog model gets ``build-<model>`` (flow ``build-model``) on the process work pool
``zhllama-process``, a weekly cron rebuild, and a trigger on the ``zhllama.upstream.changed``
event for its resource ``zhllama.model.<model>`` (emitted by ``check-upstream``, scheduled daily).
``build-tiny-demo`` builds the offline demo and has neither schedule nor trigger.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from deployments import PREFECT_YAML
from pipeline_lib import catalog, upstream
from pipeline_lib.buildspec import DEMO_MODEL
from pipeline_lib.demo import demo_spec
from tasks.settings import WORK_POOL

# Module paths, not file paths: a worker loads them from the installed package, whatever its cwd.
BUILD_ENTRYPOINT = "flows.build.build_model"
UPSTREAM_ENTRYPOINT = "flows.upstream.check_upstream"
WEEKLY_CRON = "0 3 * * 0"  # Sundays 03:00 UTC
UPSTREAM_CRON = "0 2 * * *"  # daily 02:00 UTC
HEADER = """\
# Prefect deployments of zhllama. GENERATED from pipeline_lib/catalog.py by `python -m flows.deployments`;
# do not edit by hand (tests/test_flow.py checks that this file is in sync).
#
# Deploy everything (with PREFECT_API_URL pointing at your server; entrypoints are module paths of
# the installed zhllama package, so any working directory does):
#   prefect work-pool create zhllama-process --type process
#   prefect deploy --all --prefect-file deployments/prefect.yaml
# Run one:  prefect deployment run 'build-model/build-alpaca-plus-7b'   (or: zhllama run build-alpaca-plus-7b)
# `zhllama server` does all of this for a local server.
"""


def _deployment(name: str, *, description: str, tags: list[str], parameters: dict[str, Any],
                entrypoint: str = BUILD_ENTRYPOINT, cron: str | None = None,
                triggers: list[dict] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name,
        "description": description,
        "entrypoint": entrypoint,
        "tags": tags,
        "parameters": parameters,
        "work_pool": {"name": WORK_POOL, "work_queue_name": None, "job_variables": {}},
        "schedules": [{"cron": cron, "timezone": "UTC", "active": True}] if cron else [],
    }
    if triggers:
        d["triggers"] = triggers
    return d


def deployments() -> list[dict[str, Any]]:
    out = []
    for m in catalog.MODELS.values():
        out.append(_deployment(
            m.deployment,
            description=f"Build {m.display}: LLaMA-{m.size} + " + " + ".join(lo.release_name for lo in m.lora_chain)
            + " LoRA → verified, merged, GGUF f16 + q4_0/q8_0, evaluated. Weekly rebuild; rebuilt when a hub repo moves.",
            tags=["zhllama", m.family, m.size],
            parameters={"spec": {"model": m.name}},
            cron=WEEKLY_CRON,
            triggers=[{
                "type": "event", "enabled": True,
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
                    "zhllama.upstream.changed for each model whose sources moved (its build deployment reacts).",
        tags=["zhllama", "upstream"], parameters={}, entrypoint=UPSTREAM_ENTRYPOINT, cron=UPSTREAM_CRON,
    ))
    return out


def render() -> str:
    doc = {"name": "zhllama", "prefect-version": ">=3.4", "build": None, "push": None,
           "pull": None, "deployments": deployments()}
    return HEADER + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deployments", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the committed file is current")
    parser.add_argument("--out", type=Path, default=PREFECT_YAML)
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
