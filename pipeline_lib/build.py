"""The build DAG as plain functions: plan a build from a BuildSpec, run each stage through the store.

Every stage is described by a *request* (``StageRequest``): stage name, stage version, the
content digests of its inputs, its parameters and a ``produce(tmp_dir)`` function. The
request's key is the artifact-store key, so

* ``run_stage(store, request)`` computes a stage at most once per key (the store's lock), and
  returns a hit when an intact entry exists (a missing or altered output is never a hit);
* a Prefect cache policy (``tasks/_cache.py``) computes the very same key from the very same
  request, without running anything — one definition of "same inputs" for both runners.

Stages (each a function ``<stage>_request(...) -> StageRequest``, their order is the DAG):

    download (per source) → verify → tokenizer (merge + check against each LoRA's tokenizer)
    → merge (HF/pth checkpoint, only when asked for) → gguf (one pass from the merge stream
    when no checkpoint was asked for) → quantize (per type) / ggml (per type)
    → evaluate (per variant) → report → publish (copy into the output folder)

``run_build(spec)`` runs the DAG sequentially without Prefect (the ``zhllama build --no-prefect``
path and the reference the flow is tested against); ``flows/build.py`` runs the same requests as
Prefect tasks, in parallel where the DAG allows.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from . import __version__
from .buildspec import DEMO_MODEL, BuildSpec, SourceSpec
from .errors import InputError, IntegrityError
from .fsutil import atomic_dir, sha256_bytes, write_text_atomic
from .store import Entry, Store, canonical_json, default_root

log = logging.getLogger(__name__)

# Bumped when a stage's output for the same inputs changes (cache keys include it).
STAGE_VERSIONS: dict[str, str] = {
    "download": "1", "verify": "1", "tokenizer": "1", "merge": "1", "gguf": "1", "ggml": "1",
    "quantize": "1", "evaluate": "1", "report": "1",
}

# The release's chinese_sp.model (input of the tokenizer merge) lives in its GitHub repository.
CHINESE_SP_URL = "https://github.com/ymcui/Chinese-LLaMA-Alpaca/raw/main/scripts/merge_tokenizer/chinese_sp.model"

# Files each kind of source contributes to a build (hub allow_patterns; local folders are filtered too).
INCLUDE: dict[str, tuple[str, ...] | None] = {
    # huggyllama's repos also hold safetensors shards (+ their index) and tokenizer.json: the official
    # hashes are of the .bin shards, and tokenizer.model is the tokenizer that matters.
    "base": ("config.json", "generation_config.json", "pytorch_model.bin.index.json", "pytorch_model-*.bin",
             "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "params.json",
             "consolidated.*.pth"),
    "lora": ("adapter_model.bin", "adapter_model.safetensors", "adapter_config.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"),
    "chinese_sp": None,
}


# ------------------------------------------------------------------ records


@dataclass(frozen=True)
class SourceRef:
    """One input of a build, resolved: role ('base', 'lora-0', ..., 'chinese_sp') and where from."""

    role: str
    source: str
    revision: str | None = None
    sha256: dict[str, str] = field(default_factory=dict)
    include: tuple[str, ...] | None = None
    kind: str = "base"  # key of INCLUDE

    def to_json(self) -> dict:
        return {"role": self.role, "source": self.source, "revision": self.revision, "sha256": dict(self.sha256),
                "include": list(self.include) if self.include else None, "kind": self.kind}


@dataclass(frozen=True)
class BuildPlan:
    """A BuildSpec resolved against the catalog (or the demo): concrete sources and settings."""

    spec: BuildSpec
    name: str
    display: str
    sources: tuple[SourceRef, ...]
    tokenizer: str  # "llama" | "alpaca"
    vocab_size: int | None
    out_dir: Path
    store_root: Path

    @property
    def base(self) -> SourceRef:
        return next(s for s in self.sources if s.role == "base")

    @property
    def loras(self) -> tuple[SourceRef, ...]:
        return tuple(s for s in self.sources if s.role.startswith("lora-"))

    @property
    def chinese_sp(self) -> SourceRef | None:
        return next((s for s in self.sources if s.role == "chinese_sp"), None)


@dataclass(frozen=True)
class StageRequest:
    """Everything that identifies one stage computation, plus how to produce it."""

    stage: str
    inputs: dict[str, str]  # name -> content digest
    params: dict[str, Any]
    produce: Callable[[Path], Mapping[str, Any] | None] = field(compare=False, repr=False)
    label: str = ""  # for people: "quantize q4_0"

    @property
    def version(self) -> str:
        return STAGE_VERSIONS[self.stage]

    def key(self) -> str:
        return Store.key(self.stage, version=self.version, inputs=self.inputs, params=self.params)


# Where a running stage reports progress: a callable (fraction 0..1, description) set by the caller
# around run_stage (the Prefect task sets one that updates a progress artifact). Default: nothing.
PROGRESS: contextvars.ContextVar[Callable[[float, str], None] | None] = contextvars.ContextVar(
    "zhllama_progress", default=None)


def _report(fraction: float, text: str) -> None:
    cb = PROGRESS.get()
    if cb is not None:
        cb(max(0.0, min(fraction, 1.0)), text)


def _bytes_progress(total: int, what: str) -> Callable[[int], None]:
    """A ``progress(nbytes)`` callback (merge, convert) turned into fractions of ``total``."""
    done = [0]

    def on_bytes(n: int) -> None:
        done[0] += n
        _report(done[0] / total if total else 0.0, f"{what}: {done[0] / 1e6:.0f} MB written")

    return on_bytes


def digest(entry: Entry) -> str:
    """Content digest of an entry's outputs (what downstream keys are built from)."""
    return sha256_bytes(canonical_json({k: o.sha256 for k, o in sorted(entry.outputs.items())}).encode())


def run_stage(store: Store, request: StageRequest) -> Entry:
    """Produce (or fetch from the store) one stage's outputs."""
    return store.get_or_produce(request.stage, version=request.version, inputs=request.inputs,
                                params=request.params, produce=request.produce)


def lookup(store: Store, request: StageRequest) -> Entry | None:
    """The intact store entry for a request, or None (never computes anything)."""
    return store.get(request.key())


# ------------------------------------------------------------------ planning


def plan_build(spec: BuildSpec, *, store_root: str | os.PathLike[str] | None = None) -> BuildPlan:
    """Resolve a spec: catalog sources and official hashes, overrides, demo sources, output folder."""
    root = Path(store_root) if store_root is not None else default_root()
    if spec.model == DEMO_MODEL and spec.base is None:
        from .demo import demo_sources

        base, loras, chinese_sp, tokenizer = demo_sources(root)
        display, vocab = "Tiny demo (synthetic Chinese-Alpaca-Plus)", None
    elif spec.base is not None and spec.loras is not None and spec.model not in _catalog_names():
        base, loras, chinese_sp = spec.base, list(spec.loras), spec.chinese_sp
        tokenizer, display, vocab = spec.tokenizer or "alpaca", spec.model, None
    else:
        from . import catalog

        entry = catalog.get(spec.model)
        tok_sha = catalog.release_hashes()["tokenizer_model"]
        base = SourceSpec(source=entry.base.hub_repo, sha256=entry.base.hf_bin_files())
        loras = [SourceSpec(source=lora.repo, sha256={
            **({"adapter_model.bin": lora.adapter_sha256} if lora.adapter_sha256 else {}),
            "tokenizer.model": tok_sha[lora.tokenizer]}) for lora in entry.lora_chain]
        chinese_sp = SourceSpec(source=CHINESE_SP_URL, sha256={
            "chinese_sp.model": catalog.release_hashes()["inputs_of_tokenizer_merge"]["chinese_sp_model"]})
        if spec.base is not None:
            base = spec.base
        if spec.loras is not None:
            if len(spec.loras) != len(loras):
                raise InputError(f"{len(spec.loras)} LoRA source(s) given for {entry.display}",
                                 expected=f"{len(loras)}, in merge order: "
                                 + ", ".join(lora.release_name for lora in entry.lora_chain),
                                 fix="give one source per LoRA of the chain, or none to use the hub's")
            loras = list(spec.loras)
        if spec.chinese_sp is not None:
            chinese_sp = spec.chinese_sp
        tokenizer, display, vocab = spec.tokenizer or entry.tokenizer, entry.display, entry.vocab_size
    sources = [SourceRef("base", base.source, base.revision, dict(base.sha256), INCLUDE["base"], "base")]
    sources += [SourceRef(f"lora-{i}", s.source, s.revision, dict(s.sha256), INCLUDE["lora"], "lora")
                for i, s in enumerate(loras)]
    if chinese_sp is not None:
        sources.append(SourceRef("chinese_sp", chinese_sp.source, chinese_sp.revision, dict(chinese_sp.sha256),
                                 INCLUDE["chinese_sp"], "chinese_sp"))
    return BuildPlan(spec=spec, name=spec.model, display=display, sources=tuple(sources), tokenizer=tokenizer,
                     vocab_size=vocab, out_dir=spec.output_dir(root), store_root=root)


def _catalog_names() -> set[str]:
    from . import catalog

    return set(catalog.MODELS)


# ------------------------------------------------------------------ source fingerprints


def _is_local(source: str) -> bool:
    return not source.startswith(("http://", "https://", "hf://")) and Path(source).expanduser().exists()


def _local_files(root: Path, include: Sequence[str] | None) -> list[Path]:
    from fnmatch import fnmatch

    if root.is_file():
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if include:
        files = [p for p in files if any(fnmatch(p.name, pat) for pat in include)]
    return files


def resolve_hub_revision(repo: str, revision: str | None) -> str:
    """The commit sha a hub revision points at now (a commit sha is returned as is)."""
    rev = revision or "main"
    if len(rev) == 40 and all(c in "0123456789abcdef" for c in rev):
        return rev
    from huggingface_hub import HfApi

    try:
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(repo, revision=rev).sha
    except Exception as exc:  # network down, unknown repo or revision, gated repo without a token
        raise InputError(f"cannot resolve {repo}@{rev} on the hub ({type(exc).__name__}: {exc})",
                         expected="a reachable hub repo and revision",
                         fix="check the network / HF_ENDPOINT / HF_TOKEN, or give a local folder as the source "
                             "(zhllama build MODEL --base DIR --lora DIR ...)") from exc


def _hub_repo(source: str) -> tuple[str, str | None]:
    s = source[len("hf://"):] if source.startswith("hf://") else source
    repo, _, rev = s.partition("@")
    return repo, rev or None


def source_fingerprint(ref: SourceRef) -> str:
    """What identifies a source's bytes without downloading them.

    Local folder/file: each file's relative path, size and mtime (a changed file changes its
    mtime; hashing a 13 GB base on every run would cost half a minute). Hub repo: the commit
    sha the revision resolves to now. URL: the URL itself (release files are immutable).
    """
    if _is_local(ref.source):
        root = Path(ref.source).expanduser().resolve()
        rows = []
        for p in _local_files(root, ref.include):
            st = p.stat()
            rows.append([p.relative_to(root).as_posix() if root.is_dir() else p.name, st.st_size, st.st_mtime_ns])
        if not rows:
            raise InputError(f"no files for {ref.role} in {root}", expected=f"files matching {ref.include}")
        return "local:" + sha256_bytes(canonical_json([str(root), rows]).encode())
    if ref.source.startswith(("http://", "https://")):
        return "url:" + ref.source
    repo, rev = _hub_repo(ref.source)
    return "hub:" + resolve_hub_revision(repo, ref.revision or rev)


# ------------------------------------------------------------------ stage requests


def _summary(value: Any) -> Any:
    """A JSON-able summary of a stage result (dataclasses, paths, enums flattened)."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.loads(canonical_json(_jsonable(value)))


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if hasattr(v, "value"):
        return _jsonable(v.value)
    return str(v)


def download_request(ref: SourceRef, *, fingerprint: str | None = None) -> StageRequest:
    """Fetch one source into the store (hub, local folder, URL or archive), verified on the way."""

    def produce(tmp: Path) -> dict:
        from .download import download

        result = download(ref.source, out=tmp, revision=ref.revision, include=list(ref.include or []) or None,
                          expected=dict(ref.sha256) or None, token=os.environ.get("HF_TOKEN"))
        return {"role": ref.role, "source": ref.source, "result": _summary(result)}

    fp = fingerprint or source_fingerprint(ref)
    return StageRequest("download", inputs={"source": fp},
                        params={"source": ref.source, "revision": ref.revision,
                                "include": list(ref.include) if ref.include else None},
                        produce=produce, label=f"download {ref.role}")


def _files_of(entry: Entry) -> list[Path]:
    return [entry.path / rel for rel in sorted(entry.outputs)]


def verify_request(downloads: Mapping[str, Entry], expected: Mapping[str, Mapping[str, str]]) -> StageRequest:
    """SHA256 of every downloaded file against the official/expected digests; a table of results.

    ``expected``: role -> {file name: sha256}. A mismatch raises IntegrityError; a file with no
    known digest is recorded (status 'unknown'), never passed off as official.
    """

    def produce(tmp: Path) -> dict:
        from . import verify

        rows = []
        for role, entry in downloads.items():
            result = verify.verify(_files_of(entry), expected=dict(expected.get(role, {})),
                                   what=f"the expected digests of {role}")
            for f in result.files:
                rows.append({"role": role, "file": Path(f.path).relative_to(entry.path).as_posix(),
                             "size": f.size, "sha256": f.sha256, "status": f.status.value, "against": f.against})
        write_text_atomic(tmp / "verify.json", json.dumps({"files": rows}, indent=2, ensure_ascii=False) + "\n")
        return {"files": len(rows), "unknown": sum(r["status"] == "unknown" for r in rows)}

    return StageRequest("verify", inputs={role: digest(e) for role, e in downloads.items()},
                        params={"expected": {k: dict(v) for k, v in expected.items()}}, produce=produce,
                        label="verify")


def _tokenizer_kind_of(model: Path) -> str:
    from .tokenizer import PAD_PIECE, load_proto

    proto = load_proto(model)
    return "alpaca" if proto.pieces[len(proto.pieces) - 1].piece == PAD_PIECE else "llama"


def tokenizer_request(base: Entry, loras: Sequence[Entry], chinese_sp: Entry | None, *,
                      kind: str, verified: Entry) -> StageRequest:
    """Merge LLaMA's tokenizer with chinese_sp.model and check it byte for byte against every LoRA's.

    Output: ``tokenizer/`` (the merged tokenizer of ``kind``) and ``check.json``. Without a
    chinese_sp source the last LoRA's tokenizer is used and the check says so (status 'not merged').
    """

    def produce(tmp: Path) -> dict:
        from .fsutil import sha256_file
        from .tokenizer import merge_tokenizers, piece_count

        base_tok = base.path / "tokenizer.model"
        rows, merged = [], {}
        if chinese_sp is not None:
            sp = next(chinese_sp.path / rel for rel in chinese_sp.outputs if rel.endswith(".model"))
            for k in ("llama", "alpaca"):
                merged[k] = merge_tokenizers(base_tok, sp, out=tmp / f"merged-{k}", kind=k)
        for i, lora in enumerate(loras):
            shipped = lora.path / "tokenizer.model"
            if not shipped.is_file():
                rows.append({"lora": i, "kind": None, "status": "no tokenizer shipped"})
                continue
            lkind = _tokenizer_kind_of(shipped)
            sha = sha256_file(shipped)
            row = {"lora": i, "kind": lkind, "pieces": piece_count(shipped), "shipped_sha256": sha}
            if merged:
                row["merged_sha256"] = merged[lkind].sha256
                row["status"] = "identical" if merged[lkind].sha256 == sha else "DIFFERENT"
            else:
                row["status"] = "not merged (no chinese_sp source)"
            rows.append(row)
        bad = [r for r in rows if r.get("status") == "DIFFERENT"]
        if bad:
            raise IntegrityError(
                f"the tokenizer merged from LLaMA's and chinese_sp.model differs from the one LoRA {bad[0]['lora']} "
                f"ships ({bad[0]['kind']}: merged {bad[0]['merged_sha256'][:16]}…, shipped {bad[0]['shipped_sha256'][:16]}…)",
                expected="byte-identical tokenizers (the release's merge is deterministic)",
                fix="check that the base is the original LLaMA (its tokenizer.model) and the LoRAs are the release's",
            )
        out = tmp / "tokenizer"
        if merged:
            shutil.copytree(merged[kind].out_dir, out)
        else:
            last = loras[-1].path
            out.mkdir()
            for fname in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
                if (last / fname).is_file():
                    shutil.copyfile(last / fname, out / fname)
        for k in merged:
            shutil.rmtree(tmp / f"merged-{k}")
        write_text_atomic(tmp / "check.json", json.dumps({"kind": kind, "loras": rows}, indent=2) + "\n")
        return {"kind": kind, "checked": len(rows), "merged": bool(merged)}

    inputs = {"base": digest(base), "verified": digest(verified)}
    inputs |= {f"lora-{i}": digest(e) for i, e in enumerate(loras)}
    if chinese_sp is not None:
        inputs["chinese_sp"] = digest(chinese_sp)
    return StageRequest("tokenizer", inputs=inputs, params={"kind": kind}, produce=produce, label="tokenizer")


def _lora_paths(loras: Sequence[Entry]) -> list[Path]:
    return [e.path for e in loras]


def merge_request(base: Entry, loras: Sequence[Entry], tokenizer: Entry, *, fmt: str, dtype: str) -> StageRequest:
    """The merged checkpoint (HF safetensors or Meta pth), LoRA after LoRA, streamed."""

    def produce(tmp: Path) -> dict:
        from .merge import merge

        total = base.size * (2 if dtype == "float32" else 1)  # about one base's worth of bytes is written
        result = merge(base.path, _lora_paths(loras), out=tmp / fmt, format=fmt, dtype=dtype,
                       progress=_bytes_progress(total, f"merge {fmt}"))
        return {"result": _summary(result)}

    return StageRequest("merge", inputs=_merge_inputs(base, loras, tokenizer),
                        params={"format": fmt, "dtype": dtype}, produce=produce, label=f"merge {fmt}")


def _merge_inputs(base: Entry, loras: Sequence[Entry], tokenizer: Entry) -> dict[str, str]:
    return {"base": digest(base), "tokenizer": digest(tokenizer)} | {
        f"lora-{i}": digest(e) for i, e in enumerate(loras)}


def gguf_request(base: Entry, loras: Sequence[Entry], tokenizer: Entry, *, merged_hf: Entry | None,
                 outtype: str, dtype: str, name: str) -> StageRequest:
    """GGUF of the merged model: from the HF checkpoint if one was built, else in one pass from the merge stream."""
    filename = f"{name}-{outtype}.gguf"

    def produce(tmp: Path) -> dict:
        from .gguf_export import convert

        if merged_hf is not None:
            source: Any = merged_hf.path / "hf"
        else:
            from .merge import plan_merge

            source = plan_merge(base.path, _lora_paths(loras), dtype=dtype)
        total = (merged_hf.size if merged_hf is not None else base.size) * (2 if outtype == "f32" else 1)
        result = convert(source, out=tmp / filename, outtype=outtype, name=name,
                         on_progress=_bytes_progress(total, f"gguf {outtype}"))
        return {"file": filename, "one_pass": merged_hf is None, "result": _summary(result)}

    inputs = {"merged": digest(merged_hf)} if merged_hf is not None else _merge_inputs(base, loras, tokenizer)
    return StageRequest("gguf", inputs=inputs, params={"outtype": outtype, "dtype": dtype, "file": filename},
                        produce=produce, label=f"gguf {outtype}")


def gguf_file(entry: Entry) -> Path:
    return entry.path / next(rel for rel in entry.outputs if rel.endswith(".gguf"))


def quantize_request(gguf: Entry, *, qtype: str, name: str) -> StageRequest:
    """One llama.cpp quantization of the float GGUF."""

    def produce(tmp: Path) -> dict:
        from .quantize import quantize

        result = quantize(gguf_file(gguf), qtypes=[qtype], out_dir=tmp,
                          on_progress=lambda q, i, n: _report(i / n if n else 0.0, f"quantize {q}: tensor {i}/{n}"))
        produced = sorted(p for p in tmp.iterdir() if p.suffix == ".gguf")
        want = tmp / f"{name}-{qtype}.gguf"
        if len(produced) == 1 and produced[0] != want:
            produced[0].rename(want)
        return {"file": want.name, "qtype": qtype, "result": _summary(result)}

    return StageRequest("quantize", inputs={"gguf": digest(gguf)}, params={"qtype": qtype, "file": f"{name}-{qtype}.gguf"},
                        produce=produce, label=f"quantize {qtype}")


def ggml_request(gguf: Entry, *, qtype: str, name: str) -> StageRequest:
    """Legacy GGML (ggjt v3) file for 2023 tools."""
    filename = f"{name}-ggml-{qtype}.bin"

    def produce(tmp: Path) -> dict:
        from . import ggml_legacy

        result = ggml_legacy.export(gguf_file(gguf), out=tmp / filename, qtype=qtype)
        return {"file": filename, "result": _summary(result)}

    return StageRequest("ggml", inputs={"gguf": digest(gguf)}, params={"qtype": qtype, "file": filename},
                        produce=produce, label=f"ggml {qtype}")


def _eval_kwargs(options: Mapping[str, Any]) -> dict[str, Any]:
    """EvalOptions (BuildSpec) -> keyword arguments of pipeline_lib.evaluate.evaluate_variants."""
    return {"n_ctx": options["n_ctx"], "n_chunks": options["max_chunks"], "text": options.get("text"),
            "prompts": None if options["generate"] else False,
            "samples_per_category": options["samples_per_category"], "max_tokens": options["max_new_tokens"]}


def eval_tokenizers(downloads: Mapping[str, Entry], tokenizer: Entry) -> dict[str, Entry]:
    """The tokenizers compared on the evaluation text, by report row label: LLaMA's vs the merged one."""
    return {"LLaMA (base)": downloads["base"], "merged Chinese": tokenizer}


def evaluate_request(variant: Entry, reference: Entry, tokenizers: Mapping[str, Entry], *, label: str,
                     options: Mapping[str, Any]) -> StageRequest:
    """Perplexity, KL against the float reference, speed, samples and tokenizer efficiency for one variant.

    ``tokenizers``: ``{row label: entry}``, entries holding ``tokenizer.model`` (the base's LLaMA
    tokenizer) or ``tokenizer/tokenizer.model`` (the merged one), compared on the evaluation text.
    """

    def produce(tmp: Path) -> dict:
        from .evaluate import evaluate

        toks = {name: _tokenizer_model(e) for name, e in tokenizers.items()}
        report = evaluate(gguf_file(variant), out=tmp, reference=gguf_file(reference), name=label,
                          tokenizers={n: t for n, t in toks.items() if t is not None}, **_eval_kwargs(options))
        _scrub_workfiles(tmp)
        return {"label": label, "ppl": report.variant(label).perplexity.ppl
                if report.variant(label).perplexity else None}

    return StageRequest("evaluate", inputs={"variant": digest(variant), "reference": digest(reference)}
                        | {f"tokenizer {name}": digest(e) for name, e in tokenizers.items()},
                        params={"label": label, "options": dict(options)}, produce=produce,
                        label=f"evaluate {label}")


def _tokenizer_model(entry: Entry) -> Path | None:
    for rel in ("tokenizer/tokenizer.model", "tokenizer.model"):
        if rel in entry.outputs:
            return entry.path / rel
    return None


def _scrub_workfiles(folder: Path) -> None:
    """Keep only the report files in a store entry (evaluation scratch files are not outputs)."""
    keep = {"report.json", "report.md", "report.png"}
    for p in list(folder.iterdir()):
        if p.name not in keep:
            shutil.rmtree(p) if p.is_dir() else p.unlink()


def report_request(evaluations: Mapping[str, Entry], *, title: str) -> StageRequest:
    """One report (report.json, report.md, report.png) from the per-variant evaluations."""

    def produce(tmp: Path) -> dict:
        from . import evaluate

        report = combine_reports([evaluations[k].path / "report.json" for k in evaluations], out=tmp, title=title)
        evaluate.write_report(report)
        return {"variants": [v.name for v in report.variants], "reference": report.reference}

    return StageRequest("report", inputs={label: digest(e) for label, e in evaluations.items()},
                        params={"title": title}, produce=produce, label="report")


def combine_reports(paths: Sequence[Path], *, out: Path, title: str):
    """Merge per-variant report.json files (same reference, same text) into one evaluate.Report."""
    from . import evaluate

    reports = [_from_dict(evaluate.Report, json.loads(Path(p).read_text(encoding="utf-8"))) for p in paths]
    first = reports[0]
    variants, seen = [], set()
    for r in reports:  # the reference once (first), then every variant in the given order
        for v in sorted(r.variants, key=lambda v: not v.is_reference):
            if v.name not in seen:
                seen.add(v.name)
                variants.append(v)
    variants.sort(key=lambda v: not v.is_reference)
    return replace_dc(first, out=out, json_path=out / "report.json", md_path=out / "report.md",
                      plot_path=out / "report.png", variants=tuple(variants),
                      settings={**first.settings, "title": title})


def replace_dc(obj: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(obj, **changes)


def _from_dict(cls: Any, data: Any) -> Any:
    """Rebuild a (nested, frozen) dataclass from its asdict() form, following the type hints."""
    import types
    import typing
    from dataclasses import fields

    def conv(tp: Any, v: Any) -> Any:
        if v is None:
            return None
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            return conv(args[0], v) if len(args) == 1 else v
        if origin is tuple:
            args = typing.get_args(tp)
            inner = args[0] if args else Any
            return tuple(conv(inner, x) for x in v)
        if origin in (list, dict) or tp in (Any, dict, list, str, int, float, bool):
            return v
        if tp is Path:
            return Path(v)
        if is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            names = {f.name for f in fields(tp)}
            return tp(**{k: conv(hints[k], x) for k, x in v.items() if k in names})
        return v

    return conv(cls, data)


# ------------------------------------------------------------------ publishing


def publish_entry(entry: Entry, out_dir: Path, name: str) -> Path:
    """Copy one finished output into ``out_dir`` under ``name``, atomically; return its path.

    A single-file entry becomes the file ``name``; for a name ending in ``/`` the entry becomes a
    folder (only its sub-folder of that name when it has one: ``tokenizer/``, ``hf/``, ``pth/``).
    """
    from .fsutil import atomic_path

    out_dir.mkdir(parents=True, exist_ok=True)
    files = list(entry.outputs)
    if len(files) == 1 and not name.endswith("/"):
        target = out_dir / name
        with atomic_path(target) as tmp:
            tmp.unlink()
            _link_or_copy(entry.path / files[0], tmp)
        return target
    target = out_dir / name.rstrip("/")
    prefix = name if any(rel.startswith(name) for rel in files) else ""
    with atomic_dir(target, replace=True) as tmp:
        for rel in files:
            if not rel.startswith(prefix):
                continue
            dest = tmp / rel[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            _link_or_copy(entry.path / rel, dest)
    return target


def write_build_lock(out_dir: Path, lock: Mapping[str, Any]) -> Path:
    """``build-lock.json``: sources, commits and digests — exactly what this build used."""
    path = out_dir / "build-lock.json"
    write_text_atomic(path, json.dumps(lock, indent=2, ensure_ascii=False) + "\n")
    return path


def publish(entries: Mapping[str, Entry], out_dir: Path, *, lock: Mapping[str, Any] | None = None) -> list[Path]:
    """Publish every entry (``publish_entry``) and the lock file; on any failure remove what this call wrote."""
    done: list[Path] = []
    try:
        for name, entry in entries.items():
            done.append(publish_entry(entry, out_dir, name))
        if lock is not None:
            done.append(write_build_lock(out_dir, lock))
    except BaseException:
        unpublish(done)
        raise
    return done


def _link_or_copy(src: Path, dst: Path) -> None:
    # A copy, not a hard link: store files are read-only and shared; a user editing the
    # published file must not corrupt the cache.
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o644)


def unpublish(paths: Sequence[Path]) -> None:
    """Remove what ``publish`` wrote (the rollback of a failed build)."""
    for p in paths:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ the sequential runner


@dataclass(frozen=True)
class StageRun:
    label: str
    stage: str
    key: str
    cached: bool
    seconds: float


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


def build_lock(plan: BuildPlan, downloads: Mapping[str, Entry], fingerprints: Mapping[str, str]) -> dict:
    return {
        "model": plan.name, "display": plan.display, "zhllama": __version__,
        "spec": json.loads(plan.spec.model_dump_json()),
        "sources": [{**ref.to_json(), "fingerprint": fingerprints.get(ref.role),
                     "files": {rel: o.sha256 for rel, o in downloads[ref.role].outputs.items()}}
                    for ref in plan.sources],
    }


def run_build(spec: BuildSpec, *, store: Store | None = None,
              on_stage: Callable[[StageRun], None] | None = None) -> BuildResult:
    """Run the whole DAG sequentially, without Prefect. Same keys, same outputs as the flow."""
    store = store or Store()
    plan = plan_build(spec, store_root=store.root)
    t_start = time.perf_counter()
    runs: list[StageRun] = []

    def go(req: StageRequest) -> Entry:
        t0 = time.perf_counter()
        entry = run_stage(store, req)
        run = StageRun(req.label or req.stage, req.stage, entry.key, entry.cached, time.perf_counter() - t0)
        runs.append(run)
        if on_stage:
            on_stage(run)
        return entry

    fingerprints = {ref.role: source_fingerprint(ref) for ref in plan.sources}
    downloads = {ref.role: go(download_request(ref, fingerprint=fingerprints[ref.role])) for ref in plan.sources}
    verified = go(verify_request(downloads, {ref.role: ref.sha256 for ref in plan.sources}))
    lora_entries = [downloads[ref.role] for ref in plan.loras]
    tok = go(tokenizer_request(downloads["base"], lora_entries, downloads.get("chinese_sp"), kind=plan.tokenizer,
                               verified=verified))
    publishable: dict[str, Entry] = {"tokenizer/": tok}
    merged: dict[str, Entry] = {}
    for fmt in ("hf", "pth"):
        if fmt in spec.outputs:
            merged[fmt] = go(merge_request(downloads["base"], lora_entries, tok, fmt=fmt, dtype=spec.dtype))
            publishable[f"{fmt}/"] = merged[fmt]
    need_gguf = "gguf" in spec.outputs or "ggml" in spec.outputs
    if need_gguf:
        f16 = go(gguf_request(downloads["base"], lora_entries, tok, merged_hf=merged.get("hf"),
                              outtype=spec.outtype, dtype=spec.dtype, name=plan.name))
        variants = {spec.outtype: f16}
        if "gguf" in spec.outputs:
            publishable[f"{plan.name}-{spec.outtype}.gguf"] = f16
            for q in spec.quant_types:
                variants[q] = go(quantize_request(f16, qtype=q, name=plan.name))
                publishable[f"{plan.name}-{q}.gguf"] = variants[q]
        if "ggml" in spec.outputs:
            for q in spec.ggml_types:
                publishable[f"{plan.name}-ggml-{q}.bin"] = go(ggml_request(f16, qtype=q, name=plan.name))
        if spec.evaluation.enabled and "gguf" in spec.outputs:
            options = eval_options(spec)
            evals = {label: go(evaluate_request(v, f16, eval_tokenizers(downloads, tok), label=label,
                                                     options=options))
                     for label, v in variants.items()}
            publishable["report/"] = go(report_request(evals, title=plan.display))
    published = publish(publishable, plan.out_dir, lock=build_lock(plan, downloads, fingerprints))
    return BuildResult(plan.name, plan.out_dir, tuple(published), tuple(runs), time.perf_counter() - t_start)


def eval_options(spec: BuildSpec) -> dict[str, Any]:
    return spec.evaluation.model_dump(exclude={"enabled"})
