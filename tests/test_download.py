"""Download stage against a fake hub (real huggingface_hub client) and a real local HTTP server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from pipeline_lib import fsutil
from pipeline_lib.download import DownloadError, download, parse_source, redact_url
from pipeline_lib.errors import DiskSpaceError, InputError, IntegrityError

sys.path.insert(0, str(Path(__file__).parent))
from fakehub import FakeHub, FileServer  # noqa: E402

REPO = "tester/tiny-lora"
TOKEN = "hf_SECRETsecretSECRET0123456789"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def files():
    rnd = os.urandom
    return {
        "adapter_config.json": b'{"r": 8, "lora_alpha": 32}',
        "adapter_model.bin": rnd(200_000),
        "tokenizer.model": rnd(50_000),
        "extra/README.md": b"# tiny\n",
    }


@pytest.fixture
def hub(files, monkeypatch):
    with FakeHub({REPO: files}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield h


def _gets(hub, path):
    return [r for r in hub.requests if r[0] == "GET" and r[1].endswith("/" + path)]


def _cache_repo(repo=REPO) -> Path:
    return Path(os.environ["HF_HOME"]) / "hub" / ("models--" + repo.replace("/", "--"))


def test_normal_download(hub, files, tmp_path):
    out = tmp_path / "out"
    res = download(REPO, out=out)
    assert res.kind == "hub" and res.commit == hub.head(REPO)
    got = {a.path.relative_to(out).as_posix(): a for a in res.files}
    assert set(got) == set(files)
    for rel, data in files.items():
        assert (out / rel).read_bytes() == data
        assert got[rel].sha256 == sha(data) and got[rel].size == len(data)
        assert got[rel].revision == res.commit
    assert got["adapter_model.bin"].verified_against == ("hub lfs sha256",)
    assert got["adapter_config.json"].verified_against == ("hub git sha1",)
    # the HF cache under $HF_HOME is used (and the branch ref recorded)
    cache = _cache_repo()
    assert (cache / "snapshots" / res.commit / "adapter_model.bin").exists()
    assert (cache / "refs" / "main").read_text() == res.commit
    lock = json.loads(res.lock_json())
    assert lock["commit"] == res.commit and lock["repo"] == REPO and lock["revision"] == "main"
    assert {f["path"]: f["sha256"] for f in lock["files"]} == {k: sha(v) for k, v in files.items()}
    assert "verified against hub lfs sha256" in got["adapter_model.bin"].summary(out)
    # a second run is served from the cache: no new file GETs
    n = len(hub.requests)
    download(REPO, out=tmp_path / "out2")
    assert not [r for r in hub.requests[n:] if r[0] == "GET" and "/resolve/" in r[1]]


def test_include_fetches_only_needed_files(hub, files, tmp_path):
    res = download(f"hf://{REPO}", out=tmp_path / "out", include=["*.json", "tokenizer.model"])
    assert sorted(a.path.name for a in res.files) == ["adapter_config.json", "tokenizer.model"]
    assert not _gets(hub, "adapter_model.bin") and not _gets(hub, "README.md")
    with pytest.raises(InputError, match="matches --include"):
        download(REPO, out=tmp_path / "o2", include=["*.safetensors"])


def test_byte_flipped_once_is_redownloaded(hub, files, tmp_path, caplog):
    hub.corrupt(REPO, "adapter_model.bin", times=1)
    with caplog.at_level(logging.WARNING, logger="pipeline_lib.download"):
        res = download(REPO, out=tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.bin").read_bytes() == files["adapter_model.bin"]
    assert len(_gets(hub, "adapter_model.bin")) == 2
    assert "downloading it again" in caplog.text
    assert {a.path.name: a.sha256 for a in res.files}["adapter_model.bin"] == sha(files["adapter_model.bin"])


def test_byte_flipped_always_fails_and_cleans_cache(hub, files, tmp_path):
    hub.corrupt(REPO, "adapter_model.bin", times=None)
    out = tmp_path / "out"
    with pytest.raises(IntegrityError) as err:
        download(REPO, out=out)
    msg = str(err.value)
    print(msg)
    assert "adapter_model.bin" in msg and "corrupt after 2 downloads" in msg
    assert sha(files["adapter_model.bin"]) in msg and "hub's LFS sha256" in msg
    assert "removed from the HF cache" in msg
    cache = _cache_repo()
    commit = hub.head(REPO)
    assert not (cache / "snapshots" / commit / "adapter_model.bin").exists()
    assert not (cache / "blobs" / sha(files["adapter_model.bin"])).exists()
    assert not (out / "adapter_model.bin").exists()  # nothing unverified placed in out
    # once the network is healthy again, the same call succeeds
    hub.clear_faults()
    download(REPO, out=out)
    assert (out / "adapter_model.bin").read_bytes() == files["adapter_model.bin"]


def test_small_git_file_corruption_detected(hub, files, tmp_path):
    hub.corrupt(REPO, "adapter_config.json", times=None)
    with pytest.raises(IntegrityError, match="git blob sha1"):
        download(REPO, out=tmp_path / "out", include=["*.json"])


def test_connection_dropped_mid_file(hub, files, tmp_path):
    hub.drop(REPO, "adapter_model.bin", times=1)
    res = download(REPO, out=tmp_path / "out", include=["adapter_model.bin"])
    assert res.files[0].path.read_bytes() == files["adapter_model.bin"]
    assert len(_gets(hub, "adapter_model.bin")) == 2


def test_unknown_repo_and_revision(hub, tmp_path):
    with pytest.raises(InputError) as err:
        download("tester/no-such-repo", out=tmp_path / "out")
    print(err.value)
    assert "hub repo tester/no-such-repo not found" in str(err.value)
    with pytest.raises(InputError) as err:
        download(REPO, revision="v9.9", out=tmp_path / "out")
    print(err.value)
    assert "revision 'v9.9' not found in hub repo" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_unreachable_hub(tmp_path, monkeypatch):
    with FakeHub({}) as h:
        url = h.url
    monkeypatch.setenv("HF_ENDPOINT", url)  # server stopped: connection refused
    with pytest.raises(DownloadError) as err:
        download(REPO, out=tmp_path / "out")
    print(err.value)
    assert "cannot fetch tester/tiny-lora from the hub" in str(err.value)


def test_cache_tampering_detected_and_repaired(hub, files, tmp_path):
    download(REPO, out=tmp_path / "one", include=["adapter_model.bin"])
    blob = _cache_repo() / "blobs" / sha(files["adapter_model.bin"])
    data = bytearray(blob.read_bytes())
    data[10] ^= 1
    blob.unlink()  # replace, not write in place: --out holds a hard link to the blob
    blob.write_bytes(bytes(data))
    res = download(REPO, out=tmp_path / "two", include=["adapter_model.bin"])
    assert res.files[0].path.read_bytes() == files["adapter_model.bin"]
    assert blob.read_bytes() == files["adapter_model.bin"]


def test_offline_uses_verified_cache(files, tmp_path, monkeypatch):
    with FakeHub({REPO: files}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        first = download(REPO, out=tmp_path / "online", include=["*.bin", "*.json"])
    # the hub is gone (connection refused): the cached, complete snapshot of "main" is used and re-verified
    res = download(REPO, out=tmp_path / "offline", include=["*.bin", "*.json"])
    assert res.commit == first.commit
    assert [a.verified_against[0] for a in res.files] == ["hub git sha1", "hub lfs sha256"]
    with pytest.raises(DownloadError) as err:
        download(REPO, out=tmp_path / "more")  # tokenizer.model was never fetched
    print(err.value)
    assert "the HF cache misses 2 file(s)" in str(err.value)
    blob = _cache_repo() / "blobs" / sha(files["adapter_model.bin"])
    blob.unlink()
    blob.write_bytes(b"rotten")
    with pytest.raises(IntegrityError) as err:
        download(REPO, out=tmp_path / "rotten", include=["*.bin"])
    print(err.value)
    assert "cached adapter_model.bin" in str(err.value) and not blob.exists()
    with pytest.raises(DownloadError, match="holds no listing of that revision"):
        download(REPO, revision="v2", out=tmp_path / "never")


def test_revision_pin(hub, files, tmp_path):
    old = hub.head(REPO)
    new = hub.commit(REPO, {"adapter_model.bin": b"retrained" * 100})
    hub.tag(REPO, "v1", old)
    assert new != old
    latest = download(REPO, out=tmp_path / "latest", include=["adapter_model.bin"])
    assert latest.commit == new and latest.files[0].path.read_bytes() == b"retrained" * 100
    for spec, kw in [(f"hf://{REPO}@{old}", {}), (REPO, {"revision": old}), (f"hf://{REPO}@v1", {})]:
        out = tmp_path / f"pinned-{len(os.listdir(tmp_path))}"
        res = download(spec, out=out, include=["adapter_model.bin"], **kw)
        assert res.commit == old and res.lock["commit"] == old
        assert res.files[0].path.read_bytes() == files["adapter_model.bin"]
    with pytest.raises(InputError, match="give the revision once"):
        download(f"hf://{REPO}@v1", revision="main", out=tmp_path / "x")


def test_expected_digest(hub, files, tmp_path):
    good = {"adapter_model.bin": sha(files["adapter_model.bin"])}
    res = download(REPO, out=tmp_path / "ok", include=["adapter_model.bin"], expected=good)
    assert res.files[0].verified_against == ("hub lfs sha256", "expected sha256")
    # a wrong reference is caught from the tree listing, before any byte is downloaded
    n = len(hub.requests)
    with pytest.raises(IntegrityError) as err:
        download(REPO, out=tmp_path / "bad", include=["*.bin"], expected={"adapter_model.bin": "0" * 64})
    print(err.value)
    assert "expected: " + "0" * 64 + " (expected sha256)" in str(err.value)
    assert not [r for r in hub.requests[n:] if "/resolve/" in r[1]]


def test_catalog_official_digest_applies(tmp_path, monkeypatch):
    """A repo the catalog knows: its official adapter sha256 is enforced (this one is not it)."""
    repo = "hfl/chinese-llama-plus-lora-7b"
    with FakeHub({repo: {"adapter_model.bin": b"not the release", "adapter_config.json": b"{}"}}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        with pytest.raises(IntegrityError) as err:
            download(repo, out=tmp_path / "out")
        print(err.value)
        assert "official release sha256" in str(err.value)
        assert not [r for r in h.requests if "/resolve/" in r[1]]
        res = download(repo, out=tmp_path / "out", include=["*.json"])
        assert res.files[0].verified_against == ("hub git sha1",)


def test_disk_space_checked_before_download(hub, tmp_path, monkeypatch):
    monkeypatch.setattr(fsutil, "free_bytes", lambda path: 10)
    with pytest.raises(DiskSpaceError, match="not enough disk space"):
        download(REPO, out=tmp_path / "out")
    assert not [r for r in hub.requests if "/resolve/" in r[1]]


def test_gated_repo_token_never_leaks(files, tmp_path, monkeypatch, caplog):
    with FakeHub({"tester/gated": files}, gated={"tester/gated": TOKEN}) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(InputError) as err:
            download("tester/gated", out=tmp_path / "no", token="hf_wrong")
        assert "is gated" in str(err.value)
        print(err.value)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="huggingface_hub"):
            res = download("tester/gated", out=tmp_path / "out")
        assert "huggingface_hub" in caplog.text  # the client's own debug log is captured too
        assert len(res.files) == len(files)
        assert any(r[2].get("authorization") == f"Bearer {TOKEN}" for r in h.requests)
        for text in (caplog.text, res.lock_json(), repr(res), str(err.value)):
            assert TOKEN not in text
        for p in (tmp_path / "out").rglob("*"):
            if p.is_file():
                assert TOKEN.encode() not in p.read_bytes()


def test_cli_subprocess(files, tmp_path):
    """The command line, in a fresh process with HF_ENDPOINT/HF_TOKEN from the environment."""
    with FakeHub({"tester/gated": files}, gated={"tester/gated": TOKEN}) as h:
        env = dict(os.environ, HF_ENDPOINT=h.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"),
                   ZHLLAMA_PROGRESS="0", HF_HUB_VERBOSITY="debug")
        lock = tmp_path / "lock.json"
        cmd = [sys.executable, "-m", "flows.cli", "-vv", "download", "hf://tester/gated",
               "--out", str(tmp_path / "out"), "--include", "*.bin", "--include", "*.json", "--lock", str(lock)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.strip().splitlines()
        assert len(lines) == 2 and all("verified against hub" in line for line in lines)
        assert "adapter_model.bin  200.0 KB  from hf://tester/gated@" in proc.stdout
        assert f"at commit {h.head('tester/gated')}" in proc.stderr
        assert json.loads(lock.read_text())["commit"] == h.head("tester/gated")
        for text in (proc.stdout, proc.stderr, lock.read_text()):
            assert TOKEN not in text
        bad = subprocess.run([sys.executable, "-m", "flows.cli", "download", "tester/nope", "--out",
                              str(tmp_path / "o2")], capture_output=True, text=True, env=env, timeout=120)
        print(bad.stderr)
        assert bad.returncode == 1 and "error: hub repo tester/nope not found" in bad.stderr


# --- HTTP(S) ---------------------------------------------------------------------------------


def test_http_resume_after_drop(tmp_path):
    data = os.urandom(3_000_000)
    with FileServer({"model.bin": data}) as srv:
        srv.drop("model.bin", times=1)
        res = download(srv.file_url("model.bin"), out=tmp_path / "out", backoff=0.01,
                       expected={"model.bin": sha(data)})
        art = res.files[0]
        assert art.path.read_bytes() == data and art.verified_against == ("expected sha256",)
        gets = [r for r in srv.requests if r[0] == "GET"]
        assert len(gets) == 2 and "range" not in gets[0][2]
        assert gets[1][2]["range"] == "bytes=1500000-" and gets[1][2]["if-range"]
        assert res.lock["url"] == srv.file_url("model.bin")


def test_http_resume_across_runs(tmp_path):
    data = os.urandom(2_000_000)
    with FileServer({"model.bin": data}) as srv:
        srv.drop("model.bin", times=None)
        with pytest.raises(DownloadError) as err:
            download(srv.file_url("model.bin"), out=tmp_path / "out", retries=1, backoff=0.01)
        print(err.value)
        assert "giving up on" in str(err.value) and "partial file is kept" in str(err.value)
        srv.clear_faults()
        res = download(srv.file_url("model.bin"), out=tmp_path / "out", backoff=0.01)
        assert res.files[0].path.read_bytes() == data
        assert srv.requests[-1][2]["range"] == "bytes=1000000-"


def test_http_retries_server_errors(tmp_path, caplog):
    data = os.urandom(10_000)
    with FileServer({"w.bin": data, "x.bin": data}) as srv:
        srv.fail("w.bin", status=503, times=2)
        with caplog.at_level(logging.WARNING, logger="pipeline_lib.download"):
            res = download(srv.file_url("w.bin"), out=tmp_path / "a", backoff=0.01)
        assert res.files[0].path.read_bytes() == data
        assert caplog.text.count("HTTP 503") == 2 and "retrying in 0.0" in caplog.text
        srv.fail("x.bin", status=403, times=1)  # not transient: no retry
        with pytest.raises(DownloadError, match="answered HTTP 403"):
            download(srv.file_url("x.bin"), out=tmp_path / "b")
        assert len([r for r in srv.requests if r[1] == "/x.bin"]) == 1


def test_http_cache_reused_only_while_current(tmp_path):
    data = os.urandom(10_000)
    with FileServer({"w.bin": data}) as srv:
        download(srv.file_url("w.bin"), out=tmp_path / "a")
        n = len(srv.requests)
        res = download(srv.file_url("w.bin"), out=tmp_path / "b")
        assert [r[0] for r in srv.requests[n:]] == ["HEAD"] and res.files[0].path.read_bytes() == data
        srv.files["w.bin"] = b"new upstream content"
        res = download(srv.file_url("w.bin"), out=tmp_path / "c")
        assert res.files[0].path.read_bytes() == b"new upstream content"
        n = len(srv.requests)
        download(srv.file_url("w.bin"), out=tmp_path / "d", expected={"w.bin": sha(b"new upstream content")})
        assert srv.requests[n:] == []  # matches the reference digest: no network at all


def test_http_corruption(tmp_path):
    data = os.urandom(100_000)
    with FileServer({"w.bin": data}) as srv:
        srv.corrupt("w.bin", times=1)
        res = download(srv.file_url("w.bin"), out=tmp_path / "a", expected={"w.bin": sha(data)})
        assert res.files[0].path.read_bytes() == data
        srv.corrupt("w.bin", times=None)
        with pytest.raises(IntegrityError) as err:
            download(srv.file_url("w.bin?token=zzzsecret"), out=tmp_path / "b", expected={"w.bin": sha(data)})
        print(err.value)
        assert "corrupt after 2 downloads" in str(err.value) and "zzzsecret" not in str(err.value)
        assert not (tmp_path / "b" / "w.bin").exists()


def test_http_not_found(tmp_path):
    with FileServer({}) as srv:
        with pytest.raises(DownloadError) as err:
            download(srv.file_url("missing.bin"), out=tmp_path / "out")
        print(err.value)
        assert "answered HTTP 404" in str(err.value)


def _zip_bytes(entries: dict[str, bytes]) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_zip_over_http_and_local(files, tmp_path):
    entries = {f"chinese_llama_lora_7b/{k}": v for k, v in files.items()}
    blob = _zip_bytes(entries)
    with FileServer({"lora.zip": blob}) as srv:
        res = download(srv.file_url("lora.zip"), out=tmp_path / "http",
                       expected={"adapter_model.bin": sha(files["adapter_model.bin"])})
    assert res.kind == "archive" and res.lock["archive_sha256"] == sha(blob)
    by_name = {a.path.name: a for a in res.files}
    assert by_name["adapter_model.bin"].verified_against == ("expected sha256",)
    assert by_name["adapter_model.bin"].origin.endswith("lora.zip!chinese_llama_lora_7b/adapter_model.bin")
    local = tmp_path / "lora.zip"
    local.write_bytes(blob)
    res2 = download(str(local), out=tmp_path / "local", include=["*.json"])
    assert [a.path.name for a in res2.files] == ["adapter_config.json"]
    with pytest.raises(IntegrityError):
        download(str(local), out=tmp_path / "bad", expected={"tokenizer.model": "1" * 64})
    assert not (tmp_path / "bad" / "chinese_llama_lora_7b").exists()
    evil = tmp_path / "evil.zip"
    evil.write_bytes(_zip_bytes({"ok.txt": b"1", "../evil.txt": b"2"}))
    with pytest.raises(InputError, match="zip-slip"):
        download(str(evil), out=tmp_path / "evil")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "evil").exists()


def test_local_folder(tmp_path, files):
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    res = download(str(src), out=tmp_path / "out", include=["*.bin", "*.json"],
                   expected={"adapter_model.bin": sha(files["adapter_model.bin"])})
    assert sorted(a.path.name for a in res.files) == ["adapter_config.json", "adapter_model.bin"]
    assert (tmp_path / "out" / "adapter_model.bin").read_bytes() == files["adapter_model.bin"]
    with pytest.raises(IntegrityError):
        download(str(src), out=tmp_path / "out2", expected={"tokenizer.model": "2" * 64})
    assert not (tmp_path / "out2").exists()


def test_parse_source_and_redaction(tmp_path):
    assert parse_source("owner/name").revision == "main"
    s = parse_source("hf://owner/name@v1.0")
    assert (s.kind, s.repo, s.revision) == ("hub", "owner/name", "v1.0")
    assert parse_source("https://x.org/a.zip").kind == "http"
    (tmp_path / "owner").mkdir()
    assert parse_source(str(tmp_path / "owner")).kind == "local"
    with pytest.raises(InputError):
        parse_source("not a source")
    assert redact_url("https://user:pw@h.org/f.bin?X-Amz-Signature=abc&v=1") == \
        "https://h.org/f.bin?X-Amz-Signature=REDACTED&v=1"


# --- secrets: one formatter for hub errors, scrubbed of whatever a mirror echoes ---------------------


def _no_secret(*texts: str) -> None:
    for text in texts:
        assert TOKEN not in text and "SECRETsecret" not in text, text


@pytest.mark.parametrize("fault", ["not found", "unknown revision", "gated, wrong token", "HTTP 500", "HTTP 503"])
def test_echoing_mirror_never_leaks_the_token(files, tmp_path, monkeypatch, caplog, fault):
    """A careless mirror repeats the Authorization header in its error texts: resolve_hub_revision
    (the build's revision check) and download never pass it on, in messages or logs."""
    from pipeline_lib.download import hub_error, resolve_hub_revision

    with FakeHub({REPO: files, "tester/gated": files}, gated={"tester/gated": "hf_theRightOne123456"},
                 echo_auth=True) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        repo, rev = {"not found": ("tester/nope", "main"), "unknown revision": (REPO, "v9"),
                     "gated, wrong token": ("tester/gated", "main")}.get(fault, (REPO, "main"))
        if fault.startswith("HTTP"):
            h.fail_api(status=int(fault.split()[1]), times=None)
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="huggingface_hub"):
            with pytest.raises((InputError, DownloadError)) as err:
                resolve_hub_revision(repo, rev)
            with pytest.raises((InputError, DownloadError)) as err2:
                download(repo, revision=rev, out=tmp_path / "out")
        assert any(r[2].get("authorization") == f"Bearer {TOKEN}" for r in h.requests)  # it was sent ...
        if fault.startswith("HTTP"):  # ... and echoed back in the server's error text
            from huggingface_hub import HfApi
            from huggingface_hub.errors import HfHubHTTPError

            with pytest.raises(HfHubHTTPError) as raw:
                HfApi(endpoint=h.url, token=TOKEN).model_info(repo)
            assert TOKEN in str(raw.value)
            assert f"answered HTTP {fault.split()[1]}" in str(err.value)
            assert "Authorization: Bearer ***" in str(err.value)  # the server's words, scrubbed
            _no_secret(str(hub_error(raw.value, repo=repo, revision="main", endpoint=h.url)))
    print(err.value)
    _no_secret(str(err.value), str(err2.value), caplog.text)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_scrub():
    from pipeline_lib.download import scrub

    text = (f"Authorization: Bearer {TOKEN}; authorization=hf_abcdefghijkl; bearer abc.def-ghi; "
            "https://u:pw@h/x?token=zzzsecret&v=1 other")
    got = scrub(text, secrets=[TOKEN], urls=["https://u:pw@h/x?token=zzzsecret&v=1"])
    assert TOKEN not in got and "hf_abcdefghijkl" not in got and "abc.def-ghi" not in got
    assert "zzzsecret" not in got and ":pw@" not in got and "v=1 other" in got


def test_cli_echoing_mirror_stderr_has_no_token(files, tmp_path):
    with FakeHub({REPO: files}, echo_auth=True) as h:
        h.fail_api(status=500, times=None)
        url = h.url
        env = dict(os.environ, HF_ENDPOINT=h.url, HF_TOKEN=TOKEN, HF_HOME=str(tmp_path / "hf"),
                   ZHLLAMA_PROGRESS="0", HF_HUB_VERBOSITY="debug")
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "-vv", "download", REPO, "--out",
                               str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    print(proc.stderr)
    assert proc.returncode == 1
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: the hub at {url} answered HTTP 500 for {REPO}@main (injected HTTP 500 (request had "
        "Authorization: Bearer ***)); the HF cache holds no listing of that revision to work offline"]
    _no_secret(proc.stdout, proc.stderr)


def test_existing_destination_refused_unless_overwrite(hub, files, tmp_path):
    out = tmp_path / "out"
    download(REPO, out=out, include=["*.json"])
    (out / "adapter_config.json").chmod(0o644)
    (out / "adapter_config.json").write_text("mine")
    n = len(hub.requests)
    with pytest.raises(InputError, match="adapter_config.json already exists") as err:
        download(REPO, out=out, include=["*.json"])
    assert "--overwrite" in str(err.value)
    assert not [r for r in hub.requests[n:] if "/resolve/" in r[1]]  # refused before fetching
    assert (out / "adapter_config.json").read_text() == "mine"
    download(REPO, out=out, include=["*.json"], overwrite=True)
    assert (out / "adapter_config.json").read_bytes() == files["adapter_config.json"]
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"mine")
    with pytest.raises(InputError, match="is a file"):
        download(str(src), out=src / "a.bin")
    with pytest.raises(InputError, match="is an input of this command"):  # a local file onto itself
        download(str(src / "a.bin"), out=src, overwrite=True)
    assert (src / "a.bin").read_bytes() == b"mine"


def test_local_folder_onto_itself_is_only_verified(tmp_path, files):
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    res = download(str(src), out=src)
    assert {a.path.relative_to(src).as_posix() for a in res.files} == set(files)
    assert all((src / rel).read_bytes() == data for rel, data in files.items())
