"""Safe archive extraction: good archives extract atomically; malicious ones are refused whole."""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from pipeline_lib.archive import extract_archive, is_archive, plan_extraction
from pipeline_lib.errors import InputError


def _zip(path: Path, entries: list[tuple[str, bytes, int | None]]) -> Path:
    """entries: (name, data, unix mode or None); a symlink is mode S_IFLNK with the target as data."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def _tar(path: Path, entries: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for e in entries:
            if isinstance(e, tarfile.TarInfo):
                tf.addfile(e)
            else:
                name, data = e
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def _assert_nothing_written(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert not (tmp_path / "x").exists() and not (tmp_path / "evil").exists()


def test_good_zip_extracts_atomically(tmp_path):
    arc = _zip(tmp_path / "lora.zip", [
        ("chinese_llama_lora_7b/", b"", stat.S_IFDIR | 0o755),
        ("chinese_llama_lora_7b/adapter_model.bin", os.urandom(5000), stat.S_IFREG | 0o644),
        ("chinese_llama_lora_7b/adapter_config.json", b'{"r": 8}', None),
        ("chinese_llama_lora_7b/link.json", b"adapter_config.json", stat.S_IFLNK | 0o777),  # inside: allowed
    ])
    assert is_archive(arc)
    out = tmp_path / "out"
    res = extract_archive(arc, out=out)
    root = out / "chinese_llama_lora_7b"
    assert (root / "adapter_config.json").read_bytes() == b'{"r": 8}'
    assert (root / "link.json").is_symlink() and (root / "link.json").read_bytes() == b'{"r": 8}'
    assert {p.name for p in res.files} == {"adapter_model.bin", "adapter_config.json"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")] == []


def test_include_selects_members(tmp_path):
    arc = _zip(tmp_path / "a.zip", [("d/a.bin", b"a", None), ("d/b.json", b"b", None)])
    res = extract_archive(arc, out=tmp_path / "out", include=["*.json"])
    assert [p.name for p in res.files] == ["b.json"]
    assert not (tmp_path / "out" / "d" / "a.bin").exists()


@pytest.mark.parametrize("name, why", [
    ("../x", "'..'"),
    ("ok/../../x", "'..'"),
    ("/tmp/evil-abs-zhllama", "absolute path"),
    ("C:/evil", "absolute path"),
    ("dir\\..\\x", "backslashes"),
])
def test_zip_path_escapes_rejected(tmp_path, name, why):
    arc = _zip(tmp_path / "bad.zip", [("fine.txt", b"fine", None), (name, b"pwned", None)])
    out = tmp_path / "sub" / "out"
    out.parent.mkdir()
    with pytest.raises(InputError, match=why) as err:
        extract_archive(arc, out=out)
    assert "unsafe archive bad.zip" in str(err.value)
    _assert_nothing_written(tmp_path, out)
    assert not Path("/tmp/evil-abs-zhllama").exists()


def test_zip_symlink_leaving_folder_rejected(tmp_path):
    arc = _zip(tmp_path / "bad.zip", [("d/fine.txt", b"fine", None),
                                       ("d/evil", b"../../../etc/passwd", stat.S_IFLNK | 0o777)])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="points outside the archive folder"):
        extract_archive(arc, out=out)
    _assert_nothing_written(tmp_path, out)


def test_zip_absolute_symlink_rejected(tmp_path):
    arc = _zip(tmp_path / "bad.zip", [("evil", b"/etc", stat.S_IFLNK | 0o777)])
    with pytest.raises(InputError, match="points outside"):
        extract_archive(arc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_tar_symlink_out_rejected(tmp_path):
    arc = _tar(tmp_path / "bad.tar.gz", [("a.txt", b"a"), _link("evil", "../outside")])
    with pytest.raises(InputError, match="points outside"):
        extract_archive(arc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_tar_hardlink_out_rejected(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    arc = _tar(tmp_path / "bad.tar.gz", [("a.txt", b"a"), _link("evil", "../secret.txt", tarfile.LNKTYPE)])
    with pytest.raises(InputError, match="hard link 'evil' -> '../secret.txt' points outside"):
        extract_archive(arc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")
    assert secret.read_text() == "secret"
    arc2 = _tar(tmp_path / "bad2.tar.gz", [_link("evil", str(secret), tarfile.LNKTYPE)])
    with pytest.raises(InputError, match="points outside"):
        extract_archive(arc2, out=tmp_path / "out")
    arc3 = _tar(tmp_path / "bad3.tar.gz", [_link("evil", "not-a-member", tarfile.LNKTYPE)])
    with pytest.raises(InputError, match="does not point to an earlier file member"):
        extract_archive(arc3, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_tar_write_through_symlink_rejected(tmp_path):
    # a symlink that stays inside, then a member written "through" it: refused at planning
    arc = _tar(tmp_path / "bad.tar.gz", [("d/x", b"1"), _link("a", "d"), ("a/y", b"2")])
    with pytest.raises(InputError, match="lies below a link member"):
        extract_archive(arc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_tar_absolute_and_dotdot_and_device_rejected(tmp_path):
    for i, entries in enumerate([[("/abs.txt", b"x")], [("a/../../x", b"x")],
                                 [_link("dev", "", tarfile.CHRTYPE)]]):
        arc = _tar(tmp_path / f"bad{i}.tar.gz", entries)
        with pytest.raises(InputError, match="unsafe archive"):
            extract_archive(arc, out=tmp_path / "out")
        _assert_nothing_written(tmp_path, tmp_path / "out")


def test_tar_internal_hardlink_becomes_copy(tmp_path):
    arc = _tar(tmp_path / "ok.tar.gz", [("d/a.bin", b"abc"), _link("d/b.bin", "d/a.bin", tarfile.LNKTYPE)])
    out = tmp_path / "out"
    extract_archive(arc, out=out)
    assert (out / "d" / "b.bin").read_bytes() == b"abc"
    assert os.stat(out / "d" / "b.bin").st_ino != os.stat(out / "d" / "a.bin").st_ino


def test_limits(tmp_path):
    arc = _zip(tmp_path / "many.zip", [(f"f{i}", b"x", None) for i in range(5)])
    with pytest.raises(InputError, match="5 members"):
        plan_extraction(arc, max_members=3)
    with pytest.raises(InputError, match="declares"):
        plan_extraction(arc, max_bytes=4)
    bomb = _zip(tmp_path / "bomb.zip", [("zeros.bin", b"\0" * (5 * 10**6), None)])
    with pytest.raises(InputError, match="zip bomb"):
        extract_archive(bomb, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_folder(tmp_path):
    arc = _zip(tmp_path / "a.zip", [("x.json", b"1", None)])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    extract_archive(arc, out=out)
    assert (out / "x.json").read_bytes() == b"1" and (out / "keep.txt").exists()
    with pytest.raises(InputError, match="already holds x.json"):
        extract_archive(arc, out=out)


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"this is not an archive")
    with pytest.raises(InputError, match="not a readable zip or tar archive"):
        extract_archive(junk, out=tmp_path / "out")


def test_link_chain_escape_rejected(tmp_path):
    """`a -> .` then `b -> a/a/../../X`: lexically inside, really outside (the issue's example)."""
    secret = tmp_path / "X"
    secret.write_text("private")
    for order in ([_link("a", "."), _link("b", "a/a/../../X")], [_link("b", "a/a/../../X"), _link("a", ".")]):
        arc = _tar(tmp_path / "chain.tar.gz", [("ok.txt", b"1"), *order])
        with pytest.raises(InputError, match="symlink 'b' -> 'a/a/../../X' points outside") as err:
            extract_archive(arc, out=tmp_path / "out")
        print(err.value)
        _assert_nothing_written(tmp_path, tmp_path / "out")
    zarc = _zip(tmp_path / "chain.zip", [("a", b".", stat.S_IFLNK | 0o777), ("b", b"a/a/../../X", stat.S_IFLNK | 0o777)])
    with pytest.raises(InputError, match="points outside"):
        extract_archive(zarc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")
    assert secret.read_text() == "private"


def test_link_chains_inside_and_loops(tmp_path):
    from pipeline_lib.archive import resolve_planned

    links = {"a": ".", "d/up": "..", "c": "d/up/d", "loop1": "loop2", "loop2": "loop1"}
    assert resolve_planned("a/a/x", links) == "x"
    assert resolve_planned("c/f", links) == "d/f"
    assert resolve_planned("d/up/..", links) is None
    assert resolve_planned("loop1", links) is None  # more than 40 hops
    arc = _tar(tmp_path / "ok.tar.gz", [("d/f", b"f"), _link("d/up", ".."), _link("c", "d/up/d")])
    extract_archive(arc, out=tmp_path / "out")
    assert (tmp_path / "out" / "c" / "f").read_bytes() == b"f"
    arc = _tar(tmp_path / "loop.tar.gz", [_link("l1", "l2"), _link("l2", "l1")])
    with pytest.raises(InputError, match="or loops"):
        extract_archive(arc, out=tmp_path / "loop")


def test_link_replacing_a_folder_rejected(tmp_path):
    # the folder's member comes first, the link of the same name after: writes would go through it
    arc = _tar(tmp_path / "bad.tar.gz", [("d/x", b"1"), _link("d", "..")])
    with pytest.raises(InputError, match="unsafe archive"):
        extract_archive(arc, out=tmp_path / "out")
    arc = _tar(tmp_path / "bad2.tar.gz", [("d/x", b"1"), _link("d", "e")])
    with pytest.raises(InputError, match="replaces a folder"):
        extract_archive(arc, out=tmp_path / "out")
    _assert_nothing_written(tmp_path, tmp_path / "out")
