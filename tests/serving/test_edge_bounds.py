"""Edge bounds of the servers: body size, tokenizer work off both loops, request templates,
admission under a burst."""

from __future__ import annotations

import asyncio
import threading

import httpx
import openai
import pytest

from jaxserve.engine.async_engine import AsyncEngine, AsyncEngineConfig, QueueFullError
from jaxserve.engine.sampling_params import SamplingParams
from tests.serving.harness import MODEL_NAME, ServerThread, make_fake_engine


@pytest.fixture(scope="module")
def small_body_server(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer, step_delay_s=0.002),
                          api_key=None, max_request_bytes=4096).start()
    yield server
    server.stop()


def test_oversized_bodies_are_refused_with_413(small_body_server):
    url = f"{small_body_server.http_url}/v1/completions"
    big = {"model": MODEL_NAME, "prompt": "x" * 5000, "max_tokens": 2}
    response = httpx.post(url, json=big, timeout=30)
    assert response.status_code == 413, response.text
    assert response.json()["error"]["param"] == "body"

    def chunked():  # no Content-Length: refused once the stream passes the limit
        yield b'{"model": "demo", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'", "max_tokens": 2}'

    response = httpx.post(url, content=chunked(), timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    ok = httpx.post(url, json={"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_request_chat_templates_are_refused(small_body_server):
    client = openai.OpenAI(base_url=f"{small_body_server.http_url}/v1", api_key="x",
                           max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
            extra_body={"chat_template_kwargs": {"chat_template": "{{ 6*7 }}"}})
    assert "chat_template" in str(info.value)


def _record_encode_threads(tokenizer, seen: list[tuple[str, int]]):
    original = tokenizer.encode

    def encode(text, *args, **kwargs):
        seen.append((threading.current_thread().name, len(text)))
        return original(text, *args, **kwargs)

    return original, encode


def test_tokenizer_work_runs_on_its_own_thread(demo_tokenizer):
    seen: list[tuple[str, int]] = []
    _, encode = _record_encode_threads(demo_tokenizer, seen)
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer), api_key=None).start()
    demo_tokenizer.encode = encode
    try:
        url = server.http_url
        assert httpx.post(f"{url}/v1/completions", json={
            "model": MODEL_NAME, "prompt": "Hello there", "max_tokens": 2}).status_code == 200
        assert httpx.post(f"{url}/tokenize", json={
            "model": MODEL_NAME, "prompt": "Hello there"}).status_code == 200
        chat = httpx.post(f"{url}/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2})
        assert chat.status_code == 200, chat.text
        assert len(seen) >= 3
        assert all(name.startswith("jaxserve-tokenizer") for name, _ in seen), seen
    finally:
        del demo_tokenizer.encode
        server.stop()


def test_overlong_text_is_refused_before_full_tokenization(demo_tokenizer):
    seen: list[tuple[str, int]] = []
    _, encode = _record_encode_threads(demo_tokenizer, seen)
    demo_tokenizer.encode = encode
    engine = AsyncEngine(make_fake_engine(demo_tokenizer))  # max_model_len 128
    try:
        text = "the quick brown fox " * 100_000  # 2 MB

        async def main():
            async for _ in engine.generate(text, SamplingParams(max_tokens=2), "huge"):
                pass

        with pytest.raises(ValueError, match="max_model_len"):
            asyncio.run(main())
        assert seen and max(n for _, n in seen) < 10_000, seen  # only a bounded prefix
    finally:
        del demo_tokenizer.encode
        engine.shutdown()


def test_burst_admission_fills_free_running_slots_first(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer, step_delay_s=0.02, max_num_seqs=32,
                           num_kv_blocks=200)
    engine = AsyncEngine(llm, AsyncEngineConfig(max_queued_requests=4))
    try:
        async def one(i: int):
            final = None
            async for out in engine.generate("Hi", SamplingParams(max_tokens=60, ignore_eos=True),
                                             f"b{i}"):
                final = out
            return final

        async def burst():
            return await asyncio.gather(*[one(i) for i in range(48)], return_exceptions=True)

        results = asyncio.run(burst())
        refused = [r for r in results if isinstance(r, QueueFullError)]
        assert len(refused) == 48 - 32 - 4, [type(r).__name__ for r in results]
        assert all(not isinstance(r, Exception) for r in results if r not in refused)
    finally:
        engine.shutdown()
