"""Shared fixtures: an isolated $ZHLLAMA_HOME and a tiny synthetic release built once per session."""

from __future__ import annotations

import os

import pytest

# Shared fixtures, registered once for the whole session: importing a fixture into several test
# modules would make pytest build a session fixture once per module (three Prefect servers).
pytest_plugins = ["_prefect_fixtures", "_evaluate_fixtures", "_gguf_fixtures"]

# Tests never touch the user's caches, never reach a hub, never send analytics.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("ZHLLAMA_HOME", str(tmp_path / "zhllama-home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """A complete tiny release (tokenizers, HF base, LLaMA-Plus + Alpaca-Plus LoRAs), read-only by convention."""
    from pipeline_lib.synthetic import make_release

    return make_release(tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="session")
def rel(tiny_release):
    """The tiny release under its short name (merge tests)."""
    return tiny_release


@pytest.fixture(scope="session")
def chain(tiny_release):
    """The Plus chain of the tiny release, in merge order: LLaMA-Plus LoRA, then Alpaca-Plus."""
    return [tiny_release.llama_lora, tiny_release.alpaca_lora]
