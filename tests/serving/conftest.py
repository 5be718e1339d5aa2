"""Fixtures of the serving tests: the demo tokenizer and a fake-runner server on loopback."""

from __future__ import annotations

import pytest

from tests.serving.harness import ServerThread, load_demo_tokenizer, make_fake_engine


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_path):
    return load_demo_tokenizer(demo_model_path)


@pytest.fixture(scope="module")
def fake_server(demo_tokenizer):
    """Both servers over a real LLMEngine driven by the fake runner (a little slow per step)."""
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer, step_delay_s=0.002)).start()
    yield server
    server.stop()
