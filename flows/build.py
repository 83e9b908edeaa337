"""The ``build-model`` flow: the Prefect executor of the build graph.

It walks the same ``pipeline_lib.pipeline.build_graph(plan)`` as the plain executor
(``pipeline_lib.pipeline.run_build``) and submits one task per node: the generic stage task,
named by its stage and labelled by the node (``quantize q4_0``), with the upstream futures
passed straight in, so Prefect runs each node as soon as its inputs exist (downloads in
parallel, quantizations in parallel) and draws the graph in the UI. Caching, locks and result
records come from ``tasks.cache``. It returns the same ``BuildResult`` as the plain executor.

Where the tasks run is ``spec.runner`` (``tasks.runners``): Prefect's thread pool in this process, or
a Dask cluster through ``prefect_dask.DaskTaskRunner`` (an existing one at ``spec.dask_address``,
else a ``LocalCluster`` of ``spec.dask_workers`` processes for this run), the heavy stages asking
for the worker resource ``memory_heavy``. The cluster is checked before the first task is sent.

Deployments: ``build-model/build-<model>`` (deployments/prefect.yaml); ``zhllama run``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from pipeline_lib.buildspec import BuildSpec
from pipeline_lib.pipeline import BuildResult, StageRun, build_graph, plan_build, preflight, resolve_deps
from pipeline_lib.pipeline.execute import prepared_inputs
from pipeline_lib.pipeline.stages import REPORTER
from pipeline_lib.store import Store, default_root
from tasks.runners import check_cluster, follow_console, submit, task_runner
from tasks.stage import for_node, post_artifacts, publish_task, resources


@flow(name="build-model", description="Download, verify, merge, convert, quantize and evaluate one model.",
      validate_parameters=True, persist_result=False)
def build_model(spec: BuildSpec) -> BuildResult:
    """Build one model: every stage of its graph as a task, then publish and post artifacts."""
    logger = get_run_logger()
    t_start = time.perf_counter()
    store_root = str(default_root())
    plan = plan_build(spec, store_root=store_root)
    nodes = build_graph(plan)
    logger.info("building %s (%s) into %s: %d stages; artifact store %s", plan.name, plan.display, plan.out_dir,
                len(nodes), store_root)
    prepared = prepared_inputs(plan, nodes)
    preflight.check(plan, nodes, prepared, Store(store_root))  # every output must fit before the first byte
    runner = task_runner(spec)
    with contextlib.ExitStack() as stack:
        if runner is not None:  # a Dask cluster: started (or connected to) and checked before any stage
            stack.enter_context(runner)
            if not spec.dask_address:  # our own local cluster: its workers log as this process does
                follow_console(runner)
            workers = check_cluster(runner.client, store_root=store_root)
            logger.info("Dask cluster %s: %d workers on %s", runner.client.scheduler.address, len(workers),
                        ", ".join(sorted({w["host"] for w in workers.values()})))
        return _run(plan, nodes, prepared, runner, store_root, t_start)


def _run(plan, nodes, prepared, runner, store_root: str, t_start: float) -> BuildResult:
    """Submit every node (to the flow's thread pool, or to ``runner``), report, publish, post artifacts."""
    logger = get_run_logger()
    futures = {}
    for node in nodes:
        args = resolve_deps(node, futures) | prepared.get(node.id, {})
        task = for_node(node, store_root)
        if runner is None:
            futures[node.id] = task.submit(node, args, store_root)
        else:
            futures[node.id] = submit(runner, task, {"node": node, "inputs": args, "store_root": store_root},
                                      resources=resources(node))
    reporter = REPORTER.get()
    by_future = {id(f): node for node, f in zip(nodes, futures.values(), strict=True)}
    done: dict[str, StageRun] = {}
    for fut in as_completed(list(futures.values())):  # each stage reported as it ends
        fut.wait()  # settles the future's final state (else .state asks the API, which may lag)
        node, state = by_future[id(fut)], fut.state
        if not state.is_completed():
            continue
        ref = fut.result()
        run = done[node.id] = StageRun(node.id, node.label, node.stage, ref["key"], state.name == "Cached" or ref["hit"],
                                       0.0 if state.name == "Cached" else ref["seconds"], state.name)
        if reporter is not None:
            reporter.finished(run)
        else:
            logger.info("%s: %s in %.1f s (%s)", run.label, "cache hit" if run.cached else "computed", run.seconds,
                        run.key[:12])
    for node in nodes:  # the first failure in graph order is the cause; later nodes only waited on it
        state = futures[node.id].state
        if state.is_failed() or state.is_crashed():
            futures[node.id].result()  # raises the stage's own error: the flow fails with its message
    refs = {node.id: futures[node.id].result() for node in nodes}
    runs = [done[node.id] for node in nodes]
    published = publish_task.with_options(task_run_name=f"publish {plan.name}")(plan, nodes, refs, prepared)
    post_artifacts.with_options(task_run_name=f"artifacts {plan.name}")(plan, refs, [r.to_json() for r in runs])
    hits = sum(r.cached for r in runs)
    logger.info("%s: %d/%d stages cached; outputs in %s", plan.name, hits, len(runs), plan.out_dir)
    return BuildResult(plan.name, plan.out_dir, tuple(Path(p) for p in published), tuple(runs),
                       time.perf_counter() - t_start)
