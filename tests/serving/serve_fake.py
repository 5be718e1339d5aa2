"""A `jaxserve serve` process over the fake runner, for the SIGTERM test: prints its ports."""

from __future__ import annotations

import asyncio
import logging
import sys

from jaxserve.serving.config import ServeConfig
from jaxserve.serving.launcher import run_until_signalled
from tests.serving.harness import MODEL_NAME, load_demo_tokenizer, make_fake_engine


CRASH_PROMPT = "crash the engine loop"  # with the "crashable" flag: the next step raises


def crashable(llm):
    """Make a step raise a non-request error (a scheduler bug, say) once CRASH_PROMPT arrives."""
    add, step = llm.add_request, llm.step
    armed = []

    def add_request(request_id, prompt, params):
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        if text == CRASH_PROMPT:
            armed.append(request_id)
        return add(request_id, prompt, params)

    def crashing_step():
        if armed:
            raise AssertionError("injected engine-loop failure")
        return step()

    llm.add_request, llm.step = add_request, crashing_step
    return llm


def main() -> int:
    model_path, grace, step_delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    crash = "crashable" in sys.argv[4:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = ServeConfig(model=model_path, served_model_name=MODEL_NAME, host="127.0.0.1",
                         port=0, grpc_port=0, drain_grace_period_s=grace,
                         log_stats_interval_s=0.5)
    tokenizer = load_demo_tokenizer(model_path)

    def on_started(frontends) -> None:
        print(f"PORTS {frontends.http_port} {frontends.grpc_port}", flush=True)

    def build():
        llm = make_fake_engine(tokenizer, step_delay_s=step_delay)
        return crashable(llm) if crash else llm

    return asyncio.run(run_until_signalled(config, build, on_started))


if __name__ == "__main__":
    sys.exit(main())
