"""Request decoding for the gRPC server: an undecodable message (invalid UTF-8 in a string field)
is answered INVALID_ARGUMENT naming the field, instead of grpc's own UNKNOWN / INTERNAL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError


class _Truncated(Exception):
    """The bytes end inside a field: not a protobuf message at all."""


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted name of the first string field whose bytes are not UTF-8, or None."""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            wire_type = tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            elif wire_type == 2:
                size, pos = _varint(data, pos)
                payload, pos = data[pos:pos + size], pos + size
                found = _check_payload(descriptor.fields_by_number.get(tag >> 3), payload, prefix)
                if found:
                    return found
            else:
                return None  # groups: not used by our protos
    except _Truncated:
        return None
    return None


def _check_payload(field: FieldDescriptor | None, payload: bytes, prefix: str) -> str | None:
    if field is None:
        return None
    name = f"{prefix}{field.name}"
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            return name
        return None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return invalid_utf8_field(field.message_type, payload, name + ".")
    return None


def _decode_error_message(deserializer: Callable[[bytes], Any], raw: bytes) -> str:
    message_cls = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_cls, "DESCRIPTOR", None)
    field = invalid_utf8_field(descriptor, raw) if descriptor is not None else None
    if field is not None:
        return f"{field}: is not valid UTF-8"
    kind = descriptor.full_name if descriptor is not None else "request"
    return f"the request is not a valid {kind} message"


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Decodes unary requests itself so that a bad message becomes INVALID_ARGUMENT."""

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _decoding_handler(handler)


def _decoding_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer

    async def decode(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                _decode_error_message(deserialize, raw))

    async def unary(raw, context):
        return await handler.unary_unary(await decode(raw, context), context)

    async def stream(raw, context):
        async for response in handler.unary_stream(await decode(raw, context), context):
            yield response

    kwargs = dict(request_deserializer=None, response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
