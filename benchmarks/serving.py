"""Serving benchmark: Poisson arrivals against a running server (HTTP and/or gRPC), like vLLM's
`bench serve`. Reports TTFT, TPOT, ITL (p50/p99), req/s and tok/s as JSON lines, then a table.

    jaxserve serve MODEL --port 8000 --grpc-port 50051 &
    python benchmarks/serving.py --backend both --num-prompts 64 --input-len 128 \
        --output-len 32 --request-rate 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field

import grpc
import httpx

from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc

FIRST_TOKEN_ID = 10  # keep random prompts clear of the low special-token ids


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between token-bearing messages


# ---------------------------------------------------------------------------- clients
async def http_request(client: httpx.AsyncClient, args, prompt: list[int]) -> RequestResult:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len,
            "temperature": args.temperature, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt))
    last = result.start
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["text"]:
                    last = _mark_token(result, last)
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - counted as a failed request
        result.error = repr(exc)
    result.e2e = time.perf_counter() - result.start
    return result


async def grpc_request(stub, args, prompt: list[int]) -> RequestResult:
    params = pb.SamplingParams(max_tokens=args.output_len, temperature=args.temperature,
                               ignore_eos=True)
    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling_params=params)
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    result = RequestResult(start=time.perf_counter(), prompt_tokens=len(prompt))
    last = result.start
    try:
        async for msg in stub.GenerateStream(request, metadata=metadata):
            new = sum(len(o.token_ids) for o in msg.outputs)
            if new:
                result.output_tokens += new
                last = _mark_token(result, last)
        result.ok = True
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    result.e2e = time.perf_counter() - result.start
    return result


def _mark_token(result: RequestResult, last: float) -> float:
    now = time.perf_counter()
    if result.ttft == 0.0:
        result.ttft = now - result.start
    else:
        result.itl.append(now - last)
    return now


# ---------------------------------------------------------------------------- load
def random_prompts(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(args.input_len)]
            for _ in range(args.num_prompts)]


async def run_load(send, prompts: list[list[int]], rate: float, seed: int,
                   max_concurrency: int | None) -> tuple[list[RequestResult], float]:
    """Send each prompt at Poisson arrival times (rate req/s; inf = all at once)."""
    rng = random.Random(seed + 1)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def one(prompt: list[int]) -> RequestResult:
        if gate is None:
            return await send(prompt)
        async with gate:
            return await send(prompt)

    tasks = []
    start = time.perf_counter()
    for prompt in prompts:
        tasks.append(asyncio.create_task(one(prompt)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return results, time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summarize(backend: str, args, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    ttft = [r.ttft * 1e3 for r in done]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) * 1e3 for r in done if r.output_tokens > 1]
    itl = [x * 1e3 for r in done for x in r.itl]
    e2e = [r.e2e * 1e3 for r in done]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    row = {
        "workload": "serve-poisson", "backend": backend, "model": args.model,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "num_prompts": len(results),
        "input_len": args.input_len, "output_len": args.output_len,
        "completed": len(done), "failed": len(results) - len(done),
        "duration_s": round(duration, 3),
        "req_per_s": round(len(done) / duration, 3),
        "output_tok_per_s": round(out_tokens / duration, 1),
        "total_tok_per_s": round((in_tokens + out_tokens) / duration, 1),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        row[f"{name}_ms_mean"] = round(statistics.fmean(values), 2) if values else None
        row[f"{name}_ms_p50"] = round(_pct(values, 50), 2)
        row[f"{name}_ms_p99"] = round(_pct(values, 99), 2)
    errors = sorted({r.error for r in results if not r.ok})
    if errors:
        row["errors"] = errors[:3]
    return row


def print_table(rows: list[dict]) -> None:
    cols = ("backend", "completed", "req_per_s", "output_tok_per_s", "ttft_ms_p50", "ttft_ms_p99",
            "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99")
    widths = [max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r.get(c)).rjust(w) for c, w in zip(cols, widths)))


# ---------------------------------------------------------------------------- main
async def model_info(args) -> tuple[str, int]:
    """(served model name, vocab size), from GetModelInfo when gRPC is reachable."""
    if args.vocab_size and args.model:
        return args.model, args.vocab_size
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else None
    async with grpc.aio.insecure_channel(args.grpc_target) as channel:
        info = await pb_grpc.JaxServeStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), metadata=metadata, timeout=10)
    return args.model or info.name, args.vocab_size or info.vocab_size


async def main_async(args) -> list[dict]:
    args.model, vocab = await model_info(args)
    prompts = random_prompts(args, vocab)
    rows = []
    backends = ("http", "grpc") if args.backend == "both" else (args.backend,)
    for backend in backends:
        if backend == "http":
            headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=limits,
                                         timeout=httpx.Timeout(None)) as client:
                await http_request(client, args, prompts[0])  # warm the connection pool
                results, duration = await run_load(
                    lambda p: http_request(client, args, p), prompts, args.request_rate,
                    args.seed, args.max_concurrency)
        else:
            async with grpc.aio.insecure_channel(args.grpc_target) as channel:
                stub = pb_grpc.JaxServeStub(channel)
                await grpc_request(stub, args, prompts[0])
                results, duration = await run_load(
                    lambda p: grpc_request(stub, args, p), prompts, args.request_rate,
                    args.seed, args.max_concurrency)
        row = summarize(backend, args, results, duration)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("http", "grpc", "both"), default="both")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--grpc-target", default="127.0.0.1:50051")
    p.add_argument("--model", default=None, help="served model name (default: ask the server)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="for random prompts (default: ask the server over gRPC)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrivals per second (Poisson); inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--result-file", default=None,
                   help="also write the rows and this command line to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(main_async(args))
    print_table(rows)
    if args.result_file:
        command = "python benchmarks/serving.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(args.result_file, "w") as f:
            json.dump({"command": command, "results": rows}, f, indent=2)
    return 0 if all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
