"""prompt_logprobs come back over HTTP (vLLM's shape) and gRPC, equal to the Python API's."""

from __future__ import annotations

import grpc
import httpx
import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY, MODEL_NAME, make_fake_engine

AUTH = (("authorization", f"Bearer {API_KEY}"),)
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The quick brown fox jumps"
K = 2


@pytest.fixture(scope="module")
def stub(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        yield pb_grpc.JaxServeStub(channel)


def _python_api(tokenizer, prompt) -> object:
    """The final RequestOutput of the same request from an LLMEngine stepped by hand."""
    engine = make_fake_engine(tokenizer)
    engine.add_request("ref", prompt, SamplingParams(max_tokens=3, prompt_logprobs=K))
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return final


def _expected_json(ref) -> list:
    assert ref.prompt_logprobs[0] is None and len(ref.prompt_logprobs) > 2
    return [None] + [{str(t): {"logprob": lp.logprob, "rank": lp.rank,
                               "decoded_token": lp.decoded_token} for t, lp in pos.items()}
                     for pos in ref.prompt_logprobs[1:]]


def test_http_completions_and_chat_return_prompt_logprobs(fake_server, demo_tokenizer):
    url = fake_server.http_url
    ref = _python_api(demo_tokenizer, PROMPT)
    body = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 3, "prompt_logprobs": K}
    reply = httpx.post(f"{url}/v1/completions", json=body, headers=HEADERS, timeout=30)
    assert reply.status_code == 200, reply.text
    got = reply.json()["choices"][0]["prompt_logprobs"]
    assert got == _expected_json(ref)
    ids = ref.prompt_token_ids
    for i, pos in enumerate(got[1:], start=1):  # the prompt token itself is always there
        assert str(ids[i]) in pos and sum(e["rank"] <= K for e in pos.values()) >= K

    messages = [{"role": "user", "content": "Hi there"}]
    chat = httpx.post(f"{url}/v1/chat/completions", headers=HEADERS, timeout=30,
                      json={"model": MODEL_NAME, "messages": messages, "max_tokens": 3,
                            "prompt_logprobs": K}).json()
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]
    assert chat["prompt_logprobs"][0] is None and all(chat["prompt_logprobs"][1:])
    plain = httpx.post(f"{url}/v1/completions", headers=HEADERS, timeout=30,
                       json={"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 2}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None


@pytest.mark.parametrize("route, extra", [
    ("/v1/completions", {"prompt": PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
])
def test_http_streamed_prompt_logprobs_refused(fake_server, route, extra):
    reply = httpx.post(f"{fake_server.http_url}{route}", headers=HEADERS, timeout=30,
                       json={"model": MODEL_NAME, "max_tokens": 2, "stream": True,
                             "prompt_logprobs": 1, **extra})
    assert reply.status_code == 400 and "prompt_logprobs" in reply.text


def _check_proto(entries, ref) -> None:
    ids = ref.prompt_token_ids
    assert len(entries) == len(ids) and entries[0] == pb.PositionLogprobs()
    for i, entry in enumerate(entries[1:], start=1):
        want = ref.prompt_logprobs[i]
        assert entry.sampled.token_id == ids[i]
        assert entry.sampled.logprob == pytest.approx(want[ids[i]].logprob)
        assert entry.sampled.rank == want[ids[i]].rank
        assert [t.rank for t in entry.top] == list(range(1, K + 1))
        assert [t.token_id for t in entry.top] == [
            t for t, lp in sorted(want.items(), key=lambda kv: kv[1].rank) if lp.rank <= K]


def test_grpc_unary_and_stream_return_prompt_logprobs(fake_server, stub, demo_tokenizer):
    ref = _python_api(demo_tokenizer, PROMPT)
    request = pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=3, prompt_logprobs=K))
    unary = stub.Generate(request, metadata=AUTH, timeout=30)
    _check_proto(list(unary.prompt_logprobs), ref)
    messages = list(stub.GenerateStream(request, metadata=AUTH, timeout=30))
    carrying = [m for m in messages if m.prompt_logprobs]
    assert len(carrying) == 1 and list(carrying[0].prompt_logprobs) == list(unary.prompt_logprobs)
    plain = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=2)), metadata=AUTH, timeout=30)
    assert not plain.prompt_logprobs
