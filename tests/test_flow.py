"""The build flow in-process on the demo model, against one real Prefect server for the session.

Covers: BuildSpec validation, deployments file in sync with the catalog, the demo build through
Prefect (artifacts, published files), a rerun that is all cache hits (and the sequential runner
agreeing on every key), an altered or deleted cached output being recomputed rather than
trusted, and a stage failing mid-way leaving no partial files (store and output folder).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _prefect_fixtures import prefect_server  # noqa: F401  (session fixture)
from pydantic import ValidationError

from pipeline_lib import build, demo
from pipeline_lib.buildspec import QUANT_TYPES, BuildSpec
from pipeline_lib.fsutil import TMP_PREFIX
from pipeline_lib.store import Store

pytestmark = pytest.mark.slow


# ------------------------------------------------------------------ spec and deployments (no server)


def test_buildspec_rejects_bad_values_with_clear_messages():
    with pytest.raises(ValidationError, match="unknown model 'alpaca-plsu-7b'"):
        BuildSpec(model="alpaca-plsu-7b")
    with pytest.raises(ValidationError, match="unknown quantization type 'q4_9'"):
        BuildSpec(model="alpaca-plus-7b", quant_types=["q4_9"])
    with pytest.raises(ValidationError, match="outputs"):
        BuildSpec(model="alpaca-plus-7b", outputs=["safetensors"])
    with pytest.raises(ValidationError, match="64 hex digits"):
        BuildSpec(model="x", base={"source": "a/b", "sha256": {"f.bin": "abc"}}, loras=[{"source": "c/d"}])
    with pytest.raises(ValidationError, match="extra"):
        BuildSpec(model="alpaca-plus-7b", quantize=["q4_0"])
    with pytest.raises(ValidationError, match="needs 'gguf' in outputs"):
        BuildSpec(model="alpaca-plus-7b", outputs=["hf"], quant_types=["q4_0"])
    assert not BuildSpec(model="alpaca-plus-7b", outputs=["hf"]).one_pass  # default quant types don't apply
    spec = BuildSpec(model="alpaca-plus-7b", quant_types=["Q4_K_M", "q4_k_m"])
    assert spec.quant_types == ["q4_K_M"] and spec.one_pass


def test_quant_types_agree_with_llama_cpp_table():
    from pipeline_lib.quantize import QUANT_TYPES as LIB_TYPES

    assert tuple(LIB_TYPES) == QUANT_TYPES


def test_flow_parameters_render_as_a_form():
    from flows.build import build_model

    schema = build_model.parameters.model_dump()
    spec_ref = schema["properties"]["spec"]
    assert "spec" in schema["required"]
    definitions = schema.get("definitions") or schema.get("$defs")
    assert "BuildSpec" in json.dumps(spec_ref) and "quant_types" in definitions["BuildSpec"]["properties"]
    assert definitions["BuildSpec"]["properties"]["outputs"]["items"]["enum"] == ["hf", "pth", "gguf", "ggml"]


def test_deployments_yaml_is_in_sync_with_the_catalog():
    import yaml

    from flows import deployments
    from pipeline_lib import catalog

    assert deployments.PREFECT_YAML.read_text(encoding="utf-8") == deployments.render(), \
        "deployments/prefect.yaml is stale: run `python -m flows.deployments`"
    doc = yaml.safe_load(deployments.PREFECT_YAML.read_text(encoding="utf-8"))
    names = {d["name"]: d for d in doc["deployments"]}
    for m in catalog.MODELS.values():
        d = names[f"build-{m.name}"]
        assert d["parameters"] == {"spec": {"model": m.name}}
        BuildSpec.model_validate(d["parameters"]["spec"])  # every deployment's parameters are a valid spec
        assert d["schedules"][0]["cron"] and d["work_pool"]["name"] == "zhllama-process"
        assert d["triggers"][0]["match"]["prefect.resource.id"] == f"zhllama.model.{m.name}"
    assert "build-alpaca-plus-7b" in names and "build-llama-plus-13b" in names and "build-tiny-demo" in names
    assert names["check-upstream"]["entrypoint"] == "flows/upstream.py:check_upstream"


def test_run_shorthand_names_the_deployment_like_prefect():
    from flows.cli.flow import deployment_name

    assert deployment_name("build-alpaca-plus-7b") == "build-model/build-alpaca-plus-7b"
    assert deployment_name("alpaca-plus-7b") == "build-model/build-alpaca-plus-7b"
    assert deployment_name("check-upstream") == "check-upstream/check-upstream"
    assert deployment_name("build-model/build-tiny-demo") == "build-model/build-tiny-demo"


# ------------------------------------------------------------------ the flow on the demo model


def _store_leftovers(root: Path) -> list[Path]:
    arts = root / "artifacts"
    return sorted(p for p in arts.iterdir() if p.name.startswith(TMP_PREFIX)) if arts.is_dir() else []


def test_demo_flow_then_all_cache_hits_and_damage_is_rebuilt(prefect_server, tmp_path):  # noqa: F811
    from prefect.client.orchestration import get_client

    from flows.build import build_model

    out = tmp_path / "out"
    spec = demo.demo_spec(out_dir=str(out))
    first = build_model(spec, return_state=True)
    assert first.is_completed(), first.message
    r1 = first.result()
    labels = [s["label"] for s in r1["stages"]]
    assert labels[:4] == ["download base", "download lora-0", "download lora-1", "download chinese_sp"]
    assert {"verify", "tokenizer", "gguf f16", "quantize q4_0", "quantize q8_0", "evaluate q4_0", "report"} <= set(labels)
    assert not any(s["cached"] for s in r1["stages"])
    for name in ("tiny-demo-f16.gguf", "tiny-demo-q4_0.gguf", "tiny-demo-q8_0.gguf", "build-lock.json",
                 "report/report.md", "report/report.png", "tokenizer/tokenizer.model"):
        assert (out / name).is_file(), name
    assert (out / "tiny-demo-q4_0.gguf").read_bytes()[:4] == b"GGUF"
    tok = next(e for e in Store().entries() if e.stage == "tokenizer")
    check = json.loads((tok.path / "check.json").read_text())
    assert [(r["kind"], r["status"]) for r in check["loras"]] == [("llama", "identical"), ("alpaca", "identical")]
    lock = json.loads((out / "build-lock.json").read_text())
    assert [s["role"] for s in lock["sources"]] == ["base", "lora-0", "lora-1", "chinese_sp"]

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts() if a.flow_run_id == first.state_details.flow_run_id}
    assert {"tiny-demo-stages", "tiny-demo-verify", "tiny-demo-tokenizer", "tiny-demo-report"} <= keys

    # second run: every stage is a Prefect cache hit
    r2 = build_model(spec)
    assert [s["state"] for s in r2["stages"]] == ["Cached"] * len(labels), r2["stages"]
    # the sequential runner computes the very same keys: all store hits
    seq = build.run_build(spec)
    assert seq.all_cached and [s.key[:12] for s in seq.stages] == [s["key"] for s in r2["stages"]]

    # an altered output is never trusted: quantize q4_0 runs again (and restores the entry)
    store = Store()
    q4 = next(s for s in r2["stages"] if s["label"] == "quantize q4_0")
    entry = next(e for e in store.entries() if e.key.startswith(q4["key"]))
    victim = entry.path / "tiny-demo-q4_0.gguf"
    good = victim.read_bytes()
    victim.chmod(0o644)
    victim.write_bytes(good[:-10] + b"x" * 10)
    # a deleted output folder is never trusted either
    q8 = next(s for s in r2["stages"] if s["label"] == "quantize q8_0")
    q8_entry = next(e for e in store.entries() if e.key.startswith(q8["key"]))
    from pipeline_lib.store import _rmtree

    _rmtree(q8_entry.path)
    r3 = build_model(spec)
    states = {s["label"]: s["state"] for s in r3["stages"]}
    assert states["quantize q4_0"] == "Completed" and states["quantize q8_0"] == "Completed", states
    assert states["gguf f16"] == "Cached" and states["evaluate q4_0"] == "Cached"
    assert victim.read_bytes() == good
    assert store.get(q8_entry.key) is not None
    assert not _store_leftovers(store.root)


def test_failing_stage_leaves_no_partial_files(prefect_server, tmp_path, monkeypatch):  # noqa: F811
    import pipeline_lib.quantize as quantize_mod
    from flows.build import build_model

    def broken_quantize(gguf_path, *, qtypes, out_dir, **kwargs):
        out = Path(out_dir) / f"half-{qtypes[0]}.gguf"
        out.write_bytes(b"GGUF" + b"\0" * 1000)  # a partial output, then the crash
        raise RuntimeError("simulated crash half-way through quantization")

    monkeypatch.setattr(quantize_mod, "quantize", broken_quantize)
    out = tmp_path / "out"
    spec = demo.demo_spec(out_dir=str(out), evaluation=False)
    state = build_model(spec, return_state=True)
    assert state.is_failed()
    store = Store()
    assert not _store_leftovers(store.root), "a failed stage left a temporary folder in the store"
    stages = {e.stage for e in store.entries()}
    assert "quantize" not in stages and {"download", "verify", "tokenizer", "gguf"} <= stages
    assert not list(store.root.rglob("half-*.gguf"))
    assert not out.exists() or not any(out.iterdir()), "nothing is published from a failed build"


def test_failed_publish_is_rolled_back(prefect_server, tmp_path, monkeypatch):  # noqa: F811
    from prefect import flow

    from tasks import stages

    store = Store()
    entries = {}
    for i in range(3):
        def produce(tmp, i=i):
            (tmp / f"file{i}.bin").write_bytes(os.urandom(100))

        entries[f"out{i}.bin"] = store.get_or_produce("report", version="t", inputs={"i": str(i)}, produce=produce)
    calls = {"n": 0}
    real = build._link_or_copy

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (simulated)")
        real(src, dst)

    monkeypatch.setattr(build, "_link_or_copy", flaky)

    @flow
    def publish_only(out_dir: str):
        return stages.publish(entries, out_dir, {"x": 1})  # one transaction: rolled back as a whole

    out = tmp_path / "published"
    state = publish_only(str(out), return_state=True)
    assert state.is_failed()
    assert calls["n"] == 3
    assert not [p for p in out.rglob("*") if p.is_file()], "the files published before the failure were removed"


def test_tokenizer_stage_rejects_a_lora_tokenizer_that_differs_from_the_merge(tmp_path):
    import shutil

    from pipeline_lib.errors import IntegrityError

    root = demo.ensure_demo_release(tmp_path / "home")
    lora = tmp_path / "odd-lora"
    shutil.copytree(root / demo.ROLES["lora-0"], lora)
    (lora / "tokenizer.model").unlink()
    shutil.copyfile(root / demo.ROLES["base"] / "tokenizer.model", lora / "tokenizer.model")  # LLaMA's, unmerged
    spec = BuildSpec(model="custom-odd", base={"source": str(root / demo.ROLES["base"])}, loras=[{"source": str(lora)}],
                     chinese_sp={"source": str(root / demo.ROLES["chinese_sp"])}, quant_types=[],
                     evaluation={"enabled": False}, out_dir=str(tmp_path / "out"))
    with pytest.raises(IntegrityError, match="differs from the one LoRA 0 ships"):
        build.run_build(spec)
    assert not (tmp_path / "out").exists()
    assert not [e for e in Store().entries() if e.stage == "tokenizer"]


def test_dockerfile_is_multistage_non_root_with_cache_volume_and_worker():
    """Docker does not run here; check the Dockerfile's structure statically."""
    root = Path(__file__).resolve().parent.parent
    lines = [ln.strip() for ln in (root / "Dockerfile").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    froms = [ln for ln in lines if ln.startswith("FROM ")]
    assert len(froms) >= 2 and " AS build" in froms[0] and " AS runtime" in froms[-1]
    assert any("COPY --from=build" in ln for ln in lines)
    assert any("llama-cpp-python" in ln and "pip install" in ln for ln in lines)
    assert any(ln.startswith("ENV CMAKE_ARGS=") and "GGML_CUDA=OFF" in ln for ln in lines)
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(ln.startswith("VOLUME") and "/cache" in ln for ln in lines)
    assert lines[-1].startswith("CMD") and "worker" in lines[-1] and "zhllama-process" in lines[-1]
    for ln in lines:  # every COPY source exists in the build context
        if ln.startswith("COPY ") and "--from=" not in ln:
            for src in [a for a in ln.split()[1:-1] if not a.startswith("--")]:
                assert (root / src).exists(), src


def test_checkpoint_and_legacy_ggml_outputs_sequentially(tmp_path):
    """hf + pth + ggml outputs: merge to checkpoints, GGUF from the HF checkpoint, ggjt v3 files."""
    out = tmp_path / "out"
    spec = BuildSpec(model="tiny-demo", outputs=["hf", "pth", "gguf", "ggml"], quant_types=["q4_0"],
                     ggml_types=["f16", "q4_0"], evaluation={"enabled": False}, out_dir=str(out))
    result = build.run_build(spec)
    labels = [s.label for s in result.stages]
    assert {"merge hf", "merge pth", "gguf f16", "quantize q4_0", "ggml f16", "ggml q4_0"} <= set(labels)
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    assert list((out / "pth").glob("consolidated.*.pth")) and (out / "pth" / "params.json").is_file()
    for q in ("f16", "q4_0"):
        assert (out / f"tiny-demo-ggml-{q}.bin").read_bytes()[:4] == b"tjgg"  # ggjt magic, little endian
    one_pass = build.run_build(spec.model_copy(update={"outputs": ["gguf"], "out_dir": str(tmp_path / "o2")}))
    # the one-pass GGUF (merge stream → GGUF) and the GGUF of the HF checkpoint quantize identically
    q = {s.label: s.key for s in one_pass.stages}["quantize q4_0"]
    assert q == {s.label: s.key for s in result.stages}["quantize q4_0"]


def test_build_from_hub_sources_records_commits_and_follows_new_revisions(tmp_path, monkeypatch):
    """Sources on a (fake) hub: downloaded through huggingface_hub, keyed on the resolved commit."""
    from fakehub import FakeHub

    root = demo.ensure_demo_release(tmp_path / "src")

    def files(folder: str) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (root / folder).iterdir() if p.is_file()}

    repos = {"test/llama-base": files(demo.ROLES["base"]), "test/lora-plus": files(demo.ROLES["lora-0"]),
             "test/lora-alpaca": files(demo.ROLES["lora-1"])}
    with FakeHub(repos) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        spec = BuildSpec(model="hub-chain", base={"source": "test/llama-base"},
                         loras=[{"source": "test/lora-plus"}, {"source": "hf://test/lora-alpaca"}],
                         quant_types=["q4_0"], evaluation={"enabled": False}, out_dir=str(tmp_path / "out"))
        first = build.run_build(spec)
        lock = json.loads((tmp_path / "out" / "build-lock.json").read_text())
        assert [s["fingerprint"] for s in lock["sources"]] == [
            "hub:" + hub.head(r) for r in ("test/llama-base", "test/lora-plus", "test/lora-alpaca")]
        assert (tmp_path / "out" / "hub-chain-q4_0.gguf").is_file()
        assert build.run_build(spec).all_cached
        # a new commit of one LoRA repo: its download and everything after it are recomputed
        hub.commit("test/lora-alpaca", {"README.md": b"new revision, same weights"})
        again = {s.label: s.cached for s in build.run_build(spec).stages}
        assert again["download lora-1"] is False and again["download base"] is True
        # same weights: the merged outputs have the same content digests, so they stay cached
        assert again["gguf f16"] is True and again["quantize q4_0"] is True
    assert not first.all_cached


def test_download_retries_network_errors_but_not_bad_inputs():
    from prefect.states import Failed

    from pipeline_lib.errors import IntegrityError
    from tasks.stages import download, retry_transient

    assert download.retries == 2
    assert retry_transient(None, None, Failed(data=ConnectionError("reset by peer"))) is True
    assert retry_transient(None, None, Failed(data=IntegrityError("sha256 mismatch"))) is False


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(tmp_path):
    import socket
    import subprocess
    import sys

    from tasks._cache import LivenessLockManager

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    manager = LivenessLockManager(lock_files_directory=tmp_path)
    (tmp_path / "k.lock").write_text(json.dumps({"holder": f"{socket.gethostname()}:{pid}:1:MainThread",
                                                 "expiration": None}))
    assert not manager.is_locked("k")
    assert manager.acquire_lock("k", holder="me") and manager.is_lock_holder("k", "me")
    live = f"{socket.gethostname()}:{os.getpid()}:1:MainThread"
    (tmp_path / "j.lock").write_text(json.dumps({"holder": live, "expiration": None}))
    assert manager.is_locked("j")  # a live holder keeps its lock
