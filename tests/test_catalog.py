"""Catalog consistency: every model of the release, chains in order, every hash well-formed."""

from __future__ import annotations

import re

import pytest

from pipeline_lib import catalog
from pipeline_lib.errors import InputError

HEX64 = re.compile(r"^[0-9a-f]{64}$")


def test_every_model_of_the_release_is_there():
    fams = ["llama", "llama-plus", "alpaca", "alpaca-plus", "alpaca-pro"]
    assert set(catalog.MODELS) == {f"{f}-{s}" for f in fams for s in ("7b", "13b", "33b")}


def test_every_hash_is_64_hex():
    def walk(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from walk(x)
        elif isinstance(v, list):
            for x in v:
                yield from walk(x)
        else:
            yield v

    values = list(walk(catalog.release_hashes()))
    assert len(values) >= 60
    assert all(HEX64.match(v) for v in values)
    for m in catalog.MODELS.values():
        for lora in m.lora_chain:
            assert lora.adapter_sha256 and HEX64.match(lora.adapter_sha256)
        assert HEX64.match(m.tokenizer_sha256)


def test_chains_are_valid():
    for m in catalog.MODELS.values():
        chain = m.lora_chain
        assert all(lora.repo.startswith("hfl/") and lora.repo.endswith("-" + m.size.lower()) for lora in chain)
        if m.family in ("alpaca-plus", "alpaca-pro"):
            assert [lora.key for lora in chain] == ["llama-plus", m.family]  # LLaMA-Plus LoRA first
            assert chain[0].tokenizer == "llama" and chain[1].tokenizer == "alpaca"
        else:
            assert len(chain) == 1
        # vocabulary never shrinks along the chain; the last LoRA decides the tokenizer
        sizes = [catalog.VOCAB_SIZES[lora.tokenizer] for lora in chain]
        assert sizes == sorted(sizes) and m.vocab_size == sizes[-1]
        assert m.base.hub_repo.startswith("huggyllama/llama-")
        assert len(m.base.meta_pth_sha256) == m.base.meta_parts


def test_named_examples():
    m = catalog.get("alpaca-plus-13b")
    assert [lo.repo for lo in m.lora_chain] == ["hfl/chinese-llama-plus-lora-13b",
                                                 "hfl/chinese-alpaca-plus-lora-13b"]
    assert catalog.get("Chinese-Alpaca-Pro-33B").lora_chain[1].repo == "hfl/chinese-alpaca-pro-lora-33b"
    assert catalog.get("build-llama-7b").lora_chain[0].repo == "hfl/chinese-llama-lora-7b"
    assert catalog.get("alpaca-plus-7b").vocab_size == 49954 and catalog.get("llama-plus-7b").vocab_size == 49953
    assert catalog.get("llama-33b").base.hub_repo == "huggyllama/llama-30b"
    assert catalog.expected_in_repo("huggyllama/llama-7b")["pytorch_model-00002-of-00002.bin"].startswith("461bc5e5")
    assert catalog.identify(catalog.get("llama-7b").tokenizer_sha256).startswith("Chinese-LLaMA tokenizer")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(InputError, match="zhllama catalog"):
        catalog.get("alpaca-plus-8b")


def test_cli_table_and_detail(capsys):
    from flows.cli.main import main

    assert main(["catalog"]) == 0
    out = capsys.readouterr().out
    assert "alpaca-plus-7b" in out and "15 models" in out
    assert main(["catalog", "alpaca-plus-7b"]) == 0
    out = capsys.readouterr().out
    assert "8c928db86b2a0cf73f019832f921eb7e1e069ca21441b4bfa12c4381c6cc46be" in out
    assert out.index("chinese-llama-plus-lora-7b") < out.index("chinese-alpaca-plus-lora-7b")
