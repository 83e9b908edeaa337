"""One thin Prefect task per build stage. The work is in ``pipeline_lib.build`` / the stage modules.

Every stage task takes ``store_root`` first, builds the stage's ``StageRequest`` and runs it
through the artifact store. Caching, isolation and result persistence come from
``tasks._cache.cache_options(store_root)``, applied by the flow at run time (the store's
location is known only then). Memory-heavy stages take a slot of the global concurrency limit
``zhllama-memory-heavy`` (created by ``zhllama server``; without it they run unthrottled).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.transactions import get_transaction, transaction

from pipeline_lib import build
from pipeline_lib.store import Entry, Store

from ._cache import BUILDERS, refresh

log = logging.getLogger(__name__)

MEMORY_LIMIT = "zhllama-memory-heavy"


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


def _progress(label: str) -> Any:
    from prefect.artifacts import create_progress_artifact

    try:
        return create_progress_artifact(progress=0.0, description=f"{label}: started")
    except Exception as exc:  # artifacts are a nicety; never fail a stage over one
        log.debug("no progress artifact: %s", exc)
        return None


class _ProgressArtifact:
    """build.PROGRESS callback updating a Prefect progress artifact, at most every 2 s or 5 %."""

    def __init__(self, artifact_id: Any) -> None:
        self.artifact_id, self.last_t, self.last_p = artifact_id, 0.0, 0.0

    def __call__(self, fraction: float, text: str) -> None:
        import time

        from prefect.artifacts import update_progress_artifact

        now = time.monotonic()
        if self.artifact_id is None or (now - self.last_t < 2 and fraction - self.last_p < 0.05):
            return
        self.last_t, self.last_p = now, fraction
        with contextlib.suppress(Exception):
            update_progress_artifact(artifact_id=self.artifact_id, progress=round(99 * fraction, 1),
                                     description=text)


def _progress_done(artifact_id: Any, label: str) -> None:
    from prefect.artifacts import update_progress_artifact

    if artifact_id is not None:
        with contextlib.suppress(Exception):
            update_progress_artifact(artifact_id=artifact_id, progress=100.0, description=f"{label}: done")


def _run(task_name: str, store_root: str, heavy: bool = False, **kwargs: Any) -> Entry:
    """Build the request and produce it (or hit the store). A failure leaves nothing: the store
    produces into a temporary folder that is removed on any exception."""
    store = Store(store_root)
    args = {k: refresh(store, v) for k, v in kwargs.items()}
    request = BUILDERS[task_name](**args)
    artifact_id = _progress(request.label) if heavy else None
    token = build.PROGRESS.set(_ProgressArtifact(artifact_id) if artifact_id is not None else None)
    try:
        with memory_slot(heavy):
            entry = build.run_stage(store, request)
    finally:
        build.PROGRESS.reset(token)
    _progress_done(artifact_id, request.label)
    log.info("%s: %s %s", request.label, "cache hit" if entry.cached else "produced", entry.key[:12])
    return entry


def retry_transient(task, task_run, state) -> bool:
    """Retry network trouble, not a wrong input: a bad source, a digest mismatch or a full disk stay failed."""
    from pipeline_lib.errors import DiskSpaceError, InputError, IntegrityError

    try:
        state.result()
    except (InputError, IntegrityError, DiskSpaceError):
        return False
    except Exception:
        return True
    return True


def _stage_task(name: str, *, heavy: bool = False, retries: int = 0, builder):
    """Register ``builder`` for the cache policy and return the matching task function."""
    BUILDERS[name] = builder

    def decorate(fn):
        # No task tags: every tagged task run asks the server for tag-based concurrency slots
        # (about 0.3 s each, even when the result is cached); the memory limit is a global one.
        t = task(name=name, retries=retries, retry_delay_seconds=[2, 10, 30][:retries] or 0,
                 retry_condition_fn=retry_transient if retries else None)(fn)
        return t

    return decorate


# ------------------------------------------------------------------ stage tasks


@_stage_task("download", retries=2, builder=lambda ref, fingerprint: build.download_request(ref, fingerprint=fingerprint))
def download(store_root: str, ref: build.SourceRef, fingerprint: str) -> Entry:
    """Fetch one source (hub repo, local folder, URL, archive) into the store; retried on failure."""
    return _run("download", store_root, ref=ref, fingerprint=fingerprint)


@_stage_task("verify", builder=build.verify_request)
def verify(store_root: str, downloads: dict[str, Entry], expected: dict[str, dict[str, str]]) -> Entry:
    """SHA256 of every downloaded file against the official digests."""
    return _run("verify", store_root, downloads=downloads, expected=expected)


@_stage_task("tokenizer", builder=build.tokenizer_request)
def tokenizer(store_root: str, base: Entry, loras: list[Entry], chinese_sp: Entry | None, kind: str,
              verified: Entry) -> Entry:
    """Merge LLaMA + chinese_sp tokenizers and check the result against each LoRA's."""
    return _run("tokenizer", store_root, base=base, loras=loras, chinese_sp=chinese_sp, kind=kind, verified=verified)


@_stage_task("merge", heavy=True, builder=build.merge_request)
def merge(store_root: str, base: Entry, loras: list[Entry], tokenizer: Entry, fmt: str, dtype: str) -> Entry:
    """The merged HF/pth checkpoint (only when asked for)."""
    return _run("merge", store_root, heavy=True, base=base, loras=loras, tokenizer=tokenizer, fmt=fmt, dtype=dtype)


@_stage_task("gguf", heavy=True, builder=build.gguf_request)
def gguf(store_root: str, base: Entry, loras: list[Entry], tokenizer: Entry, merged_hf: Entry | None,
         outtype: str, dtype: str, name: str) -> Entry:
    """Float GGUF, in one pass from the merge stream when no checkpoint was built."""
    return _run("gguf", store_root, heavy=True, base=base, loras=loras, tokenizer=tokenizer, merged_hf=merged_hf,
                outtype=outtype, dtype=dtype, name=name)


@_stage_task("quantize", heavy=True, builder=build.quantize_request)
def quantize(store_root: str, gguf: Entry, qtype: str, name: str) -> Entry:
    """One llama.cpp quantization type."""
    return _run("quantize", store_root, heavy=True, gguf=gguf, qtype=qtype, name=name)


@_stage_task("ggml", heavy=True, builder=build.ggml_request)
def ggml(store_root: str, gguf: Entry, qtype: str, name: str) -> Entry:
    """Legacy GGML file of one type."""
    return _run("ggml", store_root, heavy=True, gguf=gguf, qtype=qtype, name=name)


@_stage_task("evaluate", heavy=True, builder=build.evaluate_request)
def evaluate(store_root: str, variant: Entry, reference: Entry, tokenizers: dict[str, Entry], label: str,
             options: dict[str, Any]) -> Entry:
    """Perplexity / KL / speed / samples / tokenizer efficiency for one variant."""
    return _run("evaluate", store_root, heavy=True, variant=variant, reference=reference, tokenizers=tokenizers,
                label=label, options=options)


@_stage_task("report", builder=build.report_request)
def report(store_root: str, evaluations: dict[str, Entry], title: str) -> Entry:
    """report.json / report.md / report.png across variants."""
    return _run("report", store_root, evaluations=evaluations, title=title)


# ------------------------------------------------------------------ publishing (never cached)


@task(name="publish", cache_policy=NO_CACHE, persist_result=False)
def publish_one(entry: Entry, out_dir: str, name: str) -> str:
    """Copy one output into the build folder. Undone by the rollback hook if the publish transaction fails."""
    path = build.publish_entry(entry, Path(out_dir), name)
    txn = get_transaction()
    if txn is not None:
        txn.set("published", str(path))
    return str(path)


@publish_one.on_rollback
def _unpublish(txn) -> None:
    with contextlib.suppress(ValueError):
        build.unpublish([Path(txn.get("published"))])


@task(name="build-lock", cache_policy=NO_CACHE, persist_result=False)
def write_lock(out_dir: str, lock: dict[str, Any]) -> str:
    return str(build.write_build_lock(Path(out_dir), lock))


def publish(entries: dict[str, Entry], out_dir: str, lock: dict[str, Any]) -> list[str]:
    """Publish every output in one transaction: all land, or (on any failure) none of this run's remain."""
    with transaction():
        paths = [publish_one(entry, out_dir, name) for name, entry in entries.items()]
        paths.append(write_lock(out_dir, lock))
    return paths


@task(name="report-artifacts")
def post_artifacts(name: str, display: str, verified: Entry | None, tokenizer: Entry | None, report: Entry | None,
                   stages: list[dict[str, Any]]) -> None:
    """Table/markdown artifacts: verification results, tokenizer check, stage cache table, evaluation report."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    name = display
    create_table_artifact(key=f"{slug}-stages", table=stages, description=f"{name}: stages (cached or computed)")
    if verified is not None:
        rows = json.loads((verified.path / "verify.json").read_text(encoding="utf-8"))["files"]
        create_table_artifact(key=f"{slug}-verify", table=[
            {k: r[k] for k in ("role", "file", "size", "status", "against")} | {"sha256": r["sha256"][:16] + "…"}
            for r in rows], description=f"{name}: SHA256 verification")
    if tokenizer is not None:
        check = json.loads((tokenizer.path / "check.json").read_text(encoding="utf-8"))
        create_table_artifact(key=f"{slug}-tokenizer", table=check["loras"] or [{"status": "no LoRA tokenizers"}],
                              description=f"{name}: merged tokenizer vs the tokenizer each LoRA ships")
    if report is not None:
        create_markdown_artifact(key=f"{slug}-report", markdown=report_markdown(report),
                                 description=f"{name}: evaluation report")


def report_markdown(report: Entry) -> str:
    """report.md with the plot inlined as a data URI (artifacts cannot reference local files)."""
    import base64

    md_rel = next((r for r in report.outputs if r.endswith(".md")), None)
    text = (report.path / md_rel).read_text(encoding="utf-8") if md_rel else "(no report.md)"
    for rel in report.outputs:
        if rel.endswith(".png"):
            data = base64.b64encode((report.path / rel).read_bytes()).decode()
            text = text.replace(f"]({rel})", f"](data:image/png;base64,{data})")
            if f"data:image/png;base64,{data}" not in text:
                text += f"\n\n![{rel}](data:image/png;base64,{data})\n"
    return text
