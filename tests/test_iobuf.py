"""The fast I/O paths (issue 14): direct reads, recycled buffers, the chunked release update, read-ahead.

Each one must give exactly the bytes of the plain path it replaces; these tests compare against that
plain path (torch.load, the release's own arithmetic, a buffered read) on real files.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import sys
import time

import numpy as np
import pytest
import torch

from pipeline_lib import iobuf, merge, torchsave
from pipeline_lib.checkpoint import _BinFile, open_checkpoint, storage_offsets
from pipeline_lib.errors import InputError
from pipeline_lib.merge import plan_merge
from pipeline_lib.synthetic import TinyConfig, random_weights, save_hf_base

# ------------------------------------------------------------------ the buffer pool


def test_pool_reuses_a_block_only_when_nothing_references_it():
    pool = iobuf.BufferPool(min_block=1 << 20)
    a = pool.empty((1024, 1024), torch.float16)
    a.fill_(1)
    ptr = a.data_ptr()
    view = a.numpy()[:10]  # a numpy view keeps the memory alive
    del a
    gc.collect()
    b = pool.empty((1024, 1024), torch.float16)
    assert b.data_ptr() != ptr and float(view[0, 0]) == 1.0
    del view
    c = pool.empty((1024, 1024), torch.float16)
    assert c.data_ptr() == ptr and pool.reused == 1
    c2 = c.view(-1)[5:]  # a torch view of the tensor keeps it as well
    del c
    d = pool.empty((1024, 1024), torch.float16)
    assert d.data_ptr() != ptr
    del c2, d, b
    pool.trim()
    assert pool.free_bytes == 0


def test_pool_limits_what_it_keeps():
    pool = iobuf.BufferPool(per_size=1, max_block=4 << 20, min_block=1 << 20)
    big = pool.empty((8 << 20,), torch.uint8)  # above max_block: never kept
    blocks = [pool.empty((2 << 20,), torch.uint8) for _ in range(3)]
    del big, blocks
    assert pool.free_bytes == 2 << 20  # one block of that size, the others freed
    small = pool.empty((16,), torch.float32)  # below min_block: plain torch
    assert small.numel() == 16


def test_a_vocabulary_sized_block_frees_the_waiting_layer_blocks_first():
    """lm_head (larger than max_block) comes last in a stream: the layer blocks kept for reuse would
    only add to the peak, so asking for it frees them."""
    pool = iobuf.BufferPool(per_size=2, max_block=4 << 20, min_block=1 << 20)
    layers = [pool.empty((2 << 20,), torch.uint8) for _ in range(2)]
    del layers
    assert pool.free_bytes == 2 * (2 << 20)
    head = pool.empty((8 << 20,), torch.uint8)
    assert pool.free_bytes == 0 and head.numel() == 8 << 20
    again = pool.empty((2 << 20,), torch.uint8)  # later layer-sized requests are served fresh
    assert again.numel() == 2 << 20 and pool.allocated == 4


def test_pool_blocks_are_aligned_for_direct_io():
    pool = iobuf.BufferPool(min_block=1)
    for n in (4096, 5000, 1 << 20):
        assert pool.block(n).ctypes.data % iobuf.ALIGN == 0


def test_workspace_grows_once_and_clears():
    ws = iobuf.Workspace()
    ws.reserve("delta", 1000, torch.float32)
    a = ws.get("delta", (10, 10), torch.float32)
    b = ws.get("delta", (20, 50), torch.float32)
    assert a.data_ptr() == b.data_ptr() and b.shape == (20, 50)
    c = ws.get("delta", (2000,), torch.float32)
    assert c.numel() == 2000
    ws.clear()
    assert ws.get("delta", (3,), torch.float32).numel() == 3


# ------------------------------------------------------------------ reading tensors


@pytest.fixture
def data_file(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=3 * (1 << 20) + 4097, dtype=np.uint8).tobytes()
    path = tmp_path / "data.bin"
    path.write_bytes(raw)
    return path, raw


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("offset,n", [(0, 1 << 20), (64, (1 << 20) + 6), (4095, 2 << 20), (1 << 20, 10),
                                      (3 * (1 << 20) + 4097 - (1 << 20), 1 << 20)])  # the last one ends at EOF
def test_tensor_file_reads_exact_bytes(data_file, monkeypatch, direct, offset, n):
    path, raw = data_file
    if not direct:
        monkeypatch.setattr(iobuf, "_O_DIRECT", 0)
    f = iobuf.TensorFile(path)
    t = f.read(offset, (n,), torch.uint8, what="data.bin")
    assert t.numpy().tobytes() == raw[offset:offset + n]
    if n % 2 == 0 and offset % 2 == 0:
        h = f.read(offset, (n // 2,), torch.float16, what="data.bin")
        assert h.view(torch.uint8).numpy().tobytes() == raw[offset:offset + n]


@pytest.mark.parametrize("direct", [True, False])
def test_tensor_file_truncated_is_an_input_error(data_file, monkeypatch, direct):
    path, raw = data_file
    if not direct:
        monkeypatch.setattr(iobuf, "_O_DIRECT", 0)
    with pytest.raises(InputError, match="truncated"):
        iobuf.TensorFile(path).read(len(raw) - 100, (1 << 20,), torch.uint8, what="data.bin")


@pytest.fixture(scope="module")
def tiny_model():
    cfg = TinyConfig(vocab_size=400, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4)
    return cfg, random_weights(cfg, seed=5)


def test_bin_reader_reads_at_storage_offsets(tmp_path, tiny_model):
    """torch.save of today and the 2023 layout: every tensor is found in the zip and read by offset."""
    cfg, w = tiny_model
    folder = save_hf_base(w, cfg, tmp_path / "hf", shards=1)
    shard = next(folder.glob("pytorch_model-*.bin"))
    old = tmp_path / "old.bin"
    torchsave.save(torch.load(shard, weights_only=True), old)
    for path in (shard, old):
        reader = _BinFile(path)
        assert set(reader._offsets) == {k for k, v in reader._sd.items() if v.numel()}  # no fallback to the mapping
        plain = torch.load(path, weights_only=True)
        for key in plain:
            got = reader.load(key)
            assert got.dtype == plain[key].dtype and torch.equal(got, plain[key]), key


def test_storage_offsets_refuse_an_unknown_layout(tmp_path):
    sd = {"a": torch.arange(10.0), "b": torch.arange(5.0)}
    path = tmp_path / "x.pt"
    torch.save(sd, path)
    mapped = torch.load(path, mmap=True, weights_only=True)
    assert set(storage_offsets(path, mapped)) == {"a", "b"}
    assert storage_offsets(path, {"a": torch.arange(10.0) + 1}) == {}  # same size, other bytes: not this file's
    assert storage_offsets(path, {"a": torch.arange(7.0)}) == {}


def test_checkpoint_stream_equals_torch_load(tmp_path, tiny_model):
    cfg, w = tiny_model
    for st in (False, True):
        ckpt = open_checkpoint(save_hf_base(w, cfg, tmp_path / f"hf{st}", shards=2, safetensors=st))
        got = dict(ckpt.iter_tensors())
        assert list(got) == list(w)
        for k, t in got.items():
            assert torch.equal(t, w[k]), k


# ------------------------------------------------------------------ the chunked release update


def test_chunked_release_update_is_bit_exact(tiny_release, monkeypatch):
    """Many small chunks (odd sizes, a last partial chunk) give the release's own result, bit for bit."""
    from test_release_exact import release_reference

    chain = [tiny_release.llama_lora, tiny_release.alpaca_lora]
    ref = release_reference(tiny_release.base_hf, chain)
    monkeypatch.setattr(merge, "CHUNK", 777)
    ours = dict(merge.iter_merged(plan_merge(tiny_release.base_hf, chain), prefetch=False))
    assert list(ours) == list(ref)
    for name, t in ours.items():
        assert torch.equal(t, ref[name]), name


def test_release_update_flags_change_and_overflow_in_any_chunk(monkeypatch):
    monkeypatch.setattr(merge, "CHUNK", 100)
    ws = iobuf.Workspace()
    w = torch.zeros(1000, dtype=torch.float16)
    exact = torch.zeros(1000)
    assert merge._release_update(w.clone(), exact.clone(), ws) == (False, True)
    exact[950] = 1e-3  # a change only in the last chunk
    assert merge._release_update(w.clone(), exact.clone(), ws) == (True, True)
    exact[420] = 1e6  # beyond fp16 in a middle chunk
    out = w.clone()
    assert merge._release_update(out, exact.clone(), ws) == (True, False)
    assert torch.isinf(out[420])


# ------------------------------------------------------------------ quantize's read-ahead


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (mincore on a fresh mapping: it faults nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(addr, size, vec) == 0
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and posix_fadvise are Linux calls")
def test_quantize_read_ahead_requests_the_next_tensors(tmp_path):
    from pipeline_lib.quantize import _InputReadAhead

    path = tmp_path / "in.gguf"
    path.write_bytes(os.urandom(8 << 20))
    iobuf.drop_cache(path)
    spans = [("a", 0, 2 << 20), ("b", 2 << 20, 2 << 20), ("c", 4 << 20, 4 << 20)]
    before = _resident_pages(path)
    ahead = _InputReadAhead(path, spans)
    try:
        assert ahead._hinted == 2  # all three fit in READ_AHEAD: requested before the first tensor
        for _ in range(100):  # the kernel reads them in the background
            if _resident_pages(path) > before + 1000:
                break
            time.sleep(0.05)
        assert _resident_pages(path) > before + 1000
        ahead.started("b")
        ahead.started("unknown")  # names it does not know are ignored
        assert ahead._hinted == 2
    finally:
        ahead.close()


# ------------------------------------------------------------------ the fast GGUF tensor table


def test_gguf_table_equals_gguf_reader(tiny_release, tmp_path):
    import gguf

    from pipeline_lib.gguf_export import convert
    from pipeline_lib.gguf_table import read_tensor_table

    out = tmp_path / "m.gguf"
    convert(plan_merge(tiny_release.base_hf, [tiny_release.llama_lora, tiny_release.alpaca_lora]), out=out,
            outtype="q8_0", name="t")
    ref = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
           for t in gguf.GGUFReader(out).tensors]
    assert [(r.name, r.shape, r.ggml_type, r.offset, r.nbytes) for r in read_tensor_table(out)] == ref
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[:2000])
    with pytest.raises(InputError, match="tensor table"):
        read_tensor_table(cut)


@pytest.mark.skipif(not getattr(os, "RWF_NOWAIT", 0), reason="preadv2 RWF_NOWAIT is Linux-only")
def test_cached_bytes_are_copied_not_read_again(tmp_path):
    # written with O_DIRECT, so none of its pages ever entered the page cache (dropping the pages of a
    # file written through the cache is only a hint: the kernel may keep some, as CI once saw)
    import mmap

    raw = np.random.default_rng(1).integers(0, 256, size=4 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "direct.bin"
    buf = mmap.mmap(-1, len(raw))  # page-aligned, as O_DIRECT needs
    buf.write(raw)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as exc:  # pragma: no cover - a filesystem without direct I/O
        pytest.skip(f"no O_DIRECT on {tmp_path}: {exc}")
    try:
        os.write(fd, buf)
    finally:
        os.close(fd)
    f = iobuf.TensorFile(path)
    view = memoryview(bytearray(1 << 20))
    assert not f._cached_into(view, 4096)  # not in the page cache: the caller reads the device
    with open(path, "rb") as fh:
        fh.read()  # now it is
    assert f._cached_into(view, 4096) and bytes(view) == raw[4096:4096 + (1 << 20)]
    t = f.read(4096, (1 << 20,), torch.uint8, what="data.bin")
    assert t.numpy().tobytes() == raw[4096:4096 + (1 << 20)]
