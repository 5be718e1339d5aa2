"""Structured outputs and tool calling through the official `openai` client, on the real engine
with a random-weight tiny model whose chat template renders tools and <tool_call> blocks (the
hermes format). Only the constraint makes its output valid JSON."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pytest

from tests.serving.harness import API_KEY, MODEL_NAME, ServerThread

TEMPLATE = (
    "{%- if tools %}<|system|>\n<tools>{% for t in tools %}{{ t.function.name }}: "
    "{{ t.function.parameters | tojson }}\n{% endfor %}"
    "</tools></s>\n{% endif %}"
    "{%- for m in messages %}<|{{ m['role'] }}|>\n"
    "{%- if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{% endfor %}{% else %}{{ m['content'] }}{% endif %}</s>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 8},
                          "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["utc", "cet", "pst"]}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0,
                                                   "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tiny_checkpoints, tmp_path_factory):
    from jaxserve.llm import EngineArgs, create_engine

    engine = create_engine(EngineArgs(
        model=tiny_checkpoints("LlamaForCausalLM"), chat_template=TEMPLATE, dtype="float32",
        max_model_len=512, max_num_seqs=4, max_num_batched_tokens=128, block_size=16,
        show_progress=False, seed=0))
    srv = ServerThread(lambda: engine, enable_auto_tool_choice=True,
                       tool_call_parser="hermes").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0)


def _chat(client, **kw):
    kw.setdefault("max_tokens", 120)
    kw.setdefault("temperature", 1.0)
    return client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, **kw)


def _stream(client, **kw) -> tuple[str, dict[int, dict], list[str]]:
    """(content, tool calls by index accumulated from deltas, finish reasons)."""
    content, calls, reasons = "", {}, []
    for chunk in _chat(client, stream=True, **kw):
        for choice in chunk.choices:
            d = choice.delta
            content += d.content or ""
            for tc in d.tool_calls or []:
                call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = tc.id or call["id"]
                if tc.function is not None:
                    call["name"] += tc.function.name or ""
                    call["arguments"] += tc.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    return content, calls, reasons


def test_tools_reach_the_chat_template(server):
    from jaxserve.serving.openai_chat import chat_prompt_ids
    from jaxserve.serving.openai_protocol import ChatCompletionRequest

    tok = server.llm_engine.tokenizer
    body = ChatCompletionRequest(messages=MESSAGES, tools=TOOLS)
    text = tok.decode(chat_prompt_ids(tok, body))
    assert "<tools>" in text and "get_weather: {" in text and '"maxLength": 8' in text


def test_response_format_json_schema(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(4):
        out = _chat(client, response_format=fmt, seed=seed, n=2)
        for choice in out.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), PERSON)
    content, _, reasons = _stream(client, response_format=fmt, seed=9)
    jsonschema.validate(json.loads(content), PERSON)
    assert reasons == ["stop"]


def test_response_format_json_object_and_vllm_structured_outputs(client):
    out = _chat(client, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}, seed=1)
    assert out.choices[0].message.content in ("yes", "no")
    out = _chat(client, extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", out.choices[0].message.content)
    comp = client.completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=40,
                                     extra_body={"structured_outputs": {"regex": "x{2,3}y"}})
    assert re.fullmatch("x{2,3}y", comp.choices[0].text)


def _check_calls(calls: list[tuple[str, str]]) -> None:
    assert calls
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tool_choice_required(client):
    # parallel_tool_calls false: one call (a random model might add calls until max_tokens)
    one = dict(tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for seed in range(3):
        out = _chat(client, seed=seed, **one)
        msg = out.choices[0].message
        assert out.choices[0].finish_reason == "tool_calls"
        assert len(msg.tool_calls) == 1
        _check_calls([(c.function.name, c.function.arguments) for c in msg.tool_calls])
        assert all(c.id and c.type == "function" for c in msg.tool_calls)
    _, calls, reasons = _stream(client, seed=5, **one)
    _check_calls([(c["name"], c["arguments"]) for c in calls.values()])
    assert reasons == ["tool_calls"]
    # parallel calls: every call completed within max_tokens is returned, each valid
    for stream in (False, True):
        if stream:
            _, streamed, _ = _stream(client, tools=TOOLS, tool_choice="required", seed=7)
            got = [(c["name"], c["arguments"]) for c in streamed.values()]
        else:
            out = _chat(client, tools=TOOLS, tool_choice="required", seed=7)
            got = [(c.function.name, c.function.arguments)
                   for c in out.choices[0].message.tool_calls]
        _check_calls(got)


def test_tool_choice_named(client):
    choice = {"type": "function", "function": {"name": "get_time"}}
    for seed in range(3):
        out = _chat(client, tools=TOOLS, tool_choice=choice, seed=seed)
        calls = out.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        _check_calls([("get_time", calls[0].function.arguments)])
    _, calls, reasons = _stream(client, tools=TOOLS, tool_choice=choice, seed=3)
    assert list(calls) == [0] and calls[0]["name"] == "get_time" and calls[0]["id"]
    _check_calls([("get_time", calls[0]["arguments"])])
    assert reasons == ["stop"]


# The random model does not write tool calls by itself: a regex makes it write one block of
# the hermes format (text before it, then <tool_call>{...}</tool_call>), which "auto" parses.
HERMES_REGEX = (r'[a-z]{1,6} <tool_call>\{"name": "get_weather", "arguments": '
                r'\{"city": "[a-z]{1,8}", "unit": "(c|f)"\}\}</tool_call>')


def test_tool_choice_auto_parses_hermes_blocks(client):
    extra = {"structured_outputs": {"regex": HERMES_REGEX}}
    out = _chat(client, tools=TOOLS, tool_choice="auto", extra_body=extra, seed=2)
    msg = out.choices[0].message
    assert out.choices[0].finish_reason == "tool_calls"
    assert re.fullmatch("[a-z]{1,6}", msg.content)
    _check_calls([(c.function.name, c.function.arguments) for c in msg.tool_calls])
    content, calls, reasons = _stream(client, tools=TOOLS, extra_body=extra, seed=2)
    assert content.strip() == msg.content  # the same seed: the same text and call
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
    assert reasons == ["tool_calls"]
    # without tool calls in the output, "auto" returns plain content
    out = _chat(client, tools=TOOLS, extra_body={"structured_outputs": {"regex": "[a-z]{3}"}})
    assert out.choices[0].message.tool_calls in (None, []) and out.choices[0].finish_reason \
        == "stop"


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema",
                          "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "structured_outputs.json"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
])
def test_bad_constraints_are_400_naming_the_field(server, body, field):
    r = httpx.post(f"{server.http_url}/v1/chat/completions",
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert field in (err.get("param") or "") + err["message"], err


def test_grpc_structured_outputs(server):
    import grpc

    from jaxserve.serving.proto import jaxserve_pb2 as pb
    from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc

    auth = (("authorization", f"Bearer {API_KEY}"),)
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.JaxServeStub(channel)
        cases = [
            (pb.StructuredOutputs(json=json.dumps(PERSON)),
             lambda t: jsonschema.validate(json.loads(t), PERSON)),
            (pb.StructuredOutputs(regex="[a-c]{2}-[0-9]{2}"),
             lambda t: re.fullmatch("[a-c]{2}-[0-9]{2}", t) or pytest.fail(t)),
            (pb.StructuredOutputs(choice=pb.Choices(choices=["up", "down"])),
             lambda t: t in ("up", "down") or pytest.fail(t)),
        ]
        for so, check in cases:
            params = pb.SamplingParams(temperature=1.0, seed=4, max_tokens=60, n=2,
                                       structured_outputs=so)
            reply = stub.Generate(pb.GenerateRequest(text="Hi", sampling_params=params),
                                  metadata=auth, timeout=60)
            for out in reply.outputs:
                check(out.text)
        bad = pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="(x"))
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(text="Hi", sampling_params=bad), metadata=auth,
                          timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "structured_outputs.regex" in err.value.details()
