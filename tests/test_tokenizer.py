"""Tokenizer merge: order, count, scores, types, idempotence, byte-exactness, transformers round trip."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline_lib.errors import InputError
from pipeline_lib.tokenizer import PAD_PIECE, TokenizerKind, load_proto, merge_tokenizers, tokenizer_stats

TEXT = "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。\nThe primary use of LLaMA is research on large language models."


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    from pipeline_lib.synthetic import make_tokenizers

    return make_tokenizers(tmp_path_factory.mktemp("tok"))


def test_merge_appends_missing_pieces_in_order_with_score_zero(sp_models, tmp_path):
    llama = load_proto(sp_models.llama_model)
    chinese = load_proto(sp_models.chinese_sp)
    res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "out")
    merged = load_proto(res.tokenizer_model)

    have = {p.piece for p in llama.pieces}
    expected_new = [p.piece for p in chinese.pieces if p.piece not in have]
    assert 0 < len(expected_new) < len(chinese.pieces)  # the fixture has overlap (specials, shared pieces)
    # The LLaMA part is untouched, piece for piece.
    assert [(p.piece, p.score, p.type) for p in merged.pieces[: len(llama.pieces)]] == [
        (p.piece, p.score, p.type) for p in llama.pieces
    ]
    new = merged.pieces[len(llama.pieces):]
    assert [p.piece for p in new] == expected_new
    assert all(p.score == 0 and p.HasField("score") for p in new)
    assert all(not p.HasField("type") for p in new)  # default type (NORMAL), as the release's files
    assert res.total_pieces == len(llama.pieces) + len(expected_new) == len(merged.pieces)
    # Trainer/normalizer specs are LLaMA's.
    assert merged.trainer_spec == llama.trainer_spec
    assert merged.normalizer_spec == llama.normalizer_spec


def test_alpaca_appends_pad_last(sp_models, tmp_path):
    llama_res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "l")
    res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "a", kind="alpaca")
    merged = load_proto(res.tokenizer_model)
    assert res.total_pieces == llama_res.total_pieces + 1
    assert merged.pieces[-1].piece == PAD_PIECE and merged.pieces[-1].score == 0
    # The Alpaca model is the LLaMA one plus exactly one serialized piece.
    l_bytes = llama_res.tokenizer_model.read_bytes()
    assert len(res.tokenizer_model.read_bytes()) > len(l_bytes)


def test_merge_is_idempotent_and_byte_stable(sp_models, tmp_path):
    a = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "a")
    b = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "b")
    assert a.tokenizer_model.read_bytes() == b.tokenizer_model.read_bytes()
    assert a.sha256 == hashlib.sha256(a.tokenizer_model.read_bytes()).hexdigest()
    # Running again into the same folder replaces it with identical content.
    c = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "a")
    assert c.sha256 == a.sha256
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_bytes_equal_the_release_procedure_under_the_pure_python_protobuf(sp_models, tmp_path):
    """The release's script ran with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python; an independent
    re-run of that procedure in a fresh interpreter must give our bytes exactly."""
    ours = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "ours", kind="alpaca")
    script = textwrap.dedent(
        """
        import os, sys
        os.environ["PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"] = "python"
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb
        from google.protobuf.internal import api_implementation
        assert api_implementation.Type() == "python", api_implementation.Type()
        llama_file, chinese_file, out = sys.argv[1:4]
        llama = pb.ModelProto(); llama.ParseFromString(spm.SentencePieceProcessor(model_file=llama_file).serialized_model_proto())
        zh = pb.ModelProto(); zh.ParseFromString(spm.SentencePieceProcessor(model_file=chinese_file).serialized_model_proto())
        seen = set(p.piece for p in llama.pieces)
        for p in zh.pieces:
            if p.piece not in seen:
                q = pb.ModelProto().SentencePiece(); q.piece = p.piece; q.score = 0; llama.pieces.append(q)
        q = pb.ModelProto().SentencePiece(); q.piece = "[PAD]"; q.score = 0; llama.pieces.append(q)
        open(out, "wb").write(llama.SerializeToString())
        """
    )
    ref = tmp_path / "reference.model"
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    subprocess.run([sys.executable, "-c", script, str(sp_models.llama_model), str(sp_models.chinese_sp), str(ref)],
                   check=True, env=env)
    assert ref.read_bytes() == ours.tokenizer_model.read_bytes()


REAL = os.environ.get("ZHLLAMA_REAL_TOKENIZERS")


@pytest.mark.skipif(not REAL, reason="the real LLaMA tokenizer.model and chinese_sp.model cannot be had offline; "
                    "set ZHLLAMA_REAL_TOKENIZERS=DIR holding both to check the official sha256 values")
def test_real_release_files_give_official_hashes(tmp_path):  # pragma: no cover - needs the real files
    from pipeline_lib.catalog import release_hashes

    h = release_hashes()
    d = Path(REAL)
    assert hashlib.sha256((d / "tokenizer.model").read_bytes()).hexdigest() == h["inputs_of_tokenizer_merge"][
        "llama_tokenizer_model"]
    for kind in TokenizerKind:
        res = merge_tokenizers(d / "tokenizer.model", d / "chinese_sp.model", out=tmp_path / kind.value, kind=kind)
        assert res.sha256 == h["tokenizer_model"][kind.value]
        assert res.total_pieces == {"llama": 49953, "alpaca": 49954}[kind.value]


def test_transformers_round_trip(sp_models, tmp_path):
    from transformers import AutoTokenizer, LlamaTokenizer

    res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "a", kind="alpaca")
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(res.tokenizer_model))
    for cls in (LlamaTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(str(res.out_dir))
        assert len(tok) == res.total_pieces
        assert tok.pad_token == PAD_PIECE and tok.pad_token_id == res.total_pieces - 1
        assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<s>", "</s>", "<unk>")
        ids = tok(TEXT)["input_ids"]
        assert ids[0] == 1
        assert ids[1:] == sp.encode(TEXT)  # same pieces as sentencepiece itself
        assert tok.decode(ids, skip_special_tokens=True) == TEXT
    llama_dir = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "l").out_dir
    assert LlamaTokenizer.from_pretrained(str(llama_dir)).pad_token is None


def test_chinese_tokenizer_needs_fewer_tokens(sp_models, tmp_path):
    res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "l")
    zh = "\n".join(line for line in TEXT.splitlines() if not line.isascii())
    llama_stats, merged_stats = tokenizer_stats(zh, [sp_models.llama_model, res.out_dir])
    assert merged_stats.tokens < llama_stats.tokens / 2
    assert merged_stats.chars_per_token > llama_stats.chars_per_token


def test_already_merged_tokenizer_is_refused(sp_models, tmp_path):
    res = merge_tokenizers(sp_models.llama_model, sp_models.chinese_sp, out=tmp_path / "l")
    with pytest.raises(InputError, match="already contains every piece"):
        merge_tokenizers(res.tokenizer_model, sp_models.chinese_sp, out=tmp_path / "again")
    assert not (tmp_path / "again").exists()


def test_garbage_input_is_a_clear_error_and_writes_nothing(sp_models, tmp_path):
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a readable sentencepiece model"):
        merge_tokenizers(bad, sp_models.chinese_sp, out=tmp_path / "out")
    with pytest.raises(InputError, match="no sentencepiece model"):
        merge_tokenizers(tmp_path / "missing.model", sp_models.chinese_sp, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_merge_and_stats(sp_models, tmp_path):
    from flows.cli.main import main

    out = tmp_path / "cli"
    assert main(["tokenizer", "merge", "--llama-tokenizer", str(sp_models.llama_model.parent),
                 "--chinese-sp", str(sp_models.chinese_sp), "--out", str(out), "--alpaca"]) == 0
    assert load_proto(out / "tokenizer.model").pieces[-1].piece == PAD_PIECE
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["tokenizer", "stats", str(text), "--tokenizer", str(sp_models.llama_model),
                 "--tokenizer", str(out)]) == 0
