"""The build flow in-process on the demo model, against one real Prefect server for the session.

Covers: BuildSpec validation, deployments file in sync with the catalog, the demo build through
Prefect (artifacts, published files), a rerun that is all cache hits (and the plain executor
agreeing on every key), an altered or deleted cached output being recomputed rather than
trusted, a stage failing mid-way leaving no partial files (store and output folder), a build
killed while it holds a stage's lock not blocking the next one, and result records that are
data (a planted pickle never runs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline_lib import demo
from pipeline_lib.buildspec import QUANT_TYPES, BuildSpec
from pipeline_lib.fsutil import TMP_PREFIX
from pipeline_lib.pipeline import run_build
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
        BuildSpec(model="custom", base={"source": "a/b", "sha256": {"f.bin": "abc"}}, loras=[{"source": "c/d"}])
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


def _resolve(schema: dict, node: dict) -> dict:
    while "$ref" in node:
        node = {**schema["definitions"][node["$ref"].split("/")[-1]], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def test_flow_parameters_render_as_a_guiding_form():
    """The schema the Prefect UI renders as the Custom-run form: choices, defaults, titles."""
    from flows.build import build_model
    from pipeline_lib import catalog
    from pipeline_lib.buildspec import GGML_TYPES

    schema = build_model.parameters.model_dump()
    assert "spec" in schema["required"]
    spec = _resolve(schema, schema["properties"]["spec"])
    props = {k: _resolve(schema, v) for k, v in spec["properties"].items()}
    assert props["model"]["enum"] == [*catalog.MODELS, "tiny-demo", "custom"]
    assert props["quant_types"]["items"]["enum"] == list(QUANT_TYPES) and props["quant_types"]["uniqueItems"]
    assert props["ggml_types"]["items"]["enum"] == list(GGML_TYPES)
    assert props["outputs"]["items"]["enum"] == ["hf", "pth", "gguf", "ggml"] and props["outputs"]["uniqueItems"]
    assert props["outputs"]["default"] == ["gguf"] and props["quant_types"]["default"] == ["q4_0", "q8_0"]
    assert props["evaluation"]["default"]["enabled"] is True and props["outtype"]["default"] == "f16"
    for name, prop in list(props.items()) + [(f"evaluation.{k}", v) for k, v in props["evaluation"]["properties"].items()] \
            + [(f"source.{k}", v) for k, v in _resolve(schema, {"$ref": "#/definitions/SourceSpec"})["properties"].items()]:
        assert prop.get("title") and prop.get("description"), f"{name} has no title or description"
        assert "<" not in prop["description"], f"{name}: the V1 UI eats <...> in descriptions"
    assert spec["required"] == ["model"]

    # How nullable fields are drawn (docs/ui/ shows both UIs). A scalar or list override whose empty
    # value is None is its plain type, optional and without a default: the form draws an empty
    # input and sends nothing for it, instead of an "X | None" switch over 'Property is type "None"'.
    source = _resolve(schema, {"$ref": "#/definitions/SourceSpec"})["properties"]
    plain = {"out_dir": props["out_dir"], "name": props["name"], "loras": props["loras"],
             "evaluation.threads": props["evaluation"]["properties"]["threads"],
             "evaluation.text": props["evaluation"]["properties"]["text"], "source.revision": source["revision"]}
    for name, prop in plain.items():
        assert "anyOf" not in prop and "default" not in prop, f"{name} would render as a None switch"
        assert prop["type"] in {"string", "integer", "array"}, name
    assert plain["evaluation.threads"]["minimum"] == 1 and plain["name"]["pattern"]  # constraints kept
    assert props["loras"]["items"] == {"$ref": "#/definitions/SourceSpec"}
    # An object or enum override keeps the switch (left alone, a plain object form would send a
    # half-filled SourceSpec; a null among an enum's values turns the V2 choice into a text box),
    # with every tab titled by what it means, the empty choice first when it is the default.
    switches = {"base": ("Catalog's", None), "chinese_sp": ("Release's", None), "tokenizer": ("Model's", None),
                "evaluation.max_chunks": ("Whole text", 1), "evaluation.gates": ("Defaults", None)}
    for name, (none_title, default) in switches.items():
        prop = props[name] if "." not in name else props["evaluation"]["properties"][name.split(".")[1]]
        none = next(o for o in prop["anyOf"] if o.get("type") == "null")
        assert none["title"] == none_title and prop["default"] == default, name
        assert (prop["anyOf"][0] is none) == (default is None), name
        for option in prop["anyOf"]:  # a tab's label: its title, else its type ("None", "str")
            assert _resolve(schema, option).get("title"), f"{name}: an untitled tab"
    assert props["tokenizer"]["anyOf"][1]["enum"] == ["llama", "alpaca"]
    # nothing else anywhere is drawn as a None switch, and no default the form pre-fills holds a null
    every = [*props.items(), *((f"evaluation.{k}", v) for k, v in props["evaluation"]["properties"].items()),
             *((f"source.{k}", v) for k, v in source.items())]
    assert {n for n, p in every if any(o.get("type") == "null" for o in p.get("anyOf", []))} == set(switches)
    assert None not in props["evaluation"]["default"].values()


def _prefect_validation_errors(parameters: dict) -> list[str]:
    """What Prefect's server-side check (enforce_parameter_schema) says of these run parameters."""
    from prefect.utilities.schema_tools import validate

    from flows.build import build_model

    return [e.message for e in validate(parameters, build_model.parameters.model_dump())]


def test_the_parameter_schema_accepts_empty_overrides_as_prefect_validates_it():
    """Plain optional types stay nullable for Prefect's server: a spec dumped with every override
    None (what ``run_deployment(parameters={"spec": BuildSpec(...)})`` sends) is valid, and so is
    every explicit null the model accepts; bad values are still refused before a worker starts."""
    assert _prefect_validation_errors({"spec": BuildSpec(model="alpaca-plus-7b").model_dump(mode="json")}) == []
    assert _prefect_validation_errors({"spec": demo.demo_spec().model_dump(mode="json")}) == []
    nulls = {"out_dir": None, "name": None, "loras": None, "base": None, "chinese_sp": None, "tokenizer": None,
             "evaluation": {"threads": None, "text": None, "max_chunks": None}}
    assert _prefect_validation_errors({"spec": {"model": "alpaca-plus-7b", **nulls}}) == []
    custom = {"model": "custom", "name": "mine", "base": {"source": "a/b", "revision": None},
              "loras": [{"source": "c/d", "revision": "main"}]}
    assert _prefect_validation_errors({"spec": custom}) == []
    BuildSpec.model_validate({"model": "alpaca-plus-7b", **nulls})  # and the flow itself takes them
    for bad, why in [({"quant_types": ["q4_9"]}, "'q4_9' is not one of"), ({"tokenizer": "x"}, "'x' is not valid under any"),
                     ({"evaluation": {"threads": 0}}, "less than the minimum"), ({"name": "-x"}, "does not match"),
                     ({"base": {}}, "is not valid under any"), ({"loras": [{}]}, "'source' is a required")]:
        errors = _prefect_validation_errors({"spec": {"model": "alpaca-plus-7b", **bad}})
        assert any(why in e for e in errors), (bad, errors)


FORM_SENDS = Path(__file__).resolve().parent.parent / "docs" / "ui" / "form-sends.json"


def test_the_server_accepts_what_the_custom_run_form_sends(prefect_server):
    """The parameters each Prefect UI's Custom-run form POSTed when submitted untouched (recorded
    in a real browser by docs/ui/screenshots.py) create a run on a deployment that enforces the
    parameter schema; so does a BuildSpec with every override None; a bad value gets a 409."""
    import httpx
    from prefect.client.orchestration import get_client

    from flows import deployments
    from flows.build import build_model

    sends = json.loads(FORM_SENDS.read_text(encoding="utf-8"))
    assert {k.split()[0] for k in sends} == {"v1", "v2"}, "both UIs' forms were recorded"
    wanted = {d["name"]: d for d in deployments.deployments()}
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(build_model)
        ids = {}
        for name in {k.split()[1] for k in sends}:
            ids[name] = client.create_deployment(
                flow_id, f"form-{name}", parameters=wanted[name]["parameters"], enforce_parameter_schema=True,
                parameter_openapi_schema=build_model.parameters.model_dump(), entrypoint=deployments.BUILD_ENTRYPOINT)
        for what, sent in sends.items():
            name = what.split()[1]
            spec = sent["sent"]["spec"]
            assert spec["model"] == wanted[name]["parameters"]["spec"]["model"], what
            assert not ({"out_dir", "name", "loras"} & spec.keys()), f"{what}: the form sent an empty override"
            run = client.create_flow_run_from_deployment(ids[name], parameters=sent["sent"])
            assert run.parameters == sent["sent"], what
            built = BuildSpec.model_validate(run.parameters["spec"])
            assert built.base is built.loras is built.chinese_sp is built.tokenizer is None, what  # the catalog's
        everything_none = {"spec": BuildSpec(model="alpaca-plus-7b").model_dump(mode="json")}
        assert client.create_flow_run_from_deployment(ids["build-alpaca-plus-7b"], parameters=everything_none)
        with pytest.raises(httpx.HTTPStatusError, match="409") as refused:
            client.create_flow_run_from_deployment(
                ids["build-alpaca-plus-7b"], parameters={"spec": {"model": "alpaca-plus-7b", "quant_types": ["q4_9"]}})
        assert "q4_9" in refused.value.response.text


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
        assert d["entrypoint"] == "flows.build.build_model"  # a module path: no working directory needed
        assert d["triggers"][0]["match"]["prefect.resource.id"] == f"zhllama.model.{m.name}"
    assert "build-alpaca-plus-7b" in names and "build-llama-plus-13b" in names and "build-tiny-demo" in names
    assert names["check-upstream"]["entrypoint"] == "flows.upstream.check_upstream"


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


def test_demo_flow_then_all_cache_hits_and_damage_is_rebuilt(prefect_server, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.build import build_model

    out = tmp_path / "out"
    spec = demo.demo_spec(out_dir=str(out))
    first = build_model(spec, return_state=True)
    assert first.is_completed(), first.message
    r1 = first.result()
    labels = [s.label for s in r1.stages]
    assert labels[:4] == ["download base", "download lora-0", "download lora-1", "download chinese_sp"]
    assert {"verify", "tokenizer", "official sha256", "gguf f16", "fingerprint gguf", "quantize q4_0", "quantize q8_0",
            "modelfile Modelfile.f16", "modelfile Modelfile.q4_0", "modelfile Modelfile", "modelfile Modelfile.q8_0",
            "evaluate f16 (reference)", "evaluate q4_0", "evaluate q8_0", "report", "quality gates",
            "model card"} == set(labels[4:])
    assert not any(s.cached for s in r1.stages)
    for name in ("tiny-demo-f16.gguf", "tiny-demo-q4_0.gguf", "tiny-demo-q8_0.gguf", "build-lock.json",
                 "report/report.md", "report/report.png", "tokenizer/tokenizer.model", "README.md", "Modelfile",
                 "Modelfile.q8_0"):
        assert (out / name).is_file(), name
    assert (out / "tiny-demo-q4_0.gguf").read_bytes()[:4] == b"GGUF"
    tok = next(e for e in Store().entries() if e.stage == "tokenizer")
    check = json.loads((tok.path / "check.json").read_text())
    assert [(r["kind"], r["status"]) for r in check["loras"]] == [("llama", "identical"), ("alpaca", "identical")]
    lock = json.loads((out / "build-lock.json").read_text())
    assert [s["role"] for s in lock["sources"]] == ["base", "lora-0", "lora-1", "chinese_sp"]

    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.flow_run_id == first.state_details.flow_run_id}
    assert {"tiny-demo-stages", "tiny-demo-verify", "tiny-demo-tokenizer", "tiny-demo-report", "tiny-demo-card"} <= set(arts)
    # the model card as a markdown artifact: the published README.md, its plot inlined
    card = arts["tiny-demo-card"].data
    assert card.startswith("---\n") and "## Provenance" in card and "](data:image/png;base64," in card
    assert card.replace(card[card.index("](data:"):card.index(")", card.index("](data:")) + 1], "](report/report.png)") \
        == (out / "README.md").read_text()

    # second run: every stage is a Prefect cache hit
    r2 = build_model(spec)
    assert [s.state for s in r2.stages] == ["Cached"] * len(labels), r2.stages
    # the plain executor computes the very same keys: all store hits
    seq = run_build(spec)
    assert seq.all_cached and [s.key for s in seq.stages] == [s.key for s in r2.stages]

    # an altered output is never trusted: quantize q4_0 runs again (and restores the entry)
    store = Store()
    q4 = next(s for s in r2.stages if s.label == "quantize q4_0")
    entry = next(e for e in store.entries() if e.key == q4.key)
    victim = entry.path / "tiny-demo-q4_0.gguf"
    good = victim.read_bytes()
    victim.chmod(0o644)
    victim.write_bytes(good[:-10] + b"x" * 10)
    # a deleted output folder is never trusted either
    q8 = next(s for s in r2.stages if s.label == "quantize q8_0")
    q8_entry = next(e for e in store.entries() if e.key == q8.key)
    from pipeline_lib.store import _rmtree

    _rmtree(q8_entry.path)
    r3 = build_model(spec)
    states = {s.label: s.state for s in r3.stages}
    assert states["quantize q4_0"] == "Completed" and states["quantize q8_0"] == "Completed", states
    assert states["gguf f16"] == "Cached" and states["evaluate q4_0"] == "Cached"
    assert victim.read_bytes() == good
    assert store.get(q8_entry.key) is not None
    assert not _store_leftovers(store.root)

    # result records are data: a planted pickle record (as anyone who can write the cache could
    # leave) is refused, never unpickled, and the stage falls back to the store
    marker = tmp_path / "pwned"
    records = store.root / "prefect" / "results"
    gguf_key = next(s.key for s in r3.stages if s.label == "gguf f16")
    record = records / f"zhllama-gguf-{gguf_key}"
    assert record.is_file() and json.loads(record.read_text())["format"] == "zhllama-result/1"
    record.chmod(0o644)
    record.write_bytes(_pickle_record(record.name, marker))
    r4 = build_model(spec)
    assert not marker.exists(), "a pickled result record was loaded"
    states = {s.label: (s.state, s.cached) for s in r4.stages}
    assert states["gguf f16"] == ("Completed", True), states  # recomputed the record: a store hit
    assert states["quantize q4_0"] == ("Cached", True)


class _Evil:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _pickle_record(key: str, marker: Path) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    return ResultRecord(metadata=ResultRecordMetadata(storage_key=key, serializer=PickleSerializer()),
                        result=_Evil(marker)).serialize()


def test_one_session_server_for_the_whole_test_run(prefect_server):
    import _prefect_fixtures

    assert _prefect_fixtures.SESSION_STARTS == 1


_HOLD_A_STAGE = """
import os, sys, time
from pathlib import Path
import pipeline_lib.quantize as q

def stuck(*args, **kwargs):
    Path(os.environ["MARKER"]).write_text(str(os.getpid()))
    time.sleep(600)

q.quantize = stuck
from flows.build import build_model
from pipeline_lib import demo
build_model(demo.demo_spec(out_dir=sys.argv[1], evaluation=False, quant_types=("q4_0",)))
"""


def test_a_build_killed_while_it_holds_a_stage_lock_does_not_block_the_next(prefect_server, tmp_path):
    """The real thing: a real flow run (real Prefect, real lock manager) SIGKILLed inside a stage."""
    import contextvars
    import signal
    import subprocess
    import sys
    import threading
    import time

    from tasks.cache import lock_manager, prefect_dir

    marker = tmp_path / "inside-quantize"
    env = {**os.environ, **prefect_server.env, "MARKER": str(marker)}
    child = subprocess.Popen([sys.executable, "-c", _HOLD_A_STAGE, str(tmp_path / "out-killed")], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert child.poll() is None, "the child build ended before reaching quantize"
            assert time.monotonic() < deadline, "the child build never reached quantize"
            time.sleep(0.2)
        locks, lock_dir = lock_manager(Store().root), prefect_dir(Store().root) / "locks"
        held = [p.stem for p in lock_dir.glob("*.lock") if locks.is_locked(p.stem)]
        assert any(k.startswith("zhllama-quantize-") for k in held), held  # the child holds quantize's lock
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=30)

    from flows.build import build_model

    done: dict = {}
    spec = demo.demo_spec(out_dir=str(tmp_path / "out"), evaluation=False, quant_types=("q4_0",))
    context = contextvars.copy_context()  # Prefect's settings (the session server) live in the context
    runner = threading.Thread(target=lambda: context.run(lambda: done.setdefault("r", build_model(spec))),
                              daemon=True)
    runner.start()
    runner.join(timeout=120)
    assert "r" in done, "the next build waited on the dead build's lock"
    assert (tmp_path / "out" / "tiny-demo-q4_0.gguf").is_file()
    assert not any(locks.is_locked(p.stem) for p in lock_dir.glob("*.lock"))


def test_plan_prints_the_graph_before_anything_runs(tmp_path, capsys):
    from flows.cli.main import main

    assert main(["build", "tiny-demo", "--plan", "--quant", "q4_0", "--output", "gguf", "--output", "ggml"]) == 0
    out = capsys.readouterr().out
    for line in ("download base", "verify", "tokenizer", "gguf f16", "quantize q4_0", "ggml q4_0",
                 "evaluate f16 (reference)", "evaluate q4_0", "=> tiny-demo-q4_0.gguf", "=> report/"):
        assert line in out, line
    assert not Store().entries(), "--plan ran a stage"


def test_failing_stage_leaves_no_partial_files(prefect_server, tmp_path, monkeypatch):
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


def test_tokenizer_stage_rejects_a_lora_tokenizer_that_differs_from_the_merge(tmp_path):
    import shutil

    from pipeline_lib.errors import IntegrityError

    root = demo.ensure_demo_release(tmp_path / "home")
    lora = tmp_path / "odd-lora"
    shutil.copytree(root / demo.ROLES["lora-0"], lora)
    (lora / "tokenizer.model").unlink()
    shutil.copyfile(root / demo.ROLES["base"] / "tokenizer.model", lora / "tokenizer.model")  # LLaMA's, unmerged
    spec = BuildSpec(model="custom", name="custom-odd", base={"source": str(root / demo.ROLES["base"])}, loras=[{"source": str(lora)}],
                     chinese_sp={"source": str(root / demo.ROLES["chinese_sp"])}, quant_types=[],
                     evaluation={"enabled": False}, out_dir=str(tmp_path / "out"))
    with pytest.raises(IntegrityError, match="differs from the one LoRA 0 ships"):
        run_build(spec)
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
    result = run_build(spec)
    labels = [s.label for s in result.stages]
    assert {"merge hf", "merge pth", "gguf f16", "quantize q4_0", "ggml f16", "ggml q4_0"} <= set(labels)
    assert (out / "hf" / "config.json").is_file() and (out / "hf" / "tokenizer.model").is_file()
    assert list((out / "pth").glob("consolidated.*.pth")) and (out / "pth" / "params.json").is_file()
    for q in ("f16", "q4_0"):
        assert (out / f"tiny-demo-ggml-{q}.bin").read_bytes()[:4] == b"tjgg"  # ggjt magic, little endian
    one_pass = run_build(spec.model_copy(update={"outputs": ["gguf"], "out_dir": str(tmp_path / "o2")}))
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
        spec = BuildSpec(model="custom", name="hub-chain", base={"source": "test/llama-base"},
                         loras=[{"source": "test/lora-plus"}, {"source": "hf://test/lora-alpaca"}],
                         quant_types=["q4_0"], evaluation={"enabled": False}, out_dir=str(tmp_path / "out"))
        first = run_build(spec)
        lock = json.loads((tmp_path / "out" / "build-lock.json").read_text())
        assert [s["fingerprint"] for s in lock["sources"]] == [
            "hub:" + hub.head(r) for r in ("test/llama-base", "test/lora-plus", "test/lora-alpaca")]
        assert (tmp_path / "out" / "hub-chain-q4_0.gguf").is_file()
        assert run_build(spec).all_cached
        # a new commit of one LoRA repo: its download and everything after it are recomputed
        hub.commit("test/lora-alpaca", {"README.md": b"new revision, same weights"})
        again = {s.label: s.cached for s in run_build(spec).stages}
        assert again["download lora-1"] is False and again["download base"] is True
        # same weights: the merged outputs have the same content digests, so they stay cached
        assert again["gguf f16"] is True and again["quantize q4_0"] is True
    assert not first.all_cached


def test_download_retries_network_errors_but_not_bad_inputs():
    from prefect.states import Failed

    from pipeline_lib.errors import IntegrityError
    from pipeline_lib.pipeline import STAGES
    from tasks.stage import retry_transient

    assert STAGES["download"].retries == 2 and STAGES["quantize"].retries == 0
    assert retry_transient(None, None, Failed(data=ConnectionError("reset by peer"))) is True
    assert retry_transient(None, None, Failed(data=IntegrityError("sha256 mismatch"))) is False


def test_offline_build_prints_one_error_and_no_traceback(prefect_server, tmp_path):
    """Through Prefect, hub unreachable: zhllama's one error (Prefect's tracebacks stay in its logs)."""
    import subprocess
    import sys

    from _prefect_fixtures import free_port

    env = {**os.environ, **prefect_server.env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
           "ZHLLAMA_HOME": str(tmp_path / "home")}
    res = subprocess.run([sys.executable, "-m", "flows.cli", "build", "alpaca-plus-7b", "--no-eval"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    out = res.stdout + res.stderr
    assert "Traceback" not in out and "Finished in state" not in out, out
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "huggyllama/llama-7b" in errors[0] and "ConnectError" in errors[0], res.stderr
    assert "what to do:" in res.stderr
    assert len(out.strip().splitlines()) <= 4, out


def test_check_upstream_completes_offline(prefect_server, monkeypatch):
    """Offline, the daily check logs one warning (in the run's Prefect logs) and completes: no failure, no retry."""
    from _prefect_fixtures import free_port
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        LogFilter,
        LogFilterFlowRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogWorker

    from flows.upstream import check_upstream

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    state = check_upstream(models=["alpaca-plus-7b"], return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == []
    APILogWorker.drain_all(timeout=10)
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[run_id])))
    skipped = [lg for lg in logs if "upstream check skipped" in lg.message]
    assert len(skipped) == 1 and "could not be reached" in skipped[0].message and skipped[0].level == 30
    assert [t.state.name for t in tasks] == ["Completed"] and tasks[0].run_count == 1  # not retried


def test_every_cli_option_has_help():
    import argparse

    from flows.cli.main import build_parser

    parser = build_parser([])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = []
    for name, p in sub.choices.items():
        for a in p._actions:
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction) and not a.help:
                missing.append(f"zhllama {name} {'/'.join(a.option_strings) or a.dest}")
    assert missing == []


def test_a_mirror_that_echoes_the_token_never_gets_it_printed_or_stored(prefect_server, tmp_path):
    """Build through Prefect against a mirror whose errors repeat the Authorization header: the token
    reaches neither the console nor the Prefect database (the flow run's state message and logs)."""
    import subprocess
    import sys

    from fakehub import FakeHub
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    token = "hf_SECRETtoken1234567890abcdef"
    with FakeHub({"test/other": {"x.txt": b"x"}}, echo_auth=True) as hub:  # the build's repos are missing
        env = {**os.environ, **prefect_server.env, "HF_ENDPOINT": hub.url, "HF_TOKEN": token,
               "ZHLLAMA_HOME": str(tmp_path / "home")}
        res = subprocess.run([sys.executable, "-m", "flows.cli", "-vv", "build", "custom-hub", "--base", "test/base",
                              "--lora", "test/lora", "--no-eval"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "request had Authorization" in res.stderr or "test/base" in res.stderr  # the mirror's error was seen
    assert token not in res.stdout + res.stderr
    with get_client(sync_client=True) as client:
        run = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
    assert run.state.is_failed()
    assert token not in (run.state.message or "") and all(token not in lg.message for lg in logs)


def test_a_local_source_edited_in_place_with_its_size_and_mtime_kept_is_no_stale_hit(tmp_path):
    """The local fingerprint holds inode and ctime too: an edit that restores size and mtime is seen."""
    import shutil

    root = demo.ensure_demo_release(tmp_path / "src")
    base = tmp_path / "base"
    shutil.copytree(root / demo.ROLES["base"], base)
    lora = [{"source": str(root / demo.ROLES[r])} for r in ("lora-0", "lora-1")]
    spec = BuildSpec(model="custom", name="edited", base={"source": str(base)}, loras=lora, outputs=["hf"],
                     evaluation={"enabled": False}, out_dir=str(tmp_path / "out"))
    first = run_build(spec)
    victim = base / "generation_config.json"
    st = victim.stat()
    text = victim.read_text()
    edited = text.replace('"bos_token_id": 1', '"bos_token_id": 0')
    assert edited != text and len(edited) == len(text)
    victim.write_text(edited)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as before: only ctime tells
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    again = {s.label: s for s in run_build(spec).stages}
    assert not again["download base"].cached, "the edited base was taken from the cache"
    assert again["download base"].key != next(s.key for s in first.stages if s.label == "download base")
    assert json.loads((tmp_path / "out" / "hf" / "generation_config.json").read_text())["bos_token_id"] == 0
