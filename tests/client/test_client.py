"""The Python SDK against the real server: reservations that commit what was used or
refund on failure, denials and silent assistants, retries that stop where they must,
several connections, and the blocking twin."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from conftest import Grpc
from grpc_api import Api
from quotagate import telemetry
from quotagate.client import QuotaClient, SyncQuotaClient, estimate, subject
from quotagate.ledger.model import Allowance
from quotagate.v1 import admin_pb2, common_pb2

M = "message_tokens"


@pytest.fixture
async def qg(server: Grpc) -> Any:
    api = Api(server)
    await api.plan("pro", monthly=10_000)
    await api.org("acme")
    client = QuotaClient(f"127.0.0.1:{server.app.port}")
    yield client, api
    await client.close()


async def test_a_reservation_commits_what_was_used(qg: Any) -> None:
    client, api = qg
    async with client.reservation(subject("acme"), {M: 2_000}) as hold:
        assert hold.granted and hold.reservation_id and not hold.silent
        assert (await api.balance()).reserved == 2_000  # held while the work runs
        hold.use({M: 1_733})
    assert hold.outcome.charged[0].amount == 1_733
    b = await api.balance()
    assert (b.used, b.reserved) == (1_733, 0)
    # without use(): what was held is charged
    async with client.reservation(subject("acme"), {M: 500}):
        pass
    assert (await api.balance()).used == 2_233


async def test_a_failed_block_refunds_its_hold(qg: Any) -> None:
    client, api = qg
    with pytest.raises(RuntimeError, match="model timed out"):
        async with client.reservation(subject("acme"), {M: 2_000}) as hold:
            raise RuntimeError("model timed out")
    assert hold.outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.used, b.reserved) == (0, 0)


async def test_denials_and_silent_assistants(qg: Any) -> None:
    client, api = qg
    async with client.reservation(subject("acme"), {M: 20_000}) as hold:
        assert not hold.granted and hold.reason == "insufficient_balance" and not hold.silent
    assert hold.outcome is None  # nothing to commit
    await api.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
        org_id="acme", assistant_id="bot", enabled=True))
    await api.use(10_000)
    async with client.reservation(subject("acme", assistant="bot"), {M: 1}) as hold:
        assert not hold.granted and hold.silent and hold.reason == "assistant_inactive"
    assert not (await client.check(subject("acme", assistant="bot"), M)).active


async def test_reserve_by_action_and_the_other_calls(qg: Any) -> None:
    client, _ = qg
    r = await client.reserve(subject("acme"), action="ai_sequence", idempotency_key="k1")
    again = await client.reserve(subject("acme"), action="ai_sequence", idempotency_key="k1")
    assert again.reservation_id == r.reservation_id  # the same request: the same hold
    ext = await client.extend(r.reservation_id, {M: 25})
    assert ext.decision == common_pb2.DECISION_GRANTED
    await client.commit(r.reservation_id, {M: 60})
    refund = await client.refund(r.reservation_id, {M: 10}, reason="bad answer")
    assert refund.refunded[0].amount == 10
    [b] = (await client.get_balance(subject("acme"), [M])).balances
    assert b.used == 50


def _client_connections(server_port: int) -> int:
    n = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "01" and int(f[2].rsplit(":", 1)[1], 16) == server_port:
                n += 1
    return n


async def test_calls_go_round_several_connections(server: Grpc) -> None:
    before = _client_connections(server.app.port)
    async with QuotaClient(f"127.0.0.1:{server.app.port}", channels=5) as client:
        for _ in range(10):
            await client.check(subject("nobody"))
        assert _client_connections(server.app.port) - before == 5


async def test_retries_stop_after_the_limit_and_never_repeat_extend(clock: Any,
                                                                    tmp_path: Any) -> None:
    from quotagate.app import App
    from quotagate.settings import Settings
    from redis_server import RedisServer

    reg = telemetry.registry()

    def unavailable(method: str) -> float:
        return reg.get_sample_value("quotagate_rpc_requests_total", {
            "service": "quotagate.v1.QuotaService", "method": method,
            "code": "UNAVAILABLE"}) or 0.0

    own = RedisServer().start()
    app = await App(Settings(listen="127.0.0.1:0", redis_url=own.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0"), clock=clock).start()
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("pro", [Allowance(M, 1_000)])
        await app.ledger.upsert_org("acme", "pro")
        # a long timeout: each try is answered by the server (UNAVAILABLE), not cut short
        async with QuotaClient(f"127.0.0.1:{app.port}", retries=2, timeout=15) as client:
            hold = await client.reserve(subject("acme"), {M: 10})
            own.stop()  # Redis gone: every call answers UNAVAILABLE
            n_reserve, n_extend = unavailable("Reserve"), unavailable("Extend")
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.reserve(subject("acme"), {M: 10})
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            # the server counts a call just after answering it: let the last one land
            await asyncio.sleep(0.5)
            assert unavailable("Reserve") - n_reserve == 3  # the first try and 2 retries
            assert time.monotonic() - t0 < 10.5
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.extend(hold.reservation_id, {M: 5})
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.sleep(0.5)  # a repeat, were there one, would be counted by now
            assert unavailable("Extend") - n_extend == 1
    finally:
        await app.stop()
        own.close()


async def test_the_blocking_client(qg: Any, server: Grpc) -> None:
    _, api = qg

    def work() -> tuple[Any, Any]:
        with SyncQuotaClient(f"127.0.0.1:{server.app.port}", channels=2) as client:
            with client.reservation(subject("acme"), {M: 1_000}) as hold:
                assert hold.granted
                hold.use({M: 800})
            try:
                with client.reservation(subject("acme"), {M: 1_000}) as failed:
                    raise ValueError("no answer")
            except ValueError:
                pass
            return hold, failed

    hold, failed = await asyncio.to_thread(work)
    assert hold.outcome.charged[0].amount == 800
    assert failed.outcome.state == common_pb2.HOLD_STATE_REFUNDED
    b = await api.balance()
    assert (b.used, b.reserved) == (800, 0)


def test_estimates() -> None:
    assert estimate.message_tokens("how do I reset my password", 500) == 8 + 500  # 6 × 1.33
    assert estimate.message_tokens("") == 1
    assert estimate.upload_tokens(10_000) == 15_000  # DESIGN §1: 10,000 words ≈ 15,000
    assert estimate.upload_tokens("alpha beta") == 3
    with pytest.raises(ValueError):
        estimate.message_tokens("x", -1)
    with pytest.raises(ValueError):
        estimate.upload_tokens(-5)


async def test_watch_status_follows_changes_across_renewed_connections(
        redis_server: Any, redis: Any, clock: Any, tmp_path: Any) -> None:
    """The server renews connections every second and ends a stream half a second after;
    the client subscribes again, gets the current status first, and still sees the next
    change."""
    from quotagate.app import App
    from quotagate.settings import Settings

    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", max_connection_age_seconds=1,
                             max_connection_age_grace_seconds=0.5), clock=clock).start()
    try:
        assert app.ledger is not None
        await app.ledger.upsert_plan("pro", [Allowance(M, 1_000)])
        await app.ledger.upsert_org("acme", "pro")
        await app.ledger.upsert_assistant("acme", "bot")
        async with QuotaClient(f"127.0.0.1:{app.port}", channels=1) as client:
            stream = client.watch_status("acme", ["bot"])
            first = await asyncio.wait_for(anext(stream), 5)
            assert (first.assistant_id, first.active) == ("bot", True)
            # the stream is cut when its connection's grace is up: the status again
            again = await asyncio.wait_for(anext(stream), 10)
            assert (again.assistant_id, again.active) == ("bot", True)
            await app.ledger.upsert_assistant("acme", "bot", enabled=False)
            change = await asyncio.wait_for(anext(stream), 10)
            assert (change.assistant_id, change.active) == ("bot", False)
            await stream.aclose()
    finally:
        await app.stop()


def test_a_client_made_outside_the_event_loop(tmp_path: Path) -> None:
    """Made at import time, used in asyncio.run(): its channels open on the loop of the
    first call (a grpc.aio channel belongs to one loop)."""
    from test_serve import start_serve

    proc, port = start_serve(tmp_path)
    try:
        client = QuotaClient(f"127.0.0.1:{port}")

        async def use() -> bool:
            try:
                return bool((await client.check(subject("demo"), M)).active)
            finally:
                await client.close()

        assert asyncio.run(use())
        assert asyncio.run(use())  # and again on another loop, after close()
    finally:
        proc.terminate()
        proc.wait(30)


async def test_watch_events_resumes_across_cut_streams(redis_server: Any, redis: Any,
                                                       clock: Any, tmp_path: Any) -> None:
    """Connections renewed every second cut the stream; the client reopens it after the
    last event it got: every event arrives once, in order."""
    import json

    from quotagate.app import App
    from quotagate.events.hub import hub_for
    from quotagate.ledger.keys import Keys
    from quotagate.settings import Settings

    app = await App(Settings(listen="127.0.0.1:0", redis_url=redis_server.url, shards=64,
                             sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path,
                             metrics_listen="127.0.0.1:0", max_connection_age_seconds=1,
                             max_connection_age_grace_seconds=0.3), clock=clock).start()
    stream = Keys(64).events(Keys(64).shard_of("acme"))
    sent: list[str] = []

    async def produce() -> None:
        for i in range(30):
            sent.append(f"wallet.low:acme:{i}")
            await redis.xadd(stream, {"id": sent[-1], "type": "wallet.low", "org": "acme",
                                      "attrs": json.dumps({"n": str(i)}), "at": "1"})
            await asyncio.sleep(0.1)

    try:
        async with QuotaClient(f"127.0.0.1:{app.port}", channels=1) as client:
            events = client.watch_events("acme")
            first = asyncio.ensure_future(anext(events))
            hub = hub_for(app.ledger.redis, app.ledger.keys)  # type: ignore[union-attr]
            for _ in range(500):  # until the stream is open
                if hub.subscribers:
                    break
                await asyncio.sleep(0.01)
            producer = asyncio.create_task(produce())
            got = [(await asyncio.wait_for(first, 10)).id]
            while len(got) < 30:
                got.append((await asyncio.wait_for(anext(events), 10)).id)
            await producer
            await events.aclose()
        assert got == sent  # 3 s of events over several renewed connections
    finally:
        await app.stop()


async def test_watch_events_cut_before_its_first_event_misses_nothing(
        redis_server: Any, redis: Any, clock: Any, tmp_path: Any) -> None:
    """The server goes away before the stream has carried one event, events happen
    while it is down: the reopened stream starts with them (from the cursor the first
    stream's initial metadata gave), then goes on live."""
    import json

    from quotagate.app import App
    from quotagate.client.aio import CURSOR_HEADER
    from quotagate.events.hub import hub_for
    from quotagate.ledger.keys import Keys
    from quotagate.server.admin import CURSOR_HEADER as SERVER_HEADER
    from quotagate.settings import Settings

    assert CURSOR_HEADER == SERVER_HEADER

    def settings(listen: str, sub: str) -> Settings:
        return Settings(listen=listen, redis_url=redis_server.url, shards=64,
                        sweep_interval_ms=600_000, grace_seconds=0, data_dir=tmp_path / sub,
                        metrics_listen="127.0.0.1:0")

    stream = Keys(64).events(Keys(64).shard_of("acme"))

    async def event(i: int) -> str:
        await redis.xadd(stream, {"id": f"wallet.low:acme:{i}", "type": "wallet.low",
                                  "org": "acme", "attrs": json.dumps({"n": str(i)}), "at": "1"})
        return f"wallet.low:acme:{i}"

    await event(0)  # before the stream opens: not for this watcher
    app = await App(settings("127.0.0.1:0", "a"), clock=clock).start()
    port = app.port
    second: App | None = None
    try:
        async with QuotaClient(f"127.0.0.1:{port}", channels=1) as client:
            events = client.watch_events("acme")
            first = asyncio.ensure_future(anext(events))
            hub = hub_for(app.ledger.redis, app.ledger.keys)  # type: ignore[union-attr]
            for _ in range(500):  # until the stream is open
                if hub.subscribers:
                    break
                await asyncio.sleep(0.01)
            assert hub.subscribers == 1
            await asyncio.sleep(0.2)  # the client has the initial metadata
            await app.stop()
            missed = [await event(1), await event(2)]  # nobody is serving
            second = await App(settings(f"127.0.0.1:{port}", "b"), clock=clock).start()
            got = [(await asyncio.wait_for(first, 15)).id,
                   (await asyncio.wait_for(anext(events), 10)).id]
            assert got == missed
            live = await event(3)
            assert (await asyncio.wait_for(anext(events), 10)).id == live
            await events.aclose()
    finally:
        await app.stop()
        if second is not None:
            await second.stop()
