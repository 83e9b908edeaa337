"""The ``check-upstream`` flow: emit an event for every model whose hub repos moved.

Each ``build-<model>`` deployment has a trigger on ``zhllama.upstream.changed`` for resource
``zhllama.model.<model>`` (deployments/prefect.yaml), so a changed repo rebuilds exactly the
models built from it; unchanged repos emit nothing and nothing runs.
"""

from __future__ import annotations

from dataclasses import asdict

from prefect import flow, get_run_logger, task
from prefect.events import emit_event

from pipeline_lib import upstream


@task(name="hub-revisions", task_run_name="hub revisions of {n} repos", retries=2, retry_delay_seconds=10)
def find_changes(models: list[str], n: int) -> list[upstream.Change] | None:
    """The changed repos, or None when the hub cannot be reached (offline: one warning, no failure)."""
    try:
        return upstream.check(models)
    except upstream.HubUnreachable as exc:
        get_run_logger().warning("upstream check skipped: %s", exc.seen)
        return None


@flow(name="check-upstream", description="Compare the hub commits of each model's repos with the last seen ones.")
def check_upstream(models: list[str] | None = None) -> list[dict]:
    """Check ``models`` (default: every catalog model); one event per changed model."""
    from pipeline_lib import catalog

    logger = get_run_logger()
    models = models or list(catalog.MODELS)
    changes = find_changes(models, len({repo for m in models for _, repo in upstream.repos_of(m)}))
    if changes is None:
        return []
    by_model: dict[str, list[upstream.Change]] = {}
    for c in changes:
        by_model.setdefault(c.model, []).append(c)
    for model, cs in by_model.items():
        emit_event(
            event=upstream.EVENT,
            resource={"prefect.resource.id": upstream.resource_id(model), "prefect.resource.name": model},
            payload={"model": model, "changes": [asdict(c) for c in cs]},
        )
        logger.info("%s: upstream changed (%s); rebuild requested", model,
                    ", ".join(f"{c.repo} {c.old[:8]}→{c.new[:8]}" for c in cs))
    if not by_model:
        logger.info("no upstream changes")
    return [asdict(c) for c in changes]
