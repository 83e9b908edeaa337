"""The build as a declarative stage graph, and its plain executor.

``plan_build(spec) -> BuildPlan`` → ``build_graph(plan) -> (StageNode, ...)`` (pure data, printable)
→ an executor: ``run_build`` here (a topological loop), or the Prefect executor in
``flows/build.py`` (one generic task per node). ``STAGES`` is the one table of stages: version,
request builder, heavy or not, retries. Publishing (a staged folder, one swap) is ``publish``.
"""

from .execute import BuildResult, StageRun, run_build
from .graph import StageNode, build_graph, format_graph, resolve_deps
from .plan import BuildPlan, SourceRef, plan_build, source_fingerprint
from .publishing import publish
from .stages import STAGES, StageDef, StageRequest, digest, request_for, run_stage

__all__ = [
    "STAGES", "BuildPlan", "BuildResult", "SourceRef", "StageDef", "StageNode", "StageRequest", "StageRun",
    "build_graph", "digest", "format_graph", "plan_build", "publish", "request_for", "resolve_deps", "run_build",
    "run_stage", "source_fingerprint",
]
