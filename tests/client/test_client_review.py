"""A review of the Python SDK against the real server: retries that keep the same hold
and never repeat what must not be repeated (both clients), `reservation()` settling each
hold once when its task is cancelled at any point, `use({})`, TLS with an API key, and the
estimator on text that is not space-separated English.

Where a test needs a call cut off, delayed or refused, a real gRPC server of the test's
own (`Proxy`) stands between the client and quotagate over real connections: it forwards
every QuotaService call, and can answer a call with a given code instead, or hold a call
(before or after forwarding it) until the test lets it go."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import Grpc
from grpc_api import Api
from quotagate.client import QuotaClient, SyncQuotaClient, estimate, subject
from quotagate.client._common import Outcome
from quotagate.v1 import common_pb2, quota_pb2

M = "message_tokens"
SERVICE = "quotagate.v1.QuotaService"
METHODS = ("Reserve", "Commit", "Refund", "Extend", "Check", "GetBalance")


@dataclass
class Gate:
    """Holds the next call of a method: `arrived` is set when it is held (after the
    upstream answered, with `after`), and it goes on when `release` is set."""

    after: bool
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    reply: bytes = b""


class Proxy:
    """A real gRPC server forwarding QuotaService calls to `upstream`, counting them."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.calls: collections.Counter[str] = collections.Counter()
        #: codes the next calls of a method are answered with, instead of forwarding
        self.fail: dict[str, list[grpc.StatusCode]] = collections.defaultdict(list)
        #: set when the proxy answered a call with a code of `fail`
        self.failed = asyncio.Event()
        self.gates: dict[str, Gate] = {}

    def hold(self, method: str, *, after: bool = False) -> Gate:
        self.gates[method] = Gate(after)
        return self.gates[method]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def __aenter__(self) -> Proxy:
        self._channel = grpc.aio.insecure_channel(self.upstream)
        self._server = grpc.aio.server()
        handlers = {m: grpc.unary_unary_rpc_method_handler(self._forward(m)) for m in METHODS}
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)
        await self._channel.close()

    def _forward(self, method: str) -> Callable[[bytes, Any], Any]:
        upstream = self._channel.unary_unary(f"/{SERVICE}/{method}")

        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.calls[method] += 1
            if self.fail[method]:
                code = self.fail[method].pop(0)
                self.failed.set()
                await context.abort(code, "answered by the test's proxy")
            gate = self.gates.pop(method, None)
            if gate is not None and not gate.after:
                gate.arrived.set()
                await gate.release.wait()
            try:
                reply: bytes = await upstream(request)
            except grpc.aio.AioRpcError as e:
                await context.abort(e.code(), e.details() or "")
            if gate is not None and gate.after:
                gate.reply = reply
                gate.arrived.set()
                await gate.release.wait()
            return reply

        return handle


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.plan("pro", monthly=10_000)
    await a.org("acme")
    return a


@pytest.fixture
async def proxy(server: Grpc, api: Api) -> AsyncIterator[Proxy]:
    async with Proxy(f"127.0.0.1:{server.app.port}") as p:
        yield p


async def using(kind: str, target: str, work: Callable[[Any], Any], **kw: Any) -> Any:
    """`work(client)` with a QuotaClient (awaited) or, in a thread, a SyncQuotaClient."""
    if kind == "async":
        async with QuotaClient(target, **kw) as client:
            return await work(client)

    def blocking() -> Any:
        with SyncQuotaClient(target, **kw) as client:
            return work(client)

    return await asyncio.to_thread(blocking)


# -- retries --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_reserve_retried_after_its_deadline_gets_the_first_hold(
        kind: str, proxy: Proxy, api: Api) -> None:
    """The first Reserve reaches the server and holds; its answer never comes back
    (DEADLINE_EXCEEDED). The retry carries the same idempotency key: the same hold,
    nothing held twice."""
    gate = proxy.hold("Reserve", after=True)  # never released: cut by the deadline
    r = await using(kind, proxy.target, lambda c: c.reserve(subject("acme"), {M: 700}),
                    timeout=1.0, channels=2)
    assert proxy.calls["Reserve"] >= 2 and gate.reply
    assert r.reservation_id == quota_pb2.ReserveResponse.FromString(gate.reply).reservation_id
    b = await api.balance()
    assert (b.reserved, b.used) == (700, 0)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_commit_retried_after_its_deadline_charges_once(
        kind: str, proxy: Proxy, api: Api) -> None:
    hold = await api.reserve(900)
    gate = proxy.hold("Commit", after=True)
    done = await using(kind, proxy.target,
                       lambda c: c.commit(hold.reservation_id, {M: 400}), timeout=1.0)
    assert proxy.calls["Commit"] >= 2 and gate.reply  # the first one was applied
    assert done.state == common_pb2.HOLD_STATE_COMMITTED and done.charged[0].amount == 400
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 400)


NOT_RETRIED = [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
               grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_what_is_retried_and_what_is_not(kind: str, proxy: Proxy, api: Api) -> None:
    async def raised(work: Callable[[Any], Any], **kw: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as e:
            await using(kind, proxy.target, work, **kw)
        return e.value.code()  # type: ignore[no-any-return, attr-defined]

    for code in NOT_RETRIED:  # sent once, raised as it came
        proxy.calls.clear()
        proxy.fail["Reserve"] = [code]
        assert await raised(lambda c: c.reserve(subject("acme"), {M: 10})) == code
        assert proxy.calls["Reserve"] == 1
    # the real server's own refusals are not retried either
    proxy.calls.clear()
    assert await raised(lambda c: c.reserve(subject("acme"), {"no_such_meter": 1})) \
        == grpc.StatusCode.INVALID_ARGUMENT
    assert await raised(lambda c: c.commit("r3." + "0" * 32)) == grpc.StatusCode.NOT_FOUND
    assert (proxy.calls["Reserve"], proxy.calls["Commit"]) == (1, 1)
    assert (await api.balance()).reserved == 0

    # UNAVAILABLE twice: the third try holds, once
    proxy.calls.clear()
    proxy.fail["Reserve"] = [grpc.StatusCode.UNAVAILABLE] * 2
    r = await using(kind, proxy.target, lambda c: c.reserve(subject("acme"), {M: 10}),
                    retries=2)
    assert r.decision == common_pb2.DECISION_GRANTED and proxy.calls["Reserve"] == 3
    # three times with retries=2: raised after the third
    proxy.fail["Commit"] = [grpc.StatusCode.UNAVAILABLE] * 3
    assert await raised(lambda c: c.commit(r.reservation_id), retries=2) \
        == grpc.StatusCode.UNAVAILABLE
    assert proxy.calls["Commit"] == 3
    # Extend adds to the hold: never sent twice
    proxy.fail["Extend"] = [grpc.StatusCode.UNAVAILABLE]
    assert await raised(lambda c: c.extend(r.reservation_id, {M: 5})) \
        == grpc.StatusCode.UNAVAILABLE
    assert proxy.calls["Extend"] == 1
    assert (await api.balance()).reserved == 10


# -- reservation() and cancellation -----------------------------------------------------
async def test_cancelled_while_reserving_leaves_no_hold(proxy: Proxy, api: Api) -> None:
    """The task is cancelled while its Reserve is on its way back (the server holds
    already): the Reserve is finished and its hold refunded before the cancellation goes
    on. It used to stay held, the tokens out of reach until the TTL."""
    gate = proxy.hold("Reserve", after=True)
    entered = asyncio.Event()

    async with QuotaClient(proxy.target, channels=1) as client:
        async def turn() -> None:
            async with client.reservation(subject("acme"), {M: 2_000}):
                entered.set()

        task = asyncio.create_task(turn())
        await gate.arrived.wait()
        assert (await api.balance()).reserved == 2_000  # the server holds it
        task.cancel()
        gate.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not entered.is_set()  # the block did not run
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


async def test_cancelled_while_committing_still_charges(proxy: Proxy, api: Api) -> None:
    """The block is done; its Commit's first try is answered UNAVAILABLE, and the task is
    cancelled before the retry. The Commit is finished all the same: the usage is charged
    (it used to be dropped: the hold expired with nothing charged)."""
    proxy.fail["Commit"] = [grpc.StatusCode.UNAVAILABLE]
    async with QuotaClient(proxy.target, channels=1) as client:
        async def turn() -> Any:
            async with client.reservation(subject("acme"), {M: 2_000}) as hold:
                hold.use({M: 1_733})
            return hold

        task = asyncio.create_task(turn())
        await proxy.failed.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert proxy.calls["Commit"] == 2
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 1_733)


async def test_cancelled_while_refunding_still_refunds(proxy: Proxy, api: Api) -> None:
    """The block raised; the Refund's first try is answered UNAVAILABLE and the task is
    cancelled before the retry: the hold is still given back, and the block's error is
    the cancellation goes on (the block's error as its context)."""
    proxy.fail["Refund"] = [grpc.StatusCode.UNAVAILABLE]
    async with QuotaClient(proxy.target, channels=1) as client:
        async def turn() -> None:
            async with client.reservation(subject("acme"), {M: 2_000}):
                raise RuntimeError("model failed")

        task = asyncio.create_task(turn())
        await proxy.failed.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert proxy.calls["Refund"] == 2
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


async def test_a_block_cancelled_inside_refunds_its_hold(server: Grpc, api: Api) -> None:
    started = asyncio.Event()
    async with QuotaClient(f"127.0.0.1:{server.app.port}") as client:
        holds: list[Any] = []

        async def turn() -> None:
            async with client.reservation(subject("acme"), {M: 2_000}) as hold:
                holds.append(hold)
                started.set()
                await asyncio.Event().wait()  # the model call, never answering

        task = asyncio.create_task(turn())
        await started.wait()
        assert (await api.balance()).reserved == 2_000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert holds[0].outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_use_of_nothing_charges_nothing(kind: str, server: Grpc, api: Api) -> None:
    """`hold.use({})` (the work used nothing, e.g. a cached answer) charges 0. It used to
    send an empty `actual`, which the API reads as "exactly what was held"."""
    target = f"127.0.0.1:{server.app.port}"

    async def work_async(client: Any) -> Any:
        async with client.reservation(subject("acme"), {M: 2_000}) as hold:
            hold.use({})
        return hold

    def work_sync(client: Any) -> Any:
        with client.reservation(subject("acme"), {M: 2_000}) as hold:
            hold.use({})
        return hold

    hold = await using(kind, target, work_async if kind == "async" else work_sync)
    assert hold.outcome.state == common_pb2.HOLD_STATE_COMMITTED
    assert [c.amount for c in hold.outcome.charged] == [0]
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_use_of_a_meter_not_held_fails_the_block_and_refunds(kind: str, server: Grpc,
                                                                   api: Api) -> None:
    """`hold.use()` naming a meter the hold does not have raises in the block, so leaving
    it refunds the hold. Before, the Commit on leaving was refused (INVALID_ARGUMENT) and
    the hold stayed until its TTL, charging nothing."""
    target = f"127.0.0.1:{server.app.port}"
    seen: list[Any] = []

    async def work_async(client: Any) -> Any:
        async with client.reservation(subject("acme"), {M: 2_000}) as hold:
            seen.append(hold)
            hold.use({M: 10, "call_seconds": 5})
        return hold

    def work_sync(client: Any) -> Any:
        with client.reservation(subject("acme"), {M: 2_000}) as hold:
            seen.append(hold)
            hold.use({M: 10, "call_seconds": 5})
        return hold

    with pytest.raises(ValueError, match="call_seconds"):
        await using(kind, target, work_async if kind == "async" else work_sync)
    (hold,) = seen
    assert hold.outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 0)


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_commit_or_refund_of_an_empty_mapping_is_refused(kind: str, server: Grpc,
                                                               api: Api) -> None:
    """`commit(id, {})` would charge everything held and `refund(id, {})` give back
    everything charged (an empty list on the wire means "all"): both are refused before
    anything is sent; None says "all"."""
    target = f"127.0.0.1:{server.app.port}"
    hold = await api.reserve(1_000)
    with pytest.raises(ValueError, match="empty"):
        await using(kind, target, lambda c: c.commit(hold.reservation_id, {}))
    assert (await api.balance()).reserved == 1_000  # nothing was sent
    await using(kind, target, lambda c: c.commit(hold.reservation_id, {M: 600}))
    with pytest.raises(ValueError, match="empty"):
        await using(kind, target, lambda c: c.refund(hold.reservation_id, {}))
    b = await api.balance()
    assert (b.reserved, b.used) == (0, 600)


def test_a_deny_reason_newer_than_the_client_is_named() -> None:
    """A server that knows a DenyReason this client's build does not: `hold.reason`
    names it instead of raising ValueError."""
    hold = Outcome(None, subject("acme"), {M: 1}, {})
    hold.response = quota_pb2.ReserveResponse(decision=common_pb2.DECISION_DENIED, reason=99)
    assert not hold.granted and hold.reason == "unknown_99"
    hold.response = quota_pb2.ReserveResponse(
        decision=common_pb2.DECISION_DENIED,
        reason=common_pb2.DENY_REASON_SEAT_LIMIT_REACHED)
    assert hold.reason == "seat_limit_reached"


# -- TLS and API keys -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_tls_and_an_api_key(kind: str, redis_server: Any, redis: Any, clock: Any,
                                  tmp_path: Path) -> None:
    import hashlib

    from tls_files import tls_files

    from quotagate.app import App
    from quotagate.ledger.model import Allowance
    from quotagate.settings import Settings

    key = "qg_rt_acme_review_0123456789abcdef"
    keys = tmp_path / "keys.toml"
    keys.write_text('[[keys]]\nname = "rt"\nrole = "runtime"\norg = "acme"\n'
                    f'sha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n')
    ca, cert, pem_key = tls_files(tmp_path)
    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", api_keys_file=str(keys),
                             tls_cert=str(cert), tls_key=str(pem_key)), clock=clock).start()
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("pro", [Allowance(M, 1_000)])
        await app.ledger.upsert_org("acme", "pro")
        await app.ledger.upsert_org("beta", "pro")
        await app.ledger.upsert_assistant("acme", "bot")
        creds = grpc.ssl_channel_credentials(ca.read_bytes())
        target = f"127.0.0.1:{app.port}"

        def charge(c: Any) -> Any:
            if kind == "async":
                async def go() -> Any:
                    async with c.reservation(subject("acme"), {M: 100}) as hold:
                        hold.use({M: 40})
                    return hold
                return go()
            with c.reservation(subject("acme"), {M: 100}) as hold:
                hold.use({M: 40})
            return hold

        hold = await using(kind, target, charge, api_key=key, credentials=creds)
        assert hold.outcome.charged[0].amount == 40
        [b] = (await using(kind, target, lambda c: c.get_balance(subject("acme"), [M]),
                           api_key=key, credentials=creds)).balances
        assert b.used == 40
        for api_key, other, code in ((None, "acme", grpc.StatusCode.UNAUTHENTICATED),
                                     ("qg_wrong", "acme", grpc.StatusCode.UNAUTHENTICATED),
                                     (key, "beta", grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(grpc.RpcError) as e:
                await using(kind, target, lambda c, o=other: c.check(subject(o), M),
                            api_key=api_key, credentials=creds)
            assert e.value.code() == code  # type: ignore[attr-defined]
        if kind == "async":  # the stream carries the key too
            async with QuotaClient(target, api_key=key, credentials=creds) as client:
                stream = client.watch_status("acme", ["bot"])
                first = await asyncio.wait_for(anext(stream), 10)
                assert (first.assistant_id, first.active) == ("bot", True)
                await stream.aclose()
    finally:
        await app.stop()


# -- the estimator ----------------------------------------------------------------------
def test_estimates_of_text_without_spaces_between_words() -> None:
    """Chinese, Japanese, Korean and Thai are not written with a space between words,
    emoji are tokens of their own, and a URL or a pasted blob is many tokens: each used
    to be estimated as one word (2 tokens) however long it was."""
    zh = "请帮我总结一下这份合同的主要条款和付款期限"  # 21 characters
    assert estimate.message_tokens(zh) >= 21
    ja = "パスワードをリセットする方法を教えてください"
    assert estimate.message_tokens(ja) >= len(ja)
    ko = "비밀번호를 재설정하는 방법을 알려주세요"
    assert estimate.message_tokens(ko) >= len(ko.replace(" ", ""))
    assert estimate.message_tokens("ขอบคุณมากครับ") >= 13
    assert estimate.message_tokens("😀😀😀😀") >= 4
    assert estimate.message_tokens("東京 tower") == 4  # 東, 京, tower: 3 words
    blob = "aGVsbG8gd29ybGQ" * 40  # 600 characters of base64
    assert estimate.upload_tokens(blob) >= 600 // 4
    assert estimate.message_tokens("https://example.com/" + "x" * 60) >= 20
    # English is counted as before: 1.33 a word, exactly
    assert estimate.message_tokens(" ".join(["word"] * 100)) == 133
    assert estimate.message_tokens(" ".join(["word"] * 10_000)) == 13_300
    assert estimate.message_tokens("how do I reset my password", 500) == 508
    # empty or only spaces (ideographic and no-break ones too): at least 1, or the response
    for empty in ("", "   ", "\u3000\u3000", "\xa0\n\t"):
        assert estimate.message_tokens(empty) == 1
        assert estimate.message_tokens(empty, 800) == 800
        assert estimate.upload_tokens(empty) == 1


async def test_asyncio_client_interceptors_see_every_call(server: Grpc, api: Api) -> None:
    """`QuotaClient(interceptors=...)`: grpc.aio client interceptors (tracing, metrics) wrap
    every connection, also the ones opened again after close()."""
    seen: list[str] = []

    class Record(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        async def intercept_unary_unary(self, continuation: Any, details: Any,
                                        request: Any) -> Any:
            method = details.method
            if isinstance(method, bytes):
                method = method.decode()
            seen.append(method.rsplit("/", 1)[-1])
            return await continuation(details, request)

    client = QuotaClient(f"127.0.0.1:{server.app.port}", channels=2,
                         interceptors=[Record()])
    try:
        async with client.reservation(subject("acme"), {M: 100}) as hold:
            assert hold.granted
            hold.use({M: 40})
        await client.close()
        assert (await client.check(subject("acme"), M)).active  # reopened
    finally:
        await client.close()
    assert seen == ["Reserve", "Commit", "Check"]
    b = await api.balance()
    assert (b.used, b.reserved) == (40, 0)
