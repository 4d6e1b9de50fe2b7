"""The blocking client: the same calls as QuotaClient, for code without an event loop."""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Generator, Sequence
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from quotagate.client import _common as c
from quotagate.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc

log = logging.getLogger("quotagate.client")

T = TypeVar("T")


class SyncQuotaClient(c.Calls):
    """QuotaClient's blocking twin (see there): several connections, the same retries,
    the same watches (blocking iterators). `interceptors` (grpc client interceptors:
    tracing, metrics) wrap every connection. After `close()` every call raises
    ClientClosedError (a RuntimeError) and every watch ends; closing again does nothing.
    """

    def __init__(self, target: str, *, api_key: str | None = None, channels: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, timeout: float = 2.0,
                 retries: int = 2, interceptors: Sequence[Any] = ()) -> None:
        if channels < 1:
            raise ValueError("channels must be at least 1")
        opts = c.channel_options()
        self._channels = [grpc.secure_channel(target, credentials, options=opts)
                          if credentials else grpc.insecure_channel(target, options=opts)
                          for _ in range(channels)]
        if interceptors:
            self._channels = [grpc.intercept_channel(ch, *interceptors)
                              for ch in self._channels]
        self._stubs = [quota_pb2_grpc.QuotaServiceStub(ch) for ch in self._channels]
        self._admin = [admin_pb2_grpc.AdminServiceStub(ch) for ch in self._channels]
        self._next = itertools.cycle(range(channels))
        self._metadata = c.metadata(api_key)
        self.timeout, self.retries = timeout, retries
        self._lock = threading.Lock()
        self._watches: weakref.WeakSet[Watch[Any]] = weakref.WeakSet()

    def close(self) -> None:
        """End the watches and close the connections (calls still on their way end
        CANCELLED); the client takes no more calls."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            watches = list(self._watches)
        for w in watches:
            w.close()
        for ch in self._channels:
            ch.close()

    def __enter__(self) -> SyncQuotaClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: Any) -> Any:
        attempts = 1 + (self.retries if name in c.REPEATABLE else 0)
        attempt = 1
        while True:
            self._ensure_open()
            stub = self._stubs[next(self._next)]
            try:
                return getattr(stub, name)(request, timeout=self.timeout,
                                           metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() not in c.RETRY or attempt >= attempts:
                    raise
            except ValueError:  # grpc: "Cannot invoke RPC on closed channel!"
                self._ensure_open()
                raise
            time.sleep(c.backoff(attempt))
            attempt += 1

    def _watch(self, open_stream: Callable[[], Any], reopening: c.Reopening,
               opened: Callable[[Any], None] | None = None,
               each: Callable[[Any], T] = lambda m: m) -> Watch[T]:
        with self._lock:
            self._ensure_open()
            w = Watch(open_stream, reopening, opened, each)
            self._watches.add(w)
        return w

    def watch_status(self, org_id: str, assistant_ids: Sequence[str] = (), *,
                     reconnect: bool = True) -> Watch[quota_pb2.WatchStatusResponse]:
        """QuotaClient.watch_status, blocking: `for st in client.watch_status("acme"):`.
        The current status of each watched assistant (none named: every assistant of the
        org), then every change; a stream cut by UNAVAILABLE (a renewed connection, a
        restarted server) is opened again and starts with every status again, so no
        change is missed. Leaving the loop, `.close()` (from any thread) or closing the
        client ends the stream."""
        request = c.watch_status_request(org_id, assistant_ids)
        return self._watch(
            lambda: self._stubs[next(self._next)].WatchStatus(request, metadata=self._metadata),
            c.Reopening(reconnect))

    def watch_events(self, org_id: str, after: str = "", *, reconnect: bool = True
                     ) -> Watch[admin_pb2.Event]:
        """QuotaClient.watch_events, blocking: the org's events (an admin key) from now
        on, or after cursor `after`; a cut stream is opened again after the last event
        received (or where it started, when cut before its first), none missed or
        repeated. Ends like watch_status."""
        cursor = c.EventCursor(org_id, after)

        def open_stream() -> Any:
            return self._admin[next(self._next)].WatchEvents(cursor.request(),
                                                             metadata=self._metadata)

        def opened(stream: Any) -> None:
            if not cursor.last:
                cursor.started(stream.initial_metadata())

        return self._watch(open_stream, c.Reopening(reconnect), opened, cursor.seen)

    def reservation(self, subject: c.SubjectLike, charges: c.Amounts | None = None,
                    **kw: Any) -> SyncReservation:
        """`with client.reservation(who, {"message_tokens": 2000}) as hold:` (see
        QuotaClient.reservation)."""
        return SyncReservation(self, subject, charges, kw)


class Watch(Generic[T]):
    """A blocking iterator over a stream that is opened again when cut (see
    SyncQuotaClient.watch_status). `close()` may be called from any thread, also while
    another one waits in `next()`: that one then sees the iteration end. Dropping the
    iterator (leaving a `for` loop over it) ends the stream too."""

    def __init__(self, open_stream: Callable[[], Any], reopening: c.Reopening,
                 opened: Callable[[Any], None] | None, each: Callable[[Any], T]) -> None:
        # the generator holds the state, not this object: dropping the iterator frees
        # the generator at once, which cancels its stream
        self._state = _Following()
        self._messages = _follow(self._state, open_stream, reopening, opened, each)

    def __iter__(self) -> Watch[T]:
        return self

    def __next__(self) -> T:
        return next(self._messages)

    def __enter__(self) -> Watch[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the stream; the iteration ends (here, or in the thread waiting in it)."""
        self._state.stop()
        try:
            self._messages.close()
        except ValueError:  # being iterated in another thread: the cancel ends it there
            pass


class _Following:
    """A watch's current stream, and whether it was stopped (shared between threads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stream: Any = None
        self.stopped = threading.Event()

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
            stream, self.stream = self.stream, None
        if stream is not None:
            stream.cancel()


def _follow(state: _Following, open_stream: Callable[[], Any], reopening: c.Reopening,
            opened: Callable[[Any], None] | None, each: Callable[[Any], T]
            ) -> Generator[T, None, None]:
    """The messages of the stream `open_stream()` opens (each passed through `each`),
    opened again when `reopening` says so; `opened(stream)` first, each time."""
    while True:
        with state.lock:
            if state.stopped.is_set():
                return
            stream = state.stream = open_stream()
        try:
            if opened is not None:
                opened(stream)
            for msg in stream:
                reopening.received()
                yield each(msg)
            return
        except grpc.RpcError as e:
            if state.stopped.is_set():
                return  # closed: its stream was cancelled
            delay = reopening.after(e.code())
            if delay is None:
                raise
        finally:
            stream.cancel()
            with state.lock:
                if state.stream is stream:
                    state.stream = None
        state.stopped.wait(delay)


class SyncReservation(c.Outcome):
    """One Reserve and its outcome (see SyncQuotaClient.reservation). An exception in
    the block (KeyboardInterrupt, SystemExit included) refunds the hold. One raised while
    the Reserve, Commit or Refund is on its way (Ctrl-C, or any exception raised into the
    thread), which may have reached the server with its answer lost, sends that same
    request once more, to its end: a Reserve's idempotency key answers the hold it made
    (refunded at once: the block does not run), a Commit or Refund of a resolved hold
    answers what it did. Then the exception goes on. Another one during that second
    send gives up: a hold left behind expires after its TTL."""

    _client: SyncQuotaClient

    def __enter__(self) -> SyncReservation:
        request = c.reserve_request(self._subject, self._charges, **self._kw)
        response, interrupted = self._to_the_end("Reserve", request)
        if interrupted is None:
            self.response = response
            return self
        if response is not None:
            self.response = response
            if self.granted:  # the block will not run: give the hold back at once
                self._refund(f"interrupted: {type(interrupted).__name__}")
        raise interrupted

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        then = self.leaving(exc_type)
        if then is None:
            return
        what, arg = then
        if what == "commit":
            self.outcome, interrupted = self._to_the_end(
                "Commit", c.commit_request(self.reservation_id, arg))
        else:
            interrupted = self._refund(arg)
        if interrupted is not None and interrupted is not exc:
            raise interrupted

    def _to_the_end(self, name: str, request: Any) -> tuple[Any, BaseException | None]:
        """`name(request)`'s answer, and the exception that interrupted it (None: none).
        An answer from the server (grpc.RpcError) or a closed client is raised as it
        came."""
        try:
            return self._client._call(name, request), None
        except (grpc.RpcError, c.ClientClosedError):
            raise
        except BaseException as e:
            interrupted = e
        try:
            return self._client._call(name, request), interrupted
        except BaseException as e:
            log.warning("%s %s interrupted (%r) and not finished (%r); a hold it made "
                        "expires after its TTL", name,
                        getattr(request, "reservation_id", "") or "(Reserve)",
                        interrupted, e)
            return None, interrupted

    def _refund(self, reason: str) -> BaseException | None:
        """Refund the hold, to the end; a failure from the server is logged (the block's
        own error matters more). Answers the exception that interrupted it."""
        try:
            self.outcome, interrupted = self._to_the_end(
                "Refund", c.refund_request(self.reservation_id, reason=reason))
        except grpc.RpcError as e:
            log.warning("refund of %s failed (%s); the hold expires after its TTL",
                        self.reservation_id, e.code().name)
            return None
        return interrupted
