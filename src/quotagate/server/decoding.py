"""Requests that do not decode are INVALID_ARGUMENT naming the field, like any bad input.

grpcio decodes a request with the handler's `request_deserializer` before any of our code
runs, and answers a decoding error UNKNOWN ("Exception deserializing request"). `add`
registers a generated servicer with each method's deserializer wrapped: bytes protobuf
refuses (a string field that is not UTF-8, a truncated or corrupt message) become an
`Undecodable` value, and the method answers it INVALID_ARGUMENT with a BadRequest naming
the first string field that is not UTF-8 (`subject.org_id`, `charges[1].meter`), else
`request`. A request that decodes pays one type check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError

from quotagate.errors import InvalidArgument
from quotagate.server.status import to_status


class Undecodable:
    """What a guarded deserializer returns for bytes that do not decode."""

    __slots__ = ("error",)

    def __init__(self, error: InvalidArgument) -> None:
        self.error = error


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[i]
        value |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, payload of a length-delimited field) of a message."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
            yield number, wire, b""
        elif wire == 1:
            i += 8
            yield number, wire, b""
        elif wire == 5:
            i += 4
            yield number, wire, b""
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated field")
            yield number, wire, data[i:i + n]
            i += n
        else:
            raise ValueError(f"wire type {wire}")
    if i > len(data):
        raise ValueError("truncated field")


def bad_utf8_field(desc: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field of `data` (a `desc` message) that is not UTF-8
    ("charges[1].meter"), None when there is none or the wire format itself is broken."""
    seen: dict[int, int] = {}
    try:
        for number, wire, payload in _fields(data):
            field = desc.fields_by_number.get(number)
            if field is None or wire != 2:
                continue
            index = seen.get(number, 0)
            seen[number] = index + 1
            name: str = prefix + field.name
            if field.is_repeated:
                name += f"[{index}]"
            if field.type == FieldDescriptor.TYPE_STRING:
                try:
                    payload.decode("utf-8")
                except UnicodeDecodeError:
                    return name
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                entry = field.message_type
                if entry.GetOptions().map_entry:  # a map: name the entry by its key
                    name = prefix + field.name
                found = bad_utf8_field(entry, payload, name + ".")
                if found:
                    return found
    except ValueError:
        return None
    return None


def _guarded(deserialize: Callable[[bytes], Any], desc: Descriptor) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError):
            field = bad_utf8_field(desc, data)
            if field:
                return Undecodable(InvalidArgument("is not valid UTF-8", field))
            return Undecodable(InvalidArgument("could not be decoded as a "
                                               f"{desc.full_name}", "request"))
    return decode


def _behaviour(call: Callable[..., Any], streaming: bool) -> Callable[..., Any]:
    if streaming:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if request.__class__ is Undecodable:
                await context.abort_with_status(to_status(request.error))
            items = call(request, context)
            try:
                async for item in items:
                    yield item
            finally:
                await items.aclose()  # its subscriptions end with the call, not at GC
        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.__class__ is Undecodable:
            await context.abort_with_status(to_status(request.error))
        return await call(request, context)
    return unary


def _guard(handler: grpc.RpcMethodHandler, desc: Descriptor) -> grpc.RpcMethodHandler:
    if handler.request_streaming or handler.request_deserializer is None:
        return handler  # our services take one request message per call
    h: Any = handler
    if handler.response_streaming:
        return h._replace(request_deserializer=_guarded(h.request_deserializer, desc),
                          unary_stream=_behaviour(h.unary_stream, True))
    return h._replace(request_deserializer=_guarded(h.request_deserializer, desc),
                      unary_unary=_behaviour(h.unary_unary, False))


class _Capture:
    """Stands in for the server while a generated `add_*_to_server` registers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: Mapping[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # built again below from the method handlers

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.service, self.handlers = service, handlers


def add(register: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server,
        descriptor: Any) -> None:
    """`register(servicer, server)` (a generated `add_*_to_server`), each method's request
    guarded; `descriptor`: the service's ServiceDescriptor (requests by method name)."""
    cap = _Capture()
    register(servicer, cap)
    if not cap.handlers:
        raise RuntimeError(f"{register.__name__} registered no method handlers")
    guarded = {name: _guard(h, descriptor.methods_by_name[name].input_type)
               for name, h in cap.handlers.items()}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(cap.service,
                                                                         guarded),))
    server.add_registered_method_handlers(cap.service, guarded)
