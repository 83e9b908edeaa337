"""Tensor fingerprints: one model in HF, pth and f16 GGUF gives one fingerprint; real differences are named."""

from __future__ import annotations

import json

import pytest

from pipeline_lib.errors import InputError
from pipeline_lib.fingerprint import Fingerprint, compare, fingerprint
from pipeline_lib.gguf_export import convert
from pipeline_lib.merge import merge, plan_merge


@pytest.fixture(scope="module")
def outputs(tiny_release, tmp_path_factory):
    rel = tiny_release
    root = tmp_path_factory.mktemp("fingerprint")
    chain = [rel.llama_lora, rel.alpaca_lora]
    return {
        "hf": merge(rel.base_hf, chain, out=root / "hf", max_shard_size="1MB").out,
        "hf-one-shard": merge(rel.base_hf, chain, out=root / "hf1").out,
        "pth": merge(rel.base_hf, chain, out=root / "pth", format="pth").out,
        "pth-2": merge(rel.base_hf, chain, out=root / "pth2", format="pth", parts=2).out,
        "gguf": convert(plan_merge(rel.base_hf, chain), out=root / "m.gguf").path,
        "gguf-f32": convert(plan_merge(rel.base_hf, chain), out=root / "m32.gguf", outtype="f32").path,
        "gguf-q8": convert(plan_merge(rel.base_hf, chain), out=root / "m8.gguf", outtype="q8_0").path,
        "precise": merge(rel.base_hf, chain, out=root / "precise", precise=True).out,
    }


def test_hf_pth_and_gguf_give_one_fingerprint(outputs):
    prints = {k: fingerprint(outputs[k]) for k in ("hf", "hf-one-shard", "pth", "pth-2", "gguf")}
    digests = {k: p.digest for k, p in prints.items()}
    assert len(set(digests.values())) == 1, digests
    hf = prints["hf"]
    assert len(hf.tensors) == 21 and "blk.0.attn_q.weight" in hf.tensors and "token_embd.weight" in hf.tensors
    assert hf.tensors["blk.0.attn_norm.weight"].dtype == "F32"  # norms hashed as llama.cpp stores them
    assert hf.tensors["blk.0.attn_q.weight"].dtype == "F16" and hf.tensors["output.weight"].shape[1] == 256
    assert compare(prints["pth-2"], prints["gguf"]).equal


def test_differences_are_named(outputs):
    hf, precise = fingerprint(outputs["hf"]), fingerprint(outputs["precise"])
    diff = compare(hf, precise)
    assert not diff.equal and diff.differ and all(n.startswith("blk.") for n in diff.differ)
    assert {"token_embd.weight", "output.weight", "output_norm.weight"} <= set(diff.same)
    assert diff.summary().startswith(f"fingerprints differ: {len(diff.differ)} of 21 tensors differ")
    f32 = compare(hf, fingerprint(outputs["gguf-f32"]))
    assert not f32.equal and len(f32.dtype_or_shape) == 16 and len(f32.same) == 5  # only the F32 norms agree


def test_json_round_trip_and_tampering(outputs, tmp_path):
    fp = fingerprint(outputs["pth"])
    path = fp.write(tmp_path / "fp.json")
    back = Fingerprint.read(path)
    assert back.digest == fp.digest and back.tensors == fp.tensors
    assert fingerprint(path).digest == fp.digest
    data = json.loads(path.read_text())
    data["tensors"]["blk.0.attn_q.weight"]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="digest does not match"):
        Fingerprint.read(path)
    path.write_text("[]")
    with pytest.raises(InputError, match="not a zhllama fingerprint"):
        Fingerprint.read(path)


def test_quantized_gguf_refused(outputs):
    with pytest.raises(InputError, match="Q8_0 tensors"):
        fingerprint(outputs["gguf-q8"])


def test_cli(outputs, tmp_path, capsys):
    from flows.cli.main import main

    out = tmp_path / "hf.json"
    assert main(["fingerprint", str(outputs["hf"]), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["digest"] == fingerprint(outputs["hf"]).digest
    assert main(["fingerprint", str(outputs["gguf"]), "--against", str(out)]) == 0
    assert "equal: all 21 tensors have the same bytes" in capsys.readouterr().out
    assert main(["fingerprint", str(outputs["precise"]), "--against", str(out)]) == 1
    assert "fingerprints differ:" in capsys.readouterr().out
    assert main(["fingerprint", str(outputs["gguf-q8"])]) == 1
    assert capsys.readouterr().err.startswith("error: ")
