"""/metrics: open by default (Prometheus scrapes without a key), protected by a flag, and the
per-request / per-step metrics vLLM exports, checked against what the requests did."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.harness import API_KEY, MODEL_NAME, ServerThread, make_fake_engine

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def protected_server(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer), protect_metrics=True).start()
    yield server
    server.stop()


def test_metrics_open_by_default_and_protected_by_the_flag(fake_server, protected_server):
    assert httpx.get(f"{fake_server.http_url}/metrics").status_code == 200
    assert httpx.post(f"{fake_server.http_url}/v1/completions", json={}).status_code == 401
    assert httpx.get(f"{protected_server.http_url}/metrics").status_code == 401
    reply = httpx.get(f"{protected_server.http_url}/metrics", headers=HEADERS)
    assert reply.status_code == 200 and "jaxserve:num_requests_running" in reply.text


def test_serve_flag_reaches_the_config():
    import argparse

    from jaxserve.serving.launcher import add_serve_args, serve_config_from_args

    parser = add_serve_args(argparse.ArgumentParser())
    assert not serve_config_from_args(parser.parse_args(["m"])).protect_metrics
    assert serve_config_from_args(parser.parse_args(["m", "--protect-metrics"])).protect_metrics


def test_request_and_step_metrics(protected_server):
    url = protected_server.http_url
    runner = protected_server.llm_engine.runner
    step_tokens: list[int] = []  # what the runner was given, step by step
    execute = runner.execute

    def recording_execute(scheduler_output):
        step_tokens.append(scheduler_output.num_batched_tokens)
        return execute(scheduler_output)

    runner.execute = recording_execute
    body = {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": 5, "n": 2,
            "ignore_eos": True}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=30).json()
    usage = reply["usage"]
    body2 = {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3, "ignore_eos": True}
    usage2 = httpx.post(f"{url}/v1/completions", json=body2, headers=HEADERS, timeout=30).json()[
        "usage"]
    m = _samples(url)
    p = "jaxserve:"
    assert m[(p + "request_prompt_tokens_count", "")] == 2
    assert m[(p + "request_prompt_tokens_sum", "")] == (usage["prompt_tokens"]
                                                        + usage2["prompt_tokens"])
    assert m[(p + "request_generation_tokens_sum", "")] == 10 + 3
    assert m[(p + "request_max_num_generation_tokens_sum", "")] == 5 + 3
    assert m[(p + "request_params_n_sum", "")] == 3 and m[(p + "request_params_n_bucket", "1.0")] == 1
    assert m[(p + "request_params_max_tokens_sum", "")] == 8
    for name in ("request_prefill_time_seconds", "request_decode_time_seconds",
                 "request_inference_time_seconds"):
        assert m[(p + name + "_count", "")] == 2 and m[(p + name + "_sum", "")] > 0, name
    # One observation per step the runner ran, of the tokens it was given.
    assert m[(p + "iteration_tokens_total_count", "")] == len(step_tokens) > 0
    assert m[(p + "iteration_tokens_total_sum", "")] == sum(step_tokens)
    assert m[(p + "iteration_tokens_total_bucket", "+Inf")] == len(step_tokens)


def _samples(url: str) -> dict[tuple[str, str], float]:
    """(sample name, le or "") -> value, for every sample /metrics exports."""
    out = {}
    text = httpx.get(f"{url}/metrics", headers=HEADERS).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, s.labels.get("le", ""))] = s.value
    return out
