"""Shared fixtures: tiny random-weight HF checkpoints written with transformers (the oracle)."""

from __future__ import annotations

import os

import pytest

from tests.checkpoints import write_tiny_checkpoint

os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """arch name -> path of a float32 tiny HF checkpoint (written once per test session)."""
    cache: dict[str, str] = {}

    def get(arch: str, **overrides) -> str:
        key = arch + repr(sorted(overrides.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp(arch)
            cache[key] = write_tiny_checkpoint(arch, str(out), **overrides)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory):
    from jaxserve.demo import ensure_demo_model

    return ensure_demo_model(str(tmp_path_factory.mktemp("demo")))

