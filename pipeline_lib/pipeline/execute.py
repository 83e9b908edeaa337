"""The plain executor: the build graph as a topological loop, without Prefect.

``run_build(spec)`` plans the build, walks ``build_graph(plan)`` in order, runs each node through
the artifact store (``stages.run_stage``) and publishes the outputs in one swap. It is the
``zhllama build --no-prefect`` path and the reference the Prefect executor (``flows/build.py``)
is tested against: same nodes, same store keys, same published files, same ``BuildResult``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..buildspec import EXECUTION_FIELDS, BuildSpec
from ..store import Entry, Store
from . import preflight
from .graph import StageNode, build_graph, resolve_deps
from .plan import BuildPlan, plan_build
from .publishing import publish
from .stages import PROGRESS, REPORTER, STAGES, Reporter, request_for, run_stage


@dataclass(frozen=True)
class StageRun:
    """What one node did in a run."""

    id: str
    label: str
    stage: str
    key: str
    cached: bool  # an intact store entry (or a Prefect cached result) was used; nothing was computed
    seconds: float
    state: str = ""  # the Prefect state name, under Prefect

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "label": self.label, "stage": self.stage, "key": self.key, "cached": self.cached,
                "seconds": round(self.seconds, 3), "state": self.state}


@dataclass(frozen=True)
class BuildResult:
    name: str
    out_dir: Path
    published: tuple[Path, ...]
    stages: tuple[StageRun, ...]
    seconds: float

    @property
    def all_cached(self) -> bool:
        return all(s.cached for s in self.stages)


def prepared_inputs(plan: BuildPlan, nodes: tuple[StageNode, ...]) -> dict[str, dict[str, Any]]:
    """Runtime inputs of the nodes that need them (``StageDef.prepare``: source fingerprints), once per run."""
    out = {}
    for node in nodes:
        prepare = STAGES[node.stage].prepare
        if prepare is not None:
            out[node.id] = prepare(node, plan)
    return out


def build_lock(plan: BuildPlan, nodes: tuple[StageNode, ...], entries: Mapping[str, Entry],
               prepared: Mapping[str, Mapping[str, Any]]) -> dict:
    """``build-lock.json``: sources, what they resolved to, the digest of every file used, the
    official-hash result and the tensor fingerprint of every float output."""
    lock: dict[str, Any] = {
        "model": plan.name, "display": plan.display, "zhllama": __version__,
        "catalog_model": plan.catalog_model, "tokenizer": plan.tokenizer,  # what `zhllama export` needs to know
        "spec": json.loads(plan.spec.model_dump_json(exclude=EXECUTION_FIELDS)),
        "sources": [{**ref.to_json(), "fingerprint": prepared.get(f"download:{ref.role}", {}).get("fingerprint"),
                     "files": {rel: o.sha256 for rel, o in entries[f"download:{ref.role}"].outputs.items()}}
                    for ref in plan.sources],
    }
    for node in nodes:
        entry = entries[node.id]
        if node.stage == "official":
            lock["official"] = json.loads((entry.path / "official.json").read_text(encoding="utf-8"))
        elif node.stage == "fingerprint":
            lock.setdefault("fingerprints", {})[node.params["output"]] = entry.meta.get("digest")
    return lock


def publish_build(plan: BuildPlan, nodes: tuple[StageNode, ...], entries: Mapping[str, Entry],
                  prepared: Mapping[str, Mapping[str, Any]]) -> tuple[Path, ...]:
    """Publish every node that has a publish name, plus the build lock, into the plan's output folder
    (the entries are held meanwhile, so `cache gc` cannot take one away mid-copy)."""
    published = {n.publish: entries[n.id] for n in nodes if n.publish}
    with Store(plan.store_root).hold(*published.values()):
        return publish(published, plan.out_dir, lock=build_lock(plan, nodes, entries, prepared))


def run_build(spec: BuildSpec, *, store: Store | None = None, reporter: Reporter | None = None) -> BuildResult:
    """Run the whole graph in order, without Prefect. Same keys and outputs as the flow.

    ``reporter`` (default: the context's ``stages.REPORTER``) hears each stage's progress and end."""
    store = store or Store()
    reporter = reporter or REPORTER.get()
    t_start = time.perf_counter()
    plan = plan_build(spec, store_root=store.root)
    nodes = build_graph(plan)
    prepared = prepared_inputs(plan, nodes)
    preflight.check(plan, nodes, prepared, store)  # every output must fit before the first byte is written
    entries: dict[str, Entry] = {}
    runs: list[StageRun] = []
    for node in nodes:
        t0 = time.perf_counter()
        request = request_for(node, resolve_deps(node, entries) | prepared.get(node.id, {}))
        token = PROGRESS.set(None if reporter is None else
                             (lambda f, t, label=node.label: reporter.progress(label, f, t)))
        try:
            entry = entries[node.id] = run_stage(store, request)
        finally:
            PROGRESS.reset(token)
        run = StageRun(node.id, node.label, node.stage, entry.key, entry.cached, time.perf_counter() - t0)
        runs.append(run)
        if reporter is not None:
            reporter.finished(run)
    published = publish_build(plan, nodes, entries, prepared)
    return BuildResult(plan.name, plan.out_dir, published, tuple(runs), time.perf_counter() - t_start)
