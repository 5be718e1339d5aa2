"""End to end on the real engine (demo model, compiled once for this module) over loopback."""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest

from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY, MODEL_NAME, ServerThread

AUTH = (("authorization", f"Bearer {API_KEY}"),)
PROMPT = "The quick brown fox"
CASES = {  # name -> (python SamplingParams kwargs)
    "greedy": dict(temperature=0.0, max_tokens=8),
    "seeded": dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=8),
}


def _python_api(engine, prompt, params: SamplingParams) -> list[int]:
    """The Python API's answer: add the request to the LLMEngine and step it to the end."""
    engine.add_request(f"ref-{id(params)}", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            final = out if out.finished else final
    return list(final.outputs[0].token_ids)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def real(demo_model_path, request):
    """The server over an engine that schedules synchronously, then one with async scheduling."""
    from jaxserve.llm import EngineArgs, create_engine

    engine = create_engine(EngineArgs(model=demo_model_path, max_model_len=128, max_num_seqs=4,
                                      max_num_batched_tokens=64, show_progress=False,
                                      async_scheduling=request.param))
    expected = {name: _python_api(engine, PROMPT, SamplingParams(**kw))
                for name, kw in CASES.items()}
    compilations = engine.get_stats().num_compilations
    server = ServerThread(lambda: engine).start()
    yield server, expected, compilations
    server.stop()


def test_grpc_unary_and_stream_equal_python_api(real):
    server, expected, _ = real
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.JaxServeStub(channel)
        for name, kw in CASES.items():
            request = pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(**kw))
            unary = stub.Generate(request, metadata=AUTH, timeout=60)
            assert list(unary.outputs[0].token_ids) == expected[name], name
            streamed = [t for msg in stub.GenerateStream(request, metadata=AUTH, timeout=60)
                        for out in msg.outputs for t in out.token_ids]
            assert streamed == expected[name], name


def test_openai_completions_and_chat_stream_equals_whole(real):
    server, expected, _ = real
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY, max_retries=0)
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=8, temperature=0.0)
    whole = client.completions.create(**kw)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 8
    assert server.llm_engine.tokenizer.decode(expected["greedy"]) == whole.choices[0].text
    chat_kw = dict(model=MODEL_NAME, max_tokens=8, temperature=0.0,
                   messages=[{"role": "user", "content": "Tell me about JAX"}])
    chat = client.chat.completions.create(**chat_kw)
    chunks = list(client.chat.completions.create(**chat_kw, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8


def test_cancel_frees_blocks_and_no_compilation_while_serving(real):
    server, _, compilations = real
    request = pb.GenerateRequest(text=PROMPT, sampling_params=pb.SamplingParams(
        max_tokens=100, ignore_eos=True))
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = pb_grpc.JaxServeStub(channel).GenerateStream(request, metadata=AUTH, timeout=60)
        for i, _ in enumerate(call):
            if i == 2:
                call.cancel()
                break
    end = time.monotonic() + 10
    metrics = ""
    while time.monotonic() < end:
        metrics = httpx.get(f"{server.http_url}/metrics",
                            headers={"Authorization": f"Bearer {API_KEY}"}).text
        if ('jaxserve:kv_cache_usage_perc{model_name="demo"} 0.0' in metrics
                and 'jaxserve:num_requests_running{model_name="demo"} 0.0' in metrics):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(metrics)
    assert server.stats().num_compilations == compilations  # serving never compiles
