"""The release's hub repos moved from ziqingyang/* to hfl/*: the catalog names the current repos, the
old names are aliases (same plan, same store keys, same official digests, same upstream record), and
the hub's redirect from an old name is followed (against the fake hub, which answers as the real one).
"""

from __future__ import annotations

import json

import pytest
from fakehub import FakeHub

from pipeline_lib import catalog, upstream
from pipeline_lib.buildspec import BuildSpec
from pipeline_lib.download import download, resolve_hub_revision
from pipeline_lib.errors import IntegrityError
from pipeline_lib.pipeline import build_graph, plan_build, request_for

OLD = "ziqingyang/chinese-llama-plus-lora-7b"
NEW = "hfl/chinese-llama-plus-lora-7b"


def test_catalog_names_the_current_repos():
    repos = [lora.repo for m in catalog.MODELS.values() for lora in m.lora_chain]
    assert repos and all(r.startswith("hfl/chinese-") for r in repos)
    assert catalog.get("alpaca-plus-7b").lora_chain[1].repo == "hfl/chinese-alpaca-plus-lora-7b"


@pytest.mark.parametrize(("given", "expected"), [
    (OLD, NEW),
    (NEW, NEW),
    ("ZiqingYang/Chinese-LLaMA-Plus-LoRA-7B", NEW),  # the hub compares names case-insensitively
    (f"hf://{OLD}@main", f"hf://{NEW}@main"),
    (f"hf://models/{OLD}", f"hf://models/{NEW}"),
    ("ziqingyang/some-other-repo", "ziqingyang/some-other-repo"),  # not the release's: the hub redirects it
    ("huggyllama/llama-7b", "huggyllama/llama-7b"),
    ("https://example.org/ziqingyang/chinese-llama-plus-lora-7b", "https://example.org/ziqingyang/chinese-llama-plus-lora-7b"),
])
def test_old_names_are_aliases(given, expected):
    assert catalog.canonical_source(given) == expected


def test_a_local_folder_named_like_an_old_repo_stays_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ziqingyang" / "chinese-llama-plus-lora-7b").mkdir(parents=True)
    assert catalog.canonical_source(OLD) == OLD


def test_aliases_and_official_digests():
    assert catalog.repo_aliases(OLD) == catalog.repo_aliases(NEW) == (NEW, OLD)
    assert catalog.repo_aliases("huggyllama/llama-7b") == ("huggyllama/llama-7b",)
    assert catalog.expected_in_repo(OLD) == catalog.expected_in_repo(NEW)
    assert catalog.expected_in_repo(NEW)["adapter_model.bin"] == catalog.get("llama-plus-7b").lora_chain[0].adapter_sha256


def _download_keys(spec: BuildSpec, tmp_path) -> dict[str, str]:
    plan = plan_build(spec, store_root=tmp_path)
    return {n.id: request_for(n, {"fingerprint": "hub:" + "a" * 40}).key() for n in build_graph(plan)
            if n.stage == "download"}


def test_a_spec_with_the_old_names_is_the_same_build(tmp_path):
    """Deployment parameters or a lock written with ziqingyang/* plan the same sources and store keys."""
    old = BuildSpec(model="alpaca-plus-7b", out_dir=str(tmp_path / "a"), loras=[
        {"source": "ziqingyang/chinese-llama-plus-lora-7b"}, {"source": "hf://ziqingyang/chinese-alpaca-plus-lora-7b"}])
    new = BuildSpec(model="alpaca-plus-7b", out_dir=str(tmp_path / "b"), loras=[
        {"source": "hfl/chinese-llama-plus-lora-7b"}, {"source": "hfl/chinese-alpaca-plus-lora-7b"}])
    default = BuildSpec(model="alpaca-plus-7b", out_dir=str(tmp_path / "c"))
    plans = [plan_build(s, store_root=tmp_path) for s in (old, new, default)]
    assert [[(r.role, r.display) for r in p.loras] for p in plans] == [
        [("lora-0", "hf://hfl/chinese-llama-plus-lora-7b@main"), ("lora-1", "hf://hfl/chinese-alpaca-plus-lora-7b@main")]] * 3
    keys = [_download_keys(s, tmp_path) for s in (old, new, default)]
    assert keys[0] == keys[1] == keys[2]


@pytest.fixture
def moved_hub(monkeypatch):
    files = {"adapter_config.json": b'{"r": 8}', "adapter_model.bin": b"not the release's adapter"}
    with FakeHub({NEW: files}) as hub:
        hub.rename(OLD, NEW)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_the_hubs_redirect_from_the_old_name_is_followed(moved_hub, tmp_path):
    assert resolve_hub_revision(OLD) == moved_hub.head(NEW)
    assert upstream.hub_head(OLD) == moved_hub.head(NEW)
    res = download(OLD, out=tmp_path / "out", include=["*.json"])
    assert (tmp_path / "out" / "adapter_config.json").read_bytes() == b'{"r": 8}'
    assert res.commit == moved_hub.head(NEW)
    paths = [path for _, path, _ in moved_hub.requests]
    assert any(p.startswith(f"/api/models/{OLD}") for p in paths)  # asked under the old name ...
    assert any(p.startswith(f"/{NEW}/resolve/") for p in paths)  # ... and fetched under the new one
    # the official digest of the release's adapter still applies under the old name
    with pytest.raises(IntegrityError, match="official"):
        download(OLD, out=tmp_path / "bin", include=["adapter_model.bin"])


def test_fakehub_answers_307_with_a_relative_location(moved_hub):
    import http.client
    from urllib.parse import urlsplit

    u = urlsplit(moved_hub.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("HEAD", f"/{OLD}/resolve/main/adapter_config.json")
    r = conn.getresponse()
    assert r.status == 307 and r.getheader("Location") == f"/{NEW}/resolve/main/adapter_config.json"
    conn.close()


def test_upstream_record_under_the_old_name_carries_over(tmp_path, monkeypatch):
    """A state file written before the move (ziqingyang/* keys) is read under the new name: no new
    baseline, a real change is reported, and the record moves to the new key."""
    repos = {"huggyllama/llama-7b": {"config.json": b"{}"}, NEW: {"adapter_model.bin": b"v1"}}
    with FakeHub(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        state = tmp_path / "upstream.json"
        state.write_text(json.dumps({OLD: hub.head(NEW), "huggyllama/llama-7b": hub.head("huggyllama/llama-7b")}))
        assert upstream.check(["llama-plus-7b"], state_path=state) == []
        recorded = json.loads(state.read_text())
        assert OLD not in recorded and recorded[NEW] == hub.head(NEW)
        old_head = hub.head(NEW)
        new_head = hub.commit(NEW, {"adapter_model.bin": b"v2"})
        state.write_text(json.dumps({OLD: old_head, "huggyllama/llama-7b": hub.head("huggyllama/llama-7b")}))
        changes = upstream.check(["llama-plus-7b"], state_path=state)
        assert [(c.repo, c.old, c.new) for c in changes] == [(NEW, old_head, new_head)]

