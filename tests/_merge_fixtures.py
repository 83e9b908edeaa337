"""Helpers for the merge tests: the real PEFT reference merge, and LoRA variants built from the tiny release."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from pipeline_lib.lora import load_adapter


def peft_merge(base: Path, loras: list[Path], *, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What a user gets from transformers + PEFT: load the base in ``dtype``, then for each LoRA resize the
    embeddings to its vocabulary, ``PeftModel.from_pretrained`` and ``merge_and_unload``.

    PEFT 0.21 accepts the 2023 config keys ``enable_lora``/``merge_weights`` (it warns and ignores them),
    so the release's adapter_config.json is used as is.
    """
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(base), dtype=dtype)
    for lora in loras:
        rows = load_adapter(lora).embed_rows()
        if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(rows, mean_resizing=False)
        model = PeftModel.from_pretrained(model, str(lora)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "rotary_emb" not in k}


def copy_lora(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
