"""A `jaxserve serve` process over the fake runner, for the SIGTERM test: prints its ports."""

from __future__ import annotations

import asyncio
import logging
import sys

from jaxserve.serving.config import ServeConfig
from jaxserve.serving.launcher import run_until_signalled
from tests.serving.harness import MODEL_NAME, load_demo_tokenizer, make_fake_engine


def main() -> int:
    model_path, grace, step_delay = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = ServeConfig(model=model_path, served_model_name=MODEL_NAME, host="127.0.0.1",
                         port=0, grpc_port=0, drain_grace_period_s=grace,
                         log_stats_interval_s=0.5)
    tokenizer = load_demo_tokenizer(model_path)

    def on_started(frontends) -> None:
        print(f"PORTS {frontends.http_port} {frontends.grpc_port}", flush=True)

    return asyncio.run(run_until_signalled(
        config, lambda: make_fake_engine(tokenizer, step_delay_s=step_delay), on_started))


if __name__ == "__main__":
    sys.exit(main())
