"""The merge engine equals PEFT's sequential merge_and_unload, refuses bad inputs before writing, and
writes HF and Meta outputs that read back identically."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from _merge_fixtures import copy_lora, peft_merge

from pipeline_lib import fsutil, names
from pipeline_lib.checkpoint import TensorSource, open_checkpoint
from pipeline_lib.errors import DiskSpaceError, InputError
from pipeline_lib.lora import load_adapter
from pipeline_lib.merge import merge, plan_merge
from pipeline_lib.synthetic import (
    LoraSpec,
    lora_tensors,
    random_weights,
    save_hf_base,
    save_lora,
    save_meta_base,
)


@pytest.fixture(scope="module")
def peft_fp32(rel, chain):
    return peft_merge(rel.base_hf, chain, dtype=torch.float32)


@pytest.fixture(scope="module")
def merged_hf(rel, chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "hf"
    merge(rel.base_hf, chain, out=out, dtype="float16", max_shard_size="1MB")
    return out


def _stream(source: TensorSource) -> dict[str, torch.Tensor]:
    return dict(source.iter_tensors())


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(fsutil.TMP_PREFIX)]


# ------------------------------------------------------------------ equal to PEFT


def test_chain_float32_equals_peft(rel, chain, peft_fp32):
    plan = plan_merge(rel.base_hf, chain, dtype="float32")
    ours = _stream(plan)
    assert set(ours) == set(peft_fp32)
    worst = max((ours[n] - peft_fp32[n]).abs().max().item() for n in ours)
    assert worst <= 1e-6
    assert ours["model.embed_tokens.weight"].shape == (rel.alpaca_vocab, rel.config.hidden_size)
    # the LoRAs really changed something (so equality is not trivially base == base)
    base = open_checkpoint(rel.base_hf).load("model.layers.0.self_attn.q_proj.weight").float()
    assert (ours["model.layers.0.self_attn.q_proj.weight"] - base).abs().max() > 1e-3


def test_chain_float16_precise_equals_peft_cast_once(rel, chain, peft_fp32):
    """--precise fp16 output == PEFT's float32 merge cast to fp16 (rounded once, at the end)."""
    ours = _stream(plan_merge(rel.base_hf, chain, dtype="float16", precise=True))
    for name, t in ours.items():
        assert t.dtype == torch.float16
        assert torch.equal(t, peft_fp32[name].to(torch.float16)), name


def test_peft_fp16_model_rounds_after_each_lora(rel, chain, peft_fp32):
    """Documented difference: PEFT on an fp16 model rounds to fp16 after every LoRA. --precise rounds once, so it
    differs from that by at most one fp16 ulp of the values involved, and is closer to the exact result."""
    ours = _stream(plan_merge(rel.base_hf, chain, dtype="float16", precise=True))
    theirs = peft_merge(rel.base_hf, chain, dtype=torch.float16)
    after_first = _stream(plan_merge(rel.base_hf, chain[:1], dtype="float32"))
    for name, t in ours.items():
        a, b, exact = t.float(), theirs[name].float(), peft_fp32[name]
        if after_first[name].shape != t.shape:  # vocab tensors are replaced, not summed: identical
            assert torch.equal(a, b), name
            continue
        scale = torch.stack([a.abs(), b.abs(), after_first[name].abs()]).amax(0).clamp_min(2**-14)
        assert ((a - b).abs() <= scale * torch.finfo(torch.float16).eps).all(), name
        assert (a - exact).abs().sum() <= (b - exact).abs().sum(), name


def test_single_llama_lora_equals_peft(rel):
    ours = _stream(plan_merge(rel.base_hf, [rel.llama_lora], dtype="float32"))
    ref = peft_merge(rel.base_hf, [rel.llama_lora])
    assert max((ours[n] - ref[n]).abs().max().item() for n in ours) <= 1e-6
    assert ours["lm_head.weight"].shape[0] == rel.llama_vocab


def test_current_peft_format_with_rslora(rel, tmp_path):
    """An adapter written by real PEFT today (safetensors, rslora, modules_to_save) merges like PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(rel.base_hf), dtype=torch.float32)
    model.resize_token_embeddings(rel.alpaca_vocab, mean_resizing=False)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                     modules_to_save=["embed_tokens", "lm_head"])
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    lora_dir = tmp_path / "current-peft-lora"
    pm.save_pretrained(str(lora_dir))
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (lora_dir / f).write_bytes((rel.alpaca_lora / f).read_bytes())
    assert (lora_dir / "adapter_model.safetensors").is_file()
    adapter = load_adapter(lora_dir)
    assert adapter.use_rslora and adapter.scaling == pytest.approx(8 / math.sqrt(4))
    ref = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    ours = _stream(plan_merge(rel.base_hf, [lora_dir], dtype="float32"))
    assert max((ours[n] - ref[n]).abs().max().item() for n in ours) <= 1e-6


def test_key_spellings_normalised(rel, tmp_path):
    """`.lora_A.default.weight`, `modules_to_save.default`, `original_module` all read like the 2023 spelling."""
    from safetensors.torch import load_file, save_file

    spec = LoraSpec(r=8, alpha=32.0, seed=1, fmt="peft")
    plain = save_lora(lora_tensors(rel.config, spec, vocab_size=rel.llama_vocab), spec, tmp_path / "plain",
                      tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    odd = copy_lora(plain, tmp_path / "odd")
    sd = load_file(odd / "adapter_model.safetensors")
    renamed = {}
    for k, v in sd.items():
        if ".lora_" in k:
            renamed[k.replace(".weight", ".default.weight")] = v
        else:  # full weights as a live PEFT model names them, plus the base copy PEFT keeps
            module = k.removesuffix(".weight")
            renamed[f"{module}.modules_to_save.default.weight"] = v
            renamed[f"{module}.original_module.weight"] = torch.zeros_like(v)
    save_file(renamed, odd / "adapter_model.safetensors")
    a, b = load_adapter(plain), load_adapter(odd)
    assert a.pairs.keys() == b.pairs.keys() and a.full_weights.keys() == b.full_weights.keys()
    ours_a = _stream(plan_merge(rel.base_hf, [plain], dtype="float32"))
    ours_b = _stream(plan_merge(rel.base_hf, [odd], dtype="float32"))
    assert all(torch.equal(ours_a[n], ours_b[n]) for n in ours_a)


def test_fan_in_fan_out_ignored_for_linear_like_peft(rel, tmp_path):
    """--precise follows PEFT, which ignores fan_in_fan_out for nn.Linear (the release transposes: test_release_exact)."""
    base_w = random_weights(rel.config, seed=0)
    spec = LoraSpec(r=8, alpha=16.0, seed=5, fan_in_fan_out=True)
    lora = save_lora(lora_tensors(rel.config, spec, vocab_size=rel.llama_vocab, base=base_w), spec,
                     tmp_path / "fifo", tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    plan = plan_merge(rel.base_hf, [lora], dtype="float32", precise=True)
    assert any("fan_in_fan_out" in w for w in plan.warnings)
    ours = _stream(plan)
    ref = peft_merge(rel.base_hf, [lora])
    assert max((ours[n] - ref[n]).abs().max().item() for n in ours) <= 1e-6


# ------------------------------------------------------------------ other base formats


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_meta_base_same_as_hf_base(rel, chain, tmp_path, parts):
    meta = save_meta_base(random_weights(rel.config, seed=0), rel.config, tmp_path / "meta", parts=parts)
    ours = _stream(plan_merge(meta, chain))
    ref = _stream(plan_merge(rel.base_hf, chain))
    assert list(ours) == list(ref)
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


def test_safetensors_base(rel, chain, tmp_path):
    st = save_hf_base(random_weights(rel.config, seed=0), rel.config, tmp_path / "st", safetensors=True,
                      tokenizer_dir=rel.tokenizers.llama_model.parent)
    ours = _stream(plan_merge(st, chain))
    ref = _stream(plan_merge(rel.base_hf, chain))
    assert all(torch.equal(ours[n], ref[n]) for n in ref)


# ------------------------------------------------------------------ outputs


def test_hf_output_folder(rel, chain, merged_hf):
    files = {p.name for p in merged_hf.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.model"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1
    index = json.loads((merged_hf / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    cfg = json.loads((merged_hf / "config.json").read_text())
    assert cfg["vocab_size"] == rel.alpaca_vocab and cfg["torch_dtype"] == "float16"
    for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        assert (merged_hf / f).read_bytes() == (rel.alpaca_lora / f).read_bytes(), f
    back = open_checkpoint(merged_hf)
    assert back.format == "hf-safetensors"
    stream = _stream(plan_merge(rel.base_hf, chain))
    for name, t in back.iter_tensors():
        assert torch.equal(t, stream[name]), name


def test_hf_output_loads_in_transformers(merged_hf, peft_fp32):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(merged_hf), dtype=torch.float16)
    sd = model.state_dict()
    assert torch.equal(sd["lm_head.weight"], peft_fp32["lm_head.weight"].half())


@pytest.mark.parametrize("parts", [1, 2])
def test_pth_output_equals_hf_output(rel, chain, merged_hf, tmp_path, parts):
    out = tmp_path / "pth"
    result = merge(rel.base_hf, chain, out=out, format="pth", parts=parts)
    assert sorted(p.name for p in result.files if p.suffix == ".pth") == [f"consolidated.{i:02d}.pth"
                                                                         for i in range(parts)]
    params = json.loads((out / "params.json").read_text())
    assert params["dim"] == rel.config.hidden_size and params["n_layers"] == rel.config.num_hidden_layers
    raw = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    hf = open_checkpoint(merged_hf)
    q = hf.load("model.layers.1.self_attn.q_proj.weight")
    wq = names.hf_to_meta_rotary(q, rel.config.num_attention_heads)
    assert torch.equal(raw["layers.1.attention.wq.weight"], wq[: wq.shape[0] // parts])  # Meta naming, un-permuted
    back = open_checkpoint(out)
    assert back.names() == hf.names()
    for name, t in back.iter_tensors():
        assert torch.equal(t, hf.load(name)), name


# ------------------------------------------------------------------ refusals, nothing written


def test_reversed_order(rel, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InputError, match="order looks reversed") as err:
        merge(rel.base_hf, [rel.alpaca_lora, rel.llama_lora], out=out)
    assert str(rel.llama_vocab) in str(err.value) and str(rel.alpaca_vocab) in str(err.value)
    _no_output(out)


def test_alpaca_tokenizer_with_llama_lora(rel, tmp_path):
    lora = copy_lora(rel.llama_lora, tmp_path / "llama-lora-wrong-tokenizer")
    (lora / "tokenizer.model").write_bytes((rel.alpaca_lora / "tokenizer.model").read_bytes())
    out = tmp_path / "out"
    with pytest.raises(InputError, match="Chinese-Alpaca tokenizer") as err:
        merge(rel.base_hf, [lora], out=out)
    assert f"{rel.alpaca_vocab} tokens" in str(err.value) and f"{rel.llama_vocab} rows" in str(err.value)
    _no_output(out)


def test_lora_for_another_model_size(rel, tmp_path):
    big = replace(rel.config, hidden_size=320)  # stands in for a 13B LoRA (5120) on a 7B base (4096)
    spec = LoraSpec(r=8, alpha=32.0, seed=3)
    lora = save_lora(lora_tensors(big, spec, vocab_size=rel.llama_vocab), spec, tmp_path / "big-lora",
                     tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    out = tmp_path / "out"
    with pytest.raises(InputError, match="trained for hidden 320.*base model has hidden 256"):
        merge(rel.base_hf, [lora], out=out)
    _no_output(out)


def test_size_names_in_message():
    from pipeline_lib.merge import _size_name

    assert _size_name(5120) == "hidden 5120, a 13B model" and _size_name(4096) == "hidden 4096, a 7B model"


def test_lora_targets_missing_module(rel, tmp_path):
    deeper = replace(rel.config, num_hidden_layers=rel.config.num_hidden_layers + 1)
    spec = LoraSpec(r=8, alpha=32.0, seed=4)
    lora = save_lora(lora_tensors(deeper, spec, vocab_size=rel.llama_vocab), spec, tmp_path / "deep-lora",
                     tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    out = tmp_path / "out"
    missing = f"model.layers.{rel.config.num_hidden_layers}.self_attn"
    with pytest.raises(InputError, match=f"targets {missing}.*which the base model lacks"):
        merge(rel.base_hf, [lora], out=out)
    _no_output(out)


def test_not_enough_disk_space(rel, chain, tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 1000)  # a nearly full disk
    out = tmp_path / "out"
    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        merge(rel.base_hf, chain, out=out)
    _no_output(out)


def test_existing_output_refused(rel, chain, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        merge(rel.base_hf, chain, out=out)


# ------------------------------------------------------------------ command line


def test_cli_merge(rel, chain, tmp_path, capsys):
    from flows.cli.main import main

    out = tmp_path / "cli-out"
    rc = main(["merge", "--base", str(rel.base_hf), "--lora", str(chain[0]), "--lora", str(chain[1]),
               "--out", str(out), "--dtype", "bfloat16"])
    text = capsys.readouterr().out
    assert rc == 0 and f"vocab:   {rel.config.vocab_size} -> {rel.alpaca_vocab}" in text
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    rc = main(["merge", "--base", str(rel.base_hf), "--lora", f"{chain[1]},{chain[0]}",  # the release's comma form
               "--out", str(tmp_path / "cli-bad")])
    assert rc == 1 and "order looks reversed" in capsys.readouterr().err
    assert not (tmp_path / "cli-bad").exists()
