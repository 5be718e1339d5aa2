"""`jaxserve serve MODEL ...`: its flags, building the engine, running both servers, SIGTERM drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from jaxserve.engine_flags import add_engine_args, engine_args_from
from jaxserve.serving.config import ServeConfig
from jaxserve.serving.frontends import Frontends

logger = logging.getLogger("jaxserve.serving")

API_KEY_ENV = "JAXSERVE_API_KEY"  # read only here, as the default of --api-key


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the flags of `jaxserve serve` to `parser` (the `serve` subcommand's parser)."""
    parser.add_argument("model", nargs="?", default=None,
                        help="HF checkpoint directory (or jaxserve checkpoint); or --model")
    parser.add_argument("--model", dest="model_option", default=None, metavar="MODEL",
                        help="the same as the positional MODEL (vLLM's spelling)")
    parser.add_argument("--host", default="0.0.0.0", help="address both servers bind")
    parser.add_argument("--port", type=int, default=8000, help="HTTP (OpenAI-compatible) port")
    parser.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (-1: off)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) in the API; the first is the one responses carry "
                             "(default: the MODEL argument)")
    parser.add_argument("--disable-log-stats", action="store_true",
                        help="no periodic stats log line")
    parser.add_argument("--enable-log-requests", action="store_true",
                        help="log every request as it arrives (id, prompt length, parameters)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require 'Authorization: Bearer KEY' on every route but /health "
                             f"(default: ${API_KEY_ENV}); /metrics stays open for Prometheus")
    parser.add_argument("--protect-metrics", action="store_true",
                        help="require the API key on /metrics too")
    parser.add_argument("--max-queued-requests", type=int, default=None,
                        help="refuse requests (HTTP 429 / RESOURCE_EXHAUSTED) past this many "
                             "waiting")
    parser.add_argument("--max-request-bytes", type=int, default=16 * 1024 * 1024,
                        help="largest HTTP request body / gRPC message accepted (413 / "
                             "RESOURCE_EXHAUSTED past it)")
    parser.add_argument("--enable-auto-tool-choice", action="store_true",
                        help='tool_choice "auto": parse tool calls out of the output (needs '
                             "--tool-call-parser)")
    parser.add_argument("--tool-call-parser", default=None, choices=["hermes"],
                        help="how tool calls are written in the output (hermes: "
                             "<tool_call>{...}</tool_call> blocks)")
    add_engine_args(parser)  # --dtype, --max-model-len, ... --seed: shared with `generate`
    return parser


def resolve_model_arg(args: argparse.Namespace) -> str:
    """MODEL given positionally or as --model (the same value if both); sets `args.model`."""
    given = {m for m in (args.model, getattr(args, "model_option", None)) if m is not None}
    if len(given) != 1:
        raise ValueError("model: give the checkpoint directory once, as MODEL or --model"
                         if given else "model: a checkpoint directory is required (MODEL)")
    args.model = given.pop()
    return args.model


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The servers' settings from parsed flags (`api_key` must already be resolved)."""
    resolve_model_arg(args)
    extra = {"log_stats_interval_s": 0.0} if args.disable_log_stats else {}
    return ServeConfig(
        model=args.model,
        served_model_name=tuple(args.served_model_name) if args.served_model_name else None,
        log_requests=args.enable_log_requests,
        enable_auto_tool_choice=args.enable_auto_tool_choice,
        tool_call_parser=args.tool_call_parser,
        **extra,
        host=args.host,
        port=args.port,
        grpc_port=args.grpc_port,
        api_key=args.api_key or None,
        protect_metrics=args.protect_metrics,
        max_queued_requests=args.max_queued_requests,
        max_request_bytes=args.max_request_bytes,
        max_grpc_message_bytes=args.max_request_bytes,
    )


def _build_engine(args: argparse.Namespace) -> Any:
    resolve_model_arg(args)
    from jaxserve.llm import create_engine

    return create_engine(engine_args_from(args))


async def run_until_signalled(config: ServeConfig, build_engine: Callable[[], Any],
                              on_started: Callable[[Frontends], None] | None = None) -> int:
    """Start both servers, build the engine, serve until SIGTERM/SIGINT, drain, stop; exit code.

    `on_started` is called once both servers listen (before the engine is ready).
    """
    frontends = Frontends(config)
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and frontends.engine is not None:  # a second signal: stop waiting
            logger.warning("second signal: aborting the requests in flight")
            frontends.engine.abort_all()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await frontends.start()
    if on_started is not None:
        on_started(frontends)
    load = asyncio.create_task(frontends.load_engine(build_engine))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        logger.error("failed to build the engine: %r", load.exception())
        code = 1
    elif load.done():
        logger.info("ready: serving %s", config.model_name)
        died = asyncio.create_task(frontends.engine_died.wait())
        await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
        if died.done():
            logger.error("exiting with status 1: the engine loop is dead and cannot serve")
            code = 1
        else:
            logger.info("signal received: draining (grace period %.1fs)",
                        config.drain_grace_period_s)
            finished = await frontends.drain()
            logger.info("drained (%s)", "all finished" if finished else "some aborted")
        died.cancel()
    else:  # signalled while still loading
        load.cancel()
    stopped.cancel()
    await frontends.stop()
    return code


def serve(args: argparse.Namespace) -> int:
    """Run `jaxserve serve` with parsed flags; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    config = serve_config_from_args(args)
    if getattr(args, "process_id", 0) > 0:  # a follower: no servers, replay process 0's steps
        _build_engine(args)
        return 0
    return asyncio.run(run_until_signalled(config, lambda: _build_engine(args)))


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxserve.serving.launcher MODEL ...` (the same as `jaxserve serve MODEL ...`)."""
    parser = add_serve_args(argparse.ArgumentParser(prog="jaxserve serve"))
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
