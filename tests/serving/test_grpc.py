"""The gRPC service over loopback with stubs generated from the .proto (fake-runner engine)."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY, slow_steps

AUTH = (("authorization", f"Bearer {API_KEY}"),)


@pytest.fixture(scope="module")
def channel(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.JaxServeStub(channel)


def _python_api_tokens(server, prompt: str, params: SamplingParams) -> list[int]:
    """What the Python API (the LLMEngine, stepped by hand) gives for the same request."""
    from tests.serving.harness import make_fake_engine

    engine = make_fake_engine(server.llm_engine.tokenizer)
    engine.add_request("ref", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out
    return list(final.outputs[0].token_ids)


def test_health_and_model_info(channel, stub):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "jaxserve.v1.JaxServe"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=5)
    assert info.name == "demo" and info.max_model_len == 128 and info.vocab_size > 100


def test_unary_and_stream_match_python_api(fake_server, stub):
    params = pb.SamplingParams(temperature=0.0, max_tokens=10, logprobs=2)
    request = pb.GenerateRequest(text="The quick brown fox", sampling_params=params)
    expected = _python_api_tokens(fake_server, "The quick brown fox",
                                  SamplingParams(temperature=0.0, max_tokens=10, logprobs=2))
    unary = stub.Generate(request, metadata=AUTH, timeout=30)
    assert list(unary.outputs[0].token_ids) == expected
    assert unary.outputs[0].finish_reason == "length"
    assert unary.usage.completion_tokens == 10 and unary.usage.prompt_tokens > 0
    assert len(unary.outputs[0].logprobs) == 10 and len(unary.outputs[0].logprobs[0].top) == 2
    tokens, text, finish = [], "", None
    messages = list(stub.GenerateStream(request, metadata=AUTH, timeout=30))
    for msg in messages:
        for out in msg.outputs:
            tokens += list(out.token_ids)
            text += out.text
            if out.HasField("finish_reason"):
                finish = out.finish_reason
    assert tokens == expected and text == unary.outputs[0].text and finish == "length"
    assert len(messages) > 1 and messages[-1].HasField("usage")
    assert not messages[0].HasField("usage")


def test_token_ids_prompt_tokenize_detokenize(stub):
    ids = stub.Tokenize(pb.TokenizeRequest(text="Hello world"), metadata=AUTH, timeout=5).token_ids
    assert stub.Detokenize(pb.DetokenizeRequest(token_ids=ids), metadata=AUTH,
                           timeout=5).text == "Hello world"
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids),
                                 sampling_params=pb.SamplingParams(max_tokens=3))
    reply = stub.Generate(request, metadata=AUTH, timeout=30)
    assert len(reply.outputs[0].token_ids) == 3 and reply.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("params, field", [
    (pb.SamplingParams(temperature=-1.0), "temperature"),
    (pb.SamplingParams(max_tokens=0), "max_tokens"),
    (pb.SamplingParams(top_p=1.5), "top_p"),
])
def test_bad_params_invalid_argument(stub, params, field):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(text="hi", sampling_params=params), metadata=AUTH,
                      timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


def test_missing_prompt_and_too_long_prompt(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(), metadata=AUTH, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    long_prompt = pb.TokenIds(ids=[10] * 500)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.GenerateStream(pb.GenerateRequest(token_ids=long_prompt), metadata=AUTH,
                                 timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_api_key_required(stub):
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(pb.GenerateRequest(text="hi"), metadata=metadata, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            list(stub.GenerateStream(pb.GenerateRequest(text="hi"), metadata=metadata, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _wait_engine_idle(server, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = server.stats()
        if stats.num_requests_running == 0 and stats.kv_blocks_free == stats.kv_blocks_total:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"not idle: {server.stats()}")


def test_cancelled_stream_frees_blocks(fake_server, stub):
    import httpx

    request = pb.GenerateRequest(text="Once upon a time", sampling_params=pb.SamplingParams(
        max_tokens=110, ignore_eos=True))
    received = 0
    with slow_steps(fake_server, 0.02):
        call = stub.GenerateStream(request, metadata=AUTH, timeout=60)
        for msg in call:
            received += sum(len(o.token_ids) for o in msg.outputs)
            if received >= 3:
                running = fake_server.stats().num_requests_running
                call.cancel()
                break
    assert running == 1
    _wait_engine_idle(fake_server)
    metrics = httpx.get(f"{fake_server.http_url}/metrics",
                        headers={"Authorization": f"Bearer {API_KEY}"}).text
    assert 'jaxserve:kv_cache_usage_perc{model_name="demo"} 0.0' in metrics
    assert 'jaxserve:num_requests_running{model_name="demo"} 0.0' in metrics


def test_deadline_exceeded_aborts(fake_server, stub):
    request = pb.GenerateRequest(text="Once upon a time", sampling_params=pb.SamplingParams(
        max_tokens=110, ignore_eos=True))
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=AUTH, timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_engine_idle(fake_server)


def test_reflection_lists_service(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        list_services="")]), timeout=5)
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "jaxserve.v1.JaxServe" in names and "grpc.health.v1.Health" in names
