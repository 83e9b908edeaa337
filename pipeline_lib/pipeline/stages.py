"""The stages of a build, as one table: ``STAGES = {name: StageDef(...)}``.

A stage's *request builder* turns a graph node and its resolved inputs (store entries of the
upstream nodes) into a :class:`StageRequest`: stage name and version, the content digests of
its inputs, its parameters, and ``produce(tmp_dir)``, which calls the stage's module
(``download``, ``verify``, ``tokenizer``, ``merge``, ``gguf_export``, ``quantize``,
``ggml_legacy``, ``evaluate``). The request's key is the artifact-store key, so

* ``run_stage(store, request)`` computes a stage at most once per key and returns a hit when an
  intact entry exists (a missing or altered output is never a hit);
* the Prefect cache policy (``tasks/cache.py``) computes the very same key from the very same
  builder, without running anything: one definition of "same inputs" for both executors.

A new stage is one row here and one function in its stage module.
"""

from __future__ import annotations

import contextvars
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..fsutil import sha256_bytes, write_text_atomic
from ..store import Entry, Store, canonical_json
from .graph import StageNode
from .plan import BuildPlan, source_fingerprint

if TYPE_CHECKING:  # evaluate (numpy, llama.cpp) is imported when a stage runs
    from ..evaluate import PassOptions


@dataclass(frozen=True)
class StageRequest:
    """Everything that identifies one stage computation, plus how to produce it."""

    stage: str
    inputs: dict[str, str]  # name -> content digest
    params: dict[str, Any]
    produce: Callable[[Path], Mapping[str, Any] | None] = field(compare=False, repr=False)
    label: str = ""
    holding: tuple[Entry, ...] = field(default=(), compare=False, repr=False)  # inputs gc must not remove meanwhile

    @property
    def version(self) -> str:
        return STAGES[self.stage].version

    def key(self) -> str:
        return Store.key(self.stage, version=self.version, inputs=self.inputs, params=self.params)


RequestBuilder = Callable[[StageNode, Mapping[str, Any]], StageRequest]


@dataclass(frozen=True)
class StageDef:
    """One row of the stage table."""

    version: str  # bumped when the stage's output for the same inputs changes (keys include it)
    request: RequestBuilder
    description: str
    heavy: bool = False  # memory/CPU-bound: one at a time per host, and the server's memory-heavy limit
    retries: int = 0  # transient failures (network) are retried this often
    # Runtime inputs found once per run, before the stage is scheduled (a source's fingerprint):
    prepare: Callable[[StageNode, BuildPlan], dict[str, Any]] | None = None
    # Same inputs, same bytes? Evaluations measure speed, so their files differ run to run:
    # downstream keys then name the entry (its key) rather than its content.
    deterministic: bool = True


# Where a running stage reports progress: a callable (fraction 0..1, description) set by the
# executor around run_stage (the Prefect task sets one that updates a progress artifact).
PROGRESS: contextvars.ContextVar[Callable[[float, str], None] | None] = contextvars.ContextVar(
    "zhllama_progress", default=None)


class Reporter(Protocol):
    """Who watches a build (the CLI's console): progress of running stages, each stage as it ends."""

    def progress(self, label: str, fraction: float, text: str) -> None: ...

    def finished(self, run: Any) -> None: ...  # a StageRun


# The watcher of builds started in this context (set by the CLI; both executors report to it, and
# Prefect copies the context into its task threads). None: nobody watches (a worker's flow run).
REPORTER: contextvars.ContextVar[Reporter | None] = contextvars.ContextVar("zhllama_reporter", default=None)


def progress_to(label: str, *callbacks: Callable[[float, str], None] | None) -> Callable[[float, str], None] | None:
    """One PROGRESS callback feeding ``callbacks`` and the context's reporter (None if nobody listens)."""
    reporter = REPORTER.get()
    sinks = [c for c in callbacks if c is not None]
    if reporter is not None:
        sinks.append(lambda f, t: reporter.progress(label, f, t))
    if not sinks:
        return None

    def report(fraction: float, text: str) -> None:
        for sink in sinks:
            sink(fraction, text)

    return report


def report_progress(fraction: float, text: str) -> None:
    cb = PROGRESS.get()
    if cb is not None:
        cb(max(0.0, min(fraction, 1.0)), text)


def _bytes_progress(total: int, what: str) -> Callable[[int], None]:
    """A ``progress(nbytes)`` callback (merge, convert: once per tensor written) turned into
    fractions of ``total``; each call is also a tensor and its bytes for the kill points."""
    from ..progress import advance

    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        advance(tensors=1, nbytes=n)
        report_progress(done[0] / total if total else 0.0, f"{what}: {done[0] / 1e6:.0f} MB written")

    return on_bytes


def digest(entry: Entry) -> str:
    """What downstream keys are built from: the content digest of an entry's outputs, or for a
    stage whose output is not a function of its inputs (evaluations time things), its key."""
    stage = STAGES.get(entry.stage)
    if stage is not None and not stage.deterministic:
        return "key:" + entry.key
    return sha256_bytes(canonical_json({k: o.sha256 for k, o in sorted(entry.outputs.items())}).encode())


def run_stage(store: Store, request: StageRequest) -> Entry:
    """Produce (or fetch from the store) one stage's outputs; its input entries are held meanwhile
    (``cache gc`` skips them), and each stage start is a kill point ("stage") for the crash tests."""
    from .. import killpoints

    killpoints.tick("stage")
    return store.get_or_produce(request.stage, version=request.version, inputs=request.inputs,
                                params=request.params, produce=request.produce, holding=request.holding)


def _entries_in(value: Any) -> Iterator[Entry]:
    if isinstance(value, Entry):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _entries_in(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _entries_in(v)


def request_for(node: StageNode, inputs: Mapping[str, Any]) -> StageRequest:
    """The request of ``node`` given its resolved inputs (entries, and prepared runtime values)."""
    request = STAGES[node.stage].request(node, inputs)
    return replace(request, holding=tuple(_entries_in(inputs)))


def summary(value: Any) -> Any:
    """A JSON-able summary of a stage result (dataclasses, paths and enums flattened)."""
    from dataclasses import asdict, is_dataclass

    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.loads(canonical_json(value, default=str))


def files_of(entry: Entry) -> list[Path]:
    return [entry.path / rel for rel in sorted(entry.outputs)]


def gguf_file(entry: Entry) -> Path:
    return entry.path / next(rel for rel in sorted(entry.outputs) if rel.endswith(".gguf"))


def tokenizer_model(entry: Entry) -> Path | None:
    """The tokenizer.model of a download entry (the base's) or of the tokenizer stage."""
    for rel in ("tokenizer/tokenizer.model", "tokenizer.model"):
        if rel in entry.outputs:
            return entry.path / rel
    return None


# ------------------------------------------------------------------ request builders, one per stage


def _prepare_download(node: StageNode, plan: BuildPlan) -> dict[str, Any]:
    return {"fingerprint": source_fingerprint(plan.source(node.params["role"]))}


def download_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """Fetch one source (hub, local folder, URL or archive) into the store, verified on the way."""
    p = node.params

    def produce(tmp: Path) -> dict:
        from ..download import download

        result = download(p["source"], out=tmp, revision=p["revision"], include=p["include"],
                          expected=p["sha256"] or None, token=os.environ.get("HF_TOKEN"))
        return {"role": p["role"], "source": result.source, "result": summary(result)}

    from ..download import parse_source

    shown = parse_source(p["source"], revision=p["revision"]).text  # credentials never enter a manifest
    return StageRequest("download", inputs={"source": args["fingerprint"]},
                        params={"source": shown, "revision": p["revision"], "include": p["include"]},
                        produce=produce, label=node.label)


def verify_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """SHA256 of every downloaded file against the official/expected digests; a table of results.

    A mismatch raises IntegrityError; a file with no known digest is recorded (status 'unknown'),
    never passed off as official.
    """
    downloads: Mapping[str, Entry] = args["downloads"]
    expected: Mapping[str, Mapping[str, str]] = node.params["expected"]

    def produce(tmp: Path) -> dict:
        from .. import verify

        rows = []
        for role, entry in downloads.items():
            result = verify.verify(files_of(entry), expected=dict(expected.get(role, {})),
                                   what=f"the expected digests of {role}")
            for f in result.files:
                rows.append({"role": role, "file": Path(f.path).relative_to(entry.path).as_posix(),
                             "size": f.size, "sha256": f.sha256, "status": f.status.value, "against": f.against})
        write_text_atomic(tmp / "verify.json", json.dumps({"files": rows}, indent=2, ensure_ascii=False) + "\n")
        return {"files": len(rows), "unknown": sum(r["status"] == "unknown" for r in rows)}

    return StageRequest("verify", inputs={role: digest(e) for role, e in downloads.items()},
                        params={"expected": {k: dict(v) for k, v in expected.items()}}, produce=produce,
                        label=node.label)


def tokenizer_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """The build's tokenizer (tokenizer.build_tokenizer) and its check against each LoRA's (check.json)."""
    base, loras, sp = args["base"], args["loras"], args.get("chinese_sp")
    kind = node.params["kind"]

    def produce(tmp: Path) -> dict:
        from ..tokenizer import build_tokenizer

        sp_model = next((sp.path / rel for rel in sorted(sp.outputs) if rel.endswith(".model")), None) if sp else None
        check = build_tokenizer(base.path / "tokenizer.model", loras=[e.path for e in loras], chinese_sp=sp_model,
                                kind=kind, out=tmp / "tokenizer")
        write_text_atomic(tmp / "check.json", json.dumps(check.to_json(), indent=2) + "\n")
        return {"kind": kind, "checked": len(check.loras), "merged": check.merged}

    inputs = {"base": digest(base), "verified": digest(args["verified"])}
    inputs |= {f"lora-{i}": digest(e) for i, e in enumerate(loras)}
    if sp is not None:
        inputs["chinese_sp"] = digest(sp)
    return StageRequest("tokenizer", inputs=inputs, params={"kind": kind}, produce=produce, label=node.label)


def _weights_inputs(args: Mapping[str, Any]) -> dict[str, str]:
    return {"base": digest(args["base"]), "tokenizer": digest(args["tokenizer"])} | {
        f"lora-{i}": digest(e) for i, e in enumerate(args["loras"])}


def merge_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """The merged checkpoint (HF safetensors or Meta pth), LoRA after LoRA, streamed; with its audit."""
    base, loras = args["base"], args["loras"]
    fmt, dtype, precise = node.params["format"], node.params["dtype"], node.params["precise"]

    def produce(tmp: Path) -> dict:
        from ..merge import merge

        total = base.size * (2 if dtype == "float32" else 1)  # about one base's worth of bytes is written
        result = merge(base.path, [e.path for e in loras], out=tmp / fmt, format=fmt, dtype=dtype, precise=precise,
                       progress=_bytes_progress(total, node.label))
        return {"arithmetic": result.arithmetic, "audit": _audit(result.audit, loras), "result": summary(result)}

    return StageRequest("merge", inputs=_weights_inputs(args), params={"format": fmt, "dtype": dtype,
                                                                       "precise": precise},
                        produce=produce, label=node.label)


def _audit(audit: Any, loras: Sequence[Entry]) -> dict | None:
    """The post-merge audit (merge.AuditResult) for the entry's manifest meta: metadata, not an output,
    so a one-pass GGUF keeps the content digest of the same GGUF converted from a checkpoint.
    The LoRAs are named by role and source, not by their store folders."""
    if audit is None:
        return None
    doc = json.dumps({"summary": audit.summary, "ok": audit.ok, "tensors_checked": audit.tensors_checked,
                      "rows": list(audit.rows)})
    for i, e in enumerate(loras):
        shown = f"lora-{i} ({Path(str(e.meta.get('source') or e.path.name)).name})"
        doc = doc.replace(json.dumps(e.path.name)[1:-1], shown)
    return json.loads(doc)


def gguf_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """Float GGUF of the merged model: from the HF checkpoint if one was built, else one pass from the merge."""
    p = node.params
    merged: Entry | None = args.get("merged")

    def produce(tmp: Path) -> dict:
        from ..gguf_export import convert

        plan = None
        if merged is not None:
            source: Any = merged.path / "hf"
            total = merged.size
        else:
            from ..merge import plan_merge

            source = plan = plan_merge(args["base"].path, [e.path for e in args["loras"]], dtype=p["dtype"],
                                       precise=p["precise"])
            total = args["base"].size
        result = convert(source, out=tmp / p["file"], outtype=p["outtype"], name=p["name"],
                         on_progress=_bytes_progress(total * (2 if p["outtype"] == "f32" else 1), node.label))
        return {"file": p["file"], "one_pass": merged is None, "result": summary(result),
                "audit": _audit(plan.audit.result, args["loras"]) if plan is not None and plan.audit is not None
                else None}

    inputs = {"merged": digest(merged)} if merged is not None else _weights_inputs(args)
    params = {"outtype": p["outtype"], "dtype": p["dtype"], "file": p["file"]}
    if merged is None:
        params["precise"] = p["precise"]  # from a checkpoint, the arithmetic is the checkpoint's
    return StageRequest("gguf", inputs=inputs, params=params, produce=produce, label=node.label)


def fingerprint_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """Per-tensor sha256 of a float output (HF folder, pth folder or float GGUF), keyed by GGUF name."""
    output, what = args["output"], node.params["output"]

    def produce(tmp: Path) -> dict:
        from ..fingerprint import fingerprint

        target = gguf_file(output) if what == "gguf" else output.path / what
        fp = replace(fingerprint(target), source=target.name)  # not the store path: the same file everywhere
        fp.write(tmp / "fingerprint.json")
        return {"digest": fp.digest, "tensors": len(fp.tensors)}

    return StageRequest("fingerprint", inputs={"output": digest(output)}, params={"output": what},
                        produce=produce, label=node.label)


def _prepare_official(node: StageNode, plan: BuildPlan) -> dict[str, Any]:
    """The official table in force now (the packaged one, or $ZHLLAMA_RELEASE_TABLE): part of the key."""
    from ..verify import release_table

    return {"table": sha256_bytes(canonical_json(release_table()).encode())}


def official_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """What was built against the release's published SHA256 (merged pth parts, tokenizer.model)."""
    from ..errors import IntegrityError
    from ..verify import Status, Verified

    p = node.params
    built: Sequence[Entry] = [args["tokenizer"], *([args["pth"]] if "pth" in args else [])]

    def produce(tmp: Path) -> dict:
        from ..verify import check_official

        rows = json.loads((args["verified"].path / "verify.json").read_text(encoding="utf-8"))["files"]
        inputs: dict[str, list[Verified]] = {}
        for r in rows:
            inputs.setdefault(r["role"], []).append(Verified(Path(r["file"]), r["sha256"], r["size"],
                                                             Status(r["status"]), r["against"]))
        files = {e.path / rel: o.sha256 for e, want in zip(built, ("tokenizer/tokenizer.model", ".pth"), strict=False)
                 for rel, o in e.outputs.items() if rel.endswith(want)}
        check = check_official(list(files), model=p["model"], digests=files, precise=p["precise"], dtype=p["dtype"],
                               inputs=inputs)
        result = {"model": check.model, "matches": check.matches, "pth_built": "pth" in args, "files": check.rows()}
        for row in result["files"]:
            row.pop("path", None)  # a store path: meaningless outside this machine
            if p["model"] is None and row["status"] == "no official hash":
                row["message"] = "no official hash published (this build is not one of the release's models)"
        write_text_atomic(tmp / "official.json", json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        if p["require"] and check.differs:
            raise IntegrityError("; ".join(f"{f.path.name}: {f.message}" for f in check.differs),
                                 expected="files identical to the release's (--require-official)",
                                 fix="see the likely causes above; drop --require-official to keep the build anyway")
        return {"matches": check.matches, "differs": len(check.differs)}

    return StageRequest("official", inputs={"verified": digest(args["verified"]), "table": args["table"]} | {
        f"built-{i}": digest(e) for i, e in enumerate(built)}, params=dict(p), produce=produce, label=node.label)


def quantize_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """One llama.cpp quantization of the float GGUF."""
    gguf, q, file = args["gguf"], node.params["qtype"], node.params["file"]

    def produce(tmp: Path) -> dict:
        from ..quantize import quantize

        result = quantize(gguf_file(gguf), qtypes=[q], out_dir=tmp, names={q: file},
                          on_progress=lambda q, i, n: report_progress(i / n if n else 0.0, f"quantize {q}: tensor {i}/{n}"))
        return {"file": file, "qtype": q, "result": summary(result)}

    return StageRequest("quantize", inputs={"gguf": digest(gguf)}, params={"qtype": q, "file": file},
                        produce=produce, label=node.label)


def ggml_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """Legacy GGML (ggjt v3) file for 2023 tools."""
    gguf, q, file = args["gguf"], node.params["qtype"], node.params["file"]

    def produce(tmp: Path) -> dict:
        from .. import ggml_legacy

        result = ggml_legacy.export(gguf_file(gguf), out=tmp / file, qtype=q)
        return {"file": file, "result": summary(result)}

    return StageRequest("ggml", inputs={"gguf": digest(gguf)}, params={"qtype": q, "file": file},
                        produce=produce, label=node.label)


def _pass_options(options: Mapping[str, Any]) -> PassOptions:
    """EvalOptions (BuildSpec, as a dict) -> the evaluate.PassOptions that every model's pass takes."""
    from ..evaluate import PassOptions

    return PassOptions(prompts=None if options["generate"] else False,
                       samples_per_category=options["samples_per_category"],
                       max_samples=options["max_samples"] or None, max_tokens=options["max_new_tokens"],
                       speed_prompt=options["speed_prompt_tokens"], speed_gen=options["speed_gen_tokens"],
                       threads=options["threads"])


def evaluate_reference_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """The float model's evaluation, once per build: its own report row and its stored predictions,
    which every variant's KL is measured against (evaluate.reference_pass)."""
    gguf, tokenizers, label, options = args["gguf"], args["tokenizers"], node.params["label"], node.params["options"]

    def produce(tmp: Path) -> dict:
        from ..evaluate import reference_pass

        toks = {name: tokenizer_model(e) for name, e in tokenizers.items()}
        ref = reference_pass(gguf_file(gguf), out=tmp, name=label, text=options.get("text"), n_ctx=options["n_ctx"],
                             n_chunks=0 if options["max_chunks"] is None else options["max_chunks"],
                             tokenizers={n: t for n, t in toks.items() if t is not None},
                             options=_pass_options(options), plot=False)
        return {"label": label, "n_chunks": ref.n_chunks, "reference_bytes": ref.total_bytes}

    return StageRequest("evaluate-reference", inputs={"gguf": digest(gguf)} | {
        f"tokenizer {name}": digest(e) for name, e in tokenizers.items()},
        params={"label": label, "options": dict(options)}, produce=produce, label=node.label)


def evaluate_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """Perplexity, KL against the stored reference, speed and samples for one quantized variant;
    the float model is not loaded again."""
    variant, reference, label, options = args["variant"], args["reference"], node.params["label"], node.params["options"]

    def produce(tmp: Path) -> dict:
        from ..evaluate import evaluate

        evaluate(gguf_file(variant), out=tmp, reference=reference.path, name=label, options=_pass_options(options),
                 plot=False)
        return {"label": label}

    return StageRequest("evaluate", inputs={"variant": digest(variant), "reference": digest(reference)},
                        params={"label": label, "options": dict(options)}, produce=produce, label=node.label)


def report_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """One report (report.json, report.md, report.png) from the reference and the variants' evaluations,
    every quality gate in force marked pass or fail (the gates stage then decides)."""
    evaluations: Mapping[str, Entry] = args["evaluations"]
    title = node.params["title"]
    gates, enforce = node.params.get("gates", {}), node.params.get("enforce_broken", False)

    def produce(tmp: Path) -> dict:
        from ..evaluate import apply_gates, combine_reports, write_report
        from ..gates import failures

        report = combine_reports([e.path for e in evaluations.values()], out=tmp, title=title)
        report = apply_gates(report, gates, enforce_broken=enforce)
        write_report(report)
        return {"variants": [v.name for v in report.variants], "reference": report.reference,
                "gates_failed": [g.describe() for g in failures(report.gates)]}

    return StageRequest("report", inputs={label: digest(e) for label, e in evaluations.items()},
                        params={"title": title, "gates": gates, "enforce_broken": enforce}, produce=produce,
                        label=node.label)


def gates_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """The build's verdict on the report's quality gates: gates.json, or an IntegrityError naming every
    failed gate (variant, measured value, limit), so both executors fail the build alike."""
    report = args["report"]

    def produce(tmp: Path) -> dict:
        from dataclasses import asdict

        from ..errors import IntegrityError
        from ..evaluate import Report
        from ..gates import failures

        results = Report.load(report.path).gates
        failed = failures(results)
        verdict = {"passed": not failed, "gates": [asdict(g) | {"status": g.status} for g in results]}
        if failed:
            raise IntegrityError("quality gate failed: " + "; ".join(g.describe() for g in failed),
                                 expected="every variant within its gates (BuildSpec evaluation.gates; defaults: "
                                          "llama.cpp's published KL ranges, see docs/deliverables.md)",
                                 fix=f"see the report {report.path / 'report.md'}; use a higher-precision "
                                     "quantization, or set evaluation.gates for that variant (a broken "
                                     "quantization, top-1 agreement under 50%, fails whatever the gates say)")
        write_text_atomic(tmp / "gates.json", json.dumps(verdict, indent=2, ensure_ascii=False) + "\n")
        return {"passed": True, "checked": len(results)}

    return StageRequest("gates", inputs={"report": digest(report)}, params={}, produce=produce, label=node.label)


def modelfile_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """An Ollama Modelfile for one GGUF variant (pipeline_lib.ollama), its num_ctx read from the GGUF."""
    gguf, p = args["gguf"], dict(node.params)

    from .. import __version__

    p["zhllama"] = __version__  # the Modelfile names the version that wrote it

    def produce(tmp: Path) -> dict:
        from ..chat import gguf_context_length
        from ..ollama import render_modelfile

        ctx = gguf_context_length(gguf_file(gguf))
        text = render_modelfile(p["file"], template=p["template"], model=p["model"], display=p["display"],
                                variant=p["variant"], modelfile=p["modelfile"], context_length=ctx or None,
                                version=p["zhllama"])
        write_text_atomic(tmp / p["modelfile"], text)
        return {"variant": p["variant"], "num_ctx": ctx}

    return StageRequest("modelfile", inputs={"gguf": digest(gguf)}, params=p, produce=produce, label=node.label)


def card_request(node: StageNode, args: Mapping[str, Any]) -> StageRequest:
    """The model card (README.md, pipeline_lib.card) from what the build recorded: verify.json,
    official.json, the fingerprints, the report and its gates, what each source resolved to."""
    from ..card import versions

    p = node.params
    downloads: Mapping[str, Entry] = args["downloads"]
    fingerprints: Mapping[str, Entry] = args["fingerprints"]
    report: Entry | None = args.get("report")
    resolved = {role: e.inputs.get("source") for role, e in downloads.items()}
    installed = versions()

    def produce(tmp: Path) -> dict:
        from ..card import CardInputs, write_card
        from ..evaluate import Report

        rows = json.loads((args["verified"].path / "verify.json").read_text(encoding="utf-8"))["files"]
        official = json.loads((args["official"].path / "official.json").read_text(encoding="utf-8"))
        card = CardInputs(
            name=p["name"], display=p["display"], model=p["model"], tokenizer=p["tokenizer"], spec=p["spec"],
            sources=[s | {"resolved": resolved.get(s["role"])} for s in p["sources"]], inputs=rows,
            files=[tuple(f) for f in p["files"]], official=official,
            fingerprints={k: e.meta.get("digest") for k, e in fingerprints.items()},
            report=Report.load(report.path) if report is not None else None, versions=installed,
            modelfiles=p["modelfiles"], default_variant=p["default_variant"], synthetic=p["synthetic"])
        write_card(card, tmp)
        return {"versions": installed}

    inputs = {f"download {role}": digest(e) for role, e in downloads.items()}
    inputs |= {f"source {role}": str(fp) for role, fp in resolved.items()}  # a moved branch: a new card
    inputs |= {"verified": digest(args["verified"]), "official": digest(args["official"])}
    inputs |= {f"fingerprint {k}": digest(e) for k, e in fingerprints.items()}
    if report is not None:
        inputs |= {"report": digest(report), "gates": digest(args["gates"])}
    return StageRequest("card", inputs=inputs, params=dict(p) | {"versions": installed}, produce=produce,
                        label=node.label)


# ------------------------------------------------------------------ the table

STAGES: dict[str, StageDef] = {
    "download": StageDef("1", download_request, "fetch a source into the store, verified on the way",
                         retries=2, prepare=_prepare_download),
    "verify": StageDef("1", verify_request, "SHA256 of every input against the official table"),
    "tokenizer": StageDef("2", tokenizer_request, "merge LLaMA + chinese_sp tokenizers, check each LoRA's"),
    "merge": StageDef("2", merge_request, "merged HF/pth checkpoint (release arithmetic), with its audit", heavy=True),
    "gguf": StageDef("2", gguf_request, "float GGUF (one pass from the merge without a checkpoint)", heavy=True),
    "fingerprint": StageDef("1", fingerprint_request, "per-tensor sha256 of a float output"),
    "official": StageDef("1", official_request, "the built pth and tokenizer against the release's SHA256",
                         prepare=_prepare_official),
    "quantize": StageDef("1", quantize_request, "one llama.cpp quantization", heavy=True),
    "ggml": StageDef("1", ggml_request, "legacy GGML file for 2023 tools", heavy=True),
    "evaluate-reference": StageDef("2", evaluate_reference_request, "the float model's evaluation (the KL reference)",
                                   heavy=True, deterministic=False),
    "evaluate": StageDef("3", evaluate_request, "perplexity, KL, speed, samples of one variant", heavy=True,
                         deterministic=False),
    "report": StageDef("3", report_request, "report.json/md/png across variants, quality gates marked",
                       deterministic=False),
    "gates": StageDef("1", gates_request, "fail the build on a failed quality gate or a broken quantization"),
    "modelfile": StageDef("1", modelfile_request, "an Ollama Modelfile beside a GGUF variant"),
    "card": StageDef("1", card_request, "the model card README.md (provenance, evaluation, usage)"),
}
