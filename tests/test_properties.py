"""Property tests (hypothesis): the tokenizer merge, the GGUF metadata writer, the archive planner.

Example counts are fixed (``EXAMPLES``) so each test runs in seconds on a 2-core machine; the
numbers and times are recorded in docs/reliability.md. Hypothesis's database is off: a failure is
reported with its shrunk example, and the seed is printed so it can be replayed.
"""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

EXAMPLES = {"tokenizer": 60, "gguf": 100, "archive": 300}


def test_example_counts_are_documented():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text(encoding="utf-8")
    for n in EXAMPLES.values():
        assert f"| {n} |" in doc
    assert f"{sum(EXAMPLES.values())} examples" in doc


def _settings(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None, database=None, derandomize=False,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------ tokenizer merge

# pieces: short strings over an alphabet where LLaMA's and the Chinese model's pieces overlap
_CHARS = "▁abcdeé你好世界中文人的一是"
_piece = st.text(alphabet=_CHARS, min_size=1, max_size=4)


@pytest.fixture(scope="module")
def templates(tiny_release):
    from pipeline_lib.tokenizer import load_proto

    toks = tiny_release.tokenizers
    return load_proto(toks.llama_model), load_proto(toks.chinese_sp)


def _proto(template, pieces: list[str], scores: list[float]):
    """``template`` (its normalizer, trainer spec, special and byte pieces) with ``pieces`` as its normal ones."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    p = pb.ModelProto()
    p.CopyFrom(template)
    kept = [x for x in template.pieces if x.type != 1]  # <unk> <s> </s> and the 256 byte pieces, if any
    del p.pieces[:]
    for x in kept:
        p.pieces.add().CopyFrom(x)
    for s, score in zip(pieces, scores, strict=True):
        n = p.pieces.add()
        n.piece, n.score = s, score
    return p


_pieces = st.lists(_piece, min_size=1, max_size=40, unique=True)
_scores = st.floats(min_value=-50, max_value=0, allow_nan=False, width=32)


@_settings("tokenizer")
@given(llama=_pieces, chinese=_pieces, alpaca=st.booleans(), data=st.data())
def test_tokenizer_merge_union_order_idempotence(templates, llama, chinese, alpaca, data):
    from pipeline_lib.errors import InputError
    from pipeline_lib.tokenizer import PAD_PIECE, load_proto, merge_protos, merge_tokenizers

    lt, ct = templates
    lp = _proto(lt, llama, data.draw(st.lists(_scores, min_size=len(llama), max_size=len(llama))))
    cp = _proto(ct, chinese, data.draw(st.lists(_scores, min_size=len(chinese), max_size=len(chinese))))
    l_pieces = [x.piece for x in lp.pieces]
    c_pieces = [x.piece for x in cp.pieces]
    new = [p for p in c_pieces if p not in set(l_pieces)]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "l.model").write_bytes(lp.SerializeToString())
        (d / "c.model").write_bytes(cp.SerializeToString())
        kind = "alpaca" if alpaca else "llama"
        if not new:
            with pytest.raises(InputError, match="already contains every piece"):
                merge_tokenizers(d / "l.model", d / "c.model", out=d / "out", kind=kind)
            assert not (d / "out").exists()
            return
        res = merge_tokenizers(d / "l.model", d / "c.model", out=d / "out", kind=kind)
        merged = load_proto(res.tokenizer_model)  # sentencepiece itself loads the result
        m_pieces = [x.piece for x in merged.pieces]
        # union: every piece of both, once; plus [PAD] for Alpaca
        assert set(m_pieces) == set(l_pieces) | set(c_pieces) | ({PAD_PIECE} if alpaca else set())
        assert len(m_pieces) == len(set(m_pieces)) == res.total_pieces
        # order: LLaMA's pieces first, unchanged (scores and types too); then the new ones in the Chinese order
        assert m_pieces[:len(l_pieces)] == l_pieces
        assert [(x.score, x.type) for x in merged.pieces[:len(l_pieces)]] == [(x.score, x.type) for x in lp.pieces]
        assert m_pieces[len(l_pieces):] == new + ([PAD_PIECE] if alpaca else [])
        assert all(x.score == 0 for x in merged.pieces[len(l_pieces):])
        # idempotence: the same inputs give the same bytes; merging the Chinese pieces in again adds nothing
        again = merge_tokenizers(d / "l.model", d / "c.model", out=d / "again", kind=kind)
        assert again.sha256 == res.sha256
        assert (d / "again" / "tokenizer.model").read_bytes() == res.tokenizer_model.read_bytes()
        assert [x.piece for x in merge_protos(merged, cp).pieces] == m_pieces


# ------------------------------------------------------------------ GGUF metadata writer

_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
_token = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=8)
_u32 = st.integers(min_value=1, max_value=2**31 - 1)
_f32 = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32)


@st.composite
def _plans(draw):
    from pipeline_lib.gguf_export import OUTTYPES, SPECIAL_TOKEN_KINDS, ConvertPlan, Hparams, Vocab

    tokens = draw(st.lists(_token, min_size=1, max_size=30))
    n = len(tokens)
    hp = Hparams(n_vocab=n, n_embd=draw(_u32), n_ff=draw(_u32), n_layer=draw(_u32), n_head=draw(_u32),
                 n_head_kv=draw(_u32), n_ctx=draw(_u32),
                 rms_eps=draw(st.floats(min_value=2.0**-40, max_value=1.0, width=32)),
                 rope_theta=draw(st.floats(min_value=1.0, max_value=1e7, width=32)), head_dim=draw(_u32))
    vocab = Vocab(tokens=[t.encode("utf-8") for t in tokens],
                  scores=draw(st.lists(_f32, min_size=n, max_size=n)),
                  types=draw(st.lists(st.sampled_from([1, 2, 3, 4, 5, 6]), min_size=n, max_size=n)),
                  sp_pieces=n, added={})
    # "cls" included: gguf-py has no key for it, so add_metadata skips it (as llama.cpp's converter does)
    kinds = draw(st.lists(st.sampled_from(list(SPECIAL_TOKEN_KINDS)), unique=True, max_size=4))
    return ConvertPlan(
        hparams=hp, outtype=OUTTYPES[draw(st.sampled_from(sorted(OUTTYPES)))], vocab=vocab,
        special_ids={k: draw(st.integers(min_value=0, max_value=n - 1)) for k in kinds},
        add_flags=draw(st.dictionaries(st.sampled_from(["bos", "eos"]), st.booleans())),
        chat_template=draw(st.none() | _text), add_space_prefix=draw(st.none() | st.booleans()), tensors=(),
        name=draw(_text), n_params=draw(st.integers(min_value=1, max_value=10**11)))


SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                "unk": "tokenizer.ggml.unknown_token_id", "sep": "tokenizer.ggml.seperator_token_id",
                "pad": "tokenizer.ggml.padding_token_id", "mask": "tokenizer.ggml.mask_token_id"}


def test_special_token_kinds_without_a_gguf_key_are_exactly_the_skipped_ones():
    """add_metadata writes a kind when gguf-py has its key and skips it otherwise (cls, as llama.cpp)."""
    import gguf

    from pipeline_lib.gguf_export import SPECIAL_TOKEN_KINDS

    missing = [k for k in SPECIAL_TOKEN_KINDS if not hasattr(gguf.GGUFWriter, f"add_{k}_token_id")]
    assert missing == [k for k in SPECIAL_TOKEN_KINDS if k not in SPECIAL_KEYS]


@_settings("gguf")
@given(plan=_plans())
def test_gguf_metadata_round_trips_through_the_gguf_reader(plan):
    import gguf
    import numpy as np

    from pipeline_lib.gguf_check import open_gguf
    from pipeline_lib.gguf_export import ARCH, add_metadata

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.gguf"
        w = gguf.GGUFWriter(path, ARCH)
        add_metadata(w, plan)
        w.add_tensor("t", np.zeros(4, dtype=np.float32))  # one tensor: a GGUF model has at least one
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        _, r = open_gguf(path)  # our own sanity check accepts what our writer wrote
        f = {k: v.contents() for k, v in r.fields.items()}
    hp = plan.hparams
    assert f.get("general.name", "") == plan.name  # (gguf-py writes no empty string, as llama.cpp's converter)
    expect = {
        "general.architecture": ARCH, f"{ARCH}.block_count": hp.n_layer,
        f"{ARCH}.context_length": hp.n_ctx, f"{ARCH}.embedding_length": hp.n_embd,
        f"{ARCH}.feed_forward_length": hp.n_ff, f"{ARCH}.attention.head_count": hp.n_head,
        f"{ARCH}.attention.head_count_kv": hp.n_head_kv, f"{ARCH}.attention.key_length": hp.head_dim,
        f"{ARCH}.vocab_size": hp.n_vocab, f"{ARCH}.rope.dimension_count": hp.head_dim,
        "general.file_type": plan.outtype.file_type, "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [t.decode("utf-8") for t in plan.vocab.tokens],
        "tokenizer.ggml.token_type": plan.vocab.types,
    }
    for key, value in expect.items():
        assert f[key] == value, key
    assert f[f"{ARCH}.rope.freq_base"] == pytest.approx(np.float32(hp.rope_theta))
    assert f[f"{ARCH}.attention.layer_norm_rms_epsilon"] == pytest.approx(np.float32(hp.rms_eps))
    assert f["tokenizer.ggml.scores"] == [float(np.float32(s)) for s in plan.vocab.scores]
    for kind, tid in plan.special_ids.items():
        if kind in SPECIAL_KEYS:
            assert f[SPECIAL_KEYS[kind]] == tid
        else:  # no GGUF key (cls): not written under any name
            assert not any("cls" in k for k in f), f
    for kind, value in plan.add_flags.items():
        assert f[f"tokenizer.ggml.add_{kind}_token"] is value
    assert f.get("tokenizer.chat_template") == (plan.chat_template or None)  # (an empty string is not written)
    assert f.get("tokenizer.ggml.add_space_prefix") == plan.add_space_prefix


# ------------------------------------------------------------------ archive planner

_plain = st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=3).map("/".join)
_comp = st.sampled_from(["a", "b", "c", "d", "..", "."])
_rel = st.lists(_comp, min_size=1, max_size=5).map("/".join)
# member names: mostly plain (so archives get through to the link checks), sometimes hostile
_name = st.one_of(_plain, _plain, _plain, _rel, _rel.map(lambda s: "/" + s), _plain.map(lambda s: s + "/"))
# link targets: relative walks with '..' and '.' through other links, absolute paths, the classic escapes
_target = st.one_of(_rel, _rel, _plain, _rel.map(lambda s: "/" + s),
                    st.sampled_from(["/etc", "/", "..", ".", "a/../..", "../X", "a/a/../../X"]))
_member = st.tuples(st.sampled_from(["file", "dir", "symlink", "symlink", "hardlink"]), _name, _target)


def _tar(path: Path, members) -> None:
    with tarfile.open(path, "w") as tf:
        for kind, name, target in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = 3
                tf.addfile(info, io.BytesIO(b"abc"))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE}[kind]
            if kind != "dir":
                info.linkname = target
            tf.addfile(info)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


@_settings("archive")
@given(members=st.lists(_member, min_size=1, max_size=8))
def test_archive_planner_never_yields_a_path_outside(members):
    from pipeline_lib.archive import extract_archive, plan_extraction, resolve_planned
    from pipeline_lib.errors import InputError

    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        sandbox = d / "sandbox"
        (sandbox / "X").mkdir(parents=True)  # what an escape would reach
        (sandbox / "X" / "secret").write_text("private")
        arc = d / "t.tar"
        _tar(arc, members)
        out = sandbox / "out"
        try:
            plan = plan_extraction(arc)
        except InputError:
            plan = None
        try:
            extract_archive(arc, out=out)
        except InputError:
            event("refused")
            assert not out.exists()
        else:
            assert plan is not None
            links = {m.name: m.target for m in plan.members if m.kind == "symlink"}
            event("extracted, with links" if links else "extracted, no link")
            for name in links:
                assert resolve_planned(name, links) is not None
            root = os.path.realpath(out)
            for dirpath, dirnames, filenames in os.walk(out):
                for n in dirnames + filenames:
                    p = os.path.join(dirpath, n)
                    assert _inside(os.path.realpath(p), root), f"{p} -> {os.path.realpath(p)}"
        # nothing outside the output folder was created or changed
        assert sorted(p.name for p in sandbox.iterdir()) in (["X"], ["X", "out"])
        assert sorted(p.name for p in (sandbox / "X").iterdir()) == ["secret"]
        assert (sandbox / "X" / "secret").read_text() == "private"
        assert [p.name for p in d.iterdir() if p.name.startswith(".tmp-")] == []
