"""Quantization through llama.cpp: every type, byte-identical to a direct llama.cpp call, clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _gguf_fixtures import gguf_fields, gguf_tensors, llama_logits

from flows.cli import main as cli
from pipeline_lib.errors import InputError
from pipeline_lib.gguf_export import convert
from pipeline_lib.quantize import QUANT_TYPES, output_name, quantize, resolve_type

# llama.cpp's own quantizer, called the way llama-quantize calls it (default params, only the ftype
# set), in a fresh process: the reference our wrapper must equal byte for byte.
DIRECT = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))
"""


@pytest.fixture(scope="module")
def f16_gguf(gguf_models, tmp_path_factory) -> Path:
    rel = gguf_models.release
    from pipeline_lib.merge import plan_merge

    out = tmp_path_factory.mktemp("quant") / "alpaca-plus.f16.gguf"
    return convert(plan_merge(rel.base_hf, [rel.llama_lora, rel.alpaca_lora]), out=out).path


def test_type_table_is_llama_cpps():
    import llama_cpp

    for name, ftype in QUANT_TYPES.items():
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.upper()}") == ftype, name
    assert resolve_type("Q4_K_M") == "q4_K_M" and resolve_type("q4_k_m") == "q4_K_M"
    with pytest.raises(InputError, match="unknown quantization type 'q3_0'") as exc:
        resolve_type("q3_0")
    assert "q4_K_M" in str(exc.value)
    assert output_name(Path("m.f16.gguf"), "q4_0") == "m.q4_0.gguf"
    assert output_name(Path("m-f32.gguf"), "q6_K") == "m.q6_K.gguf"


def test_every_type_quantizes_loads_and_reports(f16_gguf, tmp_path):
    seen = []
    r = quantize(f16_gguf, qtypes=list(QUANT_TYPES), out_dir=tmp_path, threads=2,
                 on_progress=lambda q, i, n: seen.append((q, i, n)))
    assert [o.qtype for o in r.outputs] == list(QUANT_TYPES)
    for o in r.outputs:
        f = gguf_fields(o.path)
        assert f["general.file_type"][1] == QUANT_TYPES[o.qtype], o.qtype
        assert o.file_bytes == o.path.stat().st_size < r.source_bytes
        assert 2.0 < o.bits_per_weight < 9.0, (o.qtype, o.bits_per_weight)
        assert (o.qtype, 21, 21) in seen  # llama.cpp's per-tensor progress reached the end
    assert not list(tmp_path.glob(".tmp-*"))
    bpw = {o.qtype: o.bits_per_weight for o in r.outputs}
    assert bpw["q2_K"] < bpw["q4_0"] < bpw["q5_0"] < bpw["q8_0"]
    # K-quants really apply (rows are multiples of 256)
    types = {t for t, _, _ in gguf_tensors(tmp_path / "alpaca-plus.q4_K_M.gguf").values()}
    assert {"Q4_K", "Q6_K"} <= types
    types = {t for t, _, _ in gguf_tensors(tmp_path / "alpaca-plus.q4_0.gguf").values()}
    assert "Q4_0" in types and "Q4_K" not in types
    # the outputs load in llama.cpp and still predict like the f16 model
    tokens = [1, 300, 301, 302, 310, 500, 900, 1000]
    ref = llama_logits(f16_gguf, tokens)
    for q, min_corr in (("q8_0", 0.999), ("q4_K_M", 0.95)):  # random weights: no structure to spare bits
        got = llama_logits(tmp_path / f"alpaca-plus.{q}.gguf", tokens)
        assert got.shape == ref.shape
        assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > min_corr, q


@pytest.mark.parametrize("qtype", ["q4_0", "q5_1", "q3_K_M", "q4_K_M", "q6_K"])
def test_byte_identical_to_llama_cpp(f16_gguf, tmp_path, qtype):
    direct = tmp_path / "direct.gguf"
    proc = subprocess.run([sys.executable, "-c", DIRECT, str(f16_gguf), str(direct), qtype],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one = quantize(f16_gguf, qtypes=[qtype], out_dir=tmp_path / "t1", threads=1).outputs[0].path
    two = quantize(f16_gguf, qtypes=[qtype], out_dir=tmp_path / "t2", threads=2).outputs[0].path
    assert one.read_bytes() == direct.read_bytes()
    assert two.read_bytes() == direct.read_bytes()


def test_errors_before_any_output(f16_gguf, tmp_path):
    with pytest.raises(InputError, match="unknown quantization type"):
        quantize(f16_gguf, qtypes=["q4_0", "q9_9"], out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()
    with pytest.raises(InputError, match="no GGUF file"):
        quantize(tmp_path / "missing.gguf", qtypes=["q4_0"], out_dir=tmp_path / "o")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"ggjt" + b"\0" * 100)
    with pytest.raises(InputError, match="is a legacy GGML .ggjt. file, not GGUF"):
        quantize(bad, qtypes=["q4_0"], out_dir=tmp_path / "o")
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(InputError, match="zip archive"):
        quantize(bad, qtypes=["q4_0"], out_dir=tmp_path / "o")
    with pytest.raises(InputError, match="no quantization type"):
        quantize(f16_gguf, qtypes=[], out_dir=tmp_path / "o")
    for cut in (10, 30, 5000, f16_gguf.stat().st_size // 2, f16_gguf.stat().st_size - 1):
        bad.write_bytes(f16_gguf.read_bytes()[:cut])  # truncated: header, metadata, tensor table, data
        with pytest.raises(InputError, match="truncated") as err:
            quantize(bad, qtypes=["q4_0"], out_dir=tmp_path / "o")
        assert "copy or download it again" in str(err.value)
    assert not (tmp_path / "o").exists()


def test_outputs_claimed_before_work(f16_gguf, tmp_path):
    """An existing <name>.<type>.gguf is refused unless overwrite; --out-dir must be a folder."""
    out = tmp_path / "q"
    first = quantize(f16_gguf, qtypes=["q4_0"], out_dir=out, threads=1).outputs[0].path
    before = first.read_bytes()
    with pytest.raises(InputError, match="already exists") as err:
        quantize(f16_gguf, qtypes=["q8_0", "q4_0"], out_dir=out)
    assert "--overwrite" in str(err.value)
    assert not (out / "alpaca-plus.q8_0.gguf").exists()  # refused before the first type started
    again = quantize(f16_gguf, qtypes=["q4_0"], out_dir=out, threads=1, overwrite=True).outputs[0].path
    assert again == first and again.read_bytes() == before
    as_file = tmp_path / "file"
    as_file.write_text("x")
    with pytest.raises(InputError, match="--out-dir .* is a file"):
        quantize(f16_gguf, qtypes=["q4_0"], out_dir=as_file)
    assert as_file.read_text() == "x"


def test_non_finite_input_names_the_tensor(f16_gguf, tmp_path):
    import shutil

    import gguf

    nan = tmp_path / "nan.f16.gguf"
    shutil.copy(f16_gguf, nan)
    r = gguf.GGUFReader(nan, "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    t.data[3, 5] = np.nan
    t.data[4, 6] = np.inf
    r.data.flush()
    del r, t
    with pytest.raises(InputError) as err:
        quantize(nan, qtypes=["q4_0"], out_dir=tmp_path / "o", threads=1)
    msg = str(err.value)
    assert "tensor blk.1.ffn_up.weight holds non-finite values (1 NaN, 1 Inf)" in msg
    assert "the model itself is broken, not the conversion" in msg and "convert` again" not in msg
    assert not (tmp_path / "o").exists()  # nothing, not even the folder it would have made


def test_cli(f16_gguf, tmp_path, capsys):
    assert cli.main(["quantize", str(f16_gguf), "--type", "q4_0", "--type", "Q8_0", "--out-dir",
                     str(tmp_path), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "q4_0" in out and "q8_0" in out and "bits/weight" in out
    assert (tmp_path / "alpaca-plus.q4_0.gguf").is_file() and (tmp_path / "alpaca-plus.q8_0.gguf").is_file()
    assert cli.main(["quantize", str(f16_gguf), "--type", "q4_2", "--out-dir", str(tmp_path)]) == 1
    assert "unknown quantization type" in capsys.readouterr().err
