"""SHA256 verification: official table, sha256sum files, manifests, corrupted and truncated files."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline_lib import catalog
from pipeline_lib.errors import InputError, IntegrityError
from pipeline_lib.verify import Status, read_sha256sum, sha256_files, verify


@pytest.fixture
def files(tmp_path):
    out = {}
    for i, size in enumerate([0, 1, 8 * 1024 * 1024 + 3, 100_000]):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(bytes((j * 7 + i) % 251 for j in range(size)))
        out[p] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_parallel_hashes_equal_hashlib(files):
    assert sha256_files(files, threads=2) == files


def test_sha256sum_manifest_ok_and_corruptions_named(files, tmp_path):
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{d}  {p.name}\n" for p, d in files.items()))
    res = verify(list(files), manifest=sums, lock_file=tmp_path / "lock.json")
    assert all(f.status is Status.EXPECTED for f in res.files)
    lock = json.loads((tmp_path / "lock.json").read_text())
    assert {f["sha256"] for f in lock["files"]} == set(files.values())

    big = [p for p in files if p.stat().st_size > 1_000_000][0]
    data = bytearray(big.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit flipped
    big.write_bytes(bytes(data))
    small = [p for p in files if p.stat().st_size == 100_000][0]
    small.write_bytes(small.read_bytes()[:-10])  # truncated
    with pytest.raises(IntegrityError) as err:
        verify(list(files), manifest=sums)
    msg = str(err.value)
    assert "2 file(s)" in msg and big.name in msg and small.name in msg
    assert files[big] in msg  # the expected digest is named
    assert hashlib.sha256(big.read_bytes()).hexdigest() in msg  # and the actual one
    assert "download them again" in msg


def test_unknown_files_are_recorded_not_accepted_as_official(files, tmp_path):
    res = verify(list(files), lock_file=tmp_path / "lock.json")
    assert {f.status for f in res.files} == {Status.UNKNOWN}
    lock = json.loads((tmp_path / "lock.json").read_text())
    assert {f["status"] for f in lock["files"]} == {"unknown"}


def test_official_digest_is_recognised(monkeypatch, files):
    p, digest = next(iter(files.items()))
    monkeypatch.setitem(catalog.official_digests(), digest, "Chinese-LLaMA-7B LoRA adapter_model.bin")
    res = verify([p])
    assert res.files[0].status is Status.OFFICIAL and "Chinese-LLaMA-7B" in res.files[0].against


def test_model_files_must_match_the_models_official_hashes(tmp_path):
    fake = tmp_path / "adapter_model.bin"
    fake.write_bytes(b"not the release's adapter")
    with pytest.raises(IntegrityError, match="official adapter_model.bin of Chinese-Alpaca-Plus-7B"):
        verify([fake], model="alpaca-plus-7b")


def test_store_manifest_and_json_manifest(files, tmp_path):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({p.name: d for p, d in files.items()}))
    assert len(verify(list(files), manifest=m).files) == len(files)
    bad = tmp_path / "bad.txt"
    bad.write_text("zz  file\n")
    with pytest.raises(InputError, match="not a sha256sum line"):
        read_sha256sum(bad)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        verify([tmp_path / "nope.bin"])


def test_cli(files, tmp_path, capsys):
    from flows.cli.main import main

    sums = tmp_path / "SUMS"
    sums.write_text("".join(f"{d} *{p.name}\n" for p, d in files.items()))
    assert main(["verify", *map(str, files), "--manifest", str(sums)]) == 0
    assert "4 verified, 0 unknown" in capsys.readouterr().out
    assert main(["verify", str(next(iter(files))), "--strict"]) == 1
    p = next(iter(files))
    p.write_bytes(b"changed")
    assert main(["verify", str(p), "--manifest", str(sums)]) == 1
    assert "do not match" in capsys.readouterr().err
