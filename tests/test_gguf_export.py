"""GGUF conversion: llama.cpp's own converter as the reference, llama.cpp as the loader, transformers for logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import _gguf_fixtures
import numpy as np
import pytest
import torch
from _gguf_fixtures import (
    DictSource,
    gguf_fields,
    gguf_name,
    gguf_tensors,
    hf_folder_source,
    llama_logits,
    reference_convert,
)

from flows.cli import main as cli
from pipeline_lib.errors import InputError
from pipeline_lib.gguf_export import OUTTYPES, convert, plan_convert, read_vocab
from pipeline_lib.merge import plan_merge
from pipeline_lib.synthetic import corpus

gguf_models = _gguf_fixtures.gguf_models  # session fixture

# keys whose value is descriptive and derived by llama.cpp from folder names; everything else must match
DESCRIPTIVE_KEYS = {"general.name"}


def assert_same_gguf(ours: Path, ref: Path) -> None:
    """Every key (bar general.name), every tensor (name, type, shape, bytes), then the file bytes.

    Tensor order: ours is LLaMA's canonical order (embeddings, blocks, norm, output); llama.cpp's
    follows the shards' storage order (alphabetical in safetensors). The loader finds tensors by
    name, so order is compared (and whole files byte for byte) only where the two agree.
    """
    fo, fr = gguf_fields(ours), gguf_fields(ref)
    assert set(fo) - DESCRIPTIVE_KEYS == set(fr) - DESCRIPTIVE_KEYS, (set(fo) ^ set(fr))
    for key in fr:
        if key not in DESCRIPTIVE_KEYS:
            assert fo[key] == fr[key], f"{key}: ours {str(fo[key])[:200]} reference {str(fr[key])[:200]}"
    to, tr = gguf_tensors(ours), gguf_tensors(ref)
    assert sorted(to) == sorted(tr)
    for name in tr:
        assert to[name][:2] == tr[name][:2], name
        assert to[name][2] == tr[name][2], f"{name}: tensor bytes differ"
    if gguf_name(ours) == gguf_name(ref) and list(to) == list(tr):
        assert ours.read_bytes() == ref.read_bytes()


CASES = [("base", "f16"), ("base", "f32"), ("base", "bf16"), ("base", "q8_0"),
         ("alpaca", "f16"), ("added", "f16"), ("gqa", "f16"), ("old_config", "f16")]


@pytest.mark.slow
@pytest.mark.parametrize(("model", "outtype"), CASES, ids=[f"{m}-{o}" for m, o in CASES])
def test_matches_llama_cpp_converter(gguf_models, tmp_path, model, outtype):
    folder = getattr(gguf_models, model)
    ref = reference_convert(folder, tmp_path / "ref.gguf", outtype=outtype)
    ours = convert(folder, out=tmp_path / "ours.gguf", outtype=outtype, name=gguf_name(ref))
    assert ours.n_tensors == 21 and ours.file_bytes == ref.stat().st_size
    assert_same_gguf(ours.path, ref)
    if model == "base":  # .bin shards: same tensor order as llama.cpp, so the very same file
        assert ours.path.read_bytes() == ref.read_bytes()


def test_tokenizer_keys_from_tokenizer_model(gguf_models, tmp_path):
    """Scores and types come from tokenizer.model; added tokens are user-defined with score -1000."""
    import sentencepiece as spm

    out = convert(gguf_models.added, out=tmp_path / "a.gguf").path
    f = gguf_fields(out)
    tokens, scores, types = (f[k][1] for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                               "tokenizer.ggml.token_type"))
    sp = spm.SentencePieceProcessor(model_file=str(gguf_models.added / "tokenizer.model"))
    n = sp.vocab_size()
    assert len(tokens) == n + 1 and tokens[n] == "[PAD]" and scores[n] == -1000.0 and types[n] == 4
    assert tokens[:n] == [sp.id_to_piece(i) for i in range(n)]
    assert np.allclose(scores[:n], [sp.get_score(i) for i in range(n)])
    assert types[0] == 2 and types[1] == types[2] == 3  # <unk> unknown, <s> </s> control
    assert types[3:259] == [6] * 256 and tokens[3] == "<0x00>"  # byte fallback pieces
    assert f["tokenizer.ggml.bos_token_id"][1] == 1 and f["tokenizer.ggml.eos_token_id"][1] == 2
    assert f["tokenizer.ggml.padding_token_id"][1] == 0  # config.json's pad_token_id, as llama.cpp
    assert f["tokenizer.ggml.add_bos_token"][1] is True and f["tokenizer.ggml.add_eos_token"][1] is False
    assert f["llama.vocab_size"][1] == n + 1
    # the Alpaca tokenizer carries [PAD] inside tokenizer.model: a normal piece with score 0
    v = read_vocab(gguf_models.alpaca)
    assert v.tokens[-1] == b"[PAD]" and v.types[-1] == 1 and v.sp_pieces == len(v)


def test_architecture_keys_and_tensor_types(gguf_models, tmp_path):
    out = convert(gguf_models.gqa, out=tmp_path / "g.gguf", outtype="q8_0").path
    f = {k: v[1] for k, v in gguf_fields(out).items()}
    cfg = json.loads((gguf_models.gqa / "config.json").read_text())
    assert f["general.architecture"] == "llama" and f["general.file_type"] == OUTTYPES["q8_0"].file_type
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == 4 and f["llama.attention.head_count_kv"] == 2
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.rope.dimension_count"] == cfg["hidden_size"] // 4
    assert f["llama.rope.freq_base"] == 10000.0
    assert abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12
    assert f["general.quantization_version"] == 2
    t = gguf_tensors(out)
    assert t["blk.0.attn_norm.weight"][0] == "F32" and t["output_norm.weight"][0] == "F32"
    assert t["blk.0.attn_q.weight"][0] == "Q8_0" and t["token_embd.weight"][0] == "Q8_0"
    assert t["blk.0.attn_k.weight"][1] == (256, 128)  # GGUF shape order: (row length, rows)


def test_q_k_rotary_permutation(gguf_models, tmp_path):
    """q is permuted with the head count, k with the kv head count (visible with GQA)."""
    src = hf_folder_source(gguf_models.gqa)
    out = convert(src, out=tmp_path / "p.gguf", outtype="f32").path
    t = gguf_tensors(out)
    hf_k = src._tensors["model.layers.1.self_attn.k_proj.weight"].float()
    hf_q = src._tensors["model.layers.1.self_attn.q_proj.weight"].float()
    got_k = np.frombuffer(t["blk.1.attn_k.weight"][2], dtype=np.float32).reshape(hf_k.shape)
    got_q = np.frombuffer(t["blk.1.attn_q.weight"][2], dtype=np.float32).reshape(hf_q.shape)
    for got, w, heads in ((got_k, hf_k, 2), (got_q, hf_q, 4)):
        d = w.shape[0] // heads
        want = w.reshape(heads, 2, d // 2, -1).transpose(1, 2).reshape(w.shape)  # llama.cpp's permute
        assert np.array_equal(got, want.numpy())
        assert not np.array_equal(got, w.numpy())


def test_one_pass_merge_equals_merge_then_convert(gguf_models, tmp_path):
    rel = gguf_models.release
    plan = plan_merge(rel.base_hf, [rel.llama_lora, rel.alpaca_lora])
    ref = reference_convert(gguf_models.merged, tmp_path / "two-step.gguf")
    one = convert(plan, out=tmp_path / "one-pass.gguf", name=gguf_name(ref))
    assert one.n_vocab == rel.alpaca_vocab
    assert_same_gguf(one.path, ref)


def test_refuses_disagreeing_vocab_sizes(gguf_models, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(gguf_models.alpaca, bad)
    shutil.copy(gguf_models.release.tokenizers.chinese_llama_dir / "tokenizer.model", bad / "tokenizer.model")
    out = tmp_path / "out" / "x.gguf"
    with pytest.raises(InputError, match="vocabulary sizes disagree") as exc:
        convert(bad, out=out)
    assert "tokenizer" in str(exc.value) and "[PAD]" in str(exc.value)
    assert not out.exists() and not list(out.parent.glob(".tmp-*"))
    # config.json vocab_size that disagrees with the embedding rows
    src = hf_folder_source(gguf_models.alpaca)
    src.config = dict(src.config, vocab_size=src.config["vocab_size"] + 1)
    with pytest.raises(InputError, match="vocabulary sizes disagree"):
        plan_convert(src)
    # embedding rows that disagree with config and tokenizer
    src = hf_folder_source(gguf_models.alpaca)
    src._tensors["model.embed_tokens.weight"] = src._tensors["model.embed_tokens.weight"][:-1]
    with pytest.raises(InputError, match="embedding rows"):
        plan_convert(src)


def test_refuses_bad_inputs_before_writing(gguf_models, tmp_path):
    src = hf_folder_source(gguf_models.base)
    with pytest.raises(InputError, match="outtype"):
        plan_convert(src, outtype="q4_0")
    missing = DictSource(src.config, src.tokenizer_dir,
                         {k: v for k, v in src._tensors.items() if "layers.1.mlp.up_proj" not in k})
    with pytest.raises(InputError, match="missing"):
        plan_convert(missing)
    wrong = DictSource(src.config, src.tokenizer_dir, dict(src._tensors))
    wrong._tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 256, dtype=torch.float16)
    with pytest.raises(InputError, match="shape"):
        plan_convert(wrong)
    with pytest.raises(InputError, match="tokenizer"):
        plan_convert(DictSource(src.config, None, src._tensors))


class _Exploding(DictSource):
    def iter_tensors(self):
        for i, item in enumerate(super().iter_tensors()):
            if i == 5:
                raise RuntimeError("disk on fire")
            yield item


def test_interrupted_stream_leaves_nothing(gguf_models, tmp_path):
    src = hf_folder_source(gguf_models.base)
    boom = _Exploding(src.config, src.tokenizer_dir, src._tensors)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert(boom, out=tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_llama_cpp_loads_tokenizes_and_matches_transformers(gguf_models, tmp_path):
    import llama_cpp
    import sentencepiece as spm
    from transformers import LlamaForCausalLM

    rel = gguf_models.release
    out = convert(plan_merge(rel.base_hf, [rel.llama_lora, rel.alpaca_lora]), out=tmp_path / "m.gguf").path
    sp = spm.SentencePieceProcessor(model_file=str(gguf_models.merged / "tokenizer.model"))
    vocab = llama_cpp.Llama(str(out), vocab_only=True, verbose=False)
    texts = [t for t in corpus("zh").splitlines()[:40] + corpus("en").splitlines()[:40] if t.strip()]
    texts += ["你好，世界！Hello world 123", "  two  spaces\tand a tab", "emoji 😀 and rare 𝔘 chars", "[PAD]"]
    for text in texts:
        assert vocab.tokenize(text.encode("utf-8"), add_bos=True, special=False) == [1] + sp.encode(text), text
    vocab.close()

    tokens = [1] + sp.encode(texts[0])[:24]
    ours = llama_logits(out, tokens)
    model = LlamaForCausalLM.from_pretrained(gguf_models.merged, dtype=torch.float32)
    with torch.no_grad():
        ref = model(torch.tensor([tokens])).logits[0].numpy()
    assert ours.shape == ref.shape
    # fp16 weights are the same on both sides; llama.cpp's f16 matmuls/KV cache add ~1e-3 noise
    assert np.abs(ours - ref).max() < 2e-2 * max(1.0, np.abs(ref).max())
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_cli_convert_and_errors(gguf_models, tmp_path, capsys):
    rel = gguf_models.release
    out = tmp_path / "cli.gguf"
    assert cli.main(["convert", str(gguf_models.base), "--out", str(out), "--outtype", "q8_0"]) == 0
    assert "GGUF q8_0" in capsys.readouterr().out and out.is_file()
    out2 = tmp_path / "cli-merge.gguf"
    assert cli.main(["convert", "--base", str(rel.base_hf), "--lora", str(rel.llama_lora),
                     "--out", str(out2)]) == 0
    assert gguf_fields(out2)["llama.vocab_size"][1] == rel.llama_vocab
    assert cli.main(["convert", str(gguf_models.base), "--out", str(tmp_path / "x.gguf"), "--outtype", "q4_0"]) == 1
    assert "zhllama quantize" in capsys.readouterr().err
    assert cli.main(["convert", "--lora", str(rel.llama_lora), "--out", str(tmp_path / "y.gguf")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


def test_meta_checkpoint_converts_like_hf(gguf_models, tmp_path):
    """Meta's consolidated.NN.pth parts (q/k in Meta layout) give the same tensors as the HF folder."""
    from pipeline_lib.synthetic import save_meta_base

    src = hf_folder_source(gguf_models.base)
    weights = {k: v for k, v in src._tensors.items() if "inv_freq" not in k}
    cfg = gguf_models.release.config
    meta = save_meta_base(weights, cfg, tmp_path / "meta", parts=2,
                          tokenizer_model=gguf_models.base / "tokenizer.model")
    a = convert(meta, out=tmp_path / "meta.gguf").path
    b = convert(gguf_models.base, out=tmp_path / "hf.gguf").path
    assert gguf_tensors(a) == gguf_tensors(b)


def test_write_error_surfaces_and_leaves_nothing(gguf_models, tmp_path, monkeypatch):
    """A failing write on the write-behind thread (disk full) is raised in the caller; no file remains."""
    import gguf

    calls = []
    real = gguf.GGUFWriter.write_tensor_data

    def flaky(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        return real(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", flaky)
    with pytest.raises(OSError, match="No space left"):
        convert(gguf_models.base, out=tmp_path / "x.gguf")
    assert list(tmp_path.iterdir()) == []
