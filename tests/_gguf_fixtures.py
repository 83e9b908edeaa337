"""Helpers for the GGUF/GGML/quantize tests: llama.cpp's reference scripts, a small TensorSource, tiny models.

The reference is llama-cpp-python 0.3.36's sdist (it vendors llama.cpp's convert_hf_to_gguf.py,
its ``conversion`` package, convert_llama_ggml_to_gguf.py and gguf-py). It is found under
``$ZHLLAMA_REFERENCE_DIR`` (default ~/.cache/zhllama-reference), downloaded there with pip when
missing, and the scripts we need are extracted once into a folder of their own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pipeline_lib import names
from pipeline_lib.fsutil import atomic_dir

REFERENCE_VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{REFERENCE_VERSION}"
# the members of the sdist the tests run (relative to vendor/llama.cpp/)
REFERENCE_MEMBERS = ("convert_hf_to_gguf.py", "convert_llama_ggml_to_gguf.py", "conversion/", "gguf-py/")


def reference_root() -> Path:
    return Path(os.environ.get("ZHLLAMA_REFERENCE_DIR", Path.home() / ".cache" / "zhllama-reference"))


def _extract(tarball: Path, dest: Path) -> None:
    prefix = f"{SDIST}/vendor/llama.cpp/"
    with atomic_dir(dest, replace=True) as tmp, tarfile.open(tarball) as tar:
        for m in tar.getmembers():
            if not m.name.startswith(prefix):
                continue
            rel = m.name[len(prefix):]
            if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in REFERENCE_MEMBERS):
                continue
            if not (m.isfile() or m.isdir()) or ".." in Path(rel).parts:
                continue  # no links, no path escapes
            target = tmp / rel
            if m.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src:
                target.write_bytes(src.read())


def reference_llama_cpp() -> Path:
    """Folder holding llama.cpp's reference converters (extracted from the sdist); skip if it cannot be had."""
    root = reference_root()
    dest = root / f"llama.cpp-{REFERENCE_VERSION}-scripts"
    if (dest / "conversion" / "__init__.py").is_file() and (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    tarball = root / f"{SDIST}.tar.gz"
    if not tarball.is_file():
        root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={REFERENCE_VERSION}", "-d", str(root)],
            capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0 or not tarball.is_file():
            pytest.skip(f"llama.cpp reference converter unavailable: cannot download {SDIST} sdist "
                        f"into {root} (pip: {proc.stderr.strip()[-300:]}); set ZHLLAMA_REFERENCE_DIR "
                        f"to a folder holding {SDIST}.tar.gz")
    _extract(tarball, dest)
    return dest


def run_reference(script: str, args: list[str], *, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of llama.cpp's scripts with its own gguf-py first on the path."""
    ref = reference_llama_cpp()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = str(ref / "gguf-py")
    proc = subprocess.run([sys.executable, str(ref / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


# convert_llama_ggml_to_gguf.py of this llama.cpp passes each tensor's element shape as raw_shape
# together with its raw uint8 bytes, and this gguf-py's writer reads a uint8 array's shape as a
# *byte* shape: every tensor comes out with a shorter row (f16: half) and the script fails on
# quantized types. The runner below corrects only that: it turns the element shape into the byte
# shape the writer expects before the writer turns it back. Everything else is llama.cpp's code.
_GGML_TO_GGUF_RUNNER = """
import runpy, sys
import numpy as np
import gguf
_orig = gguf.GGUFWriter.add_tensor
def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None, tensor_endianess=None):
    if raw_shape is not None and raw_dtype is not None and tensor.dtype == np.uint8:
        raw_shape = gguf.quant_shape_to_byte_shape(raw_shape, raw_dtype)
    return _orig(self, name, tensor, raw_shape=raw_shape, raw_dtype=raw_dtype, tensor_endianess=tensor_endianess)
gguf.GGUFWriter.add_tensor = add_tensor
script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def reference_ggml_to_gguf(ggml: Path, out: Path, *, eps: float, n_ctx: int) -> Path:
    """Read a ggjt file back with llama.cpp's convert_llama_ggml_to_gguf.py (shape fix above)."""
    ref = reference_llama_cpp()
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = str(ref / "gguf-py")
    args = [sys.executable, "-c", _GGML_TO_GGUF_RUNNER, str(ref / "convert_llama_ggml_to_gguf.py"),
            "-i", str(ggml), "-o", str(out), "--eps", repr(eps), "-c", str(n_ctx)]
    proc = subprocess.run(args, cwd=out.parent, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"convert_llama_ggml_to_gguf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return out


def reference_convert(model_dir: Path, out: Path, *, outtype: str = "f16") -> Path:
    run_reference("convert_hf_to_gguf.py", [str(model_dir), "--outfile", str(out), "--outtype", outtype],
                  cwd=out.parent)
    return out


# ------------------------------------------------------------------ a small TensorSource


@dataclass(frozen=True)
class Info:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class DictSource:
    """A TensorSource over tensors held in a dict (the tests' stand-in for a checkpoint)."""

    def __init__(self, config: dict, tokenizer_dir: Path | None, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.tokenizer_dir = tokenizer_dir
        self._tensors = tensors

    def tensor_infos(self):
        return [Info(n, tuple(t.shape), t.dtype) for n, t in self._tensors.items() if not names.is_ignored(n)]

    def iter_tensors(self):
        for n, t in self._tensors.items():
            if not names.is_ignored(n):
                yield n, t


def hf_folder_source(folder: Path) -> DictSource:
    """Read a small HF folder fully into a DictSource (tests only; the library streams)."""
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("pytorch_model*.bin")):
        tensors.update(torch.load(f, map_location="cpu", weights_only=True))
    for f in sorted(folder.glob("*.safetensors")):
        from safetensors.torch import load_file

        tensors.update(load_file(f))
    return DictSource(config, folder, tensors)


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape), bytes(t.data.tobytes())) for t in r.tensors}


def gguf_fields(path: Path) -> dict[str, object]:
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        v = f.contents()
        out[k] = ([t.name for t in f.types], v)
    return out


# ------------------------------------------------------------------ tiny models and llama.cpp helpers


@dataclass(frozen=True)
class GgufModels:
    base: Path  # LLaMA tokenizer (vocab 400), .bin shards with inv_freq buffers
    alpaca: Path  # merged Chinese-Alpaca tokenizer ([PAD] inside tokenizer.model), safetensors
    added: Path  # Chinese-LLaMA tokenizer.model + added_tokens.json {"[PAD]": n} (the 2023 release's layout)
    gqa: Path  # 2 kv heads for 4 heads: k is permuted with the kv head count
    legacy: Path  # ffn 768 = ceil(8*256/3 / 256) * 256: expressible in ggjt v3 (n_mult 256)
    merged: Path  # base + LLaMA-Plus LoRA + Alpaca-Plus LoRA, merged to an HF folder by `merge`
    old_config: Path  # the base with a 2023 config.json (no rope_theta, num_key_value_heads, torch_dtype)
    release: object


@pytest.fixture(scope="session")
def gguf_models(tiny_release, tmp_path_factory) -> GgufModels:
    from dataclasses import replace

    from pipeline_lib import synthetic
    from pipeline_lib.merge import merge

    root = tmp_path_factory.mktemp("gguf-models")
    rel = tiny_release
    toks = rel.tokenizers
    cfg = replace(rel.config, vocab_size=rel.alpaca_vocab)
    alpaca = synthetic.save_hf_base(synthetic.random_weights(cfg, seed=11), cfg, root / "alpaca",
                                    tokenizer_dir=toks.chinese_alpaca_dir, shards=2, safetensors=True)
    cfg_added = replace(rel.config, vocab_size=rel.llama_vocab + 1)
    added = synthetic.save_hf_base(synthetic.random_weights(cfg_added, seed=12), cfg_added, root / "added",
                                   tokenizer_dir=toks.chinese_llama_dir, shards=1)
    (added / "added_tokens.json").write_text(json.dumps({"[PAD]": rel.llama_vocab}))
    cfg_gqa = replace(rel.config, num_key_value_heads=2)
    gqa = synthetic.save_hf_base(synthetic.random_weights(cfg_gqa, seed=13), cfg_gqa, root / "gqa",
                                 tokenizer_dir=toks.llama_model.parent, shards=1)
    cfg_legacy = replace(rel.config, vocab_size=rel.alpaca_vocab, intermediate_size=768)
    legacy = synthetic.save_hf_base(synthetic.random_weights(cfg_legacy, seed=14), cfg_legacy, root / "legacy",
                                    tokenizer_dir=toks.chinese_alpaca_dir, shards=1)
    merged = merge(rel.base_hf, [rel.llama_lora, rel.alpaca_lora], out=root / "merged").out
    import shutil

    old = Path(shutil.copytree(rel.base_hf, root / "old-config"))
    config = json.loads((old / "config.json").read_text())
    for key in ("rope_theta", "num_key_value_heads", "torch_dtype"):
        config.pop(key)
    (old / "config.json").write_text(json.dumps(config, indent=2))
    return GgufModels(base=rel.base_hf, alpaca=alpaca, added=added, gqa=gqa, legacy=legacy, merged=merged,
                      old_config=old, release=rel)


def llama_logits(model: Path, tokens: list[int]):
    """Logits of every position, from llama.cpp (llama-cpp-python), one thread for determinism."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=1, n_batch=64)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


def gguf_name(path: Path) -> str:
    import gguf

    return gguf.GGUFReader(path).fields["general.name"].contents()
