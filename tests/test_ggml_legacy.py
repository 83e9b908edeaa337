"""Legacy GGML (ggjt v3): read back by llama.cpp's convert_llama_ggml_to_gguf.py, same tensors and logits."""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import _gguf_fixtures
import numpy as np
import pytest
from _gguf_fixtures import gguf_fields, gguf_tensors, hf_folder_source, llama_logits, reference_ggml_to_gguf

from flows.cli import main as cli
from pipeline_lib.errors import InputError
from pipeline_lib.ggml_legacy import GGJT_MAGIC, LEGACY_TYPES, export_ggml, find_n_mult
from pipeline_lib.gguf_export import convert

gguf_models = _gguf_fixtures.gguf_models  # session fixture


@pytest.fixture(scope="module")
def legacy_f16_gguf(gguf_models, tmp_path_factory) -> Path:
    return convert(gguf_models.legacy, out=tmp_path_factory.mktemp("legacy") / "f16.gguf").path


def pure_gguf(f16: Path, qtype: str, out: Path) -> Path:
    """llama.cpp's quantizer with every tensor in ``qtype`` (pure): the GGUF of the same type."""
    import llama_cpp

    if qtype == "f16":
        return f16
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    p.pure = True
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), ctypes.byref(p)) == 0
    return out


def test_n_mult():
    assert find_n_mult(11008, 4096) == 256 and find_n_mult(13824, 5120) == 256
    assert find_n_mult(768, 256) == 256
    with pytest.raises(InputError, match="cannot be written in a ggjt v3 file"):
        find_n_mult(512, 256)


def test_header_and_vocab(gguf_models, tmp_path):
    r = export_ggml(gguf_models.legacy, out=tmp_path / "m.bin", qtype="q4_0")
    data = r.path.read_bytes()
    magic, version = struct.unpack_from("<II", data, 0)
    n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype = struct.unpack_from("<7i", data, 8)
    assert (magic, version) == (GGJT_MAGIC, 3) and data[:4] == b"tjgg"
    assert (n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype) == (
        gguf_models.release.alpaca_vocab, 256, 256, 4, 2, 64, 2)
    off = 36
    texts = []
    for _ in range(n_vocab):
        (n,) = struct.unpack_from("<I", data, off)
        texts.append(data[off + 4: off + 4 + n])
        off += 8 + n
    assert texts[0] == " \u2047 ".encode() and texts[1] == texts[2] == b""  # unk, control <s> </s>
    assert texts[3] == b"\x00" and texts[258] == b"\xff"  # byte pieces as raw bytes
    assert texts[-1] == b"[PAD]" and all(b"\xe2\x96\x81" not in t for t in texts)  # spaces, not U+2581


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_from_gguf_equals_from_checkpoint(gguf_models, legacy_f16_gguf, tmp_path, qtype):
    """The float GGUF (what the build pipeline keeps) gives the very same legacy file as the checkpoint."""
    a = export_ggml(legacy_f16_gguf, out=tmp_path / "from-gguf.bin", qtype=qtype).path
    b = export_ggml(gguf_models.legacy, out=tmp_path / "from-hf.bin", qtype=qtype).path
    assert a.read_bytes() == b.read_bytes()
    q8 = convert(gguf_models.legacy, out=tmp_path / "q8.gguf", outtype="q8_0").path
    with pytest.raises(InputError, match="re-quantizing"):
        export_ggml(q8, out=tmp_path / "x.bin")
    assert cli.main(["convert", str(legacy_f16_gguf), "--out", str(tmp_path / "cli.bin"), "--format", "ggml",
                     "--outtype", qtype]) == 0
    assert (tmp_path / "cli.bin").read_bytes() == a.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("qtype", list(LEGACY_TYPES))
def test_llama_cpp_reads_it_back(gguf_models, legacy_f16_gguf, tmp_path, qtype):
    ggml = export_ggml(gguf_models.legacy, out=tmp_path / f"m.{qtype}.bin", qtype=qtype).path
    back = reference_ggml_to_gguf(ggml, tmp_path / "back.gguf", eps=1e-6, n_ctx=512)
    same_type = pure_gguf(legacy_f16_gguf, qtype, tmp_path / "pure.gguf")
    # tensor for tensor the same bytes as llama.cpp's own quantizer (or our f16 GGUF)
    got, want = gguf_tensors(back), gguf_tensors(same_type)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], name
    # the vocabulary survives the 2023 spelling round trip
    fb, fw = gguf_fields(back), gguf_fields(same_type)
    assert fb["tokenizer.ggml.tokens"] == fw["tokenizer.ggml.tokens"]
    assert fb["tokenizer.ggml.scores"] == fw["tokenizer.ggml.scores"]
    assert fb["llama.feed_forward_length"][1] == 768
    # and llama.cpp computes the same logits from both
    tokens = [1, 300, 301, 302, 310, 500, 900, 1000, 1196]
    assert np.array_equal(llama_logits(back, tokens), llama_logits(same_type, tokens))


def test_refusals(gguf_models, tmp_path):
    with pytest.raises(InputError, match="not available in the legacy GGML format"):
        export_ggml(gguf_models.legacy, out=tmp_path / "x.bin", qtype="q4_K_M")
    with pytest.raises(InputError, match="cannot be written in a ggjt v3 file"):
        export_ggml(gguf_models.base, out=tmp_path / "x.bin")  # ffn 512 for hidden 256
    with pytest.raises(InputError, match="grouped-query attention"):
        export_ggml(gguf_models.gqa, out=tmp_path / "x.bin")
    src = hf_folder_source(gguf_models.legacy)
    src.config = dict(src.config, vocab_size=src.config["vocab_size"] - 1)
    with pytest.raises(InputError):
        export_ggml(src, out=tmp_path / "x.bin")
    assert list(tmp_path.iterdir()) == []


def test_cli_format_ggml(gguf_models, tmp_path, capsys):
    out = tmp_path / "cli.bin"
    assert cli.main(["convert", str(gguf_models.legacy), "--out", str(out), "--format", "ggml",
                     "--outtype", "q8_0"]) == 0
    assert "ggjt v3, q8_0" in capsys.readouterr().out and out.read_bytes()[:4] == b"tjgg"
    assert cli.main(["convert", str(gguf_models.legacy), "--out", str(out), "--format", "ggml",
                     "--outtype", "bf16"]) == 1
