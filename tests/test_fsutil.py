"""fsutil: claiming outputs (never an input, kind before work), leftovers of killed runs, full disks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from pipeline_lib import fsutil  # noqa: E402
from pipeline_lib.errors import DiskSpaceError, InputError  # noqa: E402
from pipeline_lib.fsutil import atomic_dir, atomic_path, claim_output, sweep_leftovers, tmp_name  # noqa: E402


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tree(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model-00001-of-00002.safetensors").write_bytes(b"w1")
    (base / "config.json").write_text("{}")
    (tmp_path / "out.gguf").write_bytes(b"old")
    return tmp_path


def test_existing_file_refused_unless_overwrite(tree):
    out = tree / "out.gguf"
    with pytest.raises(InputError, match="already exists") as err:
        claim_output(out, kind="file", what="--out")
    assert "add --overwrite" in str(err.value) and "choose another --out" in str(err.value)
    assert claim_output(out, kind="file", overwrite=True) == out
    assert claim_output(tree / "new.gguf", kind="file") == tree / "new.gguf"
    assert out.read_bytes() == b"old"  # a claim never writes or removes the output itself


@pytest.mark.parametrize("overwrite", [False, True])
def test_kind_is_checked_whatever_overwrite_says(tree, overwrite):
    with pytest.raises(InputError, match="is a folder"):
        claim_output(tree / "base", kind="file", overwrite=overwrite)
    with pytest.raises(InputError, match="is a file"):
        claim_output(tree / "out.gguf", kind="dir", overwrite=overwrite)
    with pytest.raises(InputError, match="is a file"):
        claim_output(tree / "out.gguf", kind="into", overwrite=overwrite)
    with pytest.raises(InputError, match="names a folder"):
        claim_output(str(tree / "newdir") + "/", kind="file", overwrite=overwrite)
    with pytest.raises(InputError, match="is a file, not a folder"):
        claim_output(tree / "out.gguf" / "sub" / "x.gguf", kind="file", overwrite=overwrite)


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_never_an_input_file(tree, how):
    shard = tree / "base" / "model-00001-of-00002.safetensors"
    out = {"same path": shard, "symlink": tree / "link.safetensors", "hard link": tree / "hard.safetensors"}[how]
    if how == "symlink":
        out.symlink_to(shard)
    elif how == "hard link":
        os.link(shard, out)
    with pytest.raises(InputError, match="is an input of this command"):
        claim_output(out, kind="file", inputs=[shard], overwrite=True)
    assert shard.read_bytes() == b"w1"


def test_dir_output_never_swallows_an_input(tree):
    base = tree / "base"
    with pytest.raises(InputError, match="is an input"):
        claim_output(base, kind="dir", inputs=[base], overwrite=True)
    with pytest.raises(InputError, match="holds an input"):  # replacing tree would delete base
        claim_output(tree, kind="dir", inputs=[base], overwrite=True)
    (base / "sub").mkdir()
    with pytest.raises(InputError, match="lies inside the input folder"):
        claim_output(base / "sub", kind="dir", inputs=[base], overwrite=True)
    # a new folder inside an input folder replaces nothing: allowed
    assert claim_output(base / "merged", kind="dir", inputs=[base]) == base / "merged"
    # a folder that only receives outputs may be an input's folder (files are claimed one by one)
    assert claim_output(base, kind="into", inputs=[base / "config.json"]) == base


def test_input_paths_from_records(tree):
    from types import SimpleNamespace

    base = tree / "base"
    ckpt = SimpleNamespace(path=base, files=[base / "model-00001-of-00002.safetensors"], tokenizer_dir=None)
    lora_dir = tree / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text("{}")
    (lora_dir / "tokenizer.model").write_bytes(b"sp")
    lora = SimpleNamespace(path=lora_dir, weights_file=lora_dir / "adapter_model.bin", tokenizer_dir=lora_dir)
    plan = SimpleNamespace(base=ckpt, loras=[lora], tokenizer_dir=lora_dir)
    got = set(fsutil.input_paths(plan))
    assert {base, base / "config.json", base / "model-00001-of-00002.safetensors", lora_dir,
            lora_dir / "adapter_config.json", lora_dir / "tokenizer.model", lora_dir / "adapter_model.bin"} <= got
    with pytest.raises(InputError, match="is an input"):
        claim_output(base / "config.json", kind="file", inputs=[plan], overwrite=True)


def test_leftovers_of_dead_processes_are_swept(tree):
    out = tree / "m.gguf"
    dead = tree / f".tmp-m.gguf.0a0b@{fsutil._HOST}:{_dead_pid()}"
    dead.write_bytes(b"partial")
    dead_dir = tree / f".tmp-.tmp-m.gguf.1a1b@{fsutil._HOST}:{_dead_pid()}.2c2c@{fsutil._HOST}:{_dead_pid()}"
    dead_dir.mkdir()
    (dead_dir / "x").write_bytes(b"1")
    os.chmod(dead_dir / "x", 0o444)
    alive = tree / f".tmp-m.gguf.3d3d@{fsutil._HOST}:{os.getppid()}"
    alive.write_bytes(b"in progress")
    other_host = tree / f".tmp-m.gguf.4e4e@another-host:{_dead_pid()}"
    other_host.write_bytes(b"theirs")
    other_target = tree / f".tmp-m.gguf2.5f5f@{fsutil._HOST}:{_dead_pid()}"
    other_target.write_bytes(b"another output's")
    claim_output(out, kind="file")
    assert not dead.exists() and not dead_dir.exists()
    assert alive.exists() and other_host.exists() and other_target.exists()
    assert sweep_leftovers(out) == []


def test_tmp_names_record_the_owner():
    name = tmp_name("model.f16.gguf")
    assert name.startswith(".tmp-model.f16.gguf.")
    assert fsutil._owner(name[len(".tmp-model.f16.gguf."):]) == (fsutil._HOST, os.getpid())


def test_atomic_dir_replace_swaps_and_keeps_nothing_else(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "a").write_text("v1")
    with atomic_dir(target, replace=True) as d:
        assert (target / "a").read_text() == "v1"  # the previous version stays until the swap
        (d / "a").write_text("v2")
    assert (target / "a").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_enospc_becomes_disk_space_error_and_leaves_nothing(tmp_path):
    out = tmp_path / "x.bin"
    with pytest.raises(DiskSpaceError) as err:
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(28, "No space left on device")
    msg = str(err.value)
    assert f"the disk filled up while writing {out}" in msg and "free on that filesystem" in msg
    assert "\n" in msg and msg.splitlines()[1].strip().startswith("what to do:")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DiskSpaceError):
        with atomic_dir(tmp_path / "d") as d:
            (d / "f").write_bytes(b"1")
            raise RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB filesystem (tmpfs, or a loop-mounted image), unmounted afterwards."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        img = tmp_path / "small.img"
        with open(img, "wb") as fh:
            fh.truncate(4 * 2**20)
        mk = subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], capture_output=True, text=True)
        proc2 = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True)
        if mk.returncode != 0 or proc2.returncode != 0:
            pytest.skip(f"cannot mount a small filesystem here: tmpfs: {proc.stderr.strip()}; loop: "
                        f"{(mk.stderr or proc2.stderr).strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_real_full_disk_while_writing(small_fs):
    out = small_fs / "big.bin"
    with pytest.raises(DiskSpaceError) as err:
        with fsutil.atomic_write(out) as fh:
            for _ in range(8):
                fh.write(os.urandom(512 * 1024))
            fh.flush()
            os.fsync(fh.fileno())
    assert str(out) in str(err.value) and "free on that filesystem" in str(err.value)
    assert list(small_fs.iterdir()) == []  # nothing half-written, no temporary
    with pytest.raises(DiskSpaceError, match="not enough disk space"):  # the up-front check, from sizes
        fsutil.check_disk_space(small_fs, 8 * 2**20, what="a test file")


def test_pid_alive():
    assert fsutil.pid_alive(os.getpid())
    assert not fsutil.pid_alive(_dead_pid())
    assert not fsutil.pid_alive(0)


def test_claim_refuses_unwritable_parent(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(InputError, match="not writable"):
            claim_output(ro / "x", kind="file")
    finally:
        ro.chmod(0o755)


def test_claim_returns_path_objects(tmp_path):
    assert isinstance(claim_output(str(tmp_path / "a"), kind="file"), Path)


def test_store_produce_on_a_full_disk(small_fs):
    from pipeline_lib.store import Store

    store = Store(small_fs / "store")

    def produce(d):
        with open(d / "big.bin", "wb") as fh:
            for _ in range(8):
                fh.write(os.urandom(512 * 1024))

    with pytest.raises(DiskSpaceError, match="the disk filled up while writing") as err:
        store.get_or_produce("merge", version="1", inputs={"x": "1"}, produce=produce)
    assert "free on that filesystem" in str(err.value)
    assert list(store.artifacts.iterdir()) == []  # no half-written entry, no temporary
    assert all(r.startswith("stale lock") for r in store.gc())


# A stage run with the up-front space check switched off, as if another process filled the disk
# meanwhile: the CLI in a child process (a crash there cannot take the test run down).
_FILLING_DISK = """
import sys
import pipeline_lib.fsutil as fs, pipeline_lib.gguf_export as ge, pipeline_lib.download as dl
for mod in (fs, ge, dl):
    mod.check_disk_space = lambda *a, **k: None
from flows.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("stage", [
    "merge-hf",
    "merge-pth",
    "convert", "download-http"])
def test_stages_on_a_disk_that_fills_up_while_writing(small_fs, tiny_release, tmp_path, stage):
    """ENOSPC (or a library's text for it) mid-write: exit 1, one `error:` line naming the path and
    the free space, no traceback or abort, nothing half-written left on the full filesystem."""
    from fakehub import FileServer

    rel = tiny_release
    loras = ["--lora", str(rel.llama_lora), "--lora", str(rel.alpaca_lora)]
    with FileServer({"w.bin": os.urandom(3 * 2**20)}) as srv:
        argv = {
            "merge-hf": ["merge", "--base", str(rel.base_hf), *loras, "--out", str(small_fs / "m")],
            "merge-pth": ["merge", "--base", str(rel.base_hf), *loras, "--format", "pth", "--out", str(small_fs / "m")],
            "convert": ["convert", "--base", str(rel.base_hf), *loras, "--out", str(small_fs / "m.gguf")],
            "download-http": ["download", srv.file_url("w.bin"), "--out", str(small_fs / "d")],
        }[stage]
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), ZHLLAMA_PROGRESS="0",
                   ZHLLAMA_HOME=str(small_fs / "home"))
        proc = subprocess.run([sys.executable, "-c", _FILLING_DISK, *argv], capture_output=True, text=True,
                              env=env, timeout=300)
    print(proc.stderr)
    assert proc.returncode == 1, proc.returncode
    assert "Traceback" not in proc.stderr and "terminate called" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the disk filled up while writing" in errors[0]
    assert "free on that filesystem" in errors[0]
    left = [p for p in small_fs.rglob("*") if p.is_file()]
    assert left == [], left
