"""Issue 14: the sized release, the build's disk preflight, and a smoke run of bench/fullsize.py.

The sized release here is the 'tiny' shape (hidden 256) with the release's real vocabularies
(32000 -> 49953 -> 49954 pieces), one layer: a few seconds to make, the same code path as 7B.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_lib.buildspec import BuildSpec, EvalOptions, SourceSpec
from pipeline_lib.errors import DiskSpaceError
from pipeline_lib.pipeline import build_graph, plan_build, preflight, run_build
from pipeline_lib.pipeline.execute import prepared_inputs
from pipeline_lib.store import Store
from pipeline_lib.synthetic import (
    RELEASE_VOCAB,
    SIZED_DONE,
    SIZED_ROLES,
    make_sized_release,
    sized_release_table,
)
from pipeline_lib.tokenizer import piece_count

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sized(tmp_path_factory):
    return make_sized_release(tmp_path_factory.mktemp("sized"), "tiny", layers=1, seed=3)


def _spec(rel: dict, out: Path, **kw) -> BuildSpec:
    table = sized_release_table(rel["root"])

    def src(role: str) -> SourceSpec:
        return SourceSpec(source=str(rel[role]), sha256=table[SIZED_ROLES[role]])

    return BuildSpec(model="custom", name="sized", base=src("base"), loras=[src("lora-0"), src("lora-1")],
                     chinese_sp=src("chinese_sp"), tokenizer="alpaca", out_dir=str(out), **kw)


def test_sized_release_has_the_release_vocabularies_and_is_reproducible(sized, tmp_path):
    assert piece_count(sized["base"]) == RELEASE_VOCAB["llama"]
    assert piece_count(sized["lora-0"]) == RELEASE_VOCAB["chinese-llama"]
    assert piece_count(sized["lora-1"]) == RELEASE_VOCAB["chinese-alpaca"]
    cfg = json.loads((sized["base"] / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]) == (256, 1, 32000)
    assert len(list(sized["base"].glob("pytorch_model-*-of-00002.bin"))) == 2
    again = make_sized_release(tmp_path / "again", "tiny", layers=1, seed=3)
    assert (again["root"] / SIZED_DONE).read_text() == (sized["root"] / SIZED_DONE).read_text()
    stamp = (sized["root"] / SIZED_DONE).stat().st_mtime_ns
    make_sized_release(sized["root"], "tiny", layers=1, seed=3)  # present: reused, not rewritten
    assert (sized["root"] / SIZED_DONE).stat().st_mtime_ns == stamp


def _needs(spec: BuildSpec, store: Store) -> preflight.DiskNeeds:
    plan = plan_build(spec, store_root=store.root)
    nodes = build_graph(plan)
    return preflight.estimate(plan, nodes, prepared_inputs(plan, nodes), store)


def test_preflight_estimates_new_outputs_then_nothing_once_built(sized, tmp_path):
    store = Store(tmp_path / "store")
    spec = _spec(sized, tmp_path / "out", outputs=["gguf"], quant_types=["q4_0"],
                 evaluation=EvalOptions(enabled=False))
    before = _needs(spec, store)
    src_bytes = sum(p.stat().st_size for p in sized["base"].iterdir() if p.is_file())
    assert before.nodes["download:base"] == src_bytes
    assert before.nodes["gguf:f16"] > 0 and before.nodes["quantize:q4_0"] > 0 and not before.cached
    result = run_build(spec, store=store)
    sizes = {s.id: store.get(s.key).size for s in result.stages}
    for node in ("gguf:f16", "quantize:q4_0"):  # within 10% of the real files
        assert abs(before.nodes[node] - sizes[node]) < 0.1 * sizes[node], node
    after = _needs(spec, store)
    assert after.store == 0 and set(after.cached) == set(sizes)
    published = sum(p.stat().st_size for p in (tmp_path / "out").rglob("*") if p.is_file()
                    and p.name != "build-lock.json")
    assert abs(after.publish - published) < 0.01 * published


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB filesystem for the build folder (needs root: tmpfs or a loop mount)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_preflight_refuses_before_any_stage_runs(sized, tmp_path, small_fs):
    store = Store(tmp_path / "store")
    spec = _spec(sized, small_fs / "out", outputs=["gguf"], quant_types=["q4_0"],
                 evaluation=EvalOptions(enabled=False))
    with pytest.raises(DiskSpaceError) as err:
        run_build(spec, store=store)
    text = str(err.value)
    assert "the build folder" in text and "free" in text and "published copies" in text
    assert not store.entries()  # refused before the first stage: nothing downloaded, nothing written
    assert not (small_fs / "out").exists()


def test_bench_fullsize_smoke(tmp_path):
    """bench/fullsize.py --layers 1 end to end on the tiny shape: inputs, floor, the build with its
    evaluation, the extra quantizations and the q8_0 evaluation (each a child calling the stage's
    own function), the report."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "fullsize.py"), "--size", "tiny", "--layers", "1",
                           "--workdir", str(tmp_path / "work"), "--out", str(out), "--floor-gb", "0.05",
                           "--steps", "floor,sha256sum,build-hf,convert-hf,build-gguf,quantize-more",
                           "--plot", str(tmp_path / "plot.png")],
                          capture_output=True, text=True, env=env, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["id"]: r for r in res["steps"]["build-gguf"]["rows"]}
    assert {"gguf:f16", "quantize:q4_0", "publish"} <= set(rows)
    gguf = rows["gguf:f16"]
    assert gguf["wall_s"] > 0 and gguf["peak_rss"] > 0 and gguf["out_bytes"] > 0 and not gguf["cached"]
    assert res["steps"]["floor"]["read_direct_Bps"] > 0 and res["steps"]["floor"]["write_buffered_Bps"] > 0
    assert res["steps"]["sha256sum"]["rc"] == 0
    assert {"evaluate:reference", "evaluate:q4_0"} <= set(rows)
    more = res["steps"]["quantize-more"]
    assert set(more) >= {"quantize q8_0", "evaluate q8_0", "quantize q4_K_M"}, more
    assert all(more[k]["rc"] == 0 for k in ("quantize q8_0", "evaluate q8_0", "quantize q4_K_M")), more
    assert "| build-gguf: gguf f16 |" in proc.stdout and "Disk (this run)" in proc.stdout
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    assert not (tmp_path / "work" / "tiny-L1" / "store").exists()  # outputs removed; inputs kept for reuse
    assert (tmp_path / "work" / "tiny-L1" / "inputs" / SIZED_DONE).is_file()
