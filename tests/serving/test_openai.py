"""The OpenAI-compatible HTTP server over loopback with the official `openai` client (fake runner)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serving.harness import API_KEY, MODEL_NAME, slow_steps


@pytest.fixture(scope="module")
def client(fake_server):
    return openai.OpenAI(base_url=f"{fake_server.http_url}/v1", api_key=API_KEY, max_retries=0)


def _headers(key: str = API_KEY) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_models_and_health(fake_server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(f"{fake_server.http_url}/health").status_code == 200  # no key needed


def test_completions_streamed_equals_whole(client):
    kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, temperature=0.0)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.prompt_tokens_details.cached_tokens >= 0
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_streamed_equals_whole(client):
    kw = dict(model=MODEL_NAME, messages=[{"role": "user", "content": "Tell me a story"}],
              max_tokens=10, temperature=0.0, seed=3)
    whole = client.chat.completions.create(**kw)
    message = whole.choices[0].message
    assert message.role == "assistant" and message.content
    assert whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prefix_cache_reported_as_cached_tokens(client):
    prompt = "Prefix caching reuses the blocks of a shared system prompt across many requests. " * 2
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    again = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_logprobs_formats(client):
    comp = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, logprobs=2)
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert "".join(lp.tokens) == comp.choices[0].text and len(lp.top_logprobs[0]) >= 2
    chat = client.chat.completions.create(model=MODEL_NAME, max_tokens=4, logprobs=True,
                                          top_logprobs=2,
                                          messages=[{"role": "user", "content": "Hi"}])
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and len(content[0].top_logprobs) == 2
    assert content[0].bytes == list(content[0].token.encode())


def test_n_stop_seed_and_vllm_extras(client):
    comp = client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=6, n=2, seed=1,
        extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True,
                    "min_tokens": 2})
    assert sorted(c.index for c in comp.choices) == [0, 1]
    assert comp.usage.completion_tokens == 12
    batch = client.completions.create(model=MODEL_NAME, prompt=["a b", "c d"], max_tokens=3)
    assert sorted(c.index for c in batch.choices) == [0, 1]
    first = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=8)
    stop = first.choices[0].text[2:4]
    if stop.strip():
        stopped = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=8,
                                            stop=[stop])
        assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text


def test_errors_and_server_keeps_serving(fake_server, client):
    bad_key = openai.OpenAI(base_url=f"{fake_server.http_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=MODEL_NAME, max_tokens="many",
                                       messages=[{"role": "user", "content": "hi"}])
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 60
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        list(client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=4,
                                       stream=True))
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    ok = client.completions.create(model=MODEL_NAME, prompt="still here", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"
    missing = httpx.get(f"{fake_server.http_url}/v1/nothing", headers=_headers())
    assert missing.status_code == 404 and "error" in missing.json()
    assert httpx.get(f"{fake_server.http_url}/metrics").status_code == 200  # open, as vLLM


def test_32_concurrent_streams(fake_server):
    aclient = openai.AsyncOpenAI(base_url=f"{fake_server.http_url}/v1", api_key=API_KEY,
                                 max_retries=0)

    async def one(i: int) -> tuple[str, str | None]:
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=f"Request {i}",
                                                  max_tokens=16, stream=True)
        text, finish = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish = chunk.choices[0].finish_reason or finish
        return text, finish

    async def main():
        try:
            return await asyncio.gather(*[one(i) for i in range(32)])
        finally:
            await aclient.close()

    results = asyncio.run(main())
    assert len(results) == 32 and all(finish == "length" and text for text, finish in results)


def test_tokenize_detokenize_and_metrics(fake_server):
    url = fake_server.http_url
    tok = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}, headers=_headers()).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 128
    back = httpx.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}, headers=_headers())
    assert "Hello world" in back.json()["prompt"]
    chat = httpx.post(f"{url}/tokenize", headers=_headers(),
                      json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > 2
    metrics = httpx.get(f"{url}/metrics", headers=_headers()).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"):
        assert f"jaxserve:{name}" in metrics, name


def test_raw_sse_framing(fake_server):
    body = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{fake_server.http_url}/v1/completions", json=body,
                      headers=_headers()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    json.loads(events[0][len("data: "):])


def _wait_idle(server, timeout: float = 10.0):
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = server.stats()
        if stats.num_requests_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return
        time.sleep(0.02)
    raise AssertionError(f"not idle: {server.stats()}")


def test_client_disconnect_aborts(fake_server):
    body = {"model": MODEL_NAME, "prompt": "Once upon a time", "max_tokens": 110,
            "ignore_eos": True, "stream": True}
    with slow_steps(fake_server, 0.02), httpx.stream(
            "POST", f"{fake_server.http_url}/v1/completions", json=body,
            headers=_headers()) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break
        assert fake_server.stats().num_requests_running == 1
    _wait_idle(fake_server)  # closed mid-stream: the request was aborted, its blocks freed


def test_mid_stream_failure_is_an_error_event(fake_server, client):
    stream = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=50,
                                       stream=True, extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError, match="failed"):
        for i, _ in enumerate(stream):
            if i == 2:
                fake_server.llm_engine.runner.fail_steps = 1
    ok = client.completions.create(model=MODEL_NAME, prompt="after the failure", max_tokens=3)
    assert ok.choices[0].finish_reason == "length"
