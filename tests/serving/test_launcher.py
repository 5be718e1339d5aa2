"""`jaxserve serve` flags map onto EngineArgs and ServeConfig; the API key may come from the env."""

from __future__ import annotations

import argparse

import httpx
import pytest

from jaxserve.engine_flags import engine_args_from
from jaxserve.serving import launcher
from tests.serving.harness import ServerThread, make_fake_engine


def _parse(argv: list[str]) -> argparse.Namespace:
    return launcher.add_serve_args(argparse.ArgumentParser()).parse_args(argv)


def test_every_flag_reaches_its_config(monkeypatch):
    monkeypatch.delenv(launcher.API_KEY_ENV, raising=False)
    args = _parse([
        "/models/m", "--host", "127.0.0.1", "--port", "8001", "--grpc-port", "50052",
        "--served-model-name", "m1", "--dtype", "bfloat16", "--max-model-len", "512",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "256", "--block-size", "32",
        "--num-kv-blocks", "100", "--kv-cache-memory-fraction", "0.5",
        "--no-enable-prefix-caching", "--tensor-parallel-size", "2", "--api-key", "k",
        "--max-queued-requests", "3", "--seed", "5", "--async-scheduling"])
    engine_args = engine_args_from(args)
    assert (engine_args.model, engine_args.dtype, engine_args.max_model_len) == \
        ("/models/m", "bfloat16", 512)
    assert (engine_args.max_num_seqs, engine_args.max_num_batched_tokens,
            engine_args.block_size, engine_args.num_kv_blocks) == (8, 256, 32, 100)
    assert engine_args.kv_cache_memory_fraction == 0.5
    assert engine_args.enable_prefix_caching is False
    assert engine_args.async_scheduling is True
    assert (engine_args.tensor_parallel_size, engine_args.seed) == (2, 5)
    config = launcher.serve_config_from_args(args)
    assert (config.host, config.port, config.grpc_port) == ("127.0.0.1", 8001, 50052)
    assert (config.model_name, config.api_key, config.max_queued_requests) == ("m1", "k", 3)


def test_defaults_and_api_key_from_env(monkeypatch):
    monkeypatch.setenv(launcher.API_KEY_ENV, "from-env")
    args = _parse(["m"])
    config = launcher.serve_config_from_args(args)
    assert (config.port, config.grpc_port, config.model_name) == (8000, 50051, "m")
    assert config.api_key == "from-env"
    assert engine_args_from(args).enable_prefix_caching is True
    assert engine_args_from(args).async_scheduling is None  # on where supported


def test_vllm_serve_flag_spellings():
    def parse(*argv):
        return launcher.serve_config_from_args(_parse(list(argv)))

    cfg = parse("--model", "/m", "--served-model-name", "a", "b", "--disable-log-stats",
                "--enable-log-requests")
    assert cfg.model == "/m" and cfg.model_names == ("a", "b") and cfg.model_name == "a"
    assert cfg.log_stats_interval_s == 0 and cfg.log_requests
    assert parse("/m").model_names == ("/m",)
    with pytest.raises(ValueError, match="model"):
        parse("/m", "--model", "/other")
    with pytest.raises(ValueError, match="model"):
        parse()


def test_every_served_name_is_accepted(demo_tokenizer):
    server = ServerThread(lambda: make_fake_engine(demo_tokenizer), api_key=None,
                          served_model_name=("first", "alias"), log_requests=True).start()
    try:
        names = [m["id"] for m in httpx.get(f"{server.http_url}/v1/models").json()["data"]]
        assert names == ["first", "alias"]
        for name in names:
            r = httpx.post(f"{server.http_url}/v1/completions",
                           json={"model": name, "prompt": "hi", "max_tokens": 2}, timeout=30)
            assert r.status_code == 200 and r.json()["model"] == "first", r.text
        r = httpx.post(f"{server.http_url}/v1/completions",
                       json={"model": "other", "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 404
    finally:
        server.stop()
