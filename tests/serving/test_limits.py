"""Refusals: queue full (429 / RESOURCE_EXHAUSTED), not ready (503 / UNAVAILABLE); the log line."""

from __future__ import annotations

import asyncio
import threading

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jaxserve.engine.stats import EngineStats
from jaxserve.serving.metrics import EngineMetrics, StatLogger
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import MODEL_NAME, ServerThread, make_fake_engine


def test_queue_full_is_refused(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer, step_delay_s=0.01,
                                                   max_num_seqs=1),
                          max_queued_requests=1, api_key=None,
                          max_grpc_message_bytes=4096).start()
    try:
        client = openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="unused",
                                    max_retries=0)

        async def one(i: int):
            return await client.completions.create(model=MODEL_NAME, prompt=f"r{i}",
                                                   max_tokens=10, extra_body={"ignore_eos": True})

        async def flood():
            try:
                return await asyncio.gather(*[one(i) for i in range(6)], return_exceptions=True)
            finally:
                await client.close()

        results = asyncio.run(flood())
        assert any(isinstance(r, openai.RateLimitError) for r in results), results
        assert any(not isinstance(r, Exception) for r in results), results

        async def grpc_flood():
            async with grpc.aio.insecure_channel(server.grpc_target) as channel:
                stub = pb_grpc.JaxServeStub(channel)
                request = pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(
                    max_tokens=10, ignore_eos=True))
                return await asyncio.gather(*[stub.Generate(request, timeout=30)
                                              for _ in range(6)], return_exceptions=True)

        codes = [r.code() for r in asyncio.run(grpc_flood()) if isinstance(r, grpc.RpcError)]
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        with grpc.insecure_channel(server.grpc_target) as channel:  # message size is bounded
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.JaxServeStub(channel).Generate(pb.GenerateRequest(text="x" * 8192),
                                                       timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop()


def test_not_ready_while_engine_builds(demo_tokenizer):
    release = threading.Event()

    def slow_build():
        release.wait(30)
        return make_fake_engine(demo_tokenizer)

    server = ServerThread(slow_build, api_key=None)
    server._thread.start()
    server.call(server.frontends.start())
    loading = asyncio.run_coroutine_threadsafe(server.frontends.load_engine(slow_build),
                                               server.loop)
    try:
        url = server.http_url
        assert httpx.get(f"{url}/health").status_code == 503
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"})
        assert refused.status_code == 503 and refused.json()["error"]["message"]
        with grpc.insecure_channel(server.grpc_target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.JaxServeStub(channel).Generate(pb.GenerateRequest(text="hi"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        loading.result(30)
        assert httpx.get(f"{url}/health").status_code == 200
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    finally:
        release.set()
        server.stop()


def test_stat_log_line():
    metrics = EngineMetrics("m")
    logger = StatLogger(metrics)
    metrics.on_stats(EngineStats(kv_blocks_total=10, kv_blocks_free=5, prefix_cache_queries=100,
                                 prefix_cache_hits=25, num_requests_running=2,
                                 num_requests_waiting=1))
    line = logger.line()
    assert "Running: 2 reqs" in line and "Waiting: 1 reqs" in line
    assert "KV cache usage: 50.0%" in line and "Prefix cache hit rate: 25.0%" in line
    assert "generation throughput" in line
