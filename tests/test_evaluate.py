"""Evaluation stage on tiny random-weight GGUFs, through real llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import json
import math
import shutil
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import chat
from pipeline_lib import evaluate as ev
from pipeline_lib.errors import InputError

N_CTX = 64
N_CHUNKS = 3


def _naive_perplexity(model: Path, text: str, *, n_ctx: int, n_chunks: int) -> tuple[float, int]:
    """An independent route: llama-cpp-python's high-level API (logits for every position), numpy
    log-softmax, and the chunking rules of llama-perplexity written out plainly."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(model), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                          verbose=False, seed=0)
    try:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True)
        nll, count = 0.0, 0
        for c in range(n_chunks):
            chunk = tokens[c * n_ctx:(c + 1) * n_ctx]
            chunk = [llm.token_bos()] + chunk[1:]
            llm.reset()
            llm.eval(chunk)
            logits = np.array(llm.scores[:n_ctx], dtype=np.float64)
            for pos in range(n_ctx // 2, n_ctx - 1):
                row = logits[pos]
                lse = row.max() + math.log(np.exp(row - row.max()).sum())
                nll += lse - row[chunk[pos + 1]]
                count += 1
    finally:
        llm.close()
    return math.exp(nll / count), count


def test_perplexity_matches_independent_numpy_computation(eval_models):
    text = ev.packaged_text()
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=N_CTX, n_batch=N_CTX)
    try:
        tokens = ev.tokenize_text(llm, text)
        ppl, kl = ev.measure_perplexity(llm, tokens, n_ctx=N_CTX, n_chunks=N_CHUNKS)
        n_vocab = llm.n_vocab()
    finally:
        llm.close()
    expected, count = _naive_perplexity(eval_models.alpaca_f16, text, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    assert kl is None
    assert ppl.scored_tokens == count == N_CHUNKS * (N_CTX - N_CTX // 2 - 1)
    assert ppl.n_chunks == N_CHUNKS and len(ppl.chunk_ppl) == N_CHUNKS
    assert ppl.ppl == pytest.approx(expected, rel=1e-4)
    assert ppl.chunk_ppl[-1] == pytest.approx(ppl.ppl)
    # sanity: a random model is close to uniform over the vocabulary, never better than a perfect model
    assert 1.0 < ppl.ppl < 10 * n_vocab


def test_kl_of_model_against_itself_is_zero(eval_models, tmp_path):
    llm = chat.load_model(eval_models.alpaca_f16, n_ctx=N_CTX, n_batch=N_CTX)
    ref = None
    try:
        tokens = ev.tokenize_text(llm, ev.packaged_text())
        ref = ev.ReferenceLogProbs(tokens, n_ctx=N_CTX, n_chunks=2, n_vocab=llm.n_vocab(), workdir=tmp_path)
        base, _ = ev.measure_perplexity(llm, tokens, n_ctx=N_CTX, n_chunks=2, save_reference=ref)
        again, kl = ev.measure_perplexity(llm, tokens, n_ctx=N_CTX, reference=ref)
    finally:
        if ref is not None:
            ref.close()
        llm.close()
    assert kl is not None
    assert kl.mean_kld == 0.0 and kl.max_kld == 0.0
    assert kl.same_top == 1.0
    assert kl.ppl_ratio == pytest.approx(1.0, abs=1e-7)
    assert kl.ppl == pytest.approx(base.ppl) == pytest.approx(again.ppl)
    assert kl.ppl_reference == pytest.approx(base.ppl)
    assert not list(tmp_path.glob(".tmp-*")), "the reference log-prob file must be removed"


@pytest.fixture(scope="module")
def quant_report(eval_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return ev.evaluate_variants(
        {"q8_0": eval_models.alpaca_q8_0, "q4_0": eval_models.alpaca_q4_0},
        reference=eval_models.alpaca_f16, out=out, n_ctx=N_CTX, n_chunks=N_CHUNKS, samples_per_category=1,
        max_tokens=4, tokenizers=[eval_models.llama_tokenizer, eval_models.alpaca_tokenizer],
    )


def test_quantization_shows_kl_and_ordering(quant_report):
    ref, q8, q4 = (quant_report.variant(n) for n in ("f16", "q8_0", "q4_0"))
    assert ref.is_reference and ref.kl is None and quant_report.reference == "f16"
    assert q4.kl.mean_kld > 0
    assert q4.kl.mean_kld > q8.kl.mean_kld > 0
    assert q4.kl.same_top < 1.0
    assert q8.kl.same_top >= q4.kl.same_top
    # the KL pass recomputes both perplexities: they agree with the standalone runs
    assert q4.kl.ppl == pytest.approx(q4.perplexity.ppl, rel=1e-9)
    assert q4.kl.ppl_reference == pytest.approx(ref.perplexity.ppl, rel=1e-6)
    assert q4.kl.ppl_ratio == pytest.approx(q4.perplexity.ppl / ref.perplexity.ppl, rel=1e-6)
    # size and bits per weight follow the quant type
    assert ref.model.file_size > q8.model.file_size > q4.model.file_size
    assert 15.5 < ref.model.bits_per_weight < 16.5
    assert 8.0 < q8.model.bits_per_weight < 9.5
    assert 4.0 < q4.model.bits_per_weight < 6.5
    assert ref.model.n_params == q4.model.n_params


def test_parameter_count_matches_the_config(eval_models, tiny_release):
    facts = ev.model_facts(eval_models.alpaca_f16)
    expected = sum(math.prod(s) for s in tiny_release.config.shapes(tiny_release.alpaca_vocab).values())
    assert facts.n_params == expected
    assert facts.vocab_size == tiny_release.alpaca_vocab and facts.vocab_kind == "alpaca"
    assert facts.file_type == "MOSTLY_F16"


def test_report_files(quant_report):
    out = quant_report.out
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [v["name"] for v in data["variants"]] == ["f16", "q8_0", "q4_0"]
    assert data["settings"]["n_ctx"] == N_CTX
    assert data["variants"][2]["kl"]["mean_kld"] == pytest.approx(quant_report.variant("q4_0").kl.mean_kld)
    assert [r["variant"] for r in data["table"]] == ["f16", "q8_0", "q4_0"]
    assert data["table"][0]["mean_kld"] == 0.0 and data["table"][2]["mean_kld"] > 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| q4_0 |" in md and "top-1 agreement" in md and "report.png" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "report.png")
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]


def test_samples_cover_ten_categories_with_alpaca_template(quant_report):
    samples = quant_report.variant("q4_0").samples
    cats = {s.category for s in samples}
    assert len(cats) == 10 and len(samples) == 10
    one = next(s for s in samples if s.category == "knowledge_qa")
    assert one.prompt == chat.ALPACA_PREAMBLE + f"### Instruction:\n\n{one.turns[0]}\n\n### Response:\n\n"
    dialogue = next(s for s in samples if s.category == "multi_turn_dialogue")
    assert len(dialogue.turns) == len(dialogue.replies) == 2
    assert dialogue.turns[0] in dialogue.prompt and dialogue.prompt.endswith(
        f"### Instruction:\n\n{dialogue.turns[1]}\n\n### Response:\n\n")
    # greedy decoding is deterministic: the reference's samples are reproducible in-process
    ref = quant_report.variant("f16").samples[0]
    llm = chat.load_model(quant_report.variant("f16").model.path, n_ctx=512)
    try:
        text, _ = chat.generate(llm, ref.prompt, max_tokens=4, stop=chat.TEMPLATES["alpaca"].stop)
    finally:
        llm.close()
    assert text.strip() == ref.replies[0]


def test_tokenizer_efficiency_rows(quant_report):
    rows = quant_report.tokenizers
    llama_row, merged_row = rows[0], rows[1]
    assert llama_row.chars == merged_row.chars > 0
    # the merged Chinese vocabulary needs fewer tokens for the same Chinese-heavy text
    assert merged_row.tokens < llama_row.tokens
    assert merged_row.chars_per_token > llama_row.chars_per_token
    gguf_row = rows[2]
    assert "GGUF" in gguf_row.tokenizer and gguf_row.vocab_size == merged_row.vocab_size


def test_llama_model_uses_plain_continuation(eval_models, tmp_path):
    assert chat.detect_template(eval_models.llama_f16).name == "plain"
    assert chat.detect_template(eval_models.alpaca_f16).name == "alpaca"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "category": "open_qa", "prompt": "从前有座山"}, ensure_ascii=False)
                       + "\n", encoding="utf-8")
    report = ev.evaluate(eval_models.llama_f16, out=tmp_path / "out", prompts=prompts, n_ctx=N_CTX,
                         n_chunks=2, max_tokens=3, speed=False)
    v = report.variants[0]
    assert v.template == "plain" and v.samples[0].prompt == "从前有座山"
    assert v.kl is None and v.speed is None and report.reference is None
    forced = ev.evaluate(eval_models.llama_f16, out=tmp_path / "out2", prompts=prompts, n_ctx=N_CTX,
                         n_chunks=2, max_tokens=3, speed=False, template="alpaca")
    assert forced.variants[0].samples[0].prompt.startswith(chat.ALPACA_PREAMBLE)


def test_bad_inputs_fail_before_writing(eval_models, tmp_path):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("太短了。", encoding="utf-8")
    with pytest.raises(InputError, match="at least"):
        ev.evaluate(eval_models.alpaca_f16, out=out, text=short, n_ctx=N_CTX, prompts=False, speed=False)
    assert not (out / "report.json").exists()
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"ggjt" + b"\0" * 64)
    with pytest.raises(InputError, match="legacy GGML .* not GGUF"):
        ev.evaluate(not_gguf, out=out)
    with pytest.raises(InputError, match="tokens, the reference"):
        ev.evaluate(eval_models.llama_f16, reference=eval_models.alpaca_f16, out=out)
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match="bad.jsonl:1"):
        ev.evaluate(eval_models.alpaca_f16, out=out, prompts=bad_prompts)
    assert not out.exists() or not any(out.iterdir())


def test_reference_copy_in_variants_is_not_evaluated_twice(eval_models, tmp_path):
    copy = tmp_path / "copy-f16.gguf"
    shutil.copyfile(eval_models.alpaca_f16, copy)
    report = ev.evaluate_variants({"f16": eval_models.alpaca_f16, "copy": copy}, reference=eval_models.alpaca_f16,
                                  out=tmp_path / "out", n_ctx=N_CTX, n_chunks=2, prompts=False, speed=False)
    assert [v.name for v in report.variants] == ["f16", "copy"]
    assert report.variant("copy").kl.mean_kld == 0.0
    assert report.variant("copy").kl.same_top == 1.0


def test_cli_eval(eval_models, tmp_path, capsys):
    from flows.cli.main import main

    out = tmp_path / "cli-out"
    rc = main(["eval", str(eval_models.alpaca_q4_0), "--reference", str(eval_models.alpaca_f16), "--out", str(out),
               "--ctx", str(N_CTX), "--chunks", "2", "--no-samples", "--no-speed"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "q4_0" in printed and "KL" in printed and "report:" in printed
    assert {"report.json", "report.md", "report.png"} <= {p.name for p in out.iterdir()}
    assert main(["eval", str(tmp_path / "missing.gguf"), "--out", str(out)]) == 1


def test_shipped_eval_text_and_prompts():
    data = files("pipeline_lib.data")
    text = data.joinpath("eval_text.txt").read_text(encoding="utf-8")
    training = data.joinpath("corpus_zh.txt").read_text(encoding="utf-8") + data.joinpath(
        "corpus_en.txt").read_text(encoding="utf-8")
    # held out: no line and no 16-character stretch of the tokenizer training text reappears
    assert not {ln for ln in text.splitlines() if ln.strip()} & set(training.splitlines())
    grams = {training[i:i + 16] for i in range(len(training) - 16)}
    assert not [text[i:i + 16] for i in range(len(text) - 16) if text[i:i + 16] in grams]
    zh = sum("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert zh > 1500 and sum(ch.isascii() and ch.isalpha() for ch in text) > 1500
    items = ev.load_prompts()
    by_cat: dict[str, int] = {}
    for it in items:
        by_cat[it.category] = by_cat.get(it.category, 0) + 1
        assert any("\u4e00" <= ch <= "\u9fff" for ch in it.turns[0])
    assert len(by_cat) == 10 and min(by_cat.values()) >= 5
    assert all(len(it.turns) >= 2 for it in items if it.category == "multi_turn_dialogue")
