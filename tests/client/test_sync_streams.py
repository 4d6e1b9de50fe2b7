"""The blocking client's watches (`SyncQuotaClient.watch_status` / `watch_events`) against
the real server: a cut stream is opened again with no status change and no event missed
or repeated, the API key is sent, and leaving the loop, `.close()` or closing the client
ends the stream and its thread; a closed client (either kind) refuses calls; and a
`SyncReservation` settles its hold when an exception (Ctrl-C) comes while its Reserve,
Commit or Refund is on its way.

Streams are cut by a real gRPC server of the test's own (`StreamProxy`) standing between
the client and quotagate, or by restarting quotagate on the same port. Ctrl-C while a call
is on its way is a KeyboardInterrupt raised in the client's thread by a gRPC client
interceptor (`Interrupt`), once: before the call is sent (it never reaches the server) or
once the server's answer is back but before the client has it (the answer is lost)."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import Grpc
from grpc_api import Api, subscribed
from quotagate.client import QuotaClient, SyncQuotaClient, subject
from quotagate.events.hub import hub_for
from quotagate.ledger.keys import Keys
from quotagate.v1 import admin_pb2, common_pb2

M = "message_tokens"


# -- a proxy for the streams ----------------------------------------------------------
@dataclass
class Plan:
    """What the proxy does with the next stream of a method: forward its header and
    `forward` messages, then wait for `then` (if any) and end it UNAVAILABLE, as a
    renewed connection or a restarting server does."""

    forward: int
    then: asyncio.Event | None = None
    header_sent: asyncio.Event = field(default_factory=asyncio.Event)


STREAMS = {"WatchStatus": "quotagate.v1.QuotaService",
           "WatchEvents": "quotagate.v1.AdminService"}


class StreamProxy:
    """A real gRPC server forwarding WatchStatus and WatchEvents (request, the client's
    `authorization`, the server's initial metadata and messages) to `upstream`; a stream
    without a Plan is forwarded until either side ends it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.opened: collections.Counter[str] = collections.Counter()
        self.plans: dict[str, list[Plan]] = collections.defaultdict(list)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> StreamProxy:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._server = grpc.aio.server()
        for method, service in STREAMS.items():
            self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                service, {method: grpc.unary_stream_rpc_method_handler(
                    self._forward(service, method))}),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
        await self._channel.close()

    def _forward(self, service: str, method: str) -> Callable[[bytes, Any], Any]:
        upstream = self._channel.unary_stream(f"/{service}/{method}")

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> None:
            self.opened[method] += 1
            plan = self.plans[method].pop(0) if self.plans[method] else None
            key = [(k, v) for k, v in context.invocation_metadata() or ()
                   if k == "authorization"]
            call = upstream(request, metadata=key)
            try:
                try:
                    await context.send_initial_metadata(tuple(await call.initial_metadata()
                                                              or ()))
                    if plan is not None:
                        plan.header_sent.set()
                    n = 0
                    while plan is None or n < plan.forward:
                        msg = await call.read()
                        if msg is grpc.aio.EOF:
                            return
                        await context.write(msg)
                        n += 1
                except grpc.aio.AioRpcError as e:
                    await context.abort(e.code(), e.details() or "")
                if plan.then is not None:
                    await plan.then.wait()
                await context.abort(grpc.StatusCode.UNAVAILABLE, "cut by the test's proxy")
            finally:
                call.cancel()

        return handle


class Interrupt(grpc.UnaryUnaryClientInterceptor):
    """Raises KeyboardInterrupt in the calling thread at the first call of `method`, as
    Ctrl-C would: before sending it (`sent=False`: it never reaches the server) or, with
    `sent=True`, once the server has answered, before the client gets the answer. Every
    other call goes through; `calls` counts what was sent, per method."""

    def __init__(self, method: str, *, sent: bool) -> None:
        self.method, self.sent, self.fired = method, sent, False
        self.calls: collections.Counter[str] = collections.Counter()

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        name = details.method.rsplit("/", 1)[-1]
        if name != self.method or self.fired:
            self.calls[name] += 1
            return continuation(details, request)
        self.fired = True
        if self.sent:
            self.calls[name] += 1
            continuation(details, request).result()  # the server did it
        raise KeyboardInterrupt


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.plan("pro", monthly=10_000)
    await a.org("acme")
    await a.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
        org_id="acme", assistant_id="bot", enabled=True))
    return a


@pytest.fixture
async def streams(server: Grpc, api: Api) -> AsyncIterator[StreamProxy]:
    async with StreamProxy(f"127.0.0.1:{server.app.port}") as p:
        yield p


# -- helpers --------------------------------------------------------------------------
async def take(watch: Iterator[Any], n: int = 1, within: float = 20) -> list[Any]:
    """The next `n` items of a blocking iterator (read in a thread)."""
    return await asyncio.wait_for(
        asyncio.to_thread(lambda: [next(watch) for _ in range(n)]), within)


async def until(cond: Callable[[], bool], what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def subscribers(server: Any) -> int:
    """Open WatchStatus / WatchEvents streams on the real server (its event hub)."""
    app = getattr(server, "app", server)
    return int(hub_for(app.ledger.redis, app.ledger.keys).subscribers)


class InThread:
    """`work()` in a thread of its own; what it answered or raised."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self.work, self.result, self.error = work, None, None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as e:  # a KeyboardInterrupt raised into it, too
            self.error = e

    async def join(self, within: float = 30) -> None:
        await asyncio.to_thread(self.thread.join, within)
        assert not self.thread.is_alive(), "the thread did not end"


def new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since `before`, but asyncio's own executor (asyncio.to_thread)."""
    return [t.name for t in threading.enumerate()
            if t not in before and not t.name.startswith("asyncio_")]


async def event(redis: Any, i: int, org: str = "acme") -> str:
    """Append an event of `org` to its shard's stream, as the ledger does."""
    keys = Keys(64)
    eid = f"wallet.low:{org}:{i}"
    await redis.xadd(keys.events(keys.shard_of(org)), {
        "id": eid, "type": "wallet.low", "org": org, "attrs": json.dumps({"n": str(i)}),
        "at": "1"})
    return eid


def status(msg: Any) -> tuple[str, bool]:
    return msg.assistant_id, msg.active


# -- watch_status ---------------------------------------------------------------------
async def test_sync_watch_status_reopens_a_cut_stream_and_misses_no_change(
        server: Grpc, api: Api, streams: StreamProxy) -> None:
    """The first stream is cut after one message: the client opens it again, which
    starts with the current status, and the next change still arrives."""
    streams.plans["WatchStatus"] = [Plan(forward=1)]
    with SyncQuotaClient(streams.target, channels=1) as client:
        watch = client.watch_status("acme", ["bot"])
        assert [status(m) for m in await take(watch)] == [("bot", True)]
        # the cut stream, opened again: the current status first
        assert [status(m) for m in await take(watch)] == [("bot", True)]
        assert streams.opened["WatchStatus"] == 2
        await subscribed(server)
        await api.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
            org_id="acme", assistant_id="bot", enabled=False))
        assert [status(m) for m in await take(watch)] == [("bot", False)]
        watch.close()
        await until(lambda: subscribers(server) == 0, "the stream was not ended")


async def test_sync_watch_status_across_a_server_restart(
        redis_server: Any, ledger: Any, clock: Any, tmp_path: Path) -> None:
    """quotagate stops; the assistant is disabled while nobody serves; a new server on
    the same port: the reopened stream starts with the status as it is now."""
    from quotagate.app import App
    from quotagate.settings import Settings

    def settings(listen: str, sub: str) -> Settings:
        return Settings(listen=listen, redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path / sub,
                        metrics_listen="127.0.0.1:0")

    await ledger.upsert_org("acme", "pro")
    await ledger.upsert_assistant("acme", "bot")
    app = await App(settings("127.0.0.1:0", "a"), clock=clock).start()
    second: Any = None
    try:
        with SyncQuotaClient(f"127.0.0.1:{app.port}", channels=1) as client:
            watch = client.watch_status("acme", ["bot"])
            assert [status(m) for m in await take(watch)] == [("bot", True)]
            await app.stop()
            await ledger.upsert_assistant("acme", "bot", enabled=False)
            second = await App(settings(f"127.0.0.1:{app.port}", "b"), clock=clock).start()
            assert [status(m) for m in await take(watch, within=30)] == [("bot", False)]
            watch.close()
            await until(lambda: subscribers(second) == 0, "the stream was not ended")
    finally:
        await app.stop()
        if second is not None:
            await second.stop()


# -- watch_events ---------------------------------------------------------------------
async def test_sync_watch_events_reopened_after_the_last_event(
        server: Grpc, api: Api, streams: StreamProxy, redis: Any) -> None:
    """Cut after 3 events, then after 2 more: every event arrives once, in order."""
    streams.plans["WatchEvents"] = [Plan(forward=3), Plan(forward=2)]
    with SyncQuotaClient(streams.target, channels=1) as client:
        watch = client.watch_events("acme")
        got = asyncio.ensure_future(take(watch, 10))
        await subscribed(server)
        sent = [await event(redis, i) for i in range(10)]
        assert [e.id for e in await got] == sent
        assert streams.opened["WatchEvents"] == 3


async def test_sync_watch_events_cut_before_its_first_event_misses_nothing(
        server: Grpc, api: Api, streams: StreamProxy, redis: Any) -> None:
    """The stream is cut after its header, before any event, and events happen before it
    is opened again: the new stream starts where the first one did (the header's
    cursor), so they arrive, then what comes live."""
    cut = Plan(forward=0, then=asyncio.Event())
    streams.plans["WatchEvents"] = [cut]
    await event(redis, 0)  # before the watch: not for it
    with SyncQuotaClient(streams.target, channels=1) as client:
        watch = client.watch_events("acme")
        got = asyncio.ensure_future(take(watch, 3))
        await cut.header_sent.wait()
        missed = [await event(redis, 1), await event(redis, 2)]
        assert cut.then is not None
        cut.then.set()
        await until(lambda: streams.opened["WatchEvents"] == 2, "not opened again")
        live = await event(redis, 3)
        assert [e.id for e in await got] == [*missed, live]


# -- API keys ---------------------------------------------------------------------------
async def test_the_sync_watches_send_the_api_key(redis_server: Any, redis: Any, clock: Any,
                                                 tmp_path: Path) -> None:
    from quotagate.app import App
    from quotagate.ledger.model import Allowance
    from quotagate.settings import Settings

    runtime, admin = "qg_rt_acme_streams_0123456789", "qg_admin_acme_streams_0123456789"
    keys = tmp_path / "keys.toml"
    keys.write_text("".join(
        f'[[keys]]\nname = "{role}"\nrole = "{role}"\norg = "acme"\n'
        f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        for role, key in (("runtime", runtime), ("admin", admin))))
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(keys)),
                    clock=clock).start()
    target = f"127.0.0.1:{app.port}"
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("pro", [Allowance(M, 1_000)])
        await app.ledger.upsert_org("acme", "pro")
        await app.ledger.upsert_assistant("acme", "bot")
        with SyncQuotaClient(target, api_key=runtime) as client:
            watch = client.watch_status("acme", ["bot"])
            assert [status(m) for m in await take(watch)] == [("bot", True)]
            watch.close()
            # the runtime key may not watch events: refused, not opened again
            with pytest.raises(grpc.RpcError) as e:
                await take(client.watch_events("acme"))
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        with SyncQuotaClient(target) as client, pytest.raises(grpc.RpcError) as e:
            await take(client.watch_status("acme", ["bot"]))
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        with SyncQuotaClient(target, api_key=admin) as client:
            watch = client.watch_events("acme")
            got = asyncio.ensure_future(take(watch))
            await until(lambda: subscribers(app) == 1, "the stream never subscribed")
            sent = await event(redis, 1)
            assert [ev.id for ev in await got] == [sent]
            watch.close()
        await until(lambda: subscribers(app) == 0, "a stream was not ended")
    finally:
        await app.stop()


# -- ending a watch ---------------------------------------------------------------------
async def test_leaving_the_loop_ends_the_stream_and_its_thread(server: Grpc,
                                                               api: Api) -> None:
    """`for st in client.watch_status(...): ... break`: the server's stream ends and no
    thread is left running (the client is still open)."""
    before = set(threading.enumerate())
    with SyncQuotaClient(f"127.0.0.1:{server.app.port}", channels=1) as client:
        def first() -> Any:
            for st in client.watch_status("acme", ["bot"]):
                return status(st)
            return None

        loop = InThread(first)
        await loop.join()
        assert (loop.result, loop.error) == (("bot", True), None)
        await until(lambda: subscribers(server) == 0, "the stream was not ended")
        await until(lambda: not new_threads(before), "a thread is left running")


async def test_close_from_another_thread_ends_a_waiting_watch(server: Grpc,
                                                              api: Api) -> None:
    """One thread waits in the watch for a change that does not come; `.close()` from
    another thread ends its loop (no exception), the stream and its thread."""
    before = set(threading.enumerate())
    with SyncQuotaClient(f"127.0.0.1:{server.app.port}", channels=1) as client:
        watch = client.watch_status("acme", ["bot"])
        seen: list[Any] = []
        loop = InThread(lambda: [seen.append(status(st)) for st in watch])
        await until(lambda: seen == [("bot", True)] and subscribers(server) == 1,
                    "the watch never started")
        watch.close()
        await loop.join()
        assert loop.error is None and seen == [("bot", True)]
        await until(lambda: subscribers(server) == 0, "the stream was not ended")
        await until(lambda: not new_threads(before), "a thread is left running")


async def test_closing_the_client_ends_its_watches_and_refuses_more(
        server: Grpc, streams: StreamProxy) -> None:
    """Closing the client ends the watches waiting in other threads, without opening
    their streams again; then every call, a new watch included, is refused (it used to
    be grpc's ValueError "Cannot invoke RPC on closed channel!")."""
    before = set(threading.enumerate())
    client = SyncQuotaClient(streams.target, channels=2)
    status_watch = client.watch_status("acme", ["bot"])
    event_watch = client.watch_events("acme")
    seen: list[Any] = []
    loops = [InThread(lambda: [seen.append(status(st)) for st in status_watch]),
             InThread(lambda: list(event_watch))]
    await until(lambda: bool(seen) and subscribers(server) == 2, "the watches never started")
    client.close()
    for loop in loops:
        await loop.join()
        assert (loop.error, loop.result) == (None, [] if loop is loops[1] else [None])
    assert streams.opened == {"WatchStatus": 1, "WatchEvents": 1}  # not opened again
    await until(lambda: subscribers(server) == 0, "a stream was not ended")
    await until(lambda: not new_threads(before), "a thread is left running")
    for call in (lambda: client.check(subject("acme"), M),
                 lambda: client.reserve(subject("acme"), {M: 1}),
                 lambda: client.watch_status("acme"), lambda: client.watch_events("acme"),
                 lambda: client.reservation(subject("acme"), {M: 1}).__enter__()):
        with pytest.raises(RuntimeError, match="client is closed"):
            call()
    client.close()  # again: nothing happens


async def test_closing_an_asyncio_client_ends_its_watches_and_it_may_be_used_again(
        server: Grpc, api: Api) -> None:
    """QuotaClient.close() ends a watch being iterated (it used to raise CancelledError
    into a task nobody cancelled). The client stays usable: its next call opens new
    connections on the loop it runs on (a client made at import time, used by several
    asyncio.run() in turn, closes at the end of each); closing twice is fine."""
    client = QuotaClient(f"127.0.0.1:{server.app.port}", channels=1)
    assert (await client.check(subject("acme"), M)).active
    watch = client.watch_status("acme", ["bot"])
    assert status(await anext(watch)) == ("bot", True)
    rest = asyncio.ensure_future(anext(watch))
    await until(lambda: subscribers(server) == 1, "the watch never started")
    await client.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(rest, 10)
    await client.close()  # again: nothing happens
    assert (await client.check(subject("acme"), M)).active  # opened again
    again = client.watch_status("acme", ["bot"])
    assert status(await anext(again)) == ("bot", True)
    await again.aclose()
    await client.close()
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


# -- reservation() and exceptions on the way -------------------------------------------
async def test_interrupted_while_reserving_leaves_no_hold(server: Grpc, api: Api) -> None:
    """Ctrl-C while the Reserve's answer is on its way back (the server holds already):
    the Reserve is sent again with its idempotency key, which answers that hold, and it
    is refunded before the KeyboardInterrupt goes on; the block does not run. It used to
    stay held until its TTL."""
    cut = Interrupt("Reserve", sent=True)
    entered = threading.Event()

    def turn() -> None:
        with SyncQuotaClient(f"127.0.0.1:{server.app.port}", interceptors=[cut]) as client, \
                client.reservation(subject("acme"), {M: 2_000}):
            entered.set()

    t = InThread(turn)
    await t.join()
    assert isinstance(t.error, KeyboardInterrupt) and not entered.is_set()
    assert (cut.calls["Reserve"], cut.calls["Refund"]) == (2, 1)
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


@pytest.mark.parametrize("sent", [False, True])
async def test_interrupted_while_committing_still_charges(sent: bool, server: Grpc,
                                                          api: Api) -> None:
    """The block is done; Ctrl-C while its Commit is on its way (not yet sent, or its
    answer not yet back): the Commit is sent again, to its end, so the usage is charged
    once and `hold.outcome` says so, then the KeyboardInterrupt goes on. An unsent Commit
    used to leave the hold to expire uncharged."""
    cut = Interrupt("Commit", sent=sent)
    holds: list[Any] = []

    def turn() -> None:
        with SyncQuotaClient(f"127.0.0.1:{server.app.port}", interceptors=[cut]) as client, \
                client.reservation(subject("acme"), {M: 2_000}) as hold:
            holds.append(hold)
            hold.use({M: 1_733})

    t = InThread(turn)
    await t.join()
    assert isinstance(t.error, KeyboardInterrupt)
    assert cut.calls["Commit"] == 1 + sent
    assert holds[0].outcome.state == common_pb2.HOLD_STATE_COMMITTED
    assert holds[0].outcome.charged[0].amount == 1_733
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 1_733)


@pytest.mark.parametrize("sent", [False, True])
async def test_interrupted_while_refunding_still_refunds(sent: bool, server: Grpc,
                                                         api: Api) -> None:
    """The block raised; Ctrl-C while the Refund is on its way: the Refund is sent again,
    then the KeyboardInterrupt goes on (the block's error as its context). An unsent
    Refund used to leave the hold held until its TTL."""
    cut = Interrupt("Refund", sent=sent)
    holds: list[Any] = []

    def turn() -> None:
        with SyncQuotaClient(f"127.0.0.1:{server.app.port}", interceptors=[cut]) as client, \
                client.reservation(subject("acme"), {M: 2_000}) as hold:
            holds.append(hold)
            raise RuntimeError("model failed")

    t = InThread(turn)
    await t.join()
    assert isinstance(t.error, KeyboardInterrupt)
    assert isinstance(t.error.__context__, RuntimeError)
    assert cut.calls["Refund"] == 1 + sent
    assert holds[0].outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, SystemExit])
async def test_ctrl_c_in_the_block_refunds_the_hold(exc: type[BaseException],
                                                    server: Grpc, api: Api) -> None:
    """A KeyboardInterrupt (or SystemExit) raised in the block refunds the hold and goes
    on (a check of what already held)."""
    holds: list[Any] = []

    def turn() -> None:
        with SyncQuotaClient(f"127.0.0.1:{server.app.port}") as client, \
                client.reservation(subject("acme"), {M: 2_000}) as hold:
            holds.append(hold)
            raise exc

    t = InThread(turn)
    await t.join()
    assert isinstance(t.error, exc)
    assert holds[0].outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)
