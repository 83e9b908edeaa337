"""Upstream check: which catalog models' hub repos moved to a new commit since the last look.

``check(models)`` resolves the current commit of every hub repo a model builds from (base and
LoRAs), compares it with the last seen commit recorded in ``$ZHLLAMA_HOME/upstream.json`` and
returns one ``Change`` per (model, repo) that moved. The first sighting of a repo is recorded as
the baseline and is not a change (the weekly scheduled rebuild covers never-built models).
The state file is written atomically after every check. A hub that cannot be reached at all
(no network, DNS failure) raises :class:`HubUnreachable`, which the scheduled check treats as
"no news today" rather than a failure.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ZhllamaError
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


class HubUnreachable(ZhllamaError):
    """The hub could not be reached at all (network down, DNS): nothing can be said about upstream."""


def _is_offline(exc: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a failure to connect, not an answer."""
    import socket

    try:
        import httpx

        network: tuple[type[BaseException], ...] = (httpx.ConnectError, httpx.ConnectTimeout, ConnectionError,
                                                     socket.gaierror)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        network = (ConnectionError, socket.gaierror)
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, network):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
    from . import catalog

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
                try:
                    heads[repo] = resolve(repo)
                except Exception as exc:
                    if not _is_offline(exc):
                        raise
                    raise HubUnreachable(f"the hub could not be reached to check {repo} ({type(exc).__name__}: {exc})",
                                         fix="nothing to do if this machine is offline; the check runs again "
                                             "tomorrow (set HF_ENDPOINT for a mirror)") from None
            # the last commit seen, under the repo's current name or a former one (hfl/x was ziqingyang/x)
            old = next((state[a] for a in catalog.repo_aliases(repo) if a in state), None)
            if old is not None and old != heads[repo]:
                changes.append(Change(model=model, repo=repo, role=role, old=old, new=heads[repo]))
            elif old is None:
                log.info("%s: first seen at %s (baseline, no rebuild)", repo, heads[repo][:12])
    for repo in heads:  # a former name's record is now kept under the current name
        for alias in catalog.repo_aliases(repo)[1:]:
            state.pop(alias, None)
    state.update(heads)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(dict(sorted(state.items())), indent=2) + "\n")
    return changes
