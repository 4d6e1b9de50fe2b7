"""The asyncio client: QuotaService calls over several connections, retried where a
retry is safe, and `reservation()` for the Reserve → work → Commit (or Refund) pattern."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any

import grpc

from quotagate.client import _common as c
from quotagate.v1 import admin_pb2, admin_pb2_grpc, quota_pb2, quota_pb2_grpc

CURSOR_HEADER = c.CURSOR_HEADER

log = logging.getLogger("quotagate.client")


class QuotaClient(c.Calls):
    """A runtime's connection to quotagate (grpc.aio). Every call is a coroutine that
    answers the RPC's response message.

    `channels` connections are opened and calls go round them, so a server with several
    workers serves this client with all of them. A call answered UNAVAILABLE or
    DEADLINE_EXCEEDED is sent again up to `retries` times (backing off from 50 ms) where
    that is safe: a Reserve keeps its idempotency key, so a retry gets the first hold,
    never a second one; Commit and Refund of a resolved hold answer what they did; Extend
    is never repeated. `api_key` is sent as `authorization: Bearer …`; `credentials`
    makes the channels TLS (`grpc.ssl_channel_credentials(...)`). `close()` closes the
    connections and ends the watches; a later call opens new ones, on the event loop it
    runs on (so a client made at import time may serve several `asyncio.run()` in turn,
    closed at the end of each); closing again does nothing.
    """

    def __init__(self, target: str, *, api_key: str | None = None, channels: int = 4,
                 credentials: grpc.ChannelCredentials | None = None, timeout: float = 2.0,
                 retries: int = 2, interceptors: Sequence[Any] = ()) -> None:
        if channels < 1:
            raise ValueError("channels must be at least 1")
        self.target, self._credentials, self._n = target, credentials, channels
        #: grpc.aio client interceptors (tracing, metrics), on every connection
        self._interceptors = list(interceptors) or None
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[quota_pb2_grpc.QuotaServiceStub] = []
        self._admin: list[admin_pb2_grpc.AdminServiceStub] = []
        self._next = itertools.cycle(range(channels))
        self._metadata = c.metadata(api_key)
        self.timeout, self.retries = timeout, retries

    def _stub(self) -> quota_pb2_grpc.QuotaServiceStub:
        """The next connection's stub. The channels are opened at the first call, on the
        event loop that makes it (a grpc.aio channel belongs to one loop), so a client
        may be made anywhere, an import included."""
        if not self._stubs:
            self.closed = False  # opened (again)
            opts = c.channel_options()
            cred = self._credentials
            icp = self._interceptors
            self._channels = [
                grpc.aio.secure_channel(self.target, cred, options=opts, interceptors=icp)
                if cred else
                grpc.aio.insecure_channel(self.target, options=opts, interceptors=icp)
                for _ in range(self._n)]
            self._stubs = [quota_pb2_grpc.QuotaServiceStub(ch) for ch in self._channels]
            self._admin = [admin_pb2_grpc.AdminServiceStub(ch) for ch in self._channels]
        return self._stubs[next(self._next)]

    async def close(self) -> None:
        """Close the connections, ending the watches (a later call opens new ones)."""
        self.closed = True
        channels, self._channels, self._stubs, self._admin = self._channels, [], [], []
        for ch in channels:
            await ch.close()

    async def __aenter__(self) -> QuotaClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, name: str, request: Any) -> Any:
        attempts = 1 + (self.retries if name in c.REPEATABLE else 0)
        attempt = 1
        while True:
            stub = self._stub()
            try:
                return await getattr(stub, name)(request, timeout=self.timeout,
                                                 metadata=self._metadata)
            except grpc.aio.AioRpcError as e:
                if e.code() not in c.RETRY or attempt >= attempts:
                    raise
            await asyncio.sleep(c.backoff(attempt))
            attempt += 1

    async def _resubscribing(self, open_stream: Callable[[], Any], reopening: c.Reopening,
                             opened: Callable[[Any], Awaitable[None]] | None = None
                             ) -> AsyncGenerator[Any, None]:
        """The messages of the stream `open_stream()` opens, opened again (backing off)
        when `reopening` says so; `opened(stream)` first, each time. Ends when the client
        is closed."""
        while True:
            stream = open_stream()
            try:
                if opened is not None:
                    await opened(stream)
                async for msg in stream:
                    reopening.received()
                    yield msg
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self.closed and (task is None or not task.cancelling()):
                    return  # the client was closed, which cancelled the stream
                raise
            except grpc.aio.AioRpcError as e:
                if self.closed:
                    return
                delay = reopening.after(e.code())
                if delay is None:
                    raise
            finally:
                stream.cancel()
            await asyncio.sleep(delay)
            if self.closed:
                return

    def watch_status(self, org_id: str, assistant_ids: Sequence[str] = (), *,
                     reconnect: bool = True
                     ) -> AsyncGenerator[quota_pb2.WatchStatusResponse, None]:
        """The status of each watched assistant (none named: every assistant of the org),
        then every change, for as long as the caller iterates. A stream that ends with
        UNAVAILABLE (a renewed connection, a restarted server) is opened again, and
        since each new stream starts with the current status of every assistant, no
        change is missed: the caller may see a status twice, never miss one."""
        request = c.watch_status_request(org_id, assistant_ids)
        return self._resubscribing(
            lambda: self._stub().WatchStatus(request, metadata=self._metadata),
            c.Reopening(reconnect))

    def watch_events(self, org_id: str, after: str = "", *, reconnect: bool = True
                     ) -> AsyncGenerator[admin_pb2.Event, None]:
        """The org's events (AdminService.WatchEvents: an admin key) from now on, or from
        the event after cursor `after`. A stream cut by UNAVAILABLE is opened again after
        the last event received, so none is missed or repeated (as long as Redis still
        holds them: else the server answers FAILED_PRECONDITION, raised here)."""
        cursor = c.EventCursor(org_id, after)

        def open_stream() -> Any:
            self._stub()  # the channels, on this loop
            return self._admin[next(self._next)].WatchEvents(cursor.request(),
                                                             metadata=self._metadata)

        async def opened(stream: Any) -> None:
            if not cursor.last:
                cursor.started(await stream.initial_metadata())

        async def events() -> AsyncGenerator[admin_pb2.Event, None]:
            async for msg in self._resubscribing(open_stream, c.Reopening(reconnect), opened):
                yield cursor.seen(msg)

        return events()

    def reservation(self, subject: c.SubjectLike, charges: c.Amounts | None = None,
                    **kw: Any) -> Reservation:
        """`async with client.reservation(who, {"message_tokens": 2000}) as hold:` —
        Reserve on entry; in the block check `hold.granted` (and `hold.silent`: hide the
        assistant), do the work, tell `hold.use({...})` what it really used. Leaving the
        block commits that (or, without `use`, what was held); an exception refunds the
        hold and goes on. `kw` are reserve()'s keywords."""
        return Reservation(self, subject, charges, kw)


async def _to_the_end(aw: Awaitable[Any]) -> tuple[asyncio.Future[Any],
                                                 asyncio.CancelledError | None]:
    """Run `aw` to its end even when the task awaiting it is cancelled meanwhile: a
    Reserve, Commit or Refund cut off on its way may have reached the server, and nobody
    would resolve the hold it made or settle. Answers the finished future and the
    cancellation the caller raises once it has dealt with it (None: not cancelled)."""
    done = asyncio.ensure_future(aw)
    cancelled: asyncio.CancelledError | None = None
    while not done.done():
        try:
            await asyncio.wait((done,))
        except asyncio.CancelledError as e:
            cancelled = e
    return done, cancelled


class Reservation(c.Outcome):
    """One Reserve and its outcome (see QuotaClient.reservation). Each hold it makes is
    settled once, also when the task is cancelled in the block, or while the Reserve,
    Commit or Refund is on its way (that call is finished first, a cancelled Reserve's
    hold refunded, then the cancellation goes on)."""

    _client: QuotaClient

    async def __aenter__(self) -> Reservation:
        done, cancelled = await _to_the_end(
            self._client.reserve(self._subject, self._charges, **self._kw))
        if cancelled is None:
            self.response = done.result()
            return self
        if not done.cancelled() and done.exception() is None:
            self.response = done.result()
            if self.granted:  # the block will not run: give the hold back at once
                await self._refund("cancelled")
        raise cancelled

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        then = self.leaving(exc_type)
        if then is None:
            return
        what, arg = then
        if what == "refund":
            cancelled = await self._refund(arg)
            if cancelled is not None and not isinstance(exc, asyncio.CancelledError):
                raise cancelled  # cancelled while refunding: the cancellation goes on
            return
        done, cancelled = await _to_the_end(self._client.commit(self.reservation_id, arg))
        if cancelled is None:
            self.outcome = done.result()
            return
        if not done.cancelled() and done.exception() is None:
            self.outcome = done.result()
        else:
            log.warning("commit of %s failed while cancelled (%r); the hold expires after "
                        "its TTL", self.reservation_id,
                        None if done.cancelled() else done.exception())
        raise cancelled

    async def _refund(self, reason: str) -> asyncio.CancelledError | None:
        """Refund the hold, to the end; a failure is logged (the block's own error, or
        its cancellation, matters more). Answers the cancellation that came meanwhile."""
        done, cancelled = await _to_the_end(
            self._client.refund(self.reservation_id, reason=reason))
        if done.cancelled():
            log.warning("refund of %s was cancelled; the hold expires after its TTL",
                        self.reservation_id)
            return cancelled
        e = done.exception()
        if e is None:
            self.outcome = done.result()
        elif isinstance(e, grpc.aio.AioRpcError):
            log.warning("refund of %s failed (%s); the hold expires after its TTL",
                        self.reservation_id, e.code().name)
        elif cancelled is None:
            raise e
        return cancelled
