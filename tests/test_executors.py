"""Both executors of the one build graph agree: same nodes, same store keys, same published bytes.

For every combination of outputs (hf, pth, gguf, ggml) and evaluation on or off, the plain
executor (``pipeline_lib.pipeline.run_build``) and the Prefect executor (``flows.build.build_model``)
build the same sources, each into its own artifact store and output folder. Stages shared between
combinations are computed once per store, so each executor computes every kind of stage once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import pytest

from pipeline_lib import demo
from pipeline_lib.buildspec import BuildSpec
from pipeline_lib.pipeline import build_graph, plan_build, run_build
from pipeline_lib.store import Store

pytestmark = pytest.mark.slow

OUTPUTS = ("hf", "pth", "gguf", "ggml")
COMBOS = [(outs, ev) for n in range(1, 5) for outs in itertools.combinations(OUTPUTS, n)
          for ev in ((False, True) if "gguf" in outs else (False,))]


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> dict[str, Path]:
    root = demo.ensure_demo_release(tmp_path_factory.mktemp("shared-release"))
    homes = {name: tmp_path_factory.mktemp(f"home-{name}") for name in ("plain", "prefect")}
    return {"root": root, **homes}


def _spec(root: Path, outputs: tuple[str, ...], evaluation: bool, out: Path) -> BuildSpec:
    table = demo._table(root)

    def src(role: str) -> dict:
        return {"source": str(root / demo.ROLES[role]), "sha256": table[demo.ROLES[role]]}

    return BuildSpec(model="custom", name="parity", base=src("base"), loras=[src("lora-0"), src("lora-1")],
                     chinese_sp=src("chinese_sp"), tokenizer="alpaca", outputs=list(outputs),
                     quant_types=["q4_0"] if "gguf" in outputs else [], ggml_types=["q4_0"],
                     evaluation={"enabled": evaluation, "n_ctx": 32, "max_chunks": 1, "generate": False},
                     out_dir=str(out))


def _files(folder: Path) -> dict[str, str]:
    """Digest of each published file; the report by its measured quality (its speed numbers and
    plot are timings of this run, not results)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.name == "build-lock.json" or rel in ("report/report.md", "report/report.png"):
            continue
        if rel == "report/report.json":
            report = json.loads(p.read_text())
            out[rel] = [(v["name"], {k: x for k, x in v["perplexity"].items() if k != "seconds"}, v["kl"])
                        for v in report["variants"]]
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize(("outputs", "evaluation"), COMBOS,
                         ids=["+".join(o) + ("+eval" if e else "") for o, e in COMBOS])
def test_both_executors_give_the_same_keys_and_files(release, prefect_server, monkeypatch, outputs, evaluation):
    from flows.build import build_model

    label = "+".join(outputs) + ("-eval" if evaluation else "")
    results = {}
    for name in ("plain", "prefect"):
        monkeypatch.setenv("ZHLLAMA_HOME", str(release[name]))
        spec = _spec(release["root"], outputs, evaluation, release[name] / "out" / label)
        results[name] = run_build(spec) if name == "plain" else build_model(spec)
    plain, prefect = results["plain"], results["prefect"]

    nodes = build_graph(plan_build(spec, store_root=release["prefect"]))
    assert [s.id for s in plain.stages] == [s.id for s in prefect.stages] == [n.id for n in nodes]
    assert [s.key for s in plain.stages] == [s.key for s in prefect.stages]
    for name, result in results.items():  # every key names an intact entry of that executor's store
        store = Store(release[name])
        assert all(store.get(s.key) is not None for s in result.stages)
    published = {name: _files(r.out_dir) for name, r in results.items()}
    assert published["plain"] == published["prefect"]
    rel = {name: {p.relative_to(r.out_dir).as_posix() for p in r.published} for name, r in results.items()}
    assert rel["plain"] == rel["prefect"]
    expect = {"tokenizer", "official.json", "README.md"} | {f for f in ("hf", "pth") if f in outputs}
    expect |= {f"fingerprints/{f}.json" for f in ("hf", "pth", "gguf") if f in outputs}
    if "gguf" in outputs:
        expect |= {"parity-f16.gguf", "parity-q4_0.gguf"} | ({"report"} if evaluation else set())
        expect |= {"Modelfile", "Modelfile.f16", "Modelfile.q4_0"}  # Ollama: one per GGUF, the default one
    if "ggml" in outputs:
        expect |= {"parity-ggml-q4_0.bin"}
    assert rel["plain"] == expect | {"build-lock.json"}
    # one model, one fingerprint: the HF folder, the pth folder and the GGUF hold the same tensors
    digests = {json.loads((plain.out_dir / f).read_text())["digest"] for f in rel["plain"] if f.startswith("fingerprints/")}
    assert len(digests) <= 1, digests
    if evaluation:  # the float reference is evaluated once, by its own node, whatever the variants
        assert [s.stage for s in plain.stages].count("evaluate-reference") == 1


def test_a_failed_quality_gate_fails_both_executors_alike(release, prefect_server, monkeypatch):
    """The gates stage is a node of the graph: the plain executor and the flow fail on it with the same
    message (variant, measured value, limit), and neither publishes anything."""
    from flows.build import build_model
    from pipeline_lib.errors import IntegrityError

    messages = {}
    for name in ("plain", "prefect"):
        monkeypatch.setenv("ZHLLAMA_HOME", str(release[name]))
        out = release[name] / "out" / "gated"
        spec = _spec(release["root"], ("gguf",), True, out)
        spec = spec.model_copy(update={"evaluation": spec.evaluation.model_copy(
            update={"gates": {"q4_0": {"max_mean_kl": 1e-9}}})})
        if name == "plain":
            with pytest.raises(IntegrityError) as err:
                run_build(spec)
            messages[name] = err.value.seen  # (its fix names the report in that executor's store)
        else:
            state = build_model(spec, return_state=True)
            assert state.is_failed()
            with pytest.raises(IntegrityError) as err:
                state.result()
            messages[name] = err.value.seen
        assert not out.exists()
    assert messages["plain"] == messages["prefect"]
    assert messages["plain"].startswith("quality gate failed: q4_0: mean KL divergence ")
    assert "> limit 1e-09 (max_mean_kl)" in messages["plain"]
