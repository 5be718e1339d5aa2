"""Two processes on 127.0.0.1 (one CPU device each), tp=2 across them, give tp=1's tokens.

Through the Python API (both processes call LLM(...); process 1 follows until process 0 exits)
and through process 0's HTTP server (official `openai` client); a killed process 1 makes
process 0 exit non-zero with a message.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from jaxserve import LLM, SamplingParams

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROMPTS = [list(range(5, 5 + n)) for n in (3, 17, 40, 9, 60)]  # mixed lengths, chunked prefill
ENGINE = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _tp1_tokens(path: str, max_tokens: int = 8) -> list[list[int]]:
    llm = LLM(path, use_tqdm_on_load=False, **ENGINE)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


SCRIPT = textwrap.dedent("""
    import json, sys
    from jaxserve import LLM, SamplingParams
    pid, addr, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    llm = LLM(path, tensor_parallel_size=2, num_processes=2, process_id=pid,
              coordinator_address=addr, use_tqdm_on_load=False, **json.loads(sys.argv[4]))
    if llm.engine is None:
        print("FOLLOWER-DONE", flush=True)
        sys.exit(0)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in json.loads(sys.argv[5])]
    outs = llm.generate(prompts, params, use_tqdm=False)
    print("TOKENS " + json.dumps([o.outputs[0].token_ids for o in outs]), flush=True)
    regex = SamplingParams(temperature=0.0, max_tokens=20,
                           structured_outputs={"regex": "[a-d]{3}-[0-9]{2}"})
    outs = llm.generate(["Hello", "Hi"], regex, use_tqdm=False)
    print("REGEX " + json.dumps([o.outputs[0].text for o in outs]), flush=True)
""")


def test_python_api_two_processes_tp2_equal_tp1(tiny_checkpoints):
    import json

    path = tiny_checkpoints("LlamaForCausalLM")
    addr = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(pid), addr, path,
                               json.dumps(ENGINE), json.dumps(PROMPTS)],
                              cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "FOLLOWER-DONE" in outs[1][0]
    line = next(x for x in outs[0][0].splitlines() if x.startswith("TOKENS "))
    assert json.loads(line[len("TOKENS "):]) == _tp1_tokens(path)
    # structured outputs: the matchers stay in process 0, the follower gets their masks
    line = next(x for x in outs[0][0].splitlines() if x.startswith("REGEX "))
    texts = json.loads(line[len("REGEX "):])
    assert all(re.fullmatch("[a-d]{3}-[0-9]{2}", t) for t in texts), texts


def _serve(path: str, pid: int, addr: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxserve.cli", "serve", path, "--tensor-parallel-size", "2",
           "--num-processes", "2", "--process-id", str(pid), "--coordinator-address", addr,
           "--port", str(port), "--grpc-port", "0", "--max-model-len", "128",
           "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
           "--no-compilation-cache"]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_healthy(url: str, procs, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            assert p.poll() is None, p.stderr.read()[-3000:]
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server never became healthy"
        time.sleep(0.2)


@pytest.fixture
def served(tiny_checkpoints):
    path = tiny_checkpoints("LlamaForCausalLM")
    addr, port = f"127.0.0.1:{_free_port()}", _free_port()
    procs = [_serve(path, 0, addr, port), _serve(path, 1, addr, port)]
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", procs)
        yield path, port, procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_http_server_of_process_0_and_a_killed_follower(served):
    import openai

    path, port, (leader, follower) = served
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    llm = LLM(path, use_tqdm_on_load=False, **ENGINE)
    tok = llm.get_tokenizer()
    want = _tp1_tokens(path)
    for prompt, tokens in zip(PROMPTS[:3], want[:3]):
        res = client.completions.create(model=path, prompt=prompt, max_tokens=8,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert res.choices[0].text == tok.decode(tokens, skip_special_tokens=True)

    follower.kill()  # process 1 dies: process 0 must not serve on, nor hang
    follower.wait()
    t = time.monotonic()
    try:
        client.with_options(timeout=60, max_retries=0).completions.create(
            model=path, prompt=PROMPTS[0], max_tokens=8, temperature=0.0)
    except openai.APIError:
        pass  # failed or cut off: either way nothing is served from a broken job
    code = leader.wait(timeout=90)
    stderr = leader.stderr.read()
    assert code != 0, stderr[-3000:]
    assert time.monotonic() - t < 90
    assert ("process of the 2-process job failed" in stderr
            or "has not been heard from" in stderr), stderr[-3000:]
