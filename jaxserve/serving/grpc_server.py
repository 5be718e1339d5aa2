"""The jaxserve.v1.JaxServe gRPC service (grpc.aio) with health, reflection and API-key checks."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from jaxserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    EngineNotAcceptingError,
    QueueFullError,
    RequestDeadlineError,
)
from jaxserve.serving import grpc_convert
from jaxserve.serving.config import ServeConfig
from jaxserve.serving.deltas import DeltaTracker
from jaxserve.serving.grpc_decode import DecodeErrorInterceptor
from jaxserve.serving.proto import jaxserve_pb2 as pb
from jaxserve.serving.proto import jaxserve_pb2_grpc as pb_grpc
from jaxserve.serving.state import Phase, ServerState

logger = logging.getLogger("jaxserve.serving")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["JaxServe"].full_name
_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code of an error raised while serving a request."""
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, EngineNotAcceptingError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, RequestDeadlineError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.INTERNAL
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _num_top(request: pb.GenerateRequest, field: str) -> int:
    """How many top tokens per position the request asked for (`logprobs` / `prompt_logprobs`)."""
    params = request.sampling_params
    return max(getattr(params, field), 0) if params.HasField(field) else 0


def _prompt_logprobs_complete(output: Any) -> bool:
    lps = output.prompt_logprobs
    return lps is not None and len(lps) == len(output.prompt_token_ids or [])


class JaxServeServicer(pb_grpc.JaxServeServicer):
    """Generate / GenerateStream / Tokenize / Detokenize / GetModelInfo over the async engine."""

    def __init__(self, state: ServerState):
        self.state = state

    async def _engine(self, context: grpc.aio.ServicerContext) -> AsyncEngine:
        try:
            return self.state.ready_engine()
        except EngineNotAcceptingError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            raise  # unreachable: abort raises

    async def _fail(self, context: grpc.aio.ServicerContext, exc: BaseException) -> None:
        code = status_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            logger.error("gRPC request failed: %r", exc)
        await context.abort(code, str(exc) or type(exc).__name__)

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Yield (request_id, RequestOutput) pairs; errors end the RPC with their status code."""
        engine = await self._engine(context)
        request_id = request.request_id or f"grpc-{uuid.uuid4().hex}"
        try:
            prompt = grpc_convert.prompt_from_request(request)
            params = grpc_convert.sampling_params_from_proto(
                request.sampling_params, engine.engine_config.generation_defaults)
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            outputs = engine.generate(prompt, params, request_id, deadline=deadline)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    yield request_id, output
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to a status code
            await self._fail(context, exc)

    async def Generate(self, request, context):
        final = None
        async for request_id, output in self._generate(request, context):
            final = (request_id, output)
        if final is None:
            await context.abort(grpc.StatusCode.INTERNAL, "the request produced no output")
        return grpc_convert.full_response(*final, num_top=_num_top(request, "logprobs"),
                                          num_prompt_top=_num_top(request, "prompt_logprobs"))

    async def GenerateStream(self, request, context):
        tracker, num_top = DeltaTracker(), _num_top(request, "logprobs")
        prompt_top = _num_top(request, "prompt_logprobs")
        prompt_sent = not request.sampling_params.HasField("prompt_logprobs")
        async for request_id, output in self._generate(request, context):
            deltas = tracker.update(output)
            prompt_ready = not prompt_sent and _prompt_logprobs_complete(output)
            if not deltas and not output.finished and not prompt_ready:
                continue
            msg = pb.GenerateResponse(request_id=request_id,
                                      outputs=[grpc_convert.delta_to_proto(d, num_top)
                                               for d in deltas])
            if prompt_ready:
                msg.prompt_logprobs.extend(grpc_convert.prompt_logprobs_to_proto(output,
                                                                                 prompt_top))
                prompt_sent = True
            if output.finished:
                msg.usage.CopyFrom(grpc_convert.usage_from_output(output))
            yield msg

    async def Tokenize(self, request, context):
        engine = await self._engine(context)
        add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = await engine.run_tokenizer(
            lambda: engine.tokenizer.encode(request.text, add_special_tokens=add_special))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request, context):
        engine = await self._engine(context)
        vocab = engine.engine_config.vocab_size
        bad = [t for t in request.token_ids if not 0 <= t < vocab]
        if bad:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: {bad[0]} is outside the vocabulary [0, {vocab})")
        # Default False, as HTTP /detokenize and vLLM: the inverse of Tokenize, specials kept.
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else False
        text = await engine.run_tokenizer(
            lambda: engine.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        engine = await self._engine(context)
        cfg = engine.engine_config
        return pb.ModelInfo(name=self.state.model_name, max_model_len=cfg.max_model_len,
                            vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                            eos_token_ids=list(cfg.eos_token_ids))


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without `authorization: Bearer <key>` with UNAUTHENTICATED (health exempt)."""

    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(_UNAUTHENTICATED_PREFIXES):
            return handler
        if self._authorized(details):
            return handler
        return _deny_handler(handler)


def _deny_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    message = "missing or wrong API key (send metadata 'authorization: Bearer <key>')"

    async def deny_unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(deny_unary, **kwargs)


def _health_listener(servicer: Any, loop: asyncio.AbstractEventLoop):
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    def on_phase(phase: Phase) -> None:
        status = serving if phase is Phase.SERVING else not_serving

        async def update() -> None:
            for name in ("", SERVICE_NAME):
                await servicer.set(name, status)

        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(update()))
        except RuntimeError:  # loop closed: the server is gone
            pass

    return on_phase


async def start_grpc_server(state: ServerState, config: ServeConfig) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on `config.grpc_port`; returns it and the port it bound."""
    interceptors = [ApiKeyInterceptor(config.api_key)] if config.api_key else []
    interceptors.append(DecodeErrorInterceptor())  # innermost: runs after the key check
    limit = config.max_grpc_message_bytes
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.max_receive_message_length", limit),
                 ("grpc.max_send_message_length", limit)],
    )
    pb_grpc.add_JaxServeServicer_to_server(JaxServeServicer(state), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    state.add_listener(_health_listener(health_servicer, asyncio.get_running_loop()))
    await server.start()
    logger.info("gRPC server listening on %s:%d", config.host, port)
    return server, port
