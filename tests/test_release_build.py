"""The build proves (or disproves) that what it made is the official model: the official-hash stage,
--require-official, the post-merge audit and the tensor fingerprints, through the real CLI.

The catalog model alpaca-plus-7b is built from the demo's synthetic sources (``--base``/``--lora``
overrides), and a test copy of the official table ($ZHLLAMA_RELEASE_TABLE) holds the hash of the
pth it makes, or that hash with one byte changed.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from flows.cli.main import main
from pipeline_lib import catalog, demo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    return demo.ensure_demo_release(tmp_path_factory.mktemp("release-sources"))


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    r = demo.ROLES
    return ["build", "alpaca-plus-7b", "--no-prefect", "--output", "pth", "--output", "gguf", "--quant", "q4_0",
            "--no-eval", "--base", str(root / r["base"]), "--lora", str(root / r["lora-0"]),
            "--lora", str(root / r["lora-1"]), "--chinese-sp", str(root / r["chinese_sp"]), "--out", str(out), *extra]


def _table(tmp_path: Path, pth_sha256: str, tokenizer_sha256: str) -> Path:
    table = dict(catalog.release_hashes())
    table["merged_consolidated_pth"] = {**table["merged_consolidated_pth"], "Chinese-Alpaca-Plus-7B": [pth_sha256]}
    table["tokenizer_model"] = {**table["tokenizer_model"], "alpaca": tokenizer_sha256}
    lines = []
    for section, rows in table.items():  # a TOML copy of the official table, one value changed
        lines.append(f"[{section}]")
        for k, v in rows.items():
            lines.append(f'"{k}" = {json.dumps(v)}')
    path = tmp_path / "release_sha256.toml"
    path.write_text("\n".join(lines) + "\n")
    assert tomllib.loads(path.read_text())["merged_consolidated_pth"]["Chinese-Alpaca-Plus-7B"] == [pth_sha256]
    return path


def test_official_hash_matches_differs_and_required(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(_argv(sources, out)) == 0
    first = capsys.readouterr().out
    assert "consolidated.00.pth: no official hash published for Chinese-Alpaca-Plus-7B" not in first
    built = json.loads((out / "official.json").read_text())
    pth = next(r for r in built["files"] if r["file"] == "consolidated.00.pth")
    tok = next(r for r in built["files"] if r["file"] == "tokenizer.model")["sha256"]
    assert pth["status"] == "differs"  # the real table's hash: the synthetic model is not the official one
    assert "DIFFERS from the official Chinese-Alpaca-Plus-7B consolidated.00.pth" in first

    # a copy of the official table that holds this pth's (and tokenizer's) hash: reported as a match
    monkeypatch.setenv("ZHLLAMA_RELEASE_TABLE", str(_table(tmp_path, pth["sha256"], tok)))
    assert main(_argv(sources, out)) == 0
    text = capsys.readouterr().out
    assert f"consolidated.00.pth: matches the official Chinese-Alpaca-Plus-7B consolidated.00.pth ({pth['sha256'][:8]}…)" \
        in text
    lock = json.loads((out / "build-lock.json").read_text())
    assert [r["status"] for r in lock["official"]["files"] if r["file"] == "consolidated.00.pth"] == ["matches"]
    assert set(lock["fingerprints"]) == {"pth", "gguf"}
    assert len(set(lock["fingerprints"].values())) == 1  # the pth and the GGUF hold the same tensors
    assert "audit:" in text and "tensors finite" in text

    # one byte changed in the official digest: DIFFERS, with a likely cause; the build still succeeds
    wrong = ("0" if pth["sha256"][0] != "0" else "1") + pth["sha256"][1:]
    monkeypatch.setenv("ZHLLAMA_RELEASE_TABLE", str(_table(tmp_path, wrong, tok)))
    assert main(_argv(sources, out)) == 0
    text = capsys.readouterr().out
    assert "DIFFERS from the official Chinese-Alpaca-Plus-7B consolidated.00.pth (" + wrong[:8] in text
    assert "likely causes: the base is not the official one" in text
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # ... and under --require-official the build fails with that message, publishing nothing new
    assert main(_argv(sources, out, "--require-official")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: consolidated.00.pth: DIFFERS from the official") and "Traceback" not in err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_precise_changes_the_pth_and_says_why_it_differs(sources, tmp_path, monkeypatch, capsys):
    out = tmp_path / "release"
    assert main(_argv(sources, out)) == 0
    release = json.loads((out / "official.json").read_text())
    digest = {r["file"]: r["sha256"] for r in release["files"]}
    monkeypatch.setenv("ZHLLAMA_RELEASE_TABLE", str(_table(tmp_path, digest["consolidated.00.pth"],
                                                             digest["tokenizer.model"])))
    capsys.readouterr()
    assert main(_argv(sources, tmp_path / "precise", "--precise")) == 0  # (differs: not required)
    text = capsys.readouterr().out
    assert "built with --precise" in text and "DIFFERS" in text
    precise = json.loads((tmp_path / "precise" / "build-lock.json").read_text())
    assert precise["fingerprints"]["pth"] != json.loads((out / "build-lock.json").read_text())["fingerprints"]["pth"]
