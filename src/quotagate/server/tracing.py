"""OpenTelemetry tracing of the RPCs (``QUOTAGATE_TRACES``): a grpc.aio server interceptor
and the tracer provider it records into. Off by default; then nothing here is set up and
the request path runs no code of it.

With ``QUOTAGATE_TRACES=otlp`` every unary RPC, and every server-streaming one for the
life of the stream, is one span of kind SERVER:

- named ``<package.Service>/<Method>`` (``quotagate.v1.QuotaService/Reserve``), the child
  of the caller's span when the call carries W3C ``traceparent`` / ``tracestate``
  metadata (the global propagator: ``OTEL_PROPAGATORS``);
- attributes of OTel's RPC conventions: ``rpc.system`` = ``grpc``, ``rpc.service``,
  ``rpc.method``, ``rpc.grpc.status_code`` (int); ``quotagate.org_id`` where the request
  names the org (``subject.org_id``, ``org_id``, Envoy's ``org_id`` descriptor entry;
  not for Commit, Refund and Extend, which carry only a reservation id);
- for Reserve, Extend, Check (QuotaService) and Envoy's ShouldRateLimit:
  ``quotagate.decision`` (``granted`` / ``denied``) and, when there is one,
  ``quotagate.reason`` (the DenyReason as in ``quotagate_decisions_total``:
  ``insufficient_balance``…), read from the answer; a denial is a normal answer, not an
  error;
- any status but OK: span status ERROR with the status message.

The interceptor is the outermost one, so calls refused for their API key are traced too.
Not traced: client-streaming and bidirectional calls (server reflection), and methods the
server does not have (gRPC answers UNIMPLEMENTED before any interceptor sees a handler).
A stream's span (WatchStatus, WatchEvents, Health/Watch) ends, and is exported, when the
stream does: ``rpc.grpc.status_code`` 1 (CANCELLED) when the client or a server stop cut it.

Spans go through a BatchSpanProcessor (``OTEL_BSP_*``) to the OTLP gRPC exporter, which
reads its endpoint, TLS and headers from the standard variables
(``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``, default
``http://localhost:4317``; ``OTEL_EXPORTER_OTLP_INSECURE``…); sampling is the SDK's
(``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``, default parentbased_always_on);
resource from ``OTEL_RESOURCE_ATTRIBUTES``, ``service.name`` from ``OTEL_SERVICE_NAME``,
else ``quotagate``. The provider belongs to the App (it is not made the global one) and
is flushed and shut down when the App stops.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from quotagate.envoy import rls_pb2
from quotagate.v1 import common_pb2

log = logging.getLogger(__name__)

#: how long App.stop waits for the last spans to be exported
SHUTDOWN_SECONDS = 5.0
OFF = ("", "off")

_GRANTED = common_pb2.DECISION_GRANTED
_OVER_LIMIT = rls_pb2.RateLimitResponse.OVER_LIMIT
_REASON = {v.number: v.name.removeprefix("DENY_REASON_").lower()
           for v in common_pb2.DenyReason.DESCRIPTOR.values if v.number}
_CODE = {c: c.value[0] for c in grpc.StatusCode}
_OK, _CANCELLED, _UNKNOWN = 0, 1, 2


# -- what a call decided, read from its answer ------------------------------------------
def _decision(response: Any) -> dict[str, str]:
    out = {"quotagate.decision": "granted" if response.decision == _GRANTED else "denied"}
    if response.reason:
        out["quotagate.reason"] = _REASON.get(response.reason, str(response.reason))
    return out


def _active(response: Any) -> dict[str, str]:
    out = {"quotagate.decision": "granted" if response.active else "denied"}
    if response.reason:
        out["quotagate.reason"] = _REASON.get(response.reason, str(response.reason))
    return out


def _rate_limit(response: Any) -> dict[str, str]:
    if response.overall_code != _OVER_LIMIT:
        return {"quotagate.decision": "granted"}
    out = {"quotagate.decision": "denied"}
    for h in response.response_headers_to_add:
        if h.key == "x-quotagate-reason":
            out["quotagate.reason"] = h.value
    return out


OUTCOMES: dict[str, Callable[[Any], dict[str, str]]] = {
    "/quotagate.v1.QuotaService/Reserve": _decision,
    "/quotagate.v1.QuotaService/Extend": _decision,
    "/quotagate.v1.QuotaService/Check": _active,
    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit": _rate_limit,
}


# -- the org a request names --------------------------------------------------------------
def _subject_org(request: Any) -> str:
    return str(request.subject.org_id)


def _org(request: Any) -> str:
    return str(request.org_id)


def _descriptor_org(request: Any) -> str:
    for d in request.descriptors:
        for e in d.entries:
            if e.key == "org_id":
                return str(e.value)
    return ""


def _org_reader(request: Any) -> Callable[[Any], str] | None:
    fields = getattr(getattr(type(request), "DESCRIPTOR", None), "fields_by_name", {})
    if "subject" in fields:
        return _subject_org
    if "org_id" in fields:
        return _org
    if "descriptors" in fields:
        return _descriptor_org
    return None


@dataclass(slots=True)
class _Method:
    """What one method's spans share."""

    name: str
    attributes: dict[str, Any]
    outcome: Callable[[Any], dict[str, str]] | None
    org: Callable[[Any], str] | None = None
    org_known: bool = False

    def org_of(self, request: Any) -> str:
        if not self.org_known:
            self.org, self.org_known = _org_reader(request), True
        return self.org(request) if self.org is not None else ""


def _method(full: str) -> _Method:
    service, _, name = full[1:].rpartition("/")
    return _Method(full[1:], {"rpc.system": "grpc", "rpc.service": service,
                              "rpc.method": name}, OUTCOMES.get(full))


def _carrier(metadata: Sequence[Any] | None) -> dict[str, str]:
    return {k: v for k, v in metadata or () if isinstance(v, str)}


def _finish(span: Any, code: int, details: Any,
            more: dict[str, Any] | None = None) -> None:
    span.set_attributes({"rpc.grpc.status_code": code, **more} if more
                        else {"rpc.grpc.status_code": code})
    if code != _OK:
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        span.set_status(Status(StatusCode.ERROR, str(details or "")))


def _aborted(context: grpc.aio.ServicerContext) -> tuple[int, Any]:
    got = context.code()
    return (_CODE.get(got, _UNKNOWN) if got is not None else _UNKNOWN), context.details()


Handler = Callable[[Any, grpc.aio.ServicerContext], Any]


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """One SERVER span per call (the module docstring says what it holds)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer
        self._methods: dict[str, _Method] = {}

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        full: str = handler_call_details.method
        m = self._methods.get(full)
        if m is None:
            m = self._methods[full] = _method(full)
        metadata = handler_call_details.invocation_metadata
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, m, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(handler.unary_unary, m, metadata),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    def _start(self, m: _Method, metadata: Any, request: Any) -> Any:
        org = m.org_of(request)
        attributes = {**m.attributes, "quotagate.org_id": org} if org else m.attributes
        return self.tracer.start_span(m.name, context=propagate.extract(_carrier(metadata)),
                                      kind=SpanKind.SERVER, attributes=attributes,
                                      record_exception=False, set_status_on_exception=False)

    def _unary_unary(self, inner: Handler, m: _Method, metadata: Any) -> Handler:
        async def behavior(request: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._start(m, metadata, request)
            with trace.use_span(span, end_on_exit=True, record_exception=False,
                                set_status_on_exception=False):
                try:
                    response = inner(request, context)
                    if inspect.isawaitable(response):
                        response = await response
                except grpc.aio.AbortError:
                    _finish(span, *_aborted(context))
                    raise
                except asyncio.CancelledError:
                    _finish(span, _CANCELLED, "cancelled")
                    raise
                except Exception as e:  # gRPC answers UNKNOWN
                    span.record_exception(e)
                    _finish(span, _UNKNOWN, f"{type(e).__name__}: {e}")
                    raise
                if span.is_recording():
                    got = context.code()
                    code = _CODE.get(got, _UNKNOWN) if got is not None else _OK
                    _finish(span, code, context.details() if code else None,
                            m.outcome(response) if m.outcome and response is not None
                            else None)
                return response

        return behavior

    def _unary_stream(self, inner: Handler, m: _Method, metadata: Any) -> Handler:
        async def behavior(request: Any, context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[Any]:
            span = self._start(m, metadata, request)
            code, details = _OK, None
            try:
                stream = inner(request, context)
                if hasattr(stream, "__aiter__"):
                    async for msg in stream:
                        yield msg
                elif inspect.isawaitable(stream):  # a handler that writes with context.write
                    await stream
                else:
                    for msg in stream:
                        yield msg
                got = context.code()
                if got is not None and got is not grpc.StatusCode.OK:
                    code, details = _CODE.get(got, _UNKNOWN), context.details()
            except grpc.aio.AbortError:
                code, details = _aborted(context)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                code, details = _CANCELLED, "cancelled"
                raise
            except Exception as e:
                span.record_exception(e)
                code, details = _UNKNOWN, f"{type(e).__name__}: {e}"
                raise
            finally:
                _finish(span, code, details)
                span.end()

        return behavior


class Tracing:
    """The tracer provider of one App and the interceptor that records into it."""

    def __init__(self, provider: Any) -> None:
        self.provider = provider
        self.interceptor = TracingInterceptor(provider.get_tracer("quotagate"))

    async def aclose(self) -> None:
        """Export the spans still queued and stop; waits at most SHUTDOWN_SECONDS (an
        unreachable collector keeps the exporter's own thread busy a while longer)."""
        t = threading.Thread(target=self.provider.shutdown, name="otel-shutdown",
                             daemon=True)
        t.start()
        await asyncio.to_thread(t.join, SHUTDOWN_SECONDS)
        if t.is_alive():
            log.warning("trace spans not all exported within %.1fs of stopping",
                        SHUTDOWN_SECONDS)


def resource() -> Any:
    """The SDK's resource from the environment, ``service.name`` quotagate unless
    ``OTEL_SERVICE_NAME`` or ``OTEL_RESOURCE_ATTRIBUTES`` names it."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    res = Resource.create()
    if str(res.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        res = res.merge(Resource({SERVICE_NAME: "quotagate"}))
    return res


def from_settings(settings: Any) -> Tracing | None:
    """The tracing QUOTAGATE_TRACES asks for; None when it is off."""
    if settings.traces in OFF:
        return None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=resource())  # sampler: OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("RPC traces exported by OTLP (service.name %s)",
             provider.resource.attributes.get("service.name"))
    return Tracing(provider)
