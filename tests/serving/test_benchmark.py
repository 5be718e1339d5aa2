"""benchmarks/serving.py runs against a live server (fake runner) and reports every figure."""

from __future__ import annotations

import asyncio
import importlib.util
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_serving", ROOT / "benchmarks/serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_serving_benchmark_http_and_grpc(fake_server, capsys):
    bench = _load_benchmark()
    args = bench.parse_args([
        "--backend", "both", "--base-url", fake_server.http_url,
        "--grpc-target", fake_server.grpc_target, "--api-key", "test-key",
        "--num-prompts", "8", "--input-len", "16", "--output-len", "6",
        "--request-rate", "50"])
    rows = asyncio.run(bench.main_async(args))
    bench.print_table(rows)
    assert [r["backend"] for r in rows] == ["http", "grpc"]
    for row in rows:
        assert row["completed"] == 8 and row["failed"] == 0, row
        assert row["output_tok_per_s"] > 0 and row["req_per_s"] > 0
        for name in ("ttft", "tpot", "itl"):
            assert row[f"{name}_ms_p50"] <= row[f"{name}_ms_p99"]
    out = capsys.readouterr().out
    assert out.count('"workload": "serve-poisson"') == 2 and "ttft_ms_p99" in out
