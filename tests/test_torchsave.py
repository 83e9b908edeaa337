"""The 2023 torch.save writer: byte for byte the files torch 2.0.1 wrote, whatever torch is installed."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from pipeline_lib import torchsave
from pipeline_lib.torchsave import TensorEntry, TorchSaveWriter, pickle_state_dict

REFERENCE = Path(__file__).parent / "data" / "torch-2.0.1-save"
RECIPE = json.loads((REFERENCE / "recipe.json").read_text())


def recipe_tensor(i: int, shape: list[int], dtype: str) -> torch.Tensor:
    """recipe.json's value_of_item_i, written from its description."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float64) * 0.37 - 3.0 * i).sin().to(getattr(torch, dtype)).reshape(shape)


def recipe_state_dict(fname: str) -> OrderedDict:
    return OrderedDict((k, recipe_tensor(i, shape, dt)) for i, (k, shape, dt) in enumerate(RECIPE["files"][fname]))


def test_reference_files_are_intact():
    sums = dict(line.split()[::-1] for line in (REFERENCE / "SHA256SUMS").read_text().splitlines())
    for name, digest in sums.items():
        assert hashlib.sha256((REFERENCE / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("fname", sorted(RECIPE["files"]))
def test_reproduces_torch_2_0_1_byte_for_byte(tmp_path, fname):
    out = torchsave.save(recipe_state_dict(fname), tmp_path / fname)
    assert out.read_bytes() == (REFERENCE / fname).read_bytes()


def test_storages_in_any_order_give_the_same_bytes(tmp_path):
    sd = recipe_state_dict("consolidated.00.pth")
    entries = [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in sd.items()]
    tensors = list(sd.values())
    with TorchSaveWriter(tmp_path / "consolidated.00.pth", entries, ordered=True) as w:
        for i in reversed(range(len(tensors))):  # the stream order need not be the record order
            w.write_storage(i, tensors[i])
    assert (tmp_path / "consolidated.00.pth").read_bytes() == (REFERENCE / "consolidated.00.pth").read_bytes()


def test_layout_of_the_2023_format(tmp_path):
    sd = {f"layers.{i}.w": torch.full((i + 1, 3), float(i), dtype=torch.float16) for i in range(12)}
    path = torchsave.save(sd, tmp_path / "consolidated.03.pth")
    data = path.read_bytes()
    z = zipfile.ZipFile(path)
    names = [i.filename for i in z.infolist()]
    keys = sorted(str(i) for i in range(12))  # string order: 0, 1, 10, 11, 2, ...
    assert names == ["consolidated.03/data.pkl", *(f"consolidated.03/data/{k}" for k in keys), "consolidated.03/version"]
    assert keys[:4] == ["0", "1", "10", "11"]
    assert z.testzip() is None and z.read("consolidated.03/version") == b"3\n"
    for info in z.infolist():
        assert info.compress_type == zipfile.ZIP_STORED and info.flag_bits == 0x0808
        off = info.header_offset
        name_len, extra_len = struct.unpack("<HH", data[off + 26:off + 30])
        extra = data[off + 30 + name_len:off + 30 + name_len + extra_len]
        assert extra[:2] == b"FB" and set(extra[4:]) <= {ord("Z")}
        assert (off + 30 + name_len + extra_len) % 64 == 0  # data 64-byte aligned
    back = torch.load(path, weights_only=True, mmap=True)
    assert type(back) is dict and list(back) == list(sd)  # a plain dict, in order
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _torch_pickles_like_2_0_1() -> bool:
    """The installed torch is an oracle for data.pkl only if it still pickles exactly as 2.0.1 did."""
    for fname in RECIPE["files"]:
        buf = io.BytesIO()
        torch.save(recipe_state_dict(fname), buf)
        ours = zipfile.ZipFile(buf).read("archive/data.pkl")
        ref = zipfile.ZipFile(REFERENCE / fname).read(f"{fname[:-4]}/data.pkl")
        if ours != ref:
            return False
    return True


def test_pickle_equals_torch_for_large_dicts():
    """Memo indices past 255 (LONG_BINPUT/GET), >1000 items (several SETITEMS batches), every dtype, 0-d to 4-d."""
    if not _torch_pickles_like_2_0_1():
        pytest.skip("the installed torch pickles state dicts differently from 2.0.1; the reference files still hold")
    g = torch.Generator().manual_seed(0)
    dtypes = list(torchsave.STORAGE_TYPES)
    shapes = [(), (3,), (2, 3), (2, 3, 4), (1, 2, 3, 4), (0,), (70000,)]
    sd = {f"k{i}": (torch.randn(shapes[i % len(shapes)], generator=g) * 100).to(dtypes[i % len(dtypes)])
          for i in range(2100)}
    for ordered in (False, True):
        obj = OrderedDict(sd) if ordered else sd
        buf = io.BytesIO()
        torch.save(obj, buf)
        ref = zipfile.ZipFile(buf).read("archive/data.pkl")
        entries = [TensorEntry(k, t.dtype, tuple(t.shape)) for k, t in sd.items()]
        assert pickle_state_dict(entries, ordered=ordered) == ref


def test_single_item_and_empty_dicts(tmp_path):
    for sd in ({}, {"only": torch.ones(2, dtype=torch.float16)}, {"empty": torch.ones(0, dtype=torch.float32)}):
        path = torchsave.save(sd, tmp_path / "x.pth")
        back = torch.load(path, weights_only=True)
        assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        assert zipfile.ZipFile(path).testzip() is None


def test_refuses_incomplete_or_wrong_writes(tmp_path):
    entries = [TensorEntry("a", torch.float16, (2, 2)), TensorEntry("b", torch.float16, (3,))]
    with pytest.raises(RuntimeError, match="never written"), TorchSaveWriter(tmp_path / "a.pth", entries) as w:
        w.write_storage(0, torch.zeros(2, 2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="planned"), TorchSaveWriter(tmp_path / "b.pth", entries) as w:
        w.write_storage(1, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="planned"), TorchSaveWriter(tmp_path / "c.pth", entries) as w:
        w.write_storage(1, b"\0" * 7)
    with pytest.raises(torchsave.InputError, match="dtype"):
        pickle_state_dict([TensorEntry("c", torch.complex64, (1,))])


def test_archive_stem():
    assert torchsave.archive_stem("/x/consolidated.00.pth") == "consolidated.00"
    assert torchsave.archive_stem("model") == "model"


@pytest.mark.slow
def test_records_beyond_4_gib_use_zip64_offsets(tmp_path):
    """A 7B consolidated.00.pth is 13 GB: headers past 4 GiB carry a zip64 offset block and 8-byte descriptors."""
    big = 2**31 + 4096  # two of these push the third record's header past 4 GiB
    entries = [TensorEntry("a", torch.uint8, (big,)), TensorEntry("b", torch.uint8, (big,)),
               TensorEntry("c", torch.float16, (4, 4))]
    small = torch.arange(16, dtype=torch.float16).reshape(4, 4)
    zeros = memoryview(bytes(64 << 20))
    path = tmp_path / "consolidated.00.pth"
    try:
        with TorchSaveWriter(path, entries) as w:
            for i in (0, 1):
                w.write_storage(i, (zeros[: min(len(zeros), big - o)] for o in range(0, big, len(zeros))))
            w.write_storage(2, small)
        rec = w.layout.storages[2]
        assert rec.offset >= 2**32 and rec.zip64 and rec.descriptor_size == 24
        assert path.stat().st_size == w.file_size
        with open(path, "rb") as fh:
            fh.seek(rec.offset + 30 + len(rec.name))
            assert fh.read(12) == struct.pack("<HHQ", 1, 8, rec.offset)  # zip64 block before the FB padding
        z = zipfile.ZipFile(path)
        info = z.getinfo("consolidated.00/data/2")
        assert info.header_offset == rec.offset and z.read(info) == small.numpy().tobytes()
        back = torch.load(path, weights_only=True, mmap=True)
        assert torch.equal(back["c"], small) and back["a"].shape == (big,)
        del back
    finally:
        path.unlink(missing_ok=True)  # 4.3 GB: do not leave it in pytest's kept tmp folders
