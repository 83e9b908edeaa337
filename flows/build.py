"""The ``build-model`` flow: one catalog model (or the demo) from sources to evaluated GGUF files.

DAG (each box a task from ``tasks.stages``; caching, isolation and results in the artifact store)::

    download × sources (parallel) → verify → tokenizer → [merge hf/pth] → gguf (one pass without a
    checkpoint) → quantize × types (parallel) / ggml × types → evaluate × variants (parallel)
    → report → publish + artifacts

Deployments: ``build-model/build-<model>`` (see deployments/prefect.yaml); ``zhllama run``.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from pipeline_lib import build
from pipeline_lib.buildspec import BuildSpec
from pipeline_lib.store import default_root
from tasks import stages
from tasks._cache import cache_options

STAGE_TASKS = ("download", "verify", "tokenizer", "merge", "gguf", "quantize", "ggml", "evaluate", "report")


def _state_name(future) -> str:
    future.wait()
    return future.state.name


@flow(name="build-model", description="Download, verify, merge, convert, quantize and evaluate one model.",
      validate_parameters=True)
def build_model(spec: BuildSpec) -> dict[str, Any]:
    """Build one model. Returns {'out_dir', 'published', 'stages': [{label, stage, state, cached, key}]}."""
    logger = get_run_logger()
    store_root = str(default_root())
    plan = build.plan_build(spec, store_root=store_root)
    opts = cache_options(store_root)
    t = {name: getattr(stages, name).with_options(**opts) for name in STAGE_TASKS}
    logger.info("building %s (%s) into %s; artifact store %s", plan.name, plan.display, plan.out_dir, store_root)

    runs: list[tuple[str, Any]] = []  # (label, future)

    def submit(name: str, label: str, *args: Any, wait_for=None, **kwargs: Any):
        fut = t[name].with_options(task_run_name=label).submit(store_root, *args, wait_for=wait_for, **kwargs)
        runs.append((label, fut))
        return fut

    fingerprints = {ref.role: build.source_fingerprint(ref) for ref in plan.sources}
    dl = {ref.role: submit("download", f"download {ref.role}", ref, fingerprints[ref.role]) for ref in plan.sources}
    downloads = {role: f.result() for role, f in dl.items()}
    verified = submit("verify", "verify", downloads, {ref.role: ref.sha256 for ref in plan.sources}).result()
    loras = [downloads[ref.role] for ref in plan.loras]
    tok = submit("tokenizer", "tokenizer", downloads["base"], loras, downloads.get("chinese_sp"), plan.tokenizer,
                 verified).result()

    publishable: dict[str, Any] = {"tokenizer/": tok}
    merged: dict[str, Any] = {}
    for fmt in ("hf", "pth"):
        if fmt in spec.outputs:
            merged[fmt] = submit("merge", f"merge {fmt}", downloads["base"], loras, tok, fmt, spec.dtype).result()
            publishable[f"{fmt}/"] = merged[fmt]

    report = None
    if "gguf" in spec.outputs or "ggml" in spec.outputs:
        f16 = submit("gguf", f"gguf {spec.outtype}", downloads["base"], loras, tok, merged.get("hf"), spec.outtype,
                     spec.dtype, plan.name).result()
        variants: dict[str, Any] = {spec.outtype: f16}
        side = []
        if "gguf" in spec.outputs:
            publishable[f"{plan.name}-{spec.outtype}.gguf"] = f16
            quants = {q: submit("quantize", f"quantize {q}", f16, q, plan.name) for q in spec.quant_types}
        else:
            quants = {}
        if "ggml" in spec.outputs:
            side = [(f"{plan.name}-ggml-{q}.bin", submit("ggml", f"ggml {q}", f16, q, plan.name))
                    for q in spec.ggml_types]
        for q, fut in quants.items():
            variants[q] = fut.result()
            publishable[f"{plan.name}-{q}.gguf"] = variants[q]
        for fname, fut in side:
            publishable[fname] = fut.result()
        if spec.evaluation.enabled and "gguf" in spec.outputs:
            options = build.eval_options(spec)
            evals = {label: submit("evaluate", f"evaluate {label}", v, f16,
                                   build.eval_tokenizers(downloads, tok), label, options)
                     for label, v in variants.items()}
            evaluations = {label: fut.result() for label, fut in evals.items()}
            report = submit("report", "report", evaluations, plan.display).result()
            publishable["report/"] = report

    stage_rows = []
    for label, fut in runs:
        entry = fut.result()
        state = _state_name(fut)
        stage_rows.append({"label": label, "stage": entry.stage, "state": state,
                           "cached": state == "Cached" or entry.cached, "key": entry.key[:12]})
    lock = build.build_lock(plan, downloads, fingerprints)
    published = stages.publish(publishable, str(plan.out_dir), lock)
    stages.post_artifacts(plan.name, plan.display, verified, tok, report, stage_rows)
    hits = sum(r["cached"] for r in stage_rows)
    logger.info("%s: %d/%d stages cached; outputs in %s", plan.name, hits, len(stage_rows), plan.out_dir)
    return {"model": plan.name, "out_dir": str(plan.out_dir), "published": published, "stages": stage_rows}
