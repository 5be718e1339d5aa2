"""SIGTERM during load: health NOT_SERVING, new requests refused, in-flight ones end, exit 0."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _stream_finish_reason(url: str, max_tokens: int, started: threading.Event) -> str | None:
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True}
    finish = None
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            started.set()
            for choice in json.loads(line[len("data: "):])["choices"]:
                finish = choice["finish_reason"] or finish
    return finish


def test_sigterm_drains_and_exits_zero(demo_model_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serving.serve_fake", demo_model_path, "1.0", "0.03"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORTS"), (line, proc.stderr.read() if proc.poll() else "")
        http_port, grpc_port = map(int, line.split()[1:])
        url = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)

        results: dict[int, str | None] = {}
        started = [threading.Event() for _ in range(6)]
        lengths = [100, 100, 100, 100, 20, 20]  # 100 tokens outlive the 1 s grace period

        def run(i: int) -> None:
            results[i] = _stream_finish_reason(url, lengths[i], started[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for event in started:
            assert event.wait(30)
        proc.send_signal(signal.SIGTERM)

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            status = None
            for _ in range(50):
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        refused = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and "error" in refused.json()
        assert httpx.get(f"{url}/health").status_code == 503

        for t in threads:
            t.join(30)
        assert proc.wait(30) == 0
        assert set(results) == set(range(6))
        assert all(results[i] in ("length", "abort") for i in range(6)), results
        assert results[4] == results[5] == "length"
        assert "abort" in results.values()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
