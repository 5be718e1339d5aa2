"""A dead engine loop is fatal: health turns NOT_SERVING and the server process exits non-zero."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serving.harness import ServerThread, make_fake_engine
from tests.serving.serve_fake import CRASH_PROMPT, crashable

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_engine_loop_failure_exits_nonzero(demo_model_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.serving.serve_fake", demo_model_path, "1.0", "0.0",
         "crashable"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()
        assert line.startswith("PORTS"), (line, proc.stderr.read() if proc.poll() else "")
        url = f"http://127.0.0.1:{int(line.split()[1])}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        ok = httpx.post(f"{url}/v1/completions",
                        json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200, ok.text
        failed = httpx.post(f"{url}/v1/completions",
                            json={"prompt": CRASH_PROMPT, "max_tokens": 3}, timeout=30)
        assert failed.status_code >= 500
        code = proc.wait(30)  # not a zombie: the process ends by itself
        stderr = proc.stderr.read()
        assert code != 0, stderr
        assert "engine loop" in stderr and "injected engine-loop failure" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_loop_failure_turns_health_not_serving(demo_tokenizer):
    server = ServerThread(lambda: crashable(make_fake_engine(demo_tokenizer)),
                          api_key=None).start()
    try:
        assert httpx.get(f"{server.http_url}/health").status_code == 200
        httpx.post(f"{server.http_url}/v1/completions",
                   json={"prompt": CRASH_PROMPT, "max_tokens": 3}, timeout=30)
        deadline = time.monotonic() + 10
        while not server.frontends.engine_died.is_set():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert httpx.get(f"{server.http_url}/health").status_code == 503
        with grpc.insecure_channel(server.grpc_target) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()
