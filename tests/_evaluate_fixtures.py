"""Tiny GGUF models for the evaluation and chat tests.

Converted with our own converter (pipeline_lib.gguf_export / quantize) when it exists, otherwise
with llama.cpp's reference ``convert_hf_to_gguf.py`` from the llama-cpp-python 0.3.36 sdist (run in
a subprocess with its own gguf-py) and ``llama_cpp.llama_model_quantize``. Weights are random: the
tests check arithmetic and plumbing, not language quality.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

SDIST = "llama_cpp_python-0.3.36"
NEEDED = ("vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/conversion/", "vendor/llama.cpp/gguf-py/")


def reference_tarball() -> Path:
    """The llama-cpp-python sdist, downloaded with pip into $ZHLLAMA_REFERENCE_DIR when missing."""
    root = Path(os.environ.get("ZHLLAMA_REFERENCE_DIR", Path.home() / ".cache" / "zhllama-reference"))
    tarball = root / f"{SDIST}.tar.gz"
    if not tarball.is_file():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        "llama-cpp-python==0.3.36", "-d", str(root)], check=True)
    return tarball


def extract_converter(dest: Path) -> Path:
    """Extract llama.cpp's HF converter (+ its conversion package and gguf-py) under ``dest``."""
    with tarfile.open(reference_tarball()) as tf:
        members = [m for m in tf.getmembers()
                   if any(m.name.startswith(f"{SDIST}/{n}") for n in NEEDED) and (m.isfile() or m.isdir())]
        tf.extractall(dest, members=members, filter="data")
    return dest / SDIST / "vendor" / "llama.cpp"


def _ours(module: str, attr: str):
    try:
        mod = importlib.import_module(f"pipeline_lib.{module}")
    except ImportError:
        return None
    return getattr(mod, attr, None)


def convert_to_gguf(hf_dir: Path, out: Path, *, tools) -> Path:
    """Our converter when present; else llama.cpp's reference script (``tools()`` gives its folder)."""
    convert = _ours("gguf_export", "convert")
    if convert is not None:
        convert(hf_dir, out=out, outtype="f16")
        return out
    tools = tools()
    env = dict(os.environ, PYTHONPATH=str(tools / "gguf-py"), NO_LOCAL_GGUF="")
    subprocess.run([sys.executable, str(tools / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(out),
                    "--outtype", "f16"], check=True, env=env, capture_output=True)
    return out


def quantize_gguf(src: Path, qtype: str, out_dir: Path) -> Path:
    quantize = _ours("quantize", "quantize")
    if quantize is not None:
        res = quantize(src, qtypes=[qtype], out_dir=out_dir)
        return next(Path(o.path) for o in res.outputs if o.qtype.lower() == qtype.lower())
    import llama_cpp

    out = out_dir / f"{src.stem.replace('f16', qtype)}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")
    return out


@dataclass(frozen=True)
class EvalModels:
    alpaca_f16: Path  # merged Alpaca-style vocabulary with [PAD] -> Alpaca template
    alpaca_q8_0: Path
    alpaca_q4_0: Path
    llama_f16: Path  # LLaMA-style vocabulary, no [PAD] -> plain continuation
    alpaca_tokenizer: Path
    llama_tokenizer: Path


@pytest.fixture(scope="session")
def eval_models(tmp_path_factory, tiny_release) -> EvalModels:
    from pipeline_lib.synthetic import random_weights, save_hf_base

    root = tmp_path_factory.mktemp("eval-models")
    extracted: list[Path] = []

    def tools() -> Path:  # extracted only if our converter is missing
        if not extracted:
            extracted.append(extract_converter(root / "reference"))
        return extracted[0]

    toks = tiny_release.tokenizers
    cfg = replace(tiny_release.config, vocab_size=tiny_release.alpaca_vocab)
    alpaca_hf = save_hf_base(random_weights(cfg, seed=11), cfg, root / "alpaca-hf",
                             tokenizer_dir=toks.chinese_alpaca_dir, shards=1, safetensors=True)
    a16 = convert_to_gguf(alpaca_hf, root / "tiny-alpaca-f16.gguf", tools=tools)
    l16 = convert_to_gguf(tiny_release.base_hf, root / "tiny-llama-f16.gguf", tools=tools)
    return EvalModels(alpaca_f16=a16, alpaca_q8_0=quantize_gguf(a16, "q8_0", root),
                      alpaca_q4_0=quantize_gguf(a16, "q4_0", root), llama_f16=l16,
                      alpaca_tokenizer=toks.chinese_alpaca_dir / "tokenizer.model",
                      llama_tokenizer=toks.llama_model)


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """File names of the GGUFs llama.cpp opens with their weights during the test (vocabulary-only
    opens are not loads): llama_cpp.Llama wrapped, the real class still does the work."""
    import llama_cpp

    loads: list[str] = []
    real = llama_cpp.Llama

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            if not kwargs.get("vocab_only"):
                loads.append(Path(kwargs.get("model_path") or args[0]).name)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", Recording)
    return loads
