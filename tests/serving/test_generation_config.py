"""generation_config.json sampling defaults, as vLLM applies them (--generation-config
auto|vllm|DIR): fields a request leaves unset take the model's defaults, over HTTP and gRPC."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest

from jaxserve.config import ConfigError, read_generation_defaults
from jaxserve.llm import EngineArgs, _generation_defaults
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import API_KEY, MODEL_NAME, ServerThread, make_fake_engine

DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1,
            "max_tokens": 3}


def _write(directory, **fields) -> str:
    (directory / "generation_config.json").write_text(json.dumps(fields))
    return str(directory)


def test_read_generation_defaults(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    _write(model, temperature=0.6, top_p=0.9, top_k=20, repetition_penalty=1.1,
           max_new_tokens=3, eos_token_id=2, do_sample=True)
    assert read_generation_defaults(str(model)) == DEFAULTS
    assert read_generation_defaults(str(model), "vllm") == {}
    other = tmp_path / "other"
    other.mkdir()
    assert read_generation_defaults(str(model), _write(other, temperature=0.2)) == {
        "temperature": 0.2}
    with pytest.raises(ConfigError, match="generation_config"):
        read_generation_defaults(str(model), str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_generation_defaults(str(empty)) == {}
    bad = tmp_path / "bad"
    bad.mkdir()
    _write(bad, temperature=-1)
    with pytest.raises(ValueError, match="temperature"):  # refused at start, naming the field
        _generation_defaults(EngineArgs(model=str(bad)), str(bad))


@pytest.fixture(scope="module")
def server(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer,
                                                   generation_defaults=DEFAULTS)).start()
    seen = []
    runner = server.llm_engine.runner
    execute = runner.execute

    def recording(scheduler_output):
        seen.extend(c.sampling_params for c in scheduler_output.chunks)
        return execute(scheduler_output)

    runner.execute = recording
    server.seen = seen
    yield server
    server.stop()


def _last_params(server):
    return server.seen[-1]


def test_http_applies_defaults_request_wins(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url = f"{server.http_url}/v1/completions"
    r = httpx.post(url, headers=headers, json={"model": MODEL_NAME, "prompt": "hi",
                                               "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 3
    p = _last_params(server)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.9, 20, 1.1)
    r = httpx.post(url, headers=headers, json={"model": MODEL_NAME, "prompt": "hi",
                                               "ignore_eos": True, "max_tokens": 5,
                                               "temperature": 0.0})
    assert r.json()["usage"]["completion_tokens"] == 5
    assert _last_params(server).temperature == 0.0 and _last_params(server).top_k == 20
    chat = httpx.post(f"{server.http_url}/v1/chat/completions", headers=headers, json={
        "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}],
        "ignore_eos": True, "top_p": 0.5})
    assert chat.json()["usage"]["completion_tokens"] == 3
    assert _last_params(server).top_p == 0.5 and _last_params(server).temperature == 0.6


def test_grpc_applies_defaults(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.JaxServeStub(channel)
        reply = stub.Generate(pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(
            ignore_eos=True, top_k=5)), metadata=(("authorization", f"Bearer {API_KEY}"),))
    assert len(reply.outputs[0].token_ids) == 3
    p = _last_params(server)
    assert (p.temperature, p.top_k) == (0.6, 5)
