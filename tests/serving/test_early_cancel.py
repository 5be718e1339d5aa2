"""Callers that leave at any moment (before admission, mid-stream, by deadline) never hurt the loop."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time

import grpc
import httpx

from jaxserve.engine.async_engine import AsyncEngine, RequestDeadlineError
from jaxserve.engine.sampling_params import SamplingParams
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from tests.serving.harness import MODEL_NAME, ServerThread, make_fake_engine


def _held_adds(llm):
    """Make `llm.add_request` wait for the returned event: the engine thread is then parked
    inside admission, exactly where a leaving caller used to break it."""
    release = threading.Event()
    entered = threading.Event()
    original = llm.add_request

    def add_request(*args, **kwargs):
        entered.set()
        release.wait(10)
        return original(*args, **kwargs)

    llm.add_request = add_request
    return entered, release


def _assert_idle(engine: AsyncEngine, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        stats = engine.last_stats
        if (not engine.is_dead and stats is not None and engine.num_in_flight == 0
                and not engine.engine.has_unfinished_requests()
                and stats.kv_blocks_free == stats.kv_blocks_total
                and stats.num_requests_running == 0 and stats.num_requests_waiting == 0):
            return
        time.sleep(0.01)
    raise AssertionError(f"engine not idle: dead={engine.is_dead} {engine.last_stats}")


async def _finish_one(engine: AsyncEngine, request_id: str) -> str:
    final = None
    async for out in engine.generate("Hello there", SamplingParams(max_tokens=5), request_id):
        final = out
    return final.outputs[0].finish_reason


def test_cancel_while_engine_admits_keeps_the_loop_alive(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer)
    entered, release = _held_adds(llm)
    engine = AsyncEngine(llm)
    try:
        async def main():
            task = asyncio.ensure_future(_finish_one(engine, "leaves"))
            while not entered.is_set():
                await asyncio.sleep(0.001)
            task.cancel()  # the caller leaves while the engine thread is inside add_request
            try:
                await task
            except asyncio.CancelledError:
                pass
            release.set()
            return await _finish_one(engine, "after")

        assert asyncio.run(main()) == "length"
        assert not engine.is_dead
        _assert_idle(engine)  # the admitted-then-abandoned request was aborted, blocks freed
    finally:
        release.set()
        engine.shutdown()


def test_cancel_before_engine_sees_the_add(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer)
    step_gate = threading.Event()
    original_step = llm.step

    def gated_step():
        step_gate.wait(10)
        return original_step()

    llm.step = gated_step
    engine = AsyncEngine(llm)
    try:
        async def main():
            first = asyncio.ensure_future(_finish_one(engine, "first"))
            while engine.last_stats is None and not llm.has_unfinished_requests():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.02)  # the loop is now parked in step(); the add waits
            late = asyncio.ensure_future(_finish_one(engine, "late"))
            await asyncio.sleep(0.02)
            late.cancel()
            try:
                await late
            except asyncio.CancelledError:
                pass
            step_gate.set()
            return await first

        assert asyncio.run(main()) == "length"
        _assert_idle(engine)
        assert "late" not in llm.requests  # never admitted: its caller had left
    finally:
        step_gate.set()
        engine.shutdown()


def test_deadline_before_admission_is_a_deadline_error(demo_tokenizer):
    llm = make_fake_engine(demo_tokenizer)
    entered, release = _held_adds(llm)
    engine = AsyncEngine(llm)
    try:
        async def main():
            outputs = engine.generate("Hi", SamplingParams(max_tokens=4), "d",
                                      deadline=time.monotonic() + 0.05)
            try:
                async for _ in outputs:
                    pass
            except RequestDeadlineError:
                return "deadline"
            return "finished"

        assert asyncio.run(main()) == "deadline"
        release.set()
        assert asyncio.run(_finish_one(engine, "next")) == "length"
        _assert_idle(engine)
    finally:
        release.set()
        engine.shutdown()


def _raw_http_hangup(port: int, body: bytes, when: threading.Event) -> None:
    """Send a request on a raw socket and hang up once `when` is set."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert when.wait(10)


def test_raw_socket_hangup_during_admission_over_http(demo_tokenizer):
    built = {}

    def build():
        llm = make_fake_engine(demo_tokenizer)
        built["gate"] = _held_adds(llm)
        return llm

    server = ServerThread(build, api_key=None).start()
    entered, release = built["gate"]
    try:
        body = b'{"model": "%s", "prompt": "Hello", "max_tokens": 20}' % MODEL_NAME.encode()
        _raw_http_hangup(server.frontends.http_port, body, entered)  # hangs up mid-admission
        time.sleep(0.2)  # the handler notices the disconnect and cancels its engine call
        release.set()
        response = httpx.post(f"{server.http_url}/v1/completions",
                              json={"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 3},
                              timeout=30)
        assert response.status_code == 200, response.text
        assert httpx.get(f"{server.http_url}/health").status_code == 200
        _assert_idle(server.frontends.engine)
    finally:
        release.set()
        server.stop()


def _storm_round(server: ServerThread, rng: random.Random) -> None:
    """Many clients; most hang up at a random moment, gRPC ones with deadlines of a few ms."""
    port = server.frontends.http_port

    def http_client(i: int) -> None:
        stream = rng.random() < 0.5
        body = (b'{"model": "%s", "prompt": "storm %d", "max_tokens": %d, "ignore_eos": true, '
                b'"stream": %s}' % (MODEL_NAME.encode(), i, rng.randint(1, 40),
                                    b"true" if stream else b"false"))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         b"application/json\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\n\r\n" + body)
            time.sleep(rng.choice([0, 0, 0.001, 0.003, 0.01, 0.03]))
            if rng.random() < 0.2:
                sock.recv(4096)

    def grpc_client(i: int) -> None:
        with grpc.insecure_channel(server.grpc_target) as channel:
            request = pb.GenerateRequest(text=f"storm {i}", sampling_params=pb.SamplingParams(
                max_tokens=rng.randint(1, 40), ignore_eos=True))
            try:
                pb_grpc.JaxServeStub(channel).Generate(
                    request, timeout=rng.choice([0.002, 0.005, 0.02, 0.5]))
            except grpc.RpcError as exc:
                assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                      grpc.StatusCode.CANCELLED), exc

    threads = [threading.Thread(target=http_client if i % 3 else grpc_client, args=(i,))
               for i in range(120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_disconnect_storm_leaves_the_engine_alive_and_empty(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer, step_delay_s=0.002,
                                                   max_num_seqs=8),
                          api_key=None).start()
    try:
        rng = random.Random(7)
        for _ in range(4):  # repeated: one lucky round proves little
            _storm_round(server, rng)
            response = httpx.post(f"{server.http_url}/v1/completions",
                                  json={"model": MODEL_NAME, "prompt": "ok", "max_tokens": 3},
                                  timeout=60)
            assert response.status_code == 200, response.text
            _assert_idle(server.frontends.engine, timeout=30)
            metrics = httpx.get(f"{server.http_url}/metrics").text
            running = [line for line in metrics.splitlines()
                       if line.startswith("jaxserve:num_requests_running")]
            assert running and all(line.endswith(" 0.0") for line in running), running
    finally:
        server.stop()
