"""Release-exact rebuild (issue 11): the release's arithmetic, key order and pth layout, whatever the base format,
checked against an independent computation written here from the issue's description, and the official-hash check."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline_lib import torchsave
from pipeline_lib.errors import InputError
from pipeline_lib.merge import merge, plan_merge
from pipeline_lib.synthetic import (
    LoraSpec,
    TinyConfig,
    lora_tensors,
    random_weights,
    save_hf_base,
    save_lora,
    save_meta_base,
)
from pipeline_lib.verify import Official, check_official

# ------------------------------------------------------------------ the release's procedure, written independently

META_NAMES = {  # HF suffix -> Meta name (the release's translate_state_dict_key, restated)
    "self_attn.q_proj.weight": "attention.wq.weight", "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight", "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight", "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
SPLIT_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def meta_name(k: str) -> str | None:
    if k in TOP_NAMES:
        return TOP_NAMES[k]
    if k.endswith("rotary_emb.inv_freq"):
        return None
    layer, rest = k.split(".")[2], ".".join(k.split(".")[3:])
    return f"layers.{layer}.{META_NAMES[rest]}"


def _load_loras(loras: list[Path]) -> list[tuple[dict, dict]]:
    return [(torch.load(lo / "adapter_model.bin", weights_only=True), json.loads((lo / "adapter_config.json").read_text()))
            for lo in loras]


def release_merge_shard(sd: dict, adapters: list[tuple[dict, dict]]) -> dict:
    """Issue 11, 'Full weights' and 'Low-rank pairs': per tensor, per LoRA in chain order, in place in fp16."""
    for k in list(sd):
        for lsd, cfg in adapters:
            key = "base_model.model." + k
            if key in lsd:
                sd[k] = lsd[key].half().clone()  # a later LoRA's copy wins
            a = key.replace(".weight", ".lora_A.weight")
            if a in lsd:
                delta = lsd[a.replace("lora_A", "lora_B")].float() @ lsd[a].float()
                if cfg["fan_in_fan_out"]:
                    delta = delta.T
                sd[k] += delta * (cfg["lora_alpha"] / cfg["r"])  # fp32(W16) + delta, rounded to fp16 per LoRA
    return sd


def release_reference(base: Path, loras: list[Path]) -> dict[str, torch.Tensor]:
    """HF names -> merged tensors, shards sorted, keys in each shard's order, inv_freq dropped."""
    adapters = _load_loras(loras)
    out = {}
    for f in sorted(base.glob("pytorch_model-*-of-*.bin")):
        out |= release_merge_shard(torch.load(f, weights_only=True), adapters)
    return {k: v for k, v in out.items() if not k.endswith("inv_freq")}


def release_parts(base: Path, loras: list[Path], *, n_heads: int, parts: int) -> list[dict]:
    """The release's pth: per base shard, Meta names, wq/wk un-permuted, split; parts = union in shard order."""
    adapters = _load_loras(loras)
    merged = [{} for _ in range(parts)]
    for f in sorted(base.glob("pytorch_model-*-of-*.bin")):
        shard = release_merge_shard(torch.load(f, weights_only=True), adapters)
        dicts = [{} for _ in range(parts)]
        for k, v in shard.items():
            new = meta_name(k)
            if new is None:
                continue
            kind = new.split(".")[-2]
            if kind in ("wq", "wk"):
                dim = v.shape[0]
                v = v.view(n_heads, 2, dim // n_heads // 2, v.shape[1]).transpose(1, 2).reshape(v.shape)
            if kind not in SPLIT_DIM or parts == 1:
                splits = [v] * parts
            else:
                ax = SPLIT_DIM[kind]
                sizes = [v.size(ax) // parts] * parts
                sizes[-1] += v.size(ax) % parts  # output on dim 0, uneven: the last part takes the rest
                splits = v.split(sizes, dim=ax)
            for d, piece in zip(dicts, splits, strict=True):
                d[new] = piece.clone()
        for m, d in zip(merged, dicts, strict=True):
            m |= d
    return merged


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------ arithmetic


def test_release_arithmetic_equals_independent_computation(rel, chain):
    ref = release_reference(rel.base_hf, chain)
    ours = dict(plan_merge(rel.base_hf, chain).iter_tensors())
    assert list(ours) == list(ref)  # the release's order too
    for name, t in ours.items():
        assert t.dtype == torch.float16 and torch.equal(t, ref[name]), name


def fp16_spacing(x: torch.Tensor) -> torch.Tensor:
    x = x.abs()
    return (torch.nextafter(x, torch.full_like(x, math.inf)) - x).float()


def test_release_and_precise_differ_by_rounding_only(rel, chain):
    """One rounding per LoRA vs one at the end: about 29 % of the targeted elements differ, each by at most one
    fp16 ulp of the largest value it passed through; every other tensor is identical."""
    release = dict(plan_merge(rel.base_hf, chain).iter_tensors())
    precise = dict(plan_merge(rel.base_hf, chain, precise=True).iter_tensors())
    after_first = dict(plan_merge(rel.base_hf, chain[:1]).iter_tensors())
    exact = dict(plan_merge(rel.base_hf, chain, dtype="float32").iter_tensors())
    n_diff = n_total = 0
    for name in release:
        diff = release[name] != precise[name]
        if not name.endswith("_proj.weight"):
            assert not diff.any(), name  # untouched and replaced tensors: identical
            continue
        assert torch.equal(precise[name], exact[name].half()), name  # precise = the fp32 result rounded once
        n_diff += int(diff.sum())
        n_total += diff.numel()
        a, b, mid = release[name][diff], precise[name][diff], after_first[name][diff]
        scale = fp16_spacing(torch.stack([a.abs(), b.abs(), mid.abs()]).amax(0))
        assert bool(((a.float() - b.float()).abs() <= scale).all()), name
    assert 0.2 < n_diff / n_total < 0.4, (n_diff, n_total)


def test_an_element_where_rounding_per_lora_changes_the_result(tmp_path):
    """W = 1.0 and two LoRAs each adding 2^-11 (half an fp16 ulp at 1.0): rounding after each LoRA ties back to
    1.0 twice; rounding once gives 1 + 2^-10. The release gives 1.0, --precise 1.0009765625."""
    cfg = TinyConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                     num_attention_heads=2, num_key_value_heads=2)
    w = random_weights(cfg, seed=3)
    q = "model.layers.0.self_attn.q_proj.weight"
    w[q][0, 0] = 1.0
    base = save_hf_base(w, cfg, tmp_path / "base", shards=1)
    loras = []
    for i, (a0, b0) in enumerate([(2.0**-6, 2.0**-5), (2.0**-5, 2.0**-6)]):
        spec = LoraSpec(r=1, alpha=1.0, target_modules=("q_proj",), full_weights=())
        a = torch.zeros(1, 64, dtype=torch.float16)
        b = torch.zeros(64, 1, dtype=torch.float16)
        a[0, 0], b[0, 0], b[1, 0] = a0, b0, 0.5  # row 1 changes visibly: each LoRA does change something
        loras.append(save_lora({f"base_model.model.{q.removesuffix('.weight')}.lora_A.weight": a,
                                f"base_model.model.{q.removesuffix('.weight')}.lora_B.weight": b}, spec,
                               tmp_path / f"lora{i}"))
    release = dict(plan_merge(base, loras).iter_tensors())[q]
    precise = dict(plan_merge(base, loras, precise=True).iter_tensors())[q]
    ref = release_reference(base, loras)[q]
    assert release[0, 0].item() == 1.0 and ref[0, 0].item() == 1.0
    assert precise[0, 0].item() == 1.0 + 2.0**-10
    assert torch.equal(release, ref)


def test_fan_in_fan_out_is_transposed_as_the_release_does(rel, tmp_path):
    """The release transposes B @ A when the adapter says fan_in_fan_out (PEFT ignores it: --precise)."""
    base_w = random_weights(rel.config, seed=0)
    spec = LoraSpec(r=8, alpha=16.0, seed=5, fan_in_fan_out=True, target_modules=("q_proj", "v_proj", "o_proj"))
    lora = save_lora(lora_tensors(rel.config, spec, vocab_size=rel.llama_vocab, base=base_w), spec,
                     tmp_path / "fifo", tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    ours = dict(plan_merge(rel.base_hf, [lora]).iter_tensors())
    ref = release_reference(rel.base_hf, [lora])
    assert all(torch.equal(ours[n], ref[n]) for n in ours)
    precise = dict(plan_merge(rel.base_hf, [lora], precise=True).iter_tensors())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[name], precise[name])
    bad_spec = LoraSpec(r=8, alpha=16.0, seed=6, fan_in_fan_out=True, target_modules=("gate_proj",))
    bad = save_lora(lora_tensors(rel.config, bad_spec, vocab_size=rel.llama_vocab, base=base_w), bad_spec,
                    tmp_path / "fifo-mlp", tokenizer_dir=rel.tokenizers.chinese_llama_dir)
    with pytest.raises(InputError, match="fan_in_fan_out"):
        plan_merge(rel.base_hf, [bad])


# ------------------------------------------------------------------ pth: layout, order, any base format


@pytest.fixture(scope="module")
def bases(rel, tmp_path_factory):
    """The tiny release's base in the three formats (same weights)."""
    root = tmp_path_factory.mktemp("bases")
    w = random_weights(rel.config, seed=0)  # make_release's base weights
    st = save_hf_base(w, rel.config, root / "st", safetensors=True, shards=3,
                      tokenizer_dir=rel.tokenizers.llama_model.parent)
    meta = save_meta_base(w, rel.config, root / "meta", parts=2)
    return {"bin": rel.base_hf, "safetensors": st, "meta": meta}


@pytest.mark.parametrize("parts", [1, 2])
def test_same_pth_from_bin_safetensors_and_meta(rel, chain, bases, tmp_path, parts):
    digests = {}
    for fmt, base in bases.items():
        out = merge(base, chain, out=tmp_path / fmt, format="pth", parts=parts).out
        digests[fmt] = [sha(out / f"consolidated.{i:02d}.pth") for i in range(parts)]
    assert digests["bin"] == digests["safetensors"] == digests["meta"], digests


@pytest.mark.parametrize("parts", [1, 2])
def test_pth_bytes_equal_the_release_procedure(rel, chain, tmp_path, parts):
    """Our streamed pth == torch.save (2023 layout) of the part dicts the release's procedure builds."""
    out = merge(rel.base_hf, chain, out=tmp_path / "ours", format="pth", parts=parts).out
    expected = release_parts(rel.base_hf, chain, n_heads=rel.config.num_attention_heads, parts=parts)
    for i, d in enumerate(expected):
        ref = torchsave.save(d, tmp_path / f"consolidated.{i:02d}.pth")
        assert sha(out / f"consolidated.{i:02d}.pth") == sha(ref), i
    params = (out / "params.json").read_text()
    assert params == json.dumps({"dim": 256, "multiple_of": 256, "n_heads": 4, "n_layers": 2, "norm_eps": 1e-06,
                                 "vocab_size": -1})  # as json.dump wrote it: no newline


def test_pth_layout_as_the_release(rel, chain, tmp_path):
    out = merge(rel.base_hf, chain, out=tmp_path / "p", format="pth", parts=2).out
    a = torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True)
    b = torch.load(out / "consolidated.01.pth", weights_only=True, mmap=True)
    assert type(a) is dict and list(a) == list(b)
    assert list(a)[:3] == ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.attention.wk.weight"]
    assert list(a)[-2:] == ["norm.weight", "output.weight"] and not any("freq" in k for k in a)
    h, v, ffn = rel.config.hidden_size, rel.alpaca_vocab, rel.config.intermediate_size
    assert a["tok_embeddings.weight"].shape == b["tok_embeddings.weight"].shape == (v, h // 2)
    assert (a["output.weight"].shape[0], b["output.weight"].shape[0]) == (v // 2, v - v // 2)  # uneven
    assert v % 2  # the tiny Alpaca vocabulary is odd, like 49953
    assert torch.equal(a["norm.weight"], b["norm.weight"]) and a["norm.weight"].shape == (h,)
    for key, shape in (("attention.wq", (h // 2, h)), ("attention.wo", (h, h // 2)),
                       ("feed_forward.w1", (ffn // 2, h)), ("feed_forward.w2", (h, ffn // 2))):
        assert a[f"layers.0.{key}.weight"].shape == shape, key
    z = zipfile.ZipFile(out / "consolidated.00.pth")
    assert len(z.namelist()) == len(a) + 2  # data.pkl + one storage per tensor + version
    assert not {"byteorder", ".format_version", ".storage_alignment"} & {n.split("/", 1)[1] for n in z.namelist()}


def test_bin_base_order_is_its_shards_order(rel, chain, tmp_path):
    """A .bin base is merged in its shards' order (files sorted, keys as stored), not the reader's."""
    base = Path(shutil.copytree(rel.base_hf, tmp_path / "base"))
    shards = sorted(base.glob("pytorch_model-*.bin"))
    first = torch.load(shards[0], weights_only=True)
    reordered = dict(reversed(list(first.items())))
    torch.save(reordered, shards[0])
    plan = plan_merge(base, chain)
    stored = [k for k in reordered if not k.endswith("inv_freq")]
    assert list(plan.steps)[:len(stored)] == stored
    assert list(plan.steps) == list(release_reference(base, chain))
    out = merge(base, chain, out=tmp_path / "p", format="pth").out
    keys = list(torch.load(out / "consolidated.00.pth", weights_only=True, mmap=True))
    assert keys[0] == meta_name(stored[0])


# ------------------------------------------------------------------ audit


def test_audit_counts_per_lora(rel, chain, tmp_path):
    result = merge(rel.base_hf, chain, out=tmp_path / "hf")
    audit = result.audit
    assert audit is not None and audit.ok and result.arithmetic == "release"
    llama, alpaca = audit.rows
    n_targets = 7 * rel.config.num_hidden_layers
    assert (llama["lora"], llama["modules_targeted"], llama["modules_changed"]) == (rel.llama_lora.name, n_targets,
                                                                                 n_targets)
    assert llama["full_weights_in_output"] == [] and len(llama["full_weights_superseded"]) == 2
    assert sorted(alpaca["full_weights_in_output"]) == ["lm_head.weight", "model.embed_tokens.weight"]
    assert audit.tensors_checked == 21 and "changed 14/14" in audit.summary
    json.dumps(list(audit.rows))  # a table the build turns into an artifact


def test_lora_matching_nothing_is_refused_by_name(rel, tmp_path):
    lora = Path(shutil.copytree(rel.llama_lora, tmp_path / "wrapped-twice"))
    sd = torch.load(lora / "adapter_model.bin", weights_only=True)
    torch.save({k.replace("base_model.model.", "base_model.model.base_model.model."): v for k, v in sd.items()},
               lora / "adapter_model.bin")
    with pytest.raises(InputError, match=f"none of the .* tensors of LoRA {lora.name} matches"):
        plan_merge(rel.base_hf, [lora])


def test_lora_that_changes_nothing_fails_and_leaves_nothing(rel, tmp_path):
    spec = LoraSpec(r=4, alpha=8.0, seed=9, full_weights=())
    tensors = {k: (torch.zeros_like(v) if ".lora_B." in k else v)
               for k, v in lora_tensors(rel.config, spec, vocab_size=rel.config.vocab_size).items()}
    lora = save_lora(tensors, spec, tmp_path / "untrained-lora")
    out = tmp_path / "out"
    with pytest.raises(InputError, match="LoRA untrained-lora changed nothing: 0 of the 14 modules"):
        merge(rel.base_hf, [lora], out=out)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------ the official table


@pytest.fixture(scope="module")
def built(rel, chain, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "pth"
    return merge(rel.base_hf, chain, out=out, format="pth").out / "consolidated.00.pth"


def _table_with(digest: str) -> dict:
    return {"merged_consolidated_pth": {"Chinese-Alpaca-Plus-7B": [digest]},
            "tokenizer_model": {"llama": "0" * 64, "alpaca": "1" * 64}}


def test_official_match(built):
    digest = sha(built)
    check = check_official([built], model="alpaca-plus-7b", table=_table_with(digest))
    (f,) = check.files
    assert f.status is Official.MATCHES and check.matches
    assert f.message == f"matches the official Chinese-Alpaca-Plus-7B consolidated.00.pth ({digest[:8]}…)"
    assert check.rows()[0]["status"] == "matches"


def test_one_byte_change_differs_with_causes(built, tmp_path):
    digest = sha(built)
    bad = tmp_path / "consolidated.00.pth"
    data = bytearray(built.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    check = check_official([bad], model="alpaca-plus-7b", table=_table_with(digest), precise=True)
    (f,) = check.files
    assert f.status is Official.DIFFERS and not check.matches and check.differs == (f,)
    assert f.message.startswith(f"DIFFERS from the official Chinese-Alpaca-Plus-7B consolidated.00.pth ({digest[:8]}…)")
    assert "--precise" in f.message and any("inputs" in c for c in f.causes)


def test_differs_names_an_unofficial_base(built, rel, tmp_path):
    from pipeline_lib.verify import verify

    base_checked = verify([rel.base_hf]).files  # synthetic: no official digest
    check = check_official([built], model="alpaca-plus-7b", table=_table_with("f" * 64),
                           inputs={"base": base_checked})
    assert "the base is not the official one" in check.files[0].message


def test_no_official_hash_and_env_table(built, tmp_path, monkeypatch):
    check = check_official([built], model="alpaca-pro-7b")
    assert check.files[0].status is Official.NO_HASH and not check.matches
    assert check.files[0].message == "no official hash published for Chinese-Alpaca-Pro-7B consolidated.00.pth"
    toml = tmp_path / "table.toml"
    toml.write_text(f'[merged_consolidated_pth]\n"Chinese-Alpaca-Plus-7B" = ["{sha(built)}"]\n')
    monkeypatch.setenv("ZHLLAMA_RELEASE_TABLE", str(toml))
    assert check_official([built], model="alpaca-plus-7b").matches
    assert check_official([built], model=None).files[0].status is Official.MATCHES  # recognised by digest


def test_cli_merge_model_and_require_official(rel, chain, built, tmp_path, monkeypatch, capsys):
    from flows.cli.main import main

    toml = tmp_path / "table.toml"
    toml.write_text(f'[merged_consolidated_pth]\n"Chinese-Alpaca-Plus-7B" = ["{sha(built)}"]\n')
    monkeypatch.setenv("ZHLLAMA_RELEASE_TABLE", str(toml))
    args = ["merge", "--base", str(rel.base_hf), "--lora", str(chain[0]), "--lora", str(chain[1]), "--format", "pth",
            "--model", "alpaca-plus-7b", "--require-official"]
    assert main([*args, "--out", str(tmp_path / "ok")]) == 0
    assert "official: consolidated.00.pth: matches the official Chinese-Alpaca-Plus-7B" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "precise"), "--precise"]) == 1
    cap = capsys.readouterr()
    assert "DIFFERS from the official" in cap.out and "--precise" in cap.out
    assert cap.err.startswith("error: 1 output file(s) differ from the official Chinese-Alpaca-Plus-7B")


# ------------------------------------------------------------------ GGUF: the same arithmetic


@pytest.mark.slow
def test_one_pass_gguf_precise_equals_llama_cpp_on_the_precise_checkpoint(rel, chain, tmp_path):
    from _gguf_fixtures import gguf_tensors, reference_convert

    from pipeline_lib.gguf_export import convert

    hf = merge(rel.base_hf, chain, out=tmp_path / "hf", precise=True).out
    ref = reference_convert(hf, tmp_path / "ref.gguf")
    one = convert(plan_merge(rel.base_hf, chain, precise=True), out=tmp_path / "one.gguf").path
    assert gguf_tensors(one) == gguf_tensors(ref)
    release = convert(plan_merge(rel.base_hf, chain), out=tmp_path / "release.gguf").path
    assert gguf_tensors(release) != gguf_tensors(ref)
