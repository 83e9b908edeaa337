"""The one Prefect task of a build stage, and the publish/artifact tasks. The work is in pipeline_lib.

``stage_task`` runs one graph node (``pipeline_lib.pipeline.StageNode``): it resolves the
upstream results to store entries, builds the node's request from the ``STAGES`` table and
produces it through the artifact store. ``for_node(node, store_root)`` gives it the node's
stage name, label, retries and the store's cache options. It returns a *StageRef*, a small JSON
record ``{"key", "stage", "hit", "seconds"}``: the store key of what it made, never a tensor or a
path to trust blindly.

Memory-heavy stages take a local slot and a slot of the global concurrency limit
``zhllama-memory-heavy`` (created by ``zhllama server``; without it they run unthrottled); on a
Dask runner they also ask for the worker resource ``memory_heavy`` (:func:`resources`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline_lib.errors import DiskSpaceError, InputError, IntegrityError
from pipeline_lib.fsutil import human_bytes
from pipeline_lib.pipeline import STAGES, StageNode, run_stage
from pipeline_lib.pipeline.stages import PROGRESS, progress_to
from pipeline_lib.store import Store

from .cache import cache_options, request_of
from .runners import HEAVY_RESOURCE
from .settings import MEMORY_LIMIT

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=8)
def _limit_exists(api_url: str | None) -> bool:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(MEMORY_LIMIT)
        return True
    except Exception:  # not created on this server (zhllama server creates it): run unthrottled
        return False


# Within one flow-run process, heavy stages also take a local slot: they are CPU- and memory-bound
# (llama.cpp and torch use every core already), so running several at once on one host only makes
# each slower. ZHLLAMA_HEAVY_SLOTS raises it; the server's global limit coordinates across workers.
_LOCAL_SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get("ZHLLAMA_HEAVY_SLOTS", "1"))))


@contextlib.contextmanager
def memory_slot(enabled: bool) -> Iterator[None]:
    """Hold a local slot, and one of the global limit ``zhllama-memory-heavy`` when the server has it."""
    from prefect.settings import PREFECT_API_URL

    if not enabled:
        yield
        return
    with _LOCAL_SLOTS:
        if not _limit_exists(PREFECT_API_URL.value()):
            yield
            return
        from prefect.concurrency.sync import concurrency

        with concurrency(MEMORY_LIMIT, occupy=1, strict=False):
            yield


class _ProgressArtifact:
    """stages.PROGRESS callback updating a Prefect progress artifact, at most every 2 s or 5 %."""

    def __init__(self, label: str) -> None:
        from prefect.artifacts import create_progress_artifact

        self.label, self.last_t, self.last_p = label, 0.0, 0.0
        try:
            self.artifact_id = create_progress_artifact(progress=0.0, description=f"{label}: started")
        except Exception as exc:  # artifacts are a nicety; never fail a stage over one
            log.debug("no progress artifact: %s", exc)
            self.artifact_id = None

    def __call__(self, fraction: float, text: str) -> None:
        now = time.monotonic()
        if now - self.last_t < 2 and fraction - self.last_p < 0.05:
            return
        self.last_t, self.last_p = now, fraction
        self._update(round(99 * fraction, 1), text)

    def done(self) -> None:
        self._update(100.0, f"{self.label}: done")

    def _update(self, progress: float, text: str) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:
            with contextlib.suppress(Exception):
                update_progress_artifact(artifact_id=self.artifact_id, progress=progress, description=text)


def retry_transient(task, task_run, state) -> bool:
    """Retry network trouble, not a wrong input: a bad source, a digest mismatch or a full disk stay failed."""
    try:
        state.result()
    except (InputError, IntegrityError, DiskSpaceError):
        return False
    except Exception:
        return True
    return True


def run_node(node: StageNode, inputs: dict[str, Any], store_root: str) -> dict[str, Any]:
    """Produce one node's outputs (or hit the store). A failure leaves nothing: the store produces
    into a temporary folder that is removed on any exception."""
    t0 = time.perf_counter()
    store = Store(store_root)
    request = request_of(store, node, inputs)
    heavy = STAGES[node.stage].heavy
    progress = _ProgressArtifact(node.label) if heavy else None
    token = PROGRESS.set(progress_to(node.label, progress))
    try:
        with memory_slot(heavy):
            entry = run_stage(store, request)
    finally:
        PROGRESS.reset(token)
    if progress is not None:
        progress.done()
    log.info("%s: %s %s", node.label, "cache hit" if entry.cached else "produced", entry.key[:12])
    return {"key": entry.key, "stage": entry.stage, "hit": entry.cached, "seconds": round(time.perf_counter() - t0, 3)}


# The task wraps a function that lives under its own module-level name, so pickle (cloudpickle, for
# Dask workers) finds it by reference; a task decorating ``def stage_task`` would shadow its function
# and make pickle copy it by value, with every global it touches.
stage_task = task(name="stage", persist_result=True)(run_node)


def resources(node: StageNode) -> dict[str, int]:
    """What a node asks of a Dask worker: one unit of ``memory_heavy`` for a heavy stage (so a worker
    runs one at a time), nothing for the light ones."""
    return {HEAVY_RESOURCE: 1} if STAGES[node.stage].heavy else {}


def for_node(node: StageNode, store_root: str):
    """``stage_task`` configured for one node: its stage name, label, retries, and the store's cache."""
    sd = STAGES[node.stage]
    return stage_task.with_options(
        name=node.stage, task_run_name=node.label, retries=sd.retries,
        retry_delay_seconds=[2, 10, 30][:sd.retries] or 0, retry_condition_fn=retry_transient if sd.retries else None,
        **cache_options(store_root))


# ------------------------------------------------------------------ publishing and artifacts (never cached)


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)
def publish_task(plan, nodes: tuple[StageNode, ...], refs: dict[str, dict[str, Any]],
                 prepared: dict[str, dict[str, Any]]) -> list[str]:
    """Publish the build into its output folder in one swap (pipeline_lib.pipeline.publish)."""
    from pipeline_lib.pipeline.execute import publish_build

    from .cache import entry_of

    store = Store(plan.store_root)
    entries = {node_id: entry_of(store, ref) for node_id, ref in refs.items()}
    return [str(p) for p in publish_build(plan, nodes, entries, prepared)]


@task(name="artifacts", cache_policy=NO_CACHE, persist_result=False)
def post_artifacts(plan, refs: dict[str, dict[str, Any]], stages: list[dict[str, Any]]) -> None:
    """Table/markdown artifacts: verification results, tokenizer check, stage table, evaluation report,
    model card."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from .cache import entry_of

    store = Store(plan.store_root)
    slug = "".join(c if c.isalnum() else "-" for c in plan.name.lower()).strip("-")
    name = plan.display
    create_table_artifact(key=f"{slug}-stages", table=stages, description=f"{name}: stages (cached or computed)")
    if "verify" in refs:
        rows = json.loads((entry_of(store, refs["verify"]).path / "verify.json").read_text(encoding="utf-8"))["files"]
        table = [{"role": r["role"], "file": r["file"], "size": human_bytes(r["size"]), "status": r["status"],
                  "against": r["against"], "sha256": r["sha256"]} for r in rows]
        if "official" in refs:  # what was built, against the release's published merged/tokenizer hashes
            official = json.loads((entry_of(store, refs["official"]).path / "official.json").read_text(encoding="utf-8"))
            table += [{"role": "built", "file": r["file"], "size": "", "status": r["status"], "against": r["message"],
                       "sha256": r["sha256"]} for r in official["files"]]
        create_table_artifact(key=f"{slug}-verify", table=table,
                              description=f"{name}: SHA256 of every input and of what was built against the official "
                                          "table (full digests; also in build-lock.json)")
    audits = [(node_id, entry_of(store, ref).meta.get("audit")) for node_id, ref in refs.items()
              if ref["stage"] in ("merge", "gguf")]
    audits = [(node_id, a) for node_id, a in audits if a]
    if audits:  # the release's post-merge check, extended: what each LoRA changed, finiteness
        create_table_artifact(key=f"{slug}-audit", table=[{"output": node_id, **row} for node_id, a in audits
                                                          for row in a["rows"]],
                              description=f"{name}: post-merge audit. " + audits[0][1]["summary"])
    if "tokenizer" in refs:
        check = json.loads((entry_of(store, refs["tokenizer"]).path / "check.json").read_text(encoding="utf-8"))
        create_table_artifact(key=f"{slug}-tokenizer", table=check["loras"] or [{"status": "no LoRA tokenizers"}],
                              description=f"{name}: merged tokenizer vs the tokenizer each LoRA ships")
    if "report" in refs:
        create_markdown_artifact(key=f"{slug}-report", markdown=report_markdown(entry_of(store, refs["report"]).path),
                                 description=f"{name}: evaluation report")
    if "card" in refs:  # the model card (README.md of the build folder), its plot inlined
        from pipeline_lib.card import CARD_FILE, inline_plot

        card = (entry_of(store, refs["card"]).path / CARD_FILE).read_text(encoding="utf-8")
        png = entry_of(store, refs["report"]).path / "report.png" if "report" in refs else None
        create_markdown_artifact(key=f"{slug}-card", markdown=inline_plot(card, png.read_bytes() if png and
                                                                           png.is_file() else None),
                                 description=f"{name}: model card (README.md)")


def report_markdown(folder: Path) -> str:
    """report.md with the plot inlined as a data URI (artifacts cannot reference local files)."""
    import base64

    md = folder / "report.md"
    text = md.read_text(encoding="utf-8") if md.is_file() else "(no report.md)"
    png = folder / "report.png"
    if png.is_file():
        uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
        text = text.replace("](report.png)", f"]({uri})")
        if uri not in text:
            text += f"\n\n![report.png]({uri})\n"
    return text
