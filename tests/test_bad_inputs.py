"""The bad-input matrix: every mistake and hostile file we know of, through the real CLI.

Each case runs ``zhllama ...`` in a child process (tests/_crash_harness.py) and asserts:

- a non-zero exit;
- exactly one stderr line starting ``error:``, which names the cause (``prints``), followed by its
  ``what to do:`` line naming the fix (``fix``);
- no traceback;
- nothing written at the output: a new output does not exist afterwards, an existing one (or an
  input) is byte for byte what it was, and no temporary is left beside it;
- no token: every run has ``HF_TOKEN`` set, and it appears nowhere in stdout or stderr.

``CASES`` is the table; docs/reliability.md shows it (``test_doc_table_matches_cases`` keeps the
two equal; ``ZHLLAMA_WRITE_DOCS=1`` rewrites the doc's table from this one). A case can carry a
strict xfail with its reason while a fix is pending (none does now).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _crash_harness import Runner  # noqa: E402
from fakehub import FakeHub  # noqa: E402

TOKEN = "hf_MATRIXsecretTOKEN0123456789"
DOC = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"


@dataclass
class Fx:
    """The fixture files every case draws from (built once), plus the current case's folder."""

    root: Path
    rel: object
    f16: Path
    hub_url: str  # a fake hub holding no repo: it answers 404
    broken_hub_url: str  # a careless mirror: every API call answers 500, echoing the Authorization header
    small: Path | None  # a 2 MiB filesystem, or None where none can be mounted
    dir: Path = Path()  # this case's folder
    runner: Runner | None = None

    def p(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Fx], list[str]]
    prints: str  # regex: the cause, in the `error:` line
    fix: str  # regex: the fix, in the `what to do:` line
    out: Callable[[Fx], Path]  # the output that must be left as it was (absent, or unchanged)
    group: str = "inputs"
    prepare: Callable[[Fx], None] | None = None
    xfail: str | None = None
    needs_small_fs: bool = False
    env: Callable[[Fx], dict[str, str]] = lambda fx: {}


def _base_args(fx: Fx, base: Path | None = None, loras: tuple[str, ...] = ("llama", "alpaca")) -> list[str]:
    lora_dir = {"llama": fx.rel.llama_lora, "alpaca": fx.rel.alpaca_lora}
    out = ["--base", str(base or fx.rel.base_hf)]
    for name in loras:
        out += ["--lora", str(lora_dir.get(name, fx.p(name)))]
    return out


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def _out(name: str) -> Callable[[Fx], Path]:
    return lambda fx: fx.dir / name


def _fix(name: str) -> Callable[[Fx], Path]:
    return lambda fx: fx.p(name)


CASES: list[Case] = [
    # --- outputs: claimed before any work (pipeline_lib.fsutil.claim_output) -------------------------
    Case("convert-out-exists", lambda fx: ["convert", *_base_args(fx), "--out", str(fx.dir / "model.gguf")],
         "--out .*model.gguf already exists", "add --overwrite", _out("model.gguf"), "outputs",
         prepare=lambda fx: _write(fx.dir / "model.gguf", b"an earlier model")),
    Case("convert-ggml-out-exists",
         lambda fx: ["convert", str(fx.p("legacy.f16.gguf")), "--format", "ggml", "--out", str(fx.dir / "m.bin")],
         "--out .*m.bin already exists", "add --overwrite", _out("m.bin"), "outputs",
         prepare=lambda fx: _write(fx.dir / "m.bin", b"an earlier ggml file")),
    Case("convert-out-is-input-shard",
         lambda fx: ["convert", str(fx.p("base-copy")), "--out",
                     str(fx.p("base-copy") / "pytorch_model-00001-of-00002.bin"), "--overwrite"],
         "is an input of this command", "an output never replaces its own input",
         _fix("base-copy/pytorch_model-00001-of-00002.bin"), "outputs"),
    Case("convert-out-is-a-folder", lambda fx: ["convert", *_base_args(fx), "--out", str(fx.dir / "folder")],
         "--out .*folder is a folder", "give the file to write", _out("folder"), "outputs",
         prepare=lambda fx: (fx.dir / "folder").mkdir()),
    Case("convert-ggml-from-its-own-output",
         lambda fx: ["convert", str(fx.p("legacy.f16.gguf")), "--format", "ggml", "--out",
                     str(fx.p("legacy.f16.gguf")), "--overwrite"],
         "is an input of this command", "choose another --out", _fix("legacy.f16.gguf"), "outputs"),
    Case("quantize-output-exists",
         lambda fx: ["quantize", str(fx.f16), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "alpaca-plus.q4_0.gguf already exists", "add --overwrite", _out("q"), "outputs",
         prepare=lambda fx: _write(fx.dir / "q" / "alpaca-plus.q4_0.gguf", b"an earlier q4_0")),
    Case("quantize-out-dir-is-a-file",
         lambda fx: ["quantize", str(fx.f16), "--type", "q4_0", "--out-dir", str(fx.dir / "q.txt")],
         "--out-dir .*q.txt is a file", "give a folder as --out-dir", _out("q.txt"), "outputs",
         prepare=lambda fx: _write(fx.dir / "q.txt", "notes")),
    Case("merge-overwrite-out-is-base",
         lambda fx: ["merge", *_base_args(fx, fx.p("base-copy")), "--out", str(fx.p("base-copy")), "--overwrite"],
         "--out .*base-copy is an input of this command", "an output never replaces its own input",
         _fix("base-copy"), "outputs"),
    Case("merge-overwrite-out-holds-base",
         lambda fx: ["merge", *_base_args(fx, fx.p("models/base")), "--out", str(fx.p("models")), "--overwrite"],
         "--out .*models holds an input of this command", "choose another --out", _fix("models"), "outputs"),
    Case("merge-out-exists", lambda fx: ["merge", *_base_args(fx), "--out", str(fx.dir / "merged")],
         "--out .*merged already exists", "add --overwrite", _out("merged"), "outputs",
         prepare=lambda fx: _write(fx.dir / "merged" / "keep.txt", "mine")),
    Case("tokenizer-out-is-input",
         lambda fx: ["tokenizer", "merge", "--llama-tokenizer", str(fx.p("tok-copy")), "--chinese-sp",
                     str(fx.rel.tokenizers.chinese_sp), "--out", str(fx.p("tok-copy")), "--overwrite"],
         "is an input of this command", "choose another --out", _fix("tok-copy"), "outputs"),
    Case("tokenizer-out-exists",
         lambda fx: ["tokenizer", "merge", "--llama-tokenizer", str(fx.rel.tokenizers.llama_model),
                     "--chinese-sp", str(fx.rel.tokenizers.chinese_sp), "--out", str(fx.dir / "tok")],
         "--out .*tok already exists", "add --overwrite", _out("tok"), "outputs",
         prepare=lambda fx: _write(fx.dir / "tok" / "tokenizer.model", b"mine")),
    Case("download-out-is-a-file", lambda fx: ["download", str(fx.rel.llama_lora), "--out", str(fx.dir / "f")],
         "--out .*f is a file", "give a folder as --out", _out("f"), "outputs",
         prepare=lambda fx: _write(fx.dir / "f", "mine")),
    Case("download-file-exists", lambda fx: ["download", str(fx.rel.llama_lora), "--out", str(fx.dir / "d")],
         "adapter_config.json already exists", "add --overwrite", _out("d"), "outputs",
         prepare=lambda fx: _write(fx.dir / "d" / "adapter_config.json", "mine")),
    Case("eval-report-exists",
         lambda fx: ["eval", str(fx.f16), "--out", str(fx.dir / "r"), "--no-samples", "--no-speed"],
         "report .*report.json already exists", "add --overwrite", _out("r"), "outputs",
         prepare=lambda fx: _write(fx.dir / "r" / "report.json", "{}")),
    Case("eval-out-is-a-file", lambda fx: ["eval", str(fx.f16), "--out", str(fx.dir / "r.txt")],
         "--out .*r.txt is a file", "give a folder as --out", _out("r.txt"), "outputs",
         prepare=lambda fx: _write(fx.dir / "r.txt", "notes")),
    # --- hostile archives ------------------------------------------------------------------------------
    Case("archive-link-chain-escape", lambda fx: ["download", str(fx.p("chain.tar.gz")), "--out", str(fx.dir / "x")],
         "symlink 'b' -> 'a/a/../../X' points outside the archive folder", "do not extract this archive",
         _out("x"), "hostile files"),
    Case("archive-zip-slip", lambda fx: ["download", str(fx.p("slip.zip")), "--out", str(fx.dir / "x")],
         "contains '..'", "do not extract this archive", _out("x"), "hostile files"),
    Case("archive-absolute-symlink", lambda fx: ["download", str(fx.p("abs.tar.gz")), "--out", str(fx.dir / "x")],
         "symlink 'etc' -> '/etc' points outside", "do not extract this archive", _out("x"), "hostile files"),
    Case("archive-link-over-folder", lambda fx: ["download", str(fx.p("over.tar.gz")), "--out", str(fx.dir / "x")],
         "symlink 'd' replaces a folder", "do not extract this archive", _out("x"), "hostile files"),
    Case("archive-device", lambda fx: ["download", str(fx.p("dev.tar.gz")), "--out", str(fx.dir / "x")],
         "is a special file", "do not extract this archive", _out("x"), "hostile files"),
    # --- damaged or foreign files ----------------------------------------------------------------------
    Case("quantize-truncated-gguf",
         lambda fx: ["quantize", str(fx.p("truncated.gguf")), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "truncated.gguf (is truncated|cannot be read as GGUF: truncated or damaged)", "copy or download it again",
         _out("q"), "damaged files"),
    Case("quantize-gguf-header-only",
         lambda fx: ["quantize", str(fx.p("header.gguf")), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "header.gguf (is truncated|cannot be read as GGUF)", "copy or download it again", _out("q"), "damaged files"),
    Case("quantize-not-gguf",
         lambda fx: ["quantize", str(fx.p("garbage.gguf")), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "is not a GGUF file", "give a .gguf file", _out("q"), "damaged files"),
    Case("quantize-legacy-ggml",
         lambda fx: ["quantize", str(fx.p("old.bin")), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "is a legacy GGML .ggjt. file, not GGUF", "convert the model to GGUF", _out("q"), "damaged files"),
    Case("quantize-nan-gguf",
         lambda fx: ["quantize", str(fx.p("nan.f16.gguf")), "--type", "q4_0", "--out-dir", str(fx.dir / "q")],
         "tensor blk.1.ffn_up.weight holds non-finite values", "the model itself is broken, not the conversion",
         _out("q"), "damaged files"),
    Case("eval-truncated-gguf", lambda fx: ["eval", str(fx.p("truncated.gguf")), "--out", str(fx.dir / "r")],
         "(is truncated|truncated or damaged)", "copy or download it again", _out("r"), "damaged files"),
    Case("eval-empty-file", lambda fx: ["eval", str(fx.p("empty.gguf")), "--out", str(fx.dir / "r")],
         "is empty or truncated", "copy or download it again", _out("r"), "damaged files"),
    Case("ggml-from-truncated-gguf",
         lambda fx: ["convert", str(fx.p("truncated.gguf")), "--format", "ggml", "--out", str(fx.dir / "m.bin")],
         "(is truncated|truncated or damaged)", "copy or download it again", _out("m.bin"), "damaged files"),
    Case("merge-truncated-safetensors",
         lambda fx: ["merge", *_base_args(fx, fx.p("st-truncated")), "--out", str(fx.dir / "m")],
         "cannot read safetensors file .*model-00002-of-00002.safetensors", "re-download the file", _out("m"),
         "damaged files"),
    Case("merge-truncated-bin", lambda fx: ["merge", *_base_args(fx, fx.p("bin-truncated")), "--out", str(fx.dir / "m")],
         "cannot read .*pytorch_model-00002-of-00002.bin", "re-download the file", _out("m"), "damaged files"),
    Case("tokenizer-corrupt-sentencepiece",
         lambda fx: ["tokenizer", "merge", "--llama-tokenizer", str(fx.p("corrupt.model")), "--chinese-sp",
                     str(fx.rel.tokenizers.chinese_sp), "--out", str(fx.dir / "tok")],
         "is not a readable sentencepiece model", "check that the file is complete", _out("tok"), "damaged files"),
    Case("tokenizer-not-sentencepiece",
         lambda fx: ["tokenizer", "merge", "--llama-tokenizer", str(fx.p("hf-fast-tokenizer")), "--chinese-sp",
                     str(fx.rel.tokenizers.chinese_sp), "--out", str(fx.dir / "tok")],
         "no sentencepiece model at", "pass the path of a tokenizer.model", _out("tok"), "damaged files"),
    Case("tokenizer-bpe-json-as-model",
         lambda fx: ["tokenizer", "merge", "--llama-tokenizer", str(fx.p("hf-fast-tokenizer/tokenizer.json")),
                     "--chinese-sp", str(fx.rel.tokenizers.chinese_sp), "--out", str(fx.dir / "tok")],
         "is not a readable sentencepiece model", "check that the file is complete", _out("tok"), "damaged files"),
    # --- user mistakes -----------------------------------------------------------------------------------
    Case("merge-lora-order-reversed", lambda fx: ["merge", *_base_args(fx, loras=("alpaca", "llama")),
                                                  "--out", str(fx.dir / "m")],
         "LoRA order looks reversed", "give the LLaMA.-Plus. LoRA first", _out("m")),
    Case("merge-alpaca-tokenizer-with-llama-lora",
         lambda fx: ["merge", *_base_args(fx, loras=("lora-alpaca-tok",)), "--out", str(fx.dir / "m")],
         "looks like the Chinese-Alpaca tokenizer", "put the tokenizer.model released with this LoRA", _out("m")),
    Case("merge-13b-lora-on-7b-base", lambda fx: ["merge", *_base_args(fx, loras=("lora-wide",)),
                                                  "--out", str(fx.dir / "m")],
         "was trained for hidden 320, but the base model has hidden 256", "use the matching LoRA", _out("m")),
    Case("convert-13b-lora-on-7b-base", lambda fx: ["convert", *_base_args(fx, loras=("lora-wide",)),
                                                    "--out", str(fx.dir / "m.gguf")],
         "was trained for hidden 320", "use the matching LoRA", _out("m.gguf")),
    Case("quantize-unknown-type",
         lambda fx: ["quantize", str(fx.f16), "--type", "q4_9", "--out-dir", str(fx.dir / "q")],
         "unknown quantization type 'q4_9'", "pick one of the listed types", _out("q")),
    Case("convert-unknown-outtype", lambda fx: ["convert", *_base_args(fx), "--outtype", "q4_0",
                                                "--out", str(fx.dir / "m.gguf")],
         "--outtype q4_0 is not a GGUF conversion type", "convert to f16 first", _out("m.gguf")),
    Case("convert-ggml-kquant", lambda fx: ["convert", str(fx.p("legacy.f16.gguf")), "--format", "ggml", "--outtype",
                                            "q4_K", "--out", str(fx.dir / "m.bin")],
         "--outtype q4_K is not available with --format ggml", "", _out("m.bin")),
    Case("convert-model-and-base", lambda fx: ["convert", str(fx.rel.base_hf), *_base_args(fx),
                                               "--out", str(fx.dir / "m.gguf")],
         "both MODEL_DIR and --base/--lora given", "give a model folder, or --base with --lora", _out("m.gguf")),
    Case("download-bad-sha256-option", lambda fx: ["download", str(fx.rel.llama_lora), "--out", str(fx.dir / "d"),
                                                   "--sha256", "adapter_model.bin=12ab"],
         "is not FILE=HEX", "", _out("d")),
    Case("download-unknown-hub-repo", lambda fx: ["download", "tester/no-such-lora", "--out", str(fx.dir / "d")],
         "hub repo tester/no-such-lora not found at", "check the spelling", _out("d")),
    Case("download-hub-error-echoing-token", lambda fx: ["download", "tester/broken", "--out", str(fx.dir / "d")],
         r"answered HTTP 500 for tester/broken@main \(.*Authorization: Bearer \*\*\*\)", "retry later",
         _out("d"), env=lambda fx: {"HF_ENDPOINT": fx.broken_hub_url}),
    # --- invalid BuildSpec fields, through the CLI parser (no build runs) --------------------------------
    Case("build-unknown-quant-type", lambda fx: ["build", "tiny-demo", "--quant", "q4_9", "--out", str(fx.dir / "b")],
         "invalid build spec: quant_types: .*unknown quantization type 'q4_9'", "see `zhllama build --help`",
         _out("b"), "build spec"),
    Case("build-quant-without-gguf", lambda fx: ["build", "tiny-demo", "--output", "hf", "--quant", "q4_0",
                                                 "--out", str(fx.dir / "b")],
         "quant_types needs 'gguf' in outputs", "see `zhllama build --help`", _out("b"), "build spec"),
    Case("build-unknown-model", lambda fx: ["build", "alpaca-plus-9b", "--out", str(fx.dir / "b")],
         "invalid build spec: .*unknown model 'alpaca-plus-9b'", "see `zhllama build --help`", _out("b"),
         "build spec"),
    Case("build-spec-unknown-field", lambda fx: ["build", "tiny-demo", "--spec", str(fx.p("spec-extra.json")),
                                                 "--out", str(fx.dir / "b")],
         "invalid build spec: quantize: Extra inputs are not permitted", "see `zhllama build --help`", _out("b"),
         "build spec"),
    Case("build-bad-ggml-type", lambda fx: ["build", "tiny-demo", "--output", "ggml", "--ggml-type", "q4_K",
                                            "--out", str(fx.dir / "b")],
         "unknown legacy GGML type 'q4_K'", "see `zhllama build --help`", _out("b"), "build spec"),
    # --- whole builds: what the user gets from `zhllama build` --------------------------------------------
    Case("build-out-is-the-base", lambda fx: ["build", "chain", *_base_args(fx, base=fx.p("base-copy")), "--no-prefect",
                                              "--no-eval", "--out", str(fx.p("base-copy"))],
         "the build folder \\(--out\\) .*base-copy", "choose", _fix("base-copy"), "builds"),
    Case("build-lora-order-reversed", lambda fx: ["build", "chain", *_base_args(fx, loras=("alpaca", "llama")),
                                                  "--no-prefect", "--no-eval", "--out", str(fx.dir / "b")],
         "LoRA order looks reversed", "give the LLaMA\\(-Plus\\) LoRA first", _out("b"), "builds"),
    Case("build-server-start-timeout", lambda fx: ["build", "tiny-demo", "--no-eval", "--out", str(fx.dir / "b")],
         "the Prefect server did not answer on .* within 0 s", "raise ZHLLAMA_SERVER_TIMEOUT", _out("b"), "builds",
         env=lambda fx: {"ZHLLAMA_SERVER_TIMEOUT": "0.001"}),
    # --- a nearly full disk: a real 2 MiB filesystem -------------------------------------------------------
    Case("full-disk-convert", lambda fx: ["convert", *_base_args(fx), "--out", str(fx.small / "m.gguf")],
         "not enough disk space for GGUF file m.gguf at .*: .* free", "free some space", lambda fx: fx.small / "m.gguf",
         "disk", needs_small_fs=True),
    Case("full-disk-merge", lambda fx: ["merge", *_base_args(fx), "--out", str(fx.small / "merged")],
         "not enough disk space for the merged model", "free some space", lambda fx: fx.small / "merged",
         "disk", needs_small_fs=True),
    Case("full-disk-quantize", lambda fx: ["quantize", str(fx.f16), "--type", "q8_0", "--out-dir",
                                           str(fx.small / "q")],
         "not enough disk space for 1 quantized file", "free some space", lambda fx: fx.small / "q" / "x",
         "disk", needs_small_fs=True),
    Case("full-disk-download", lambda fx: ["download", str(fx.p("base-copy")), "--out", str(fx.small / "d")],
         "not enough disk space for copying", "free some space", lambda fx: fx.small / "d" / "x",
         "disk", needs_small_fs=True),
    # --- the merge engine: fixed on helper A's branch (issue 11) -------------------------------------------
    Case("merge-nan-in-lora", lambda fx: ["merge", *_base_args(fx, loras=("llama", "lora-nan")), "--out",
                                          str(fx.dir / "m")],
         "(NaN|non-finite).*lora-nan|lora-nan.*(NaN|non-finite)", "", _out("m"), "merge engine"),
    Case("merge-lora-overflows-fp16", lambda fx: ["merge", *_base_args(fx, loras=("llama", "lora-huge")), "--out",
                                                  str(fx.dir / "m")],
         "(Inf|overflow|non-finite)", "", _out("m"), "merge engine"),
    Case("merge-same-lora-twice", lambda fx: ["merge", *_base_args(fx, loras=("llama", "llama")), "--out",
                                              str(fx.dir / "m")],
         "(twice|more than once|duplicate)", "", _out("m"), "merge engine"),
    Case("merge-alpaca-plus-without-tokenizer",
         lambda fx: ["merge", *_base_args(fx, loras=("llama", "alpaca-no-tok")), "--out", str(fx.dir / "m")],
         "tokenizer", "tokenizer", _out("m"), "merge engine"),
    Case("merge-gpt2-base", lambda fx: ["merge", *_base_args(fx, fx.p("gpt2-base")), "--out", str(fx.dir / "m")],
         "gpt2", "", _out("m"), "merge engine"),
    Case("merge-adapter-config-no-r", lambda fx: ["merge", *_base_args(fx, loras=("lora-no-r",)), "--out",
                                                  str(fx.dir / "m")],
         "adapter_config.json", "", _out("m"), "merge engine"),
    Case("merge-adapter-config-r-not-a-number", lambda fx: ["merge", *_base_args(fx, loras=("lora-r-text",)), "--out",
                                                            str(fx.dir / "m")],
         "adapter_config.json", "", _out("m"), "merge engine"),
    Case("merge-adapter-config-not-an-object", lambda fx: ["merge", *_base_args(fx, loras=("lora-cfg-list",)),
                                                           "--out", str(fx.dir / "m")],
         "adapter_config.json", "", _out("m"), "merge engine"),
    Case("merge-pickle-with-code", lambda fx: ["merge", *_base_args(fx, loras=("lora-pickle-code",)), "--out",
                                               str(fx.dir / "m")],
         "^(?!.*weights_only).*adapter_model.bin", "", _out("m"), "merge engine"),
    Case("merge-max-shard-size-lots", lambda fx: ["merge", *_base_args(fx), "--max-shard-size", "lots", "--out",
                                                  str(fx.dir / "m")],
         "--max-shard-size", "", _out("m"), "merge engine"),
]

# --------------------------------------------------------------------------------------------- fixtures


def _tar(path: Path, entries: list) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                info = tarfile.TarInfo(e[0])
                info.size = len(e[1])
                tf.addfile(info, io.BytesIO(e[1]))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _lora_variant(src: Path, dst: Path, *, tensors=None, config=None, weights: bytes | None = None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        sd = torch.load(dst / "adapter_model.bin", weights_only=True)
        tensors(sd)
        torch.save(sd, dst / "adapter_model.bin")
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps(config(cfg)))
    if weights is not None:
        (dst / "adapter_model.bin").write_bytes(weights)
    return dst


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/zhllama-pwned",))


def _make_fixtures(root: Path, rel) -> None:
    from pipeline_lib import synthetic
    from pipeline_lib.gguf_export import convert
    from pipeline_lib.merge import plan_merge

    cfg = rel.config
    # copies that cases may try (and must fail) to overwrite
    shutil.copytree(rel.base_hf, root / "base-copy")
    shutil.copytree(rel.base_hf, root / "models" / "base")
    shutil.copytree(rel.tokenizers.llama_model.parent, root / "tok-copy")
    # float GGUFs: the Alpaca-Plus one, and one whose ffn fits ggjt v3
    convert(plan_merge(rel.base_hf, [rel.llama_lora, rel.alpaca_lora]), out=root / "alpaca-plus.f16.gguf")
    lcfg = replace(cfg, vocab_size=rel.alpaca_vocab, intermediate_size=768)
    legacy = synthetic.save_hf_base(synthetic.random_weights(lcfg, seed=14), lcfg, root / "legacy",
                                    tokenizer_dir=rel.tokenizers.chinese_alpaca_dir, shards=1)
    convert(legacy, out=root / "legacy.f16.gguf")
    data = (root / "alpaca-plus.f16.gguf").read_bytes()
    _write(root / "truncated.gguf", data[: len(data) // 2])
    _write(root / "header.gguf", data[:24])
    _write(root / "garbage.gguf", b"\x89PNG\r\n\x1a\n" + b"\0" * 200)
    _write(root / "old.bin", b"ggjt\x03\0\0\0" + b"\0" * 200)
    _write(root / "empty.gguf", b"")
    import gguf

    shutil.copy(root / "alpaca-plus.f16.gguf", root / "nan.f16.gguf")
    r = gguf.GGUFReader(root / "nan.f16.gguf", "r+")
    t = next(t for t in r.tensors if t.name == "blk.1.ffn_up.weight")
    t.data[3, 5] = np.nan
    r.data.flush()
    del r, t
    # damaged checkpoints and tokenizers
    st = synthetic.save_hf_base(synthetic.random_weights(cfg, seed=3), cfg, root / "st-truncated",
                                tokenizer_dir=rel.tokenizers.llama_model.parent, shards=2, safetensors=True)
    shard = sorted(st.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-5000])
    shutil.copytree(rel.base_hf, root / "bin-truncated")
    shard = root / "bin-truncated" / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _write(root / "corrupt.model", rel.tokenizers.llama_model.read_bytes()[:300])
    _write(root / "hf-fast-tokenizer" / "tokenizer.json", json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    # LoRA variants
    _lora_variant(rel.llama_lora, root / "lora-alpaca-tok")
    shutil.copy(rel.tokenizers.chinese_alpaca_dir / "tokenizer.model", root / "lora-alpaca-tok" / "tokenizer.model")
    wcfg = replace(cfg, hidden_size=320, num_attention_heads=4, num_key_value_heads=4)
    spec = synthetic.LoraSpec(r=8, alpha=32.0, seed=5)
    synthetic.save_lora(synthetic.lora_tensors(wcfg, spec, vocab_size=rel.llama_vocab), spec, root / "lora-wide",
                        tokenizer_dir=rel.tokenizers.chinese_llama_dir)

    def nan(sd):
        k = next(k for k in sd if k.endswith("q_proj.lora_B.weight"))
        sd[k][0, 0] = float("nan")

    def huge(sd):
        k = next(k for k in sd if k.endswith("q_proj.lora_B.weight"))
        sd[k].fill_(60000.0)  # finite in fp16, the merged weight overflows

    _lora_variant(rel.alpaca_lora, root / "lora-nan", tensors=nan)
    _lora_variant(rel.alpaca_lora, root / "lora-huge", tensors=huge)
    _lora_variant(rel.alpaca_lora, root / "alpaca-no-tok")
    (root / "alpaca-no-tok" / "tokenizer.model").unlink()
    _lora_variant(rel.llama_lora, root / "lora-no-r", config=lambda c: {k: v for k, v in c.items() if k != "r"})
    _lora_variant(rel.llama_lora, root / "lora-r-text", config=lambda c: {**c, "r": "eight"})
    _lora_variant(rel.llama_lora, root / "lora-cfg-list", config=lambda c: [c])
    buf = io.BytesIO()
    torch.save({"x": _Evil()}, buf)
    _lora_variant(rel.llama_lora, root / "lora-pickle-code", weights=buf.getvalue())
    shutil.copytree(rel.base_hf, root / "gpt2-base")
    c = json.loads((root / "gpt2-base" / "config.json").read_text())
    (root / "gpt2-base" / "config.json").write_text(json.dumps({**c, "model_type": "gpt2",
                                                                "architectures": ["GPT2LMHeadModel"]}))
    # hostile archives
    secret = root / "X"
    secret.write_text("private")
    _tar(root / "chain.tar.gz", [("ok.txt", b"1"), _link("a", "."), _link("b", "a/a/../../X")])
    with zipfile.ZipFile(root / "slip.zip", "w") as zf:
        zf.writestr("ok.txt", b"1")
        zf.writestr("../evil.txt", b"2")
    _tar(root / "abs.tar.gz", [("ok.txt", b"1"), _link("etc", "/etc")])
    _tar(root / "over.tar.gz", [("d/x", b"1"), ("e/y", b"2"), _link("d", "e")])
    _tar(root / "dev.tar.gz", [("ok.txt", b"1"), _link("null", "", tarfile.CHRTYPE)])
    (root / "spec-extra.json").write_text(json.dumps({"model": "tiny-demo", "quantize": ["q4_0"]}))


def _mount_small(path: Path) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def fx(tiny_release, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    _make_fixtures(root, tiny_release)
    small = root / "small"
    mounted = _mount_small(small)
    with FakeHub({"tester/broken": {"adapter_config.json": b"{}"}}, echo_auth=True) as broken, \
            FakeHub({}, echo_auth=True) as plain:
        broken.fail_api(status=500, times=None)  # every API call answers 500 and echoes the token
        runner = Runner(root / "runs")
        yield Fx(root=root, rel=tiny_release, f16=root / "alpaca-plus.f16.gguf", hub_url=plain.url,
                 broken_hub_url=broken.url, small=small if mounted else None, runner=runner)
        runner.close()
    if mounted:
        subprocess.run(["umount", "-l", str(small)], capture_output=True)


def _state(path: Path) -> dict[str, bytes] | None:
    """What is at ``path`` (None: nothing), compared before and after a case."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {p.relative_to(path).as_posix(): (p.read_bytes() if p.is_file() else b"<dir>")
            for p in sorted(path.rglob("*"))}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(reason=c.xfail, strict=True)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(fx, tmp_path, case):
    if case.needs_small_fs and fx.small is None:
        pytest.skip("cannot mount a 2 MiB tmpfs here (needs root); the full-disk library case in "
                    "tests/test_fsutil.py tries a loop-mounted image too")
    fx.dir = tmp_path
    if case.prepare:
        case.prepare(fx)
    out = case.out(fx)
    before = _state(out)
    env = {"HF_TOKEN": TOKEN, "ZHLLAMA_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": fx.hub_url, **case.env(fx)}
    run = fx.runner.run(case.argv(fx), env=env)
    err = run.stderr
    print(err)
    assert run.rc not in (0, -9), f"exit {run.rc}"
    assert "Traceback" not in err and "Traceback" not in run.stdout
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, f"expected one error line, got {lines}"
    assert re.search(case.prints, lines[0]), f"{case.prints!r} not in {lines[0]!r}"
    fix_lines = [line for line in err.splitlines() if line.strip().startswith("what to do:")]
    if case.fix:
        assert fix_lines and re.search(case.fix, fix_lines[0]), f"fix {case.fix!r} not in {fix_lines}"
    assert TOKEN not in err and TOKEN not in run.stdout
    assert _state(out) == before, f"{out} changed"
    parent = out.parent
    assert not [p.name for p in parent.iterdir() if p.name.startswith(".tmp-")] if parent.is_dir() else True
    assert not Path("/tmp/zhllama-pwned").exists()
    assert (fx.p("X").read_text() == "private")


# --------------------------------------------------------------------------------------------- the doc

DOC_BEGIN = "<!-- bad-input cases: generated from tests/test_bad_inputs.py; do not edit by hand -->"
DOC_END = "<!-- end of bad-input cases -->"


def _shown(case: Case) -> str:
    """The case's command line with fixture paths replaced by readable names."""
    fake_root, fake_dir, fake_small = Path("/FIX"), Path("/OUT"), Path("/SMALL")
    rel = type("Rel", (), {})()
    rel.base_hf, rel.llama_lora, rel.alpaca_lora = fake_root / "llama-base", fake_root / "llama-plus-lora", \
        fake_root / "alpaca-plus-lora"
    rel.tokenizers = type("T", (), {"chinese_sp": fake_root / "chinese_sp.model",
                                    "llama_model": fake_root / "llama-tokenizer/tokenizer.model"})()
    f = Fx(root=fake_root, rel=rel, f16=fake_root / "alpaca-plus.f16.gguf", hub_url="HUB", broken_hub_url="HUB",
           small=fake_small, dir=fake_dir)
    text = " ".join(case.argv(f))
    return "zhllama " + text.replace("/FIX/", "").replace("/OUT/", "").replace("/SMALL/", "small-fs/")


def render_table() -> str:
    rows = ["| group | case | command | `error:` line says | `what to do:` says | status |",
            "|---|---|---|---|---|---|"]
    for c in CASES:
        def cell(s: str) -> str:
            return s.replace("|", "\\|") if s else "—"
        status = f"strict xfail: {c.xfail}" if c.xfail else "passes"
        rows.append(f"| {c.group} | `{c.id}` | `{_shown(c)}` | `{cell(c.prints)}` | `{cell(c.fix)}` | {status} |")
    return "\n".join(rows)


def test_doc_table_matches_cases():
    text = DOC.read_text(encoding="utf-8")
    table = render_table()
    if os.environ.get("ZHLLAMA_WRITE_DOCS") == "1":
        head, _, rest = text.partition(DOC_BEGIN)
        _, _, tail = rest.partition(DOC_END)
        DOC.write_text(f"{head}{DOC_BEGIN}\n{table}\n{DOC_END}{tail}", encoding="utf-8")
        text = DOC.read_text(encoding="utf-8")
    assert DOC_BEGIN in text and DOC_END in text
    assert text.split(DOC_BEGIN)[1].split(DOC_END)[0].strip() == table, \
        "docs/reliability.md is out of date: run ZHLLAMA_WRITE_DOCS=1 pytest tests/test_bad_inputs.py -k doc"
    n = sum(1 for c in CASES if not c.xfail)
    assert f"{len(CASES)} cases" in text and f"{n} pass" in text


def test_case_ids_unique():
    assert len({c.id for c in CASES}) == len(CASES)

