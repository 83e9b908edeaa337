"""Disk-space preflight of a whole build: every output's bytes against the free space, before stage one.

Called by both executors (``execute.run_build`` and ``flows/build.py``) after the graph is built
and before the first stage runs. A 7B build with f16 and three quantizations writes about 30 GB
into the store and publishes a copy of the same 30 GB into the build folder (a local base is also
copied into the store first): finding out after an hour that the last copy does not fit helps
nobody, so the build refuses at once, naming the numbers.

What is counted (:func:`estimate`), per node of the graph:

* a node whose store entry already exists (found the way the executors find it: the same request
  builder and key, for every node whose inputs are known before running) needs nothing;
* a new entry needs its estimated output bytes: a download the size of its local files (hub
  sources: the catalog's model size), a merged checkpoint or float GGUF the model's parameters
  times the dtype's width (shapes from config.json and the last LoRA's vocabulary), a quantized
  file the parameters times the type's bits per weight (``lm_head`` at least q6_K's, as llama.cpp
  quantizes it), small stages nothing worth counting;
* every published node needs its bytes again in the build folder (publishing copies).

Where the store and the build folder share a filesystem their needs add up. Estimates are within a
few per cent for LLaMA models (norms and metadata are ignored); a 5% margin is added.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DiskSpaceError
from ..fsutil import free_bytes, human_bytes
from ..store import Entry, Store
from .graph import StageNode, resolve_deps
from .plan import BuildPlan, _local_files

log = logging.getLogger(__name__)

MARGIN = 0.05
# bytes per parameter of each float output dtype / outtype (data, not branches)
FLOAT_BYTES: dict[str, float] = {"float16": 2, "bfloat16": 2, "float32": 4, "f16": 2, "bf16": 2, "f32": 4}
GGML_BPW: dict[str, float] = {"f16": 16.0, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5}
SMALL_STAGES = frozenset({"verify", "tokenizer", "official", "fingerprint", "report"})
HEAD_BPW = 6.5625  # q6_K: what llama.cpp makes of output.weight for every type below it
EVAL_BYTES = 64 << 20  # an evaluation's report and stored predictions: bounded by its options, well under this


@dataclass(frozen=True)
class ModelSize:
    """What the estimates need: parameters of the merged model and how they were found."""

    params: int
    source: str  # "config.json of ...", "the catalog"
    head: int = 0  # parameters of lm_head (llama.cpp quantizes it to at least q6_K)


@dataclass(frozen=True)
class DiskNeeds:
    """Bytes a build still has to write: into the store and into the build folder, node by node."""

    store: int
    publish: int
    nodes: dict[str, int] = field(default_factory=dict)  # node id -> estimated new bytes in the store
    cached: tuple[str, ...] = ()  # node ids whose entries exist
    model: ModelSize | None = None

    def lines(self) -> list[str]:
        rows = [f"{nid}: {human_bytes(n)}" for nid, n in self.nodes.items() if n]
        return rows + [f"publish: {human_bytes(self.publish)}"]


def _params(config: Mapping[str, Any], vocab: int | None) -> int:
    h, ffn, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    v = vocab or config["vocab_size"]
    attn = h * h * 2 + 2 * h * (h // heads) * kv
    return 2 * v * h + layers * (attn + 3 * h * ffn + 2 * h) + h


def _lora_vocab(folder: Path) -> int | None:
    """Rows of the enlarged embed_tokens a LoRA folder ships (read from its header only)."""
    try:
        from ..lora import load_adapter

        rows = load_adapter(folder).embed_rows()
    except Exception as exc:  # noqa: BLE001 - only an estimate; the merge checks it properly
        log.debug("preflight: no vocabulary from %s: %s", folder, exc)
        return None
    return rows


def model_size(plan: BuildPlan, entries: Mapping[str, Entry]) -> ModelSize | None:
    """The merged model's parameter count, from the base's config.json (store entry or local folder)
    and the vocabulary (catalog, else the last LoRA's embed_tokens); else the catalog's fp16 size."""
    base = plan.source("base")
    folders = []
    if "download:base" in entries:
        folders.append(entries["download:base"].path)
    if base is not None and base.parsed.path is not None and Path(base.parsed.path).is_dir():
        folders.append(Path(base.parsed.path))
    vocab = plan.vocab_size
    if vocab is None and plan.loras:
        last = plan.loras[-1]
        folder = entries[f"download:{last.role}"].path if f"download:{last.role}" in entries else last.parsed.path
        if folder is not None and Path(folder).is_dir():
            vocab = _lora_vocab(Path(folder))
    for folder in folders:
        cfg_file = folder / "config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
                return ModelSize(_params(cfg, vocab), f"config.json of {folder}",
                                 head=(vocab or cfg["vocab_size"]) * cfg["hidden_size"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
    if plan.catalog_model is not None:
        from .. import catalog

        entry = catalog.get(plan.catalog_model)
        if entry.fp16_bytes:
            return ModelSize(entry.fp16_bytes // 2, "the catalog's fp16 size")
    return None


def _download_bytes(plan: BuildPlan, node: StageNode, model: ModelSize | None) -> int:
    ref = plan.source(node.params["role"])
    if ref is not None and ref.parsed.path is not None:
        root = Path(ref.parsed.path).expanduser()
        if root.exists():
            return sum(p.stat().st_size for p in _local_files(root.resolve(), ref.include))
    if ref is not None and ref.kind == "base" and model is not None:
        return model.params * 2  # a hub base: its fp16 shards
    return 0  # a hub LoRA or an URL: its size is not known before the download (the download checks it)


def _node_bytes(plan: BuildPlan, node: StageNode, model: ModelSize | None) -> int:
    """Estimated bytes of the entry a node writes."""
    p = node.params
    if node.stage == "download":
        return _download_bytes(plan, node, model)
    if node.stage in SMALL_STAGES:
        return 0
    if model is None:
        return 0
    if node.stage == "merge":
        return int(model.params * FLOAT_BYTES[p["dtype"]])
    if node.stage == "gguf":
        return int(model.params * FLOAT_BYTES[p["outtype"]])
    if node.stage == "quantize":
        from ..quantize import _PLAN_BPW

        bpw = _PLAN_BPW[p["qtype"]]
        return int(((model.params - model.head) * bpw + model.head * max(bpw, HEAD_BPW)) / 8)
    if node.stage == "ggml":
        return int(model.params * GGML_BPW.get(p["qtype"], 16.0) / 8)
    if node.stage.startswith("evaluate"):
        return EVAL_BYTES
    return 0


def estimate(plan: BuildPlan, nodes: tuple[StageNode, ...], prepared: Mapping[str, Mapping[str, Any]],
             store: Store) -> DiskNeeds:
    """What the build still has to write (see the module doc); reads headers and manifests only."""
    from .stages import request_for

    entries: dict[str, Entry] = {}
    for node in nodes:  # existing entries, as far as keys can be known before running
        if not all(up in entries for up in node.upstream()):
            continue
        try:
            request = request_for(node, resolve_deps(node, entries) | dict(prepared.get(node.id, {})))
            entry = store.get(request.key())
        except Exception as exc:  # noqa: BLE001 - an input the stage itself will refuse, with its own message
            log.debug("preflight: %s: %s", node.id, exc)
            continue
        if entry is not None:
            entries[node.id] = entry
    model = model_size(plan, entries)
    need = {n.id: (0 if n.id in entries else _node_bytes(plan, n, model)) for n in nodes}
    publish = sum(entries[n.id].size if n.id in entries else _node_bytes(plan, n, model) for n in nodes if n.publish)
    return DiskNeeds(store=sum(need.values()), publish=publish, nodes=need, cached=tuple(entries), model=model)


def _device(path: Path) -> int:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return os.stat(p).st_dev


def check(plan: BuildPlan, nodes: tuple[StageNode, ...], prepared: Mapping[str, Mapping[str, Any]],
          store: Store) -> DiskNeeds:
    """Raise DiskSpaceError (before anything is written) unless the build's outputs fit; return the needs."""
    needs = estimate(plan, nodes, prepared, store)
    store_root, out_dir = Path(store.root), Path(plan.out_dir)
    same = _device(store_root) == _device(out_dir)
    checks = [(store_root, needs.store + (needs.publish if same else 0), "the store" + (
        " and the build folder" if same else ""))]
    if not same:
        checks.append((out_dir, needs.publish, "the build folder"))
    for where, want, what in checks:
        if not want:
            continue
        free = free_bytes(where)
        with_margin = int(want * (1 + MARGIN))
        if free < with_margin:
            biggest = sorted(((n, b) for n, b in needs.nodes.items() if b), key=lambda x: -x[1])[:4]
            detail = ", ".join(f"{nid} {human_bytes(b)}" for nid, b in biggest)
            raise DiskSpaceError(
                f"build {plan.name} needs about {human_bytes(with_margin)} in {what} ({where}) and "
                f"{human_bytes(free)} is free: new store entries {human_bytes(needs.store)} ({detail}), "
                f"published copies {human_bytes(needs.publish)}",
                expected=f"at least {human_bytes(with_margin)} free (the estimate plus {MARGIN:.0%})",
                fix="free space (`zhllama cache gc` removes old entries), publish to another disk (--out), "
                    "or build fewer outputs/quantization types at a time")
    log.info("preflight: %s new in the store, %s published; %s cached", human_bytes(needs.store),
             human_bytes(needs.publish), len(needs.cached))
    return needs
