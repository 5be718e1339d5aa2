"""Hostile inputs at the edge: each is refused with 400 / INVALID_ARGUMENT naming the field,
and the server keeps serving (fake-runner engine; HTTP with httpx, gRPC with grpcio stubs)."""

from __future__ import annotations

import grpc
import httpx
import pytest

from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY, MODEL_NAME

AUTH = (("authorization", f"Bearer {API_KEY}"),)
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def stub(fake_server):
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        yield pb_grpc.JaxServeStub(channel)


def post(server, path: str, body: dict | str) -> httpx.Response:
    """POST a JSON body (a dict, or raw JSON text for what json.dumps cannot write)."""
    content = body if isinstance(body, str) else None
    return httpx.post(f"{server.http_url}{path}", headers=HEADERS, timeout=30,
                      content=content, json=None if content is not None else body)


def assert_refused(response: httpx.Response, field: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert field in error["message"], error
    assert error["type"] == "invalid_request_error"


def grpc_code(stub, request: pb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(request, metadata=AUTH, timeout=30)
    return info.value.code(), info.value.details()


def assert_still_serving(server) -> None:
    ok = post(server, "/v1/completions", {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------ item 7: non-finite floats
@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "min_p",
                                   "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "1e999"])
def test_http_infinite_floats_refused(fake_server, field, literal):
    for path, head in (("/v1/completions", '"prompt": "hi"'),
                       ("/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]')):
        raw = f'{{"model": "{MODEL_NAME}", {head}, "max_tokens": 2, "{field}": {literal}}}'
        assert_refused(post(fake_server, path, raw), field)
    raw = f'{{"model": "{MODEL_NAME}", "prompt": "hi", "logit_bias": {{"5": {literal}}}}}'
    assert_refused(post(fake_server, "/v1/completions", raw), "logit_bias")
    assert_still_serving(fake_server)


@pytest.mark.parametrize("field", ["temperature", "repetition_penalty", "top_p", "min_p",
                                   "presence_penalty", "frequency_penalty"])
def test_grpc_infinite_floats_refused(stub, field):
    for value in (float("inf"), float("-inf"), 1e300):
        params = pb.SamplingParams(max_tokens=2, **{field: value})
        code, details = grpc_code(stub, pb.GenerateRequest(text="hi", sampling_params=params))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and field in details
    params = pb.SamplingParams(max_tokens=2, logit_bias={5: float("inf")})
    code, details = grpc_code(stub, pb.GenerateRequest(text="hi", sampling_params=params))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "logit_bias" in details


# ------------------------------------------------------------------ items 2, 4, 20: bounded lists
@pytest.mark.parametrize("extra, field", [
    ({"n": 10**6}, "n"),
    ({"n": 10**6, "best_of": 10**6}, "n"),
    ({"best_of": 10**6}, "best_of"),
    ({"stop": [f"s{i}" for i in range(100_000)]}, "stop"),
    ({"stop": "x" * 1_000_000}, "stop"),
    ({"stop_token_ids": list(range(1000)), "min_tokens": 1}, "stop_token_ids"),
])
def test_http_unbounded_requests_refused(fake_server, extra, field):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, **extra}
    assert_refused(post(fake_server, "/v1/completions", body), field)
    if "best_of" not in extra:
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2, **extra}
        assert_refused(post(fake_server, "/v1/chat/completions", chat), field)
    assert_still_serving(fake_server)


@pytest.mark.parametrize("params, field", [
    (pb.SamplingParams(n=10**6), "n"),
    (pb.SamplingParams(stop=[f"s{i}" for i in range(100_000)]), "stop"),
    (pb.SamplingParams(stop=["x" * 100_000]), "stop"),
    (pb.SamplingParams(stop_token_ids=list(range(1000)), min_tokens=1), "stop_token_ids"),
])
def test_grpc_unbounded_requests_refused(stub, params, field):
    code, details = grpc_code(stub, pb.GenerateRequest(text="hi", sampling_params=params))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details


# ------------------------------------------------------------------ item 6: not-UTF-8 text
SURROGATE = '"a\\ud800b"'  # JSON text of a str with a lone surrogate


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", f'{{"prompt": {SURROGATE}}}', "prompt"),
    ("/v1/completions", f'{{"prompt": ["ok", {SURROGATE}]}}', "prompt[1]"),
    ("/v1/completions", f'{{"prompt": "hi", "stop": [{SURROGATE}]}}', "stop[0]"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
     "messages.0.content"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": '
     f'[{{"type": "text", "text": {SURROGATE}}}]}}]}}', "messages.0.content[0].text"),
    ("/tokenize", f'{{"prompt": {SURROGATE}}}', "prompt"),
    ("/tokenize", f'{{"messages": [{{"role": "user", "content": {SURROGATE}}}]}}',
     "messages.0.content"),
])
def test_http_lone_surrogates_refused(fake_server, path, body, field):
    response = post(fake_server, path, body)
    assert_refused(response, field)
    assert response.json()["error"]["param"] == field
    assert_still_serving(fake_server)


def _raw_rpc(channel, method: str, data: bytes, metadata=AUTH):
    """Call `method` with raw bytes (what a client with its own encoder could send)."""
    if method.endswith("Stream"):
        call = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        return list(call(data, metadata=metadata, timeout=30))
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    return call(data, metadata=metadata, timeout=30)


@pytest.mark.parametrize("method, message, field", [
    ("Generate", pb.GenerateRequest(text="hello"), "text"),
    ("GenerateStream", pb.GenerateRequest(text="hello"), "text"),
    ("Generate", pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(
        stop=["x", "hello"])), "sampling_params.stop"),
    ("Tokenize", pb.TokenizeRequest(text="hello"), "text"),
])
def test_grpc_invalid_utf8_is_invalid_argument(fake_server, method, message, field):
    data = message.SerializeToString().replace(b"hello", b"hel\xfflo")
    with grpc.insecure_channel(fake_server.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as info:
            _raw_rpc(channel, f"/jaxserve.v1.JaxServe/{method}", data)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert info.value.details().startswith(f"{field}:"), info.value.details()
        with pytest.raises(grpc.RpcError) as info:  # without the key: refused first
            _raw_rpc(channel, f"/jaxserve.v1.JaxServe/{method}", data, metadata=())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=2))
        reply = _raw_rpc(channel, "/jaxserve.v1.JaxServe/Generate", good.SerializeToString())
        assert pb.GenerateResponse.FromString(reply).outputs[0].token_ids


# ------------------------------------------------------------------ item 9: strict types
CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": None}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"content": "hi"}]}, "messages.0.role"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "n": True}, "n"),
    ("/v1/completions", {**COMPLETION, "temperature": "0.5"}, "temperature"),
    ("/v1/completions", {**COMPLETION, "stream": "true"}, "stream"),
    ("/v1/completions", {**COMPLETION, "prompt": ["1", 2]}, "prompt"),
    ("/detokenize", {"tokens": ["1"]}, "tokens"),
])
def test_http_strict_types(fake_server, path, body, field):
    response = post(fake_server, path, body)
    assert_refused(response, field)
    assert response.json()["error"]["param"].startswith(field)


# ------------------------------------------------------------------ item 14: unknown fields
@pytest.mark.parametrize("path, extra, field", [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type"),
    ("/v1/chat/completions", {"guided_json": {"type": "object"}}, "guided_json"),
    ("/v1/completions", {"guided_regex": "a+"}, "guided_regex"),
    ("/v1/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ("/v1/completions", {"use_beam_search": True}, "use_beam_search"),
    ("/v1/completions", {"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
    ("/v1/completions", {"add_special_tokens": False}, "add_special_tokens"),
    ("/v1/completions", {"bad_words": ["x"]}, "bad_words"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"no_such_field": 1}, "no_such_field"),
])
def test_http_unsupported_fields_refused(fake_server, path, extra, field):
    base = CHAT if "chat" in path else COMPLETION
    response = post(fake_server, path, {**base, **extra})
    assert_refused(response, field)
    assert response.json()["error"]["param"] == field


@pytest.mark.parametrize("path, extra", [
    ("/v1/chat/completions", {"user": "u1", "parallel_tool_calls": True, "tool_choice": "none",
                              "response_format": {"type": "text"}}),
    ("/v1/completions", {"user": "u1", "use_beam_search": False, "length_penalty": 1.0,
                         "spaces_between_special_tokens": True, "priority": 0,
                         "echo": False, "best_of": 1, "response_format": {"type": "text"}}),
])
def test_http_documented_no_op_fields_accepted(fake_server, path, extra):
    base = CHAT if "chat" in path else COMPLETION
    response = post(fake_server, path, {**base, **extra})
    assert response.status_code == 200, response.text
