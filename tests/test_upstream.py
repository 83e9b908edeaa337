"""The upstream check against the fake hub: baseline, a changed revision reported for exactly the
models built from that repo, nothing for unchanged repos; the flow emits one event per changed model.

(The deployment trigger reacting to that event is covered in tests/test_e2e_server.py.)
"""

from __future__ import annotations

import json

import pytest
from fakehub import FakeHub

from pipeline_lib import catalog, upstream


def _repo(tag: bytes) -> dict[str, bytes]:
    return {"config.json": b"{}", "adapter_model.bin": b"lora " + tag}


@pytest.fixture
def hub(monkeypatch):
    repos = {"huggyllama/llama-7b": _repo(b"base")}
    for name in ("llama-plus-7b", "alpaca-plus-7b"):
        for lora in catalog.get(name).lora_chain:
            repos[lora.repo] = _repo(lora.repo.encode())
    with FakeHub(repos) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        yield h


def test_only_a_changed_revision_is_reported(hub, tmp_path):
    state = tmp_path / "upstream.json"
    models = ["llama-plus-7b", "alpaca-plus-7b"]
    assert upstream.check(models, state_path=state) == []  # baseline
    recorded = json.loads(state.read_text())
    assert recorded["huggyllama/llama-7b"] == hub.head("huggyllama/llama-7b")
    assert upstream.check(models, state_path=state) == []  # nothing moved

    old = hub.head("hfl/chinese-alpaca-plus-lora-7b")
    new = hub.commit("hfl/chinese-alpaca-plus-lora-7b", {"adapter_model.bin": b"retrained"})
    changes = upstream.check(models, state_path=state)
    assert [(c.model, c.repo, c.role, c.old, c.new) for c in changes] == [
        ("alpaca-plus-7b", "hfl/chinese-alpaca-plus-lora-7b", "lora-1", old, new)]
    assert upstream.check(models, state_path=state) == []  # recorded: reported once

    # a repo shared by both models (the LLaMA-Plus LoRA is the first link of Alpaca-Plus) rebuilds both
    hub.commit("hfl/chinese-llama-plus-lora-7b", {"adapter_model.bin": b"fixed"})
    assert sorted(c.model for c in upstream.check(models, state_path=state)) == ["alpaca-plus-7b", "llama-plus-7b"]


def test_unknown_repo_is_a_clear_error(hub, tmp_path):
    # chinese-llama-7b's LoRA repo is not served: the check fails loudly instead of reporting "unchanged"
    with pytest.raises(Exception, match="chinese-llama-lora-7b|404|not found|Repository"):
        upstream.check(["llama-7b"], state_path=tmp_path / "s.json")
    assert not (tmp_path / "s.json").exists()


def test_flow_emits_one_event_per_changed_model(hub, prefect_server, monkeypatch):
    import flows.upstream as flow_mod

    emitted = []
    real_emit = flow_mod.emit_event

    def spy(**kwargs):
        emitted.append(kwargs)
        return real_emit(**kwargs)

    monkeypatch.setattr(flow_mod, "emit_event", spy)
    assert flow_mod.check_upstream(models=["llama-plus-7b", "alpaca-plus-7b"]) == []
    assert emitted == []
    hub.commit("hfl/chinese-llama-plus-lora-7b", {"adapter_model.bin": b"v2"})
    changes = flow_mod.check_upstream(models=["llama-plus-7b", "alpaca-plus-7b"])
    assert len(changes) == 2
    assert sorted(e["resource"]["prefect.resource.id"] for e in emitted) == [
        "zhllama.model.alpaca-plus-7b", "zhllama.model.llama-plus-7b"]
    assert all(e["event"] == upstream.EVENT for e in emitted)
    emitted.clear()
    assert flow_mod.check_upstream(models=["llama-plus-7b", "alpaca-plus-7b"]) == [] and emitted == []
