"""Upstream check: which catalog models' hub repos moved to a new commit since the last look.

``check(models)`` resolves the current commit of every hub repo a model builds from (base and
LoRAs), compares it with the last seen commit recorded in ``$ZHLLAMA_HOME/upstream.json`` and
returns one ``Change`` per (model, repo) that moved. The first sighting of a repo is recorded as
the baseline and is not a change (the weekly scheduled rebuild covers never-built models).
The state file is written atomically after every check.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .fsutil import write_text_atomic
from .store import default_root

log = logging.getLogger(__name__)

STATE_FILE = "upstream.json"
EVENT = "zhllama.upstream.changed"


def resource_id(model: str) -> str:
    """The Prefect event resource a model's rebuild trigger listens to."""
    return f"zhllama.model.{model}"


@dataclass(frozen=True)
class Change:
    model: str
    repo: str
    role: str  # "base" | "lora-0" | ...
    old: str
    new: str


def repos_of(model: str) -> list[tuple[str, str]]:
    """(role, hub repo) pairs a catalog model is built from."""
    from . import catalog

    entry = catalog.get(model)
    return [("base", entry.base.hub_repo)] + [(f"lora-{i}", lora.repo) for i, lora in enumerate(entry.lora_chain)]


def hub_head(repo: str, revision: str = "main", *, endpoint: str | None = None) -> str:
    """The commit sha ``revision`` of ``repo`` points at now (the hub's repo-info API)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
    return api.model_info(repo, revision=revision).sha


def check(models: Sequence[str], *, state_path: str | os.PathLike[str] | None = None,
          resolve: Callable[[str], str] | None = None) -> list[Change]:
    """Compare every repo of ``models`` with the recorded commits; record the new ones."""
    path = Path(state_path) if state_path is not None else default_root() / STATE_FILE
    try:
        state: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        state = {}
    resolve = resolve or hub_head
    heads: dict[str, str] = {}
    changes: list[Change] = []
    for model in models:
        for role, repo in repos_of(model):
            if repo not in heads:
                heads[repo] = resolve(repo)
            old = state.get(repo)
            if old is not None and old != heads[repo]:
                changes.append(Change(model=model, repo=repo, role=role, old=old, new=heads[repo]))
            elif old is None:
                log.info("%s: first seen at %s (baseline, no rebuild)", repo, heads[repo][:12])
    state.update(heads)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(dict(sorted(state.items())), indent=2) + "\n")
    return changes
