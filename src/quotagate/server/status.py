"""Exceptions -> gRPC status codes and details, in one table; the bookkeeping of the
answers QUOTAGATE_FAIL_OPEN gives instead of UNAVAILABLE."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from quotagate import errors, telemetry

log = logging.getLogger(__name__)

#: a fail-open answer is logged at most once per this many seconds (all are counted)
FAIL_OPEN_LOG_EVERY = 5.0

CODES: dict[type[errors.QuotagateError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
}


def to_status(exc: errors.QuotagateError) -> grpc.Status:
    code = CODES.get(type(exc), grpc.StatusCode.INTERNAL)
    detail = status_pb2.Status(code=getattr(code_pb2, code.name), message=str(exc))
    if exc.field and code is grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field,
                                                        description=exc.message)])
        detail.details.add().Pack(bad)
    return rpc_status.to_status(detail)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def translated(fn: F) -> F:
    """Run a unary handler; a QuotagateError becomes its gRPC status (with BadRequest).
    Anything else is a bug: logged with its traceback, answered INTERNAL with a short
    message (a long one would not fit the status trailer). Each call is counted in
    telemetry.RPC by method (the servicer's SERVICE and the handler's name), status code
    and time taken."""
    slot: list[int] = []
    ok, internal = telemetry.OK, telemetry.CODE_INDEX[grpc.StatusCode.INTERNAL]
    unknown = telemetry.CODE_INDEX[grpc.StatusCode.UNKNOWN]

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        if not slot:
            slot.append(telemetry.method_index(f"/{self.SERVICE}/{fn.__name__}"))
        t0 = time.perf_counter()
        code = ok
        try:
            return await fn(self, request, context)
        except errors.QuotagateError as e:
            code = telemetry.CODE_INDEX[CODES.get(type(e), grpc.StatusCode.INTERNAL)]
            await context.abort_with_status(to_status(e))
        except grpc.aio.AbortError:
            if code == ok:  # the handler aborted itself
                got = context.code()
                code = telemetry.CODE_INDEX.get(got, unknown) if got is not None else unknown
            raise
        except Exception as e:
            code = internal
            log.exception("%s failed", fn.__name__)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"internal error: {type(e).__name__}: {str(e)[:200]}")
        finally:
            if slot[0] >= 0:
                telemetry.RPC.observe(slot[0], code, time.perf_counter() - t0)

    return wrapper  # type: ignore[return-value]


class FailOpen:
    """Each answer given without Redis (QUOTAGATE_FAIL_OPEN) is counted in
    `quotagate_fail_open_total{method}` and logged at WARNING, at most once per `every`
    seconds with how many were given since the last line."""

    def __init__(self, every: float = FAIL_OPEN_LOG_EVERY) -> None:
        self.every = every
        self._last = float("-inf")
        self._since = 0

    def answered(self, method: int, name: str, cause: object) -> None:
        if method >= 0:
            telemetry.RPC.failed_open(method)
        self._since += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            log.warning("fail-open: %d call(s) answered without Redis since the last such "
                        "line, their usage recorded nowhere (last: %s: %s)", self._since,
                        name, cause)
            self._last, self._since = now, 0


#: one for the process: the servicers share the rate limit of the log line
FAIL_OPEN = FailOpen()
