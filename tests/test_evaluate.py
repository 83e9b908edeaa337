"""Evaluation stage on tiny random-weight GGUFs, through real llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest

from pipeline_lib import chat
from pipeline_lib import evaluate as ev
from pipeline_lib.errors import InputError

N_CTX = 64
N_CHUNKS = 3
QUIET = ev.PassOptions(prompts=False, speed=False)  # perplexity and KL only


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


def _exact_predictions(model: Path, *, n_ctx: int, n_chunks: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(targets, float64 log-probs, argmax) per chunk, kept in memory: the in-process computation."""
    llm = chat.load_model(model, n_ctx=n_ctx, n_batch=n_ctx)
    try:
        tokens = ev.tokenize_text(llm, ev.packaged_text())
        return [(t, ev.log_softmax(lg), lg.argmax(axis=1))
                for _, t, lg in ev.chunk_logits(llm, tokens, n_ctx=n_ctx, n_chunks=n_chunks)]
    finally:
        llm.close()


def _within_kl_tolerance(stored: float, exact: float) -> bool:
    return abs(stored - exact) <= ev.KL_TOLERANCE["abs"] + ev.KL_TOLERANCE["rel"] * abs(exact)


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


def test_logprob_grid_and_stored_kl_on_peaked_distributions(tmp_path):
    """The 16-bit grid: error <= half a step, the floor maps to 0; and on distributions as peaked as a real
    model's (top token ~0.6, most of a 49954 vocabulary below -16) the KL from the stored form stays
    within KL_TOLERANCE of the exact float64 one, and a model against itself gives ~0, never below."""
    lp = np.array([0.0, -1e-9, -0.5, -7.25, -15.9999, -16.0, -40.0])
    back = ev.decode_logprobs(ev.encode_logprobs(lp))
    assert list(ev.encode_logprobs(lp)[-2:]) == [0, 0] and ev.encode_logprobs(lp)[0] == ev.LOGPROB_CODES
    assert np.all(np.abs(back[:5] - lp[:5]) <= ev.LOGPROB_STEP / 2 + 1e-12)
    rng = np.random.default_rng(0)
    n_pos, n_vocab = 64, 49954
    for scale, noise in ((8.0, 0.02), (8.0, 0.2), (3.0, 0.5)):
        logits = rng.standard_normal((n_pos, n_vocab)) * scale
        lr = ev.log_softmax(logits)
        lq = ev.log_softmax(logits + noise * np.sqrt(scale) * rng.standard_normal((n_pos, n_vocab)))
        exact = np.where(lr > ev.KL_LOG_PROB_FLOOR, np.exp(lr) * (lr - lq), 0.0).sum(axis=1).mean()
        store = ev.ReferenceLogProbs.create(tmp_path / f"{scale}-{noise}.npy", n_chunks=1, per_chunk=n_pos,
                                            n_vocab=n_vocab)
        store.put(0, lr, rng.integers(0, n_vocab, n_pos))
        dec, mask = store.decoded(0)
        stored = np.where(mask, np.exp(dec) * (dec - lq), 0.0).sum(axis=1).mean()
        self_kl = np.where(mask, np.exp(dec) * (dec - lr), 0.0).sum(axis=1)
        assert _within_kl_tolerance(stored, exact), (scale, noise, stored, exact)
        assert np.all(self_kl >= -1e-15) and self_kl.max() < 1e-7
        assert np.array_equal(store.top[0], lr.argmax(axis=1))


@pytest.fixture(scope="module")
def reference(eval_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    return ev.reference_pass(eval_models.alpaca_f16, out=out, n_ctx=N_CTX, n_chunks=N_CHUNKS,
                             options=ev.PassOptions(max_tokens=4, max_samples=0),
                             tokenizers={"LLaMA (base)": eval_models.llama_tokenizer,
                                         "merged Chinese": eval_models.alpaca_tokenizer})


def test_reference_pass_writes_a_bounded_reusable_reference(reference, eval_models):
    per_chunk = N_CTX - N_CTX // 2 - 1
    n_vocab = ev.model_facts(eval_models.alpaca_f16).vocab_size
    assert (reference.n_ctx, reference.n_chunks, reference.positions, reference.n_vocab) == \
        (N_CTX, N_CHUNKS, per_chunk, n_vocab)
    # the documented size formula, byte for byte for the log-prob grid
    assert reference.logprob_bytes == N_CHUNKS * per_chunk * n_vocab * 2 + ev.NPY_HEADER_BYTES
    assert (reference.out / ev.LOGPROBS_FILE).stat().st_size == reference.logprob_bytes
    assert reference.total_bytes <= ev.reference_bytes(N_CHUNKS, N_CTX, n_vocab) + len(ev.packaged_text().encode())
    meta = json.loads((reference.out / ev.REFERENCE_FILE).read_text(encoding="utf-8"))
    assert meta["text"]["sha256"] == reference.text_sha256 == reference.report.text["sha256"]
    assert meta["tokens"]["count"] == reference.n_tokens and len(meta["tokens"]["sha256"]) == 64
    # its own report: one reference row with perplexity, speed, samples, memory
    row = reference.variant
    assert reference.report.reference == row.name == "f16" and row.is_reference and row.kl is None
    assert row.perplexity.n_chunks == N_CHUNKS and row.speed is not None and len(row.samples) == 10
    assert [t.tokenizer for t in reference.report.tokenizers][:2] == ["LLaMA (base)", "merged Chinese"]
    assert {p.name for p in reference.out.iterdir()} == {*ev.REPORT_FILES, ev.REFERENCE_FILE, ev.LOGPROBS_FILE,
                                                         ev.POSITIONS_FILE, ev.TEXT_FILE}
    again = ev.ReferenceResult.load(reference.out)
    assert again == reference


def test_stored_reference_kl_equals_in_process_numbers(reference, eval_models, tmp_path):
    ref = _exact_predictions(eval_models.alpaca_f16, n_ctx=N_CTX, n_chunks=N_CHUNKS)
    for qname, path in (("q8_0", eval_models.alpaca_q8_0), ("q4_0", eval_models.alpaca_q4_0)):
        q = _exact_predictions(path, n_ctx=N_CTX, n_chunks=N_CHUNKS)
        kld, same, nll, nll_ref = [], [], [], []
        for (t, lr, ar), (_, lq, aq) in zip(ref, q, strict=True):
            kld += np.where(lr > ev.KL_LOG_PROB_FLOOR, np.exp(lr) * (lr - lq), 0.0).sum(axis=1).tolist()
            same += (aq == ar).tolist()
            rows = np.arange(len(t))
            nll += (-lq[rows, t]).tolist()
            nll_ref += (-lr[rows, t]).tolist()
        kl = ev.evaluate(path, out=tmp_path / qname, reference=reference.out, options=QUIET).variant(qname).kl
        assert kl.scored_tokens == len(kld) == N_CHUNKS * reference.positions
        assert _within_kl_tolerance(kl.mean_kld, float(np.mean(kld))), (qname, kl.mean_kld, np.mean(kld))
        assert kl.max_kld == pytest.approx(max(kld), rel=1e-3)
        assert kl.same_top == np.mean(same)  # exact: the reference's argmax is stored as is
        assert kl.ppl_reference == pytest.approx(math.exp(np.mean(nll_ref)), rel=1e-9)
        assert kl.ppl_ratio == pytest.approx(math.exp(np.mean(nll) - np.mean(nll_ref)), rel=1e-9)
        dp = np.exp(-np.asarray(nll)) - np.exp(-np.asarray(nll_ref))
        assert kl.rms_dp == pytest.approx(math.sqrt(np.mean(dp * dp)), rel=1e-9)


def test_stored_reference_spares_the_f16_load(reference, eval_models, tmp_path, model_loads):
    report = ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "q4", reference=reference,
                         options=ev.PassOptions(prompts=False))
    assert model_loads == [eval_models.alpaca_q4_0.name]
    assert [v.name for v in report.variants] == ["f16", "q4_0"] and report.reference == "f16"
    assert report.variant("f16") == reference.variant  # the reference's row, copied, not recomputed
    assert report.settings["n_ctx"] == N_CTX and report.settings["n_chunks"] == N_CHUNKS
    assert report.tokenizers == reference.report.tokenizers
    # the reference model itself against its own stored pass: its report as it is, no model loaded
    model_loads.clear()
    same = ev.evaluate(eval_models.alpaca_f16, out=tmp_path / "f16", reference=reference)
    assert model_loads == [] and same.variants == reference.report.variants


def test_mismatched_reference_is_refused_unloaded(reference, eval_models, tmp_path, model_loads):
    other_text = tmp_path / "other.txt"
    other_text.write_text(ev.packaged_text()[::-1], encoding="utf-8")
    cases = [
        (dict(text=other_text), "not the reference's"),
        (dict(n_ctx=2 * N_CTX), "computed with n_ctx"),
        (dict(n_chunks=1), "holds 3"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "x", reference=reference.out, **kwargs)
    with pytest.raises(InputError, match="tokens, the reference"):
        ev.evaluate(eval_models.llama_f16, out=tmp_path / "x", reference=reference.out)
    # same vocabulary size, other tokens: a tampered record stands in for another tokenizer
    tampered = tmp_path / "tampered"
    shutil.copytree(reference.out, tampered)
    meta = json.loads((tampered / ev.REFERENCE_FILE).read_text(encoding="utf-8"))
    meta["tokens"]["sha256"] = "0" * 64
    (tampered / ev.REFERENCE_FILE).write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(InputError, match="tokenizes the evaluation text"):
        ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "x", reference=tampered)
    # an incomplete or truncated folder
    truncated = tmp_path / "truncated"
    shutil.copytree(reference.out, truncated)
    with open(truncated / ev.LOGPROBS_FILE, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(InputError, match="incomplete"):
        ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "x", reference=truncated)
    (truncated / ev.REFERENCE_FILE).unlink()
    with pytest.raises(InputError, match="no reference.json"):
        ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "x", reference=truncated)
    with pytest.raises(InputError, match="no reference at"):
        ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "x", reference=tmp_path / "missing-f16.gguf")
    assert model_loads == []
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def quant_report(eval_models, tmp_path_factory):
    """The `zhllama eval` path: the f16 GGUF as the reference, evaluated once, two quants against it."""
    out = tmp_path_factory.mktemp("report")
    return ev.evaluate_variants(
        {"q8_0": eval_models.alpaca_q8_0, "q4_0": eval_models.alpaca_q4_0},
        reference=eval_models.alpaca_f16, out=out, n_ctx=N_CTX, n_chunks=N_CHUNKS,
        options=ev.PassOptions(samples_per_category=1, max_samples=0, max_tokens=4),
        tokenizers=[eval_models.llama_tokenizer, eval_models.alpaca_tokenizer],
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
    assert q4.kl.ppl_reference == pytest.approx(ref.perplexity.ppl, rel=1e-9)
    assert q4.kl.ppl_ratio == pytest.approx(q4.perplexity.ppl / ref.perplexity.ppl, rel=1e-9)
    # size and bits per weight follow the quant type
    assert ref.model.file_size > q8.model.file_size > q4.model.file_size
    assert 15.5 < ref.model.bits_per_weight < 16.5
    assert 8.0 < q8.model.bits_per_weight < 9.5
    assert 4.0 < q4.model.bits_per_weight < 6.5
    assert ref.model.n_params == q4.model.n_params


def test_one_options_record_reaches_every_pass(quant_report):
    """evaluate_variants hands its PassOptions to the reference pass and to every variant's pass: each
    report's settings record the same options, and the samples follow them."""
    out = quant_report.out
    expected = {"gen_ctx": None, "samples_per_category": 1, "max_samples": 0, "max_tokens": 4, "seed": 0,
                "template_override": None, "speed": {"prompt_tokens": ev.DEFAULT_SPEED_PROMPT,
                                                     "gen_tokens": ev.DEFAULT_SPEED_GEN}}
    for folder in (out / "reference", out / "variants" / "q8_0", out / "variants" / "q4_0", out):
        settings = ev.Report.load(folder).settings
        assert {k: settings[k] for k in expected} == expected, folder
        assert settings["threads"] == chat.physical_cores()
    categories = {it.category for it in ev.load_prompts()}
    for v in quant_report.variants:
        assert {s.category for s in v.samples} == categories and len(v.samples) == len(categories), v.name
        assert all(s.completion_tokens <= 4 * len(s.turns) for s in v.samples), v.name
        assert v.speed is not None and v.speed.prompt_tokens == ev.DEFAULT_SPEED_PROMPT


def test_build_eval_options_map_to_the_pass_options():
    """The BuildSpec's EvalOptions defaults are the library's PassOptions defaults; every knob reaches
    its field (the build's evaluation stages call _pass_options)."""
    from pipeline_lib.buildspec import EvalOptions
    from pipeline_lib.pipeline.stages import _pass_options

    assert _pass_options(EvalOptions().model_dump()) == ev.PassOptions()
    knobs = EvalOptions(generate=False, samples_per_category=2, max_samples=0, max_new_tokens=7,
                        speed_prompt_tokens=9, speed_gen_tokens=5, threads=3)
    assert _pass_options(knobs.model_dump()) == ev.PassOptions(
        prompts=False, samples_per_category=2, max_samples=None, max_tokens=7, speed_prompt=9, speed_gen=5, threads=3)


def test_eval_runs_the_reference_once_for_reuse(quant_report, eval_models, tmp_path, model_loads):
    out = quant_report.out
    stored = ev.ReferenceResult.load(out / "reference")
    assert stored.variant == quant_report.variant("f16")
    assert {p.name for p in (out / "variants").iterdir()} == {"q8_0", "q4_0"}
    # an earlier run's reference folder as --reference: the quants again, the f16 never loaded
    again = ev.evaluate_variants({"q4_0": eval_models.alpaca_q4_0}, reference=out / "reference",
                                 out=tmp_path / "again", options=QUIET)
    assert model_loads == [eval_models.alpaca_q4_0.name]
    assert again.variant("q4_0").kl.mean_kld == pytest.approx(quant_report.variant("q4_0").kl.mean_kld, rel=1e-12)
    # the GGUF-reference path loads each model exactly once
    model_loads.clear()
    ev.evaluate_variants({"q4_0": eval_models.alpaca_q4_0, "q8_0": eval_models.alpaca_q8_0},
                         reference=eval_models.alpaca_f16, out=tmp_path / "once", n_ctx=N_CTX, n_chunks=1,
                         options=QUIET)
    assert sorted(model_loads) == sorted(p.name for p in (eval_models.alpaca_f16, eval_models.alpaca_q4_0,
                                                         eval_models.alpaca_q8_0))


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
    assert data["settings"]["n_ctx"] == N_CTX and data["version"] == ev.REPORT_VERSION
    assert data["variants"][2]["kl"]["mean_kld"] == pytest.approx(quant_report.variant("q4_0").kl.mean_kld)
    assert [r["variant"] for r in data["table"]] == ["f16", "q8_0", "q4_0"]
    assert data["table"][0]["mean_kld"] == 0.0 and data["table"][2]["mean_kld"] > 0
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| q4_0 |" in md and "top-1 agreement" in md and "report.png" in md
    assert "resident (anonymous)" in md and "stored predictions" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(out / "report.png")
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers
    assert ev.Report.load(out) == quant_report


def test_memory_is_reported_as_resident_and_file_backed(quant_report):
    for v in quant_report.variants:
        m = v.memory
        assert m is not None and m.anon_bytes > 0 and m.file_bytes > 0
        assert m.peak_rss_bytes >= max(m.anon_bytes, m.file_bytes)
        assert v.seconds > 0
    now = ev.memory_now()
    assert now["VmRSS"] == pytest.approx(now["RssAnon"] + now["RssFile"] + now["RssShmem"], rel=0.05)


def test_speed_test_is_bounded(eval_models, monkeypatch):
    """Exactly repeats x pp + tg tokens are decoded, whatever the model; the defaults are small."""
    import llama_cpp

    decoded: list[int] = []
    real = llama_cpp.llama_decode

    def counting(ctx, batch):
        decoded.append(batch.n_tokens)
        return real(ctx, batch)

    llm = chat.load_model(eval_models.alpaca_q4_0, n_ctx=256, n_batch=128)
    try:
        tokens = ev.tokenize_text(llm, ev.packaged_text())
        monkeypatch.setattr(llama_cpp, "llama_decode", counting)
        sp = ev.measure_speed(llm, tokens)
        assert (sp.prompt_tokens, sp.gen_tokens) == (ev.DEFAULT_SPEED_PROMPT, ev.DEFAULT_SPEED_GEN)
        assert decoded == [ev.DEFAULT_SPEED_PROMPT] + [1] * ev.DEFAULT_SPEED_GEN
        decoded.clear()
        sp = ev.measure_speed(llm, tokens, n_prompt=8, n_gen=3, repeats=2)
        assert decoded == [8, 8, 1, 1, 1] and sp.prompt_tokens == 8 and sp.gen_tokens == 3
    finally:
        llm.close()
    assert sp.threads == chat.physical_cores() and sp.prompt_tokens_per_s > 0 and sp.gen_tokens_per_s > 0
    assert ev.DEFAULT_SPEED_PROMPT + ev.DEFAULT_SPEED_GEN <= 64


def test_progress_for_load_perplexity_and_speed(reference, eval_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ZHLLAMA_PROGRESS", "1")
    ev.evaluate(eval_models.alpaca_q4_0, out=tmp_path / "q4", reference=reference,
                options=ev.PassOptions(prompts=False))
    err = capsys.readouterr().err
    for bar_name in ("load q4_0", "perplexity q4_0", "speed q4_0"):
        assert bar_name in err, err


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


def test_pick_prompts_spans_categories_first():
    items = ev.load_prompts()
    first = ev.pick_prompts(items, 1, ev.DEFAULT_MAX_SAMPLES)
    cats = list(dict.fromkeys(it.category for it in items))
    assert [it.category for it in first] == cats[:ev.DEFAULT_MAX_SAMPLES]
    two = ev.pick_prompts(items, 2, 12)
    assert [it.category for it in two] == cats + cats[:2]
    assert len(ev.pick_prompts(items, 0, 0)) == len(items)


def test_tokenizer_efficiency_rows(quant_report):
    rows = quant_report.tokenizers
    llama_row, merged_row = rows[0], rows[1]
    assert llama_row.chars == merged_row.chars > 0
    # the merged Chinese vocabulary needs fewer tokens for the same Chinese-heavy text
    assert merged_row.tokens < llama_row.tokens
    assert merged_row.chars_per_token > llama_row.chars_per_token
    gguf_row = rows[2]
    assert "GGUF" in gguf_row.tokenizer and gguf_row.vocab_size == merged_row.vocab_size
    assert len(rows) == 3


def test_llama_model_uses_plain_continuation(eval_models, tmp_path):
    assert chat.detect_template(eval_models.llama_f16).name == "plain"
    assert chat.detect_template(eval_models.alpaca_f16).name == "alpaca"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "x", "category": "open_qa", "prompt": "从前有座山"}, ensure_ascii=False)
                       + "\n", encoding="utf-8")
    options = ev.PassOptions(prompts=prompts, max_tokens=3, speed=False)
    report = ev.evaluate(eval_models.llama_f16, out=tmp_path / "out", n_ctx=N_CTX, n_chunks=2, options=options)
    v = report.variants[0]
    assert v.template == "plain" and v.samples[0].prompt == "从前有座山"
    assert v.kl is None and v.speed is None and report.reference is None
    assert v.perplexity.n_chunks == 2
    forced = ev.evaluate(eval_models.llama_f16, out=tmp_path / "out2", n_ctx=N_CTX, n_chunks=2,
                         options=replace(options, template="alpaca"))
    assert forced.variants[0].samples[0].prompt.startswith(chat.ALPACA_PREAMBLE)


def test_bad_inputs_fail_before_writing(eval_models, tmp_path, model_loads):
    out = tmp_path / "out"
    short = tmp_path / "short.txt"
    short.write_text("太短了。", encoding="utf-8")
    with pytest.raises(InputError, match="at least"):
        ev.evaluate(eval_models.alpaca_f16, out=out, text=short, n_ctx=N_CTX, options=QUIET)
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
        ev.evaluate(eval_models.alpaca_f16, out=out, options=ev.PassOptions(prompts=bad_prompts))
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(json.dumps({"id": "long", "prompt": "长" * 3000}, ensure_ascii=False) + "\n",
                           encoding="utf-8")
    with pytest.raises(InputError, match="sample prompt long"):
        ev.evaluate(eval_models.alpaca_f16, out=out, n_ctx=N_CTX, options=ev.PassOptions(prompts=long_prompt))
    not_sp = tmp_path / "tokenizer.model"
    not_sp.write_bytes(b"not a sentencepiece model")
    with pytest.raises(InputError, match="not a sentencepiece tokenizer"):
        ev.evaluate(eval_models.alpaca_f16, out=out, tokenizers=[not_sp])
    assert not out.exists() or not any(out.iterdir())
    assert model_loads == []


def test_reference_copy_in_variants_is_not_evaluated_twice(eval_models, tmp_path, model_loads):
    copy = tmp_path / "copy-f16.gguf"
    shutil.copyfile(eval_models.alpaca_f16, copy)
    report = ev.evaluate_variants({"f16": eval_models.alpaca_f16, "copy": copy}, reference=eval_models.alpaca_f16,
                                  out=tmp_path / "out", n_ctx=N_CTX, n_chunks=2, options=QUIET)
    assert [v.name for v in report.variants] == ["f16", "copy"]
    assert model_loads == [eval_models.alpaca_f16.name, copy.name]
    # the same weights: the stored 16-bit reference gives ~0 (second order in the grid step), never less
    assert 0.0 <= report.variant("copy").kl.mean_kld < 1e-8
    assert report.variant("copy").kl.same_top == 1.0
    assert report.variant("copy").kl.ppl_ratio == 1.0


def test_combine_reports_puts_the_reference_first(reference, eval_models, tmp_path):
    reps = {q: ev.evaluate(p, out=tmp_path / q, reference=reference, options=QUIET)
            for q, p in (("q4_0", eval_models.alpaca_q4_0), ("q8_0", eval_models.alpaca_q8_0))}
    combined = ev.combine_reports([reps["q4_0"].json_path, reference.out, reps["q8_0"].out],
                                  out=tmp_path / "all", title="tiny")
    assert [v.name for v in combined.variants] == ["f16", "q4_0", "q8_0"]
    assert combined.reference == "f16" and combined.settings["title"] == "tiny"
    assert combined.json_path == tmp_path / "all" / "report.json" and not combined.json_path.exists()
    assert combined.variant("q8_0") == reps["q8_0"].variant("q8_0")
    # from_dict is to_dict's inverse
    assert ev.Report.from_dict(combined.to_dict()) == combined
    # reports of different evaluations are not combined
    other = ev.reference_pass(eval_models.alpaca_f16, out=tmp_path / "other-ref", n_ctx=2 * N_CTX, n_chunks=1,
                              options=QUIET)
    with pytest.raises(InputError, match="different contexts"):
        ev.combine_reports([other.out, reps["q4_0"].out], out=tmp_path / "bad")
    twin = replace(reps["q8_0"].variant("q8_0"), name="q4_0")
    ev.write_report(replace(reps["q8_0"], variants=(reference.variant, twin), out=tmp_path / "twin",
                            json_path=tmp_path / "twin" / "report.json", md_path=tmp_path / "twin" / "report.md",
                            plot_path=tmp_path / "twin" / "report.png"))
    with pytest.raises(InputError, match="two different models"):
        ev.combine_reports([reps["q4_0"].out, tmp_path / "twin"], out=tmp_path / "bad")


def test_cli_eval(eval_models, tmp_path, capsys):
    from flows.cli.main import main

    out = tmp_path / "cli-out"
    rc = main(["eval", str(eval_models.alpaca_q4_0), "--reference", str(eval_models.alpaca_f16), "--out", str(out),
               "--ctx", str(N_CTX), "--chunks", "2", "--no-samples", "--no-speed"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "q4_0" in printed and "KL" in printed and "report:" in printed and "RAM" in printed
    assert f"reference: {out / 'reference'}" in printed
    assert {"report.json", "report.md", "report.png", "reference", "variants"} <= {p.name for p in out.iterdir()}
    # the stored reference again: no --ctx/--chunks needed, they come with it
    rc = main(["eval", str(eval_models.alpaca_q8_0), "--reference", str(out / "reference"), "--out",
               str(tmp_path / "cli-again"), "--no-samples", "--no-speed"])
    assert rc == 0 and "KL" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing.gguf"), "--out", str(out)]) == 1


def test_cli_bad_tokenizer_fails_fast_before_any_model(eval_models, tmp_path, capsys, model_loads):
    from flows.cli.main import main

    models = [str(eval_models.alpaca_f16), str(eval_models.alpaca_q4_0), str(eval_models.alpaca_q8_0)]
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\x00" * 100)
    for bad in (tmp_path / "missing" / "tokenizer.model", garbage):
        t0 = time.perf_counter()
        rc = main(["eval", *models, "--reference", models[0], "--out", str(tmp_path / "out"),
                   "--tokenizer", str(eval_models.llama_tokenizer), "--tokenizer", str(bad)])
        elapsed = time.perf_counter() - t0
        assert rc == 1 and "error:" in capsys.readouterr().err
        assert elapsed < 1.0, elapsed
    assert model_loads == [] and not (tmp_path / "out").exists()


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
