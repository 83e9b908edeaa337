"""Bad inputs to the merge engine (issue 12, the merge items), through the CLI as a user meets them.

Every case: non-zero exit, exactly one line starting with ``error:`` (the first), naming the cause, a
``what to do:`` line, no traceback, and nothing written at the output (no temporary leftovers either).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline_lib.synthetic import LoraSpec, lora_tensors, save_lora


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _edit_adapter(lora: Path, edit) -> Path:
    sd = torch.load(lora / "adapter_model.bin", weights_only=True)
    edit(sd)
    torch.save(sd, lora / "adapter_model.bin")
    return lora


def _first_b(sd: dict) -> str:
    return next(k for k in sd if ".lora_B." in k)


def _nan_lora(rel, tmp: Path) -> list[str]:
    def poison(sd):
        sd[_first_b(sd)][0, 0] = float("nan")
    return ["--lora", str(_edit_adapter(_copy(rel.llama_lora, tmp / "nan-lora"), poison))]


def _overflow_lora(rel, tmp: Path) -> list[str]:
    def blow_up(sd):  # finite fp16 values whose product overflows fp16 once added to the base
        b = _first_b(sd)
        a = b.replace(".lora_B.", ".lora_A.")
        sd[a][0, :] = 200.0
        sd[b][:, 0] = 300.0
    return ["--lora", str(_edit_adapter(_copy(rel.llama_lora, tmp / "huge-lora"), blow_up))]


def _same_path_twice(rel, tmp: Path) -> list[str]:
    return ["--lora", str(rel.llama_lora), "--lora", str(rel.llama_lora)]


def _same_content_twice(rel, tmp: Path) -> list[str]:
    return ["--lora", str(rel.llama_lora), "--lora", str(_copy(rel.llama_lora, tmp / "copy-of-llama-lora"))]


def _alpaca_without_tokenizer(rel, tmp: Path) -> list[str]:
    alpaca = _copy(rel.alpaca_lora, tmp / "alpaca-no-tokenizer")
    (alpaca / "tokenizer.model").unlink()
    return ["--lora", str(rel.llama_lora), "--lora", str(alpaca)]


def _base_with_config(rel, tmp: Path, **changes) -> Path:
    base = _copy(rel.base_hf, tmp / "base")
    cfg = json.loads((base / "config.json").read_text())
    cfg.update(changes)
    (base / "config.json").write_text(json.dumps(cfg))
    return base


def _adapter_config(rel, tmp: Path, text: str) -> list[str]:
    lora = _copy(rel.llama_lora, tmp / "bad-config-lora")
    (lora / "adapter_config.json").write_text(text)
    return ["--lora", str(lora)]


def _config_without(key: str):
    def make(rel, tmp: Path) -> list[str]:
        cfg = json.loads((rel.llama_lora / "adapter_config.json").read_text())
        del cfg[key]
        return _adapter_config(rel, tmp, json.dumps(cfg))
    return make


def _config_with(**changes):
    def make(rel, tmp: Path) -> list[str]:
        cfg = json.loads((rel.llama_lora / "adapter_config.json").read_text()) | changes
        return _adapter_config(rel, tmp, json.dumps(cfg))
    return make


class _Code:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _pickled_code(rel, tmp: Path) -> list[str]:
    lora = _copy(rel.llama_lora, tmp / "code-lora")
    (lora / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Code()}, protocol=2))
    return ["--lora", str(lora)]


def _torch_saved_code(rel, tmp: Path) -> list[str]:
    lora = _copy(rel.llama_lora, tmp / "code-lora")
    torch.save({"x": _Code()}, lora / "adapter_model.bin")  # the zip format, as a hostile upload would be
    return ["--lora", str(lora)]


def _matches_nothing(rel, tmp: Path) -> list[str]:
    def rename(sd):
        for k in list(sd):
            sd[k.replace("base_model.model.", "transformer.")] = sd.pop(k)
    return ["--lora", str(_edit_adapter(_copy(rel.llama_lora, tmp / "foreign-lora"), rename))]


def _changes_nothing(rel, tmp: Path) -> list[str]:
    spec = LoraSpec(r=4, alpha=8.0, seed=9, full_weights=())
    tensors = {k: torch.zeros_like(v) if ".lora_B." in k else v
               for k, v in lora_tensors(rel.config, spec, vocab_size=rel.config.vocab_size).items()}
    return ["--lora", str(save_lora(tensors, spec, tmp / "untrained-lora"))]


@dataclass(frozen=True)
class Case:
    id: str
    make: object  # (rel, tmp) -> extra argv (LoRA arguments), or a full argv builder
    match: str  # must appear in the error line (the cause)
    base: object = None  # (rel, tmp) -> base folder, default the tiny release's
    extra: tuple[str, ...] = ()
    command: str = "merge"


CASES = [
    Case("nan-in-lora", _nan_lora, "holds non-finite values: its update of model.layers.0"),
    Case("finite-lora-overflows-fp16", _overflow_lora, "overflows float16"),
    Case("same-lora-twice-by-path", _same_path_twice, "is given twice"),
    Case("same-lora-twice-by-content", _same_content_twice, "is the same adapter as LoRA chinese-llama-plus-lora"),
    Case("alpaca-folder-without-tokenizer", _alpaca_without_tokenizer, "but the merged vocabulary has"),
    Case("base-config-gpt2", lambda rel, tmp: ["--lora", str(rel.llama_lora)], "describes a 'gpt2' model, not LLaMA",
         base=lambda rel, tmp: _base_with_config(rel, tmp, model_type="gpt2")),
    Case("base-architectures-not-llama", lambda rel, tmp: ["--lora", str(rel.llama_lora)],
         "describes architectures ['GPT2LMHeadModel']",
         base=lambda rel, tmp: _base_with_config(rel, tmp, architectures=["GPT2LMHeadModel"])),
    Case("adapter-config-not-an-object", lambda rel, tmp: _adapter_config(rel, tmp, "[8, 32]"),
         "holds a JSON list, not an object"),
    Case("adapter-config-missing-r", _config_without("r"), "the LoRA rank r is missing"),
    Case("adapter-config-non-numeric-r", _config_with(r="eight"), "the LoRA rank r is 'eight'"),
    Case("adapter-config-missing-alpha", _config_without("lora_alpha"), "lora_alpha is missing"),
    Case("adapter-config-non-numeric-alpha", _config_with(lora_alpha="a lot"), "lora_alpha is 'a lot'"),
    Case("adapter-config-bad-target-modules", _config_with(target_modules=7), "target_modules is 7"),
    Case("pickle-with-code", _pickled_code, "is refused as unsafe: its pickle holds code or objects other than "
         "tensors (GLOBAL "),
    Case("torch-save-with-code", _torch_saved_code, "refused as unsafe: its pickle holds code or objects other than "
         "tensors (GLOBAL "),
    Case("max-shard-size-lots", lambda rel, tmp: ["--lora", str(rel.llama_lora)], "--max-shard-size 'lots' is not a size",
         extra=("--max-shard-size", "lots")),
    Case("lora-matching-nothing", _matches_nothing, "tensors of LoRA foreign-lora matches a tensor of the base"),
    Case("lora-changing-nothing", _changes_nothing, "LoRA untrained-lora changed nothing"),
    Case("convert-nan-in-lora", _nan_lora, "holds non-finite values", command="convert"),
    Case("convert-same-lora-twice", _same_content_twice, "is the same adapter", command="convert"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line_and_nothing_written(rel, tmp_path, capsys, case):
    from flows.cli.main import main

    work = tmp_path / "inputs"
    work.mkdir()
    lora_args = case.make(rel, work)
    base = case.base(rel, work) if case.base else rel.base_hf
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    out = outdir / ("merged" if case.command == "merge" else "merged.gguf")
    argv = [case.command, "--base", str(base), *lora_args, "--out", str(out), *case.extra]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and err.startswith("error:"), err
    assert case.match in error_lines[0], err
    assert "what to do:" in err, err
    assert "weights_only" not in err  # never torch's advice to unpickle unsafely
    assert list(outdir.iterdir()) == [], "something was written at the output"
