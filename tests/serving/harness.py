"""Test harness: LLMEngines on the fake runner, and the servers run on a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

from jaxserve.engine.config import EngineConfig
from jaxserve.engine.llm_engine import LLMEngine
from jaxserve.serving.config import ServeConfig
from jaxserve.serving.frontends import Frontends
from tests.serving.fake_runner import FakeRunner

API_KEY = "test-key"
MODEL_NAME = "demo"


def load_demo_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_fake_engine(tokenizer: Any, step_delay_s: float = 0.0, **overrides) -> LLMEngine:
    """A real LLMEngine whose runner is the deterministic FakeRunner."""
    cfg = dict(num_kv_blocks=65, max_model_len=128, vocab_size=len(tokenizer), block_size=16,
               max_num_seqs=16, max_num_batched_tokens=256,
               eos_token_ids=(tokenizer.eos_token_id,))
    cfg.update(overrides)
    config = EngineConfig(**cfg)
    return LLMEngine(FakeRunner(config.vocab_size, step_delay_s), tokenizer, config)


class ServerThread:
    """Frontends (HTTP + gRPC on loopback, free ports) on an event loop in a daemon thread."""

    def __init__(self, build_engine: Callable[[], Any], **config: Any):
        cfg = dict(model="demo-path", served_model_name=MODEL_NAME, host="127.0.0.1", port=0,
                   grpc_port=0, api_key=API_KEY, log_stats_interval_s=0)
        cfg.update(config)
        self.config = ServeConfig(**cfg)
        self.build_engine = build_engine
        self.loop = asyncio.new_event_loop()
        self.frontends = Frontends(self.config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> ServerThread:
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        await self.frontends.start()
        await self.frontends.load_engine(self.build_engine)

    def call(self, coro: Any, timeout: float = 120.0) -> Any:
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.frontends.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.frontends.grpc_port}"

    @property
    def llm_engine(self) -> LLMEngine:
        return self.frontends.engine.engine

    def stats(self):
        """The engine's stats as last published by the loop."""
        return self.frontends.engine.last_stats

    def stop(self) -> None:
        self.call(self.frontends.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@contextlib.contextmanager
def slow_steps(server: ServerThread, step_delay_s: float):
    """Make the fake runner of `server` slower for a while (so requests stay in flight)."""
    runner = server.llm_engine.runner
    old, runner.step_delay_s = runner.step_delay_s, step_delay_s
    try:
        yield
    finally:
        runner.step_delay_s = old
