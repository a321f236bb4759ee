"""Shared fixtures: small real models built on the fly (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pg import pg_url  # noqa: F401 - the Postgres fixture, for every test module

from guard.controller.record import GenerationRecord
from guard.testing import make_random_llama

REPO = Path(__file__).resolve().parent.parent
ORGANISM = REPO / "models" / "organism"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight 2-layer Llama (d=64) with a byte-level BPE tokenizer and chat template."""
    return make_random_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir):
    from guard.engine.transformers_engine import TransformersEngine

    return TransformersEngine.load(tiny_model_dir)


@pytest.fixture(autouse=True, scope="session")
def _activation_cache_in_tmp(tmp_path_factory):
    """Keep the probe activation cache out of the user's home directory during tests."""
    import os

    old = os.environ.get("GUARD_CACHE_DIR")
    os.environ["GUARD_CACHE_DIR"] = str(tmp_path_factory.mktemp("activation-cache"))
    yield
    if old is None:
        os.environ.pop("GUARD_CACHE_DIR", None)
    else:
        os.environ["GUARD_CACHE_DIR"] = old


def generation_record(
    *,
    request_id: str = "r",
    messages: list[dict[str, str]] | None = None,
    prompt: str | None = "x",
    prompt_tokens: int = 0,
) -> GenerationRecord:
    """The record a generation that a test drives by hand starts with: policy ``p`` (hash ``h``) on
    model ``m``."""
    return GenerationRecord(
        request_id=request_id,
        policy_name="p",
        policy_hash="h",
        model="m",
        messages=messages,
        prompt=prompt,
        prompt_tokens=prompt_tokens,
    )
