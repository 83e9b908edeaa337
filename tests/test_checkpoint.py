"""Checkpoint readers: HF .bin / safetensors shards and Meta consolidated parts give the same HF tensors."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline_lib import names
from pipeline_lib.checkpoint import Checkpoint, TensorInfo, TensorSource, open_checkpoint
from pipeline_lib.errors import InputError
from pipeline_lib.synthetic import TinyConfig, random_weights, save_hf_base, save_meta_base


@pytest.fixture(scope="module")
def tiny():
    cfg = TinyConfig(vocab_size=400, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    return cfg, random_weights(cfg, seed=3)


def _assert_same(ckpt: Checkpoint, weights: dict[str, torch.Tensor]) -> None:
    infos = ckpt.tensor_infos()
    assert [i.name for i in infos] == list(weights)  # canonical order, buffers left out
    streamed = list(ckpt.iter_tensors())
    assert [n for n, _ in streamed] == [i.name for i in infos]
    for info, (name, t) in zip(infos, streamed, strict=True):
        assert info == TensorInfo(name, tuple(t.shape), t.dtype)
        assert torch.equal(t, weights[name]), name


def test_hf_bin_shards(tmp_path, tiny):
    cfg, w = tiny
    ckpt = open_checkpoint(save_hf_base(w, cfg, tmp_path / "hf", shards=3))
    assert ckpt.format == "hf-bin" and isinstance(ckpt, TensorSource)
    assert not any("inv_freq" in i.name for i in ckpt.tensor_infos())
    assert ckpt.config["vocab_size"] == 400
    _assert_same(ckpt, w)
    # random access twice: dropping mapped pages must not corrupt later reads
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(ckpt.load(name), ckpt.load(name))


def test_hf_bin_without_index(tmp_path, tiny):
    cfg, w = tiny
    folder = save_hf_base(w, cfg, tmp_path / "hf", shards=1)
    (folder / "pytorch_model.bin.index.json").unlink()
    _assert_same(open_checkpoint(folder), w)


def test_safetensors_shards(tmp_path, tiny):
    cfg, w = tiny
    ckpt = open_checkpoint(save_hf_base(w, cfg, tmp_path / "st", shards=2, safetensors=True))
    assert ckpt.format == "hf-safetensors"
    _assert_same(ckpt, w)


@pytest.mark.parametrize("parts", [1, 2, 4])
def test_meta_parts_join_and_permute(tmp_path, tiny, parts):
    cfg, w = tiny
    ckpt = open_checkpoint(save_meta_base(w, cfg, tmp_path / f"meta{parts}", parts=parts))
    assert ckpt.format == "meta"
    assert not any("freqs" in i.name for i in ckpt.tensor_infos())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert ckpt.config[key] == cfg.hf_config()[key], key
    _assert_same(ckpt, w)


def test_meta_q_is_permuted_back(tmp_path, tiny):
    cfg, w = tiny
    folder = save_meta_base(w, cfg, tmp_path / "meta", parts=1)
    raw = torch.load(folder / "consolidated.00.pth", weights_only=True)
    q = w["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(raw["layers.0.attention.wq.weight"], q)  # the layouts really differ
    assert torch.equal(names.meta_to_hf_rotary(raw["layers.0.attention.wq.weight"], cfg.num_attention_heads), q)


def test_missing_shard_is_named(tmp_path, tiny):
    cfg, w = tiny
    folder = save_hf_base(w, cfg, tmp_path / "hf", shards=2)
    (folder / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(InputError, match="pytorch_model-00002-of-00002.bin"):
        open_checkpoint(folder)


def test_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps({}))
    with pytest.raises(InputError, match="no model weights"):
        open_checkpoint(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")


def test_non_tensor_pickle_rejected(tmp_path, tiny):
    cfg, w = tiny
    folder = save_hf_base(w, cfg, tmp_path / "hf", shards=1)
    shard = folder / "pytorch_model-00001-of-00001.bin"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    shard.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(InputError, match="refused as unsafe") as err:
        open_checkpoint(folder)
    assert "weights_only" not in str(err.value)  # never torch's advice to load it unsafely


def test_legacy_pickle_shard_read_twice(tmp_path, tiny):
    """Pre-zip .bin files cannot be mapped; they are read into memory and must stay intact across reads."""
    cfg, w = tiny
    folder = save_hf_base(w, cfg, tmp_path / "hf", shards=1, with_inv_freq=False)
    shard = folder / "pytorch_model-00001-of-00001.bin"
    torch.save(w, shard, _use_new_zipfile_serialization=False)
    ckpt = open_checkpoint(folder)
    _assert_same(ckpt, w)
    _assert_same(ckpt, w)  # a second pass: nothing was zeroed by page dropping
