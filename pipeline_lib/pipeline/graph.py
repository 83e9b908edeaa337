"""The build as data: ``build_graph(plan)`` turns a BuildPlan into stage nodes, before anything runs.

Each :class:`StageNode` names its stage (a row of ``stages.STAGES``), a label for people, its
parameters, the upstream nodes each of its arguments comes from, and the name it is published
under in the output folder (if any). The tuple is in topological order. Both executors
(``execute.run_build`` here, ``flows/build.py`` under Prefect) walk this one graph, so they
cannot disagree about what a build is; ``format_graph`` prints it (``zhllama build NAME --plan``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .plan import BuildPlan

# An argument's upstream: one node id, a tuple of ids (in order) or {label: id} (in order).
Dep = str | tuple[str, ...] | Mapping[str, str]


@dataclass(frozen=True)
class StageNode:
    """One stage computation of a build."""

    id: str  # unique in the graph: "download:base", "quantize:q4_0"
    stage: str  # key of stages.STAGES
    label: str  # for people and for Prefect task-run names: "quantize q4_0"
    params: Mapping[str, Any] = field(default_factory=dict)  # JSON values
    deps: Mapping[str, Dep] = field(default_factory=dict)  # argument -> upstream node id(s)
    publish: str | None = None  # name in the output folder ("x.gguf"; "tokenizer/" for a folder)

    def upstream(self) -> Iterator[str]:
        """Every node id this node reads, in argument order."""
        for dep in self.deps.values():
            if isinstance(dep, str):
                yield dep
            elif isinstance(dep, tuple):
                yield from dep
            else:
                yield from dep.values()


def resolve_deps(node: StageNode, value_of: Mapping[str, Any]) -> dict[str, Any]:
    """The node's arguments with every upstream id replaced by ``value_of[id]`` (same shapes)."""
    out: dict[str, Any] = {}
    for arg, dep in node.deps.items():
        if isinstance(dep, str):
            out[arg] = value_of[dep]
        elif isinstance(dep, tuple):
            out[arg] = [value_of[d] for d in dep]
        else:
            out[arg] = {k: value_of[d] for k, d in dep.items()}
    return out


def eval_options(plan: BuildPlan) -> dict[str, Any]:
    # the gates judge the measurements, they do not change them: not part of the evaluations' keys
    return plan.spec.evaluation.model_dump(exclude={"enabled", "gates"})


def gates_in_force(plan: BuildPlan) -> tuple[dict[str, Any], bool]:
    """(gates per variant in ``gates.resolve``'s form, whether the broken-quant flag fails the build):
    llama.cpp's defaults for catalog models, the spec's entries over them, none for synthetic models."""
    from ..gates import resolve

    given = plan.spec.evaluation.gates
    real = plan.catalog_model is not None
    return resolve(given, variants=plan.spec.quant_types, defaults=real), real or given is not None


def build_graph(plan: BuildPlan) -> tuple[StageNode, ...]:
    """Every stage of the build in topological order, from the plan alone (no I/O)."""
    spec, name = plan.spec, plan.name
    nodes: list[StageNode] = []

    def add(node: StageNode) -> str:
        nodes.append(node)
        return node.id

    downloads = {ref.role: add(StageNode(
        f"download:{ref.role}", "download", f"download {ref.role}",
        params={"role": ref.role, "source": ref.source, "revision": ref.revision,
                "include": list(ref.include) if ref.include else None, "sha256": dict(ref.sha256)}))
        for ref in plan.sources}
    verify = add(StageNode("verify", "verify", "verify", deps={"downloads": dict(downloads)},
                           params={"expected": {ref.role: dict(ref.sha256) for ref in plan.sources}}))
    loras = tuple(downloads[ref.role] for ref in plan.loras)
    tok_deps: dict[str, Any] = {"base": downloads["base"], "loras": loras, "verified": verify}
    if "chinese_sp" in downloads:
        tok_deps["chinese_sp"] = downloads["chinese_sp"]
    tokenizer = add(StageNode("tokenizer", "tokenizer", "tokenizer", deps=tok_deps, params={"kind": plan.tokenizer},
                              publish="tokenizer/"))
    weights = {"base": downloads["base"], "loras": loras, "tokenizer": tokenizer}
    merged = {fmt: add(StageNode(f"merge:{fmt}", "merge", f"merge {fmt}", deps=weights,
                                 params={"format": fmt, "dtype": spec.dtype, "precise": spec.precise},
                                 publish=f"{fmt}/"))
              for fmt in ("hf", "pth") if fmt in spec.outputs}
    official_deps: dict[str, Any] = {"verified": verify, "tokenizer": tokenizer}
    if "pth" in merged:
        official_deps["pth"] = merged["pth"]
    add(StageNode("official", "official", "official sha256", deps=official_deps,
                  params={"model": plan.catalog_model, "precise": spec.precise, "dtype": spec.dtype,
                          "require": spec.require_official}, publish="official.json"))
    for fmt, node_id in merged.items():
        add(StageNode(f"fingerprint:{fmt}", "fingerprint", f"fingerprint {fmt}", deps={"output": node_id},
                      params={"output": fmt}, publish=f"fingerprints/{fmt}.json"))
    if not {"gguf", "ggml"} & set(spec.outputs):
        add(card_node(plan, nodes, downloads=downloads, verify=verify, report=None, gates=None, modelfiles={}))
        return tuple(nodes)

    f16_file = f"{name}-{spec.outtype}.gguf"
    gguf_deps = {"merged": merged["hf"]} if "hf" in merged else weights
    f16 = add(StageNode(f"gguf:{spec.outtype}", "gguf", f"gguf {spec.outtype}", deps=gguf_deps,
                        params={"outtype": spec.outtype, "dtype": spec.dtype, "file": f16_file, "name": name,
                                "precise": spec.precise},
                        publish=f16_file if "gguf" in spec.outputs else None))
    if "gguf" in spec.outputs:
        add(StageNode("fingerprint:gguf", "fingerprint", "fingerprint gguf", deps={"output": f16},
                      params={"output": "gguf"}, publish="fingerprints/gguf.json"))
    quants: dict[str, str] = {}
    if "gguf" in spec.outputs:
        for q in spec.quant_types:
            file = f"{name}-{q}.gguf"
            quants[q] = add(StageNode(f"quantize:{q}", "quantize", f"quantize {q}", deps={"gguf": f16},
                                      params={"qtype": q, "file": file}, publish=file))
    if "ggml" in spec.outputs:
        for q in spec.ggml_types:
            file = f"{name}-ggml-{q}.bin"
            add(StageNode(f"ggml:{q}", "ggml", f"ggml {q}", deps={"gguf": f16}, params={"qtype": q, "file": file},
                          publish=file))
    modelfiles: dict[str, str] = {}
    if "gguf" in spec.outputs:  # Ollama: a Modelfile beside each GGUF, `Modelfile` for the default variant
        from ..chat import TEMPLATE_FOR_VOCAB
        from ..ollama import modelfile_name

        default = default_variant(plan)
        for v, node_id in {spec.outtype: f16, **quants}.items():
            for is_default in (False, True) if v == default else (False,):
                mf = modelfile_name(v, default=is_default)
                modelfiles.setdefault(v, mf)
                add(StageNode(f"modelfile:{'default' if is_default else v}", "modelfile", f"modelfile {mf}",
                              deps={"gguf": node_id}, publish=mf,
                              params={"variant": v, "file": f"{name}-{v}.gguf", "modelfile": mf, "model": name,
                                      "display": plan.display, "template": TEMPLATE_FOR_VOCAB[plan.tokenizer]}))
    report = gates = None
    if spec.evaluation.enabled and "gguf" in spec.outputs:
        options = eval_options(plan)
        reference = add(StageNode(
            "evaluate:reference", "evaluate-reference", f"evaluate {spec.outtype} (reference)",
            deps={"gguf": f16, "tokenizers": {"LLaMA (base)": downloads["base"], "merged Chinese": tokenizer}},
            params={"label": spec.outtype, "options": options}))
        evals = {spec.outtype: reference} | {q: add(StageNode(
            f"evaluate:{q}", "evaluate", f"evaluate {q}", deps={"variant": node_id, "reference": reference},
            params={"label": q, "options": options})) for q, node_id in quants.items()}
        in_force, enforce_broken = gates_in_force(plan)
        report = add(StageNode("report", "report", "report", deps={"evaluations": evals}, publish="report/",
                               params={"title": plan.display, "gates": in_force, "enforce_broken": enforce_broken}))
        gates = add(StageNode("gates", "gates", "quality gates", deps={"report": report}))
    add(card_node(plan, nodes, downloads=downloads, verify=verify, report=report, gates=gates,
                  modelfiles=modelfiles))
    return tuple(nodes)


def default_variant(plan: BuildPlan) -> str:
    """The variant a user takes by default (``Modelfile``, ``zhllama export``): the first quantization
    asked for (q4_0 unless told otherwise), else the float GGUF."""
    return plan.spec.quant_types[0] if plan.spec.quant_types else plan.spec.outtype


# What each published node is, for the model card's file list (stage -> kind; see card.OUTPUT_WORDS).
_CARD_KINDS: dict[str, str] = {"tokenizer": "tokenizer/", "official": "official.json", "fingerprint": "fingerprints/",
                               "quantize": "gguf-quant:variant={qtype}", "ggml": "ggml:variant={qtype}",
                               "modelfile": "modelfile:variant={variant}", "report": "report/",
                               "gguf": "gguf-float:outtype={outtype}"}


def card_node(plan: BuildPlan, nodes: list[StageNode], *, downloads: Mapping[str, str], verify: str,
              report: str | None, gates: str | None, modelfiles: Mapping[str, str]) -> StageNode:
    """The model card (README.md): what every other node recorded, nothing measured again."""
    from ..buildspec import CUSTOM_MODEL, DEMO_MODEL, EXECUTION_FIELDS

    files: list[list[str]] = []  # [published name, kind]: JSON values
    for n in nodes:
        if not n.publish:
            continue
        kind = _CARD_KINDS[n.stage].format(**n.params) if n.stage != "merge" else n.publish
        name = "fingerprints/" if n.stage == "fingerprint" else n.publish
        if [name, kind] not in files:
            files.append([name, kind])
    files.append(["build-lock.json", "build-lock.json"])
    deps: dict[str, Any] = {"downloads": dict(downloads), "verified": verify,
                            "official": next(n.id for n in nodes if n.stage == "official"),
                            "fingerprints": {n.params["output"]: n.id for n in nodes if n.stage == "fingerprint"}}
    if report is not None:
        deps |= {"report": report, "gates": gates}
    spec = plan.spec.model_dump(mode="json", exclude={"out_dir", *EXECUTION_FIELDS})  # what, not how it ran
    sources = [{"role": ref.role, "kind": ref.parsed.kind, "source": ref.display, "revision": ref.revision,
                "repo": ref.parsed.repo} for ref in plan.sources]
    return StageNode("card", "card", "model card", deps=deps, publish="README.md", params={
        "name": plan.name, "display": plan.display, "model": plan.catalog_model, "tokenizer": plan.tokenizer,
        "spec": spec, "sources": sources, "files": files, "modelfiles": dict(modelfiles),
        "default_variant": default_variant(plan) if modelfiles else None,
        "synthetic": plan.spec.model in (DEMO_MODEL, CUSTOM_MODEL)})


def format_graph(plan: BuildPlan, nodes: tuple[StageNode, ...]) -> str:
    """The graph as text: one line per node with its inputs and where it is published."""
    lines = [f"build {plan.name} ({plan.display}) into {plan.out_dir}", "sources:"]
    lines += [f"  {ref.role:<11} {ref.display}" + (f" @ {ref.revision}" if ref.revision else "")
              for ref in plan.sources]
    lines.append(f"stages ({len(nodes)}):")
    width = max(len(n.label) for n in nodes)
    for n in nodes:
        ups = ", ".join(dict.fromkeys(n.upstream()))
        line = f"  {n.label:<{width}}  <- {ups or '(source)'}"
        if n.publish:
            line += f"  => {n.publish}"
        lines.append(line)
    return "\n".join(lines)
