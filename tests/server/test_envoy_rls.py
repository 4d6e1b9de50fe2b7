"""Envoy's rate-limit service on the real server: each descriptor charged at once, over
limit answered OVER_LIMIT with nothing changed, bad descriptors refused before anything
is charged, and no more granted than the wallet holds under concurrency."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
import pytest
from google.protobuf.wrappers_pb2 import UInt64Value
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from conftest import Grpc
from grpc_api import Api, sub
from quotagate.envoy import ratelimit_pb2, rls_pb2, rls_pb2_grpc
from quotagate.v1 import admin_pb2, quota_pb2

Resp = rls_pb2.RateLimitResponse
M = "message_tokens"


def desc(hits: int | None = None, **entries: str) -> Any:
    out = ratelimit_pb2.RateLimitDescriptor(entries=[
        ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()])
    if hits is not None:
        out.hits_addend.CopyFrom(UInt64Value(value=hits))
    return out


def req(*descriptors: Any, hits: int = 0) -> Any:
    return rls_pb2.RateLimitRequest(domain="ai", descriptors=list(descriptors),
                                    hits_addend=hits)


@pytest.fixture
async def rls(server: Grpc) -> Any:
    api = Api(server)
    await api.plan("pro", monthly=1_000)
    await api.org("acme")
    await api.org("beta")
    return rls_pb2_grpc.RateLimitServiceStub(server.channel), api


def headers(resp: Any) -> dict[str, str]:
    return {h.key: h.value for h in resp.response_headers_to_add}


async def test_a_descriptor_is_charged_at_once(rls: Any) -> None:
    stub, api = rls
    resp = await stub.ShouldRateLimit(req(desc(org_id="acme"), hits=40))
    assert resp.overall_code == Resp.OK
    [st] = resp.statuses
    assert st.code == Resp.OK and st.limit_remaining == 960
    assert st.current_limit.name == M and st.current_limit.requests_per_unit == 1_000
    assert st.current_limit.unit == Resp.RateLimit.MONTH
    assert st.duration_until_reset.seconds > 0  # to the end of the billing period
    b = await api.balance()
    assert (b.used, b.reserved, b.remaining) == (40, 0, 960)  # charged, nothing left held
    # the request's hits_addend unset counts 1, as Envoy counts; a descriptor's own wins
    await stub.ShouldRateLimit(req(desc(org_id="acme")))
    await stub.ShouldRateLimit(req(desc(hits=9, org_id="acme"), hits=500))
    assert (await api.balance()).used == 50


async def test_the_usage_is_recorded_like_a_commit(rls: Any, server: Grpc) -> None:
    stub, api = rls
    await api.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="sales"))
    await api.a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="ann",
                                                       team_id="sales"))
    await stub.ShouldRateLimit(req(desc(org_id="acme", seat_id="ann", action="ai_sequence"),
                                   hits=2))
    # the action's price (50 message tokens) per hit, charged to the seat's chain
    assert (await api.balance(sub(seat="ann"))).used == 100
    assert (await api.balance()).used == 100
    # in the durable ledger (the in-process syncer copies the stream to SQLite, and
    # deletes what it copied: read it where it ends up)
    import sqlite3

    db = server.app.settings.data_dir / "quotagate.db"
    rows: list[tuple[str, str, int, str]] = []
    for _ in range(200):
        with contextlib.closing(sqlite3.connect(db)) as c:
            rows = c.execute("SELECT type, seat, amount, action FROM ledger_entries "
                             "WHERE org = 'acme' AND type IN ('reserve', 'commit') "
                             "ORDER BY at_ms, stream_id").fetchall()
        if len(rows) >= 2:
            break
        await asyncio.sleep(0.05)
    assert rows == [("reserve", "ann", 100, "ai_sequence"), ("commit", "ann", 100, "ai_sequence")]


async def test_over_limit_changes_nothing(rls: Any) -> None:
    stub, api = rls
    await api.use(990)
    resp = await stub.ShouldRateLimit(req(desc(org_id="acme"), hits=11))
    assert resp.overall_code == Resp.OVER_LIMIT
    assert resp.statuses[0].code == Resp.OVER_LIMIT and resp.statuses[0].limit_remaining == 10
    assert headers(resp) == {"x-quotagate-reason": "insufficient_balance"}
    b = await api.balance()
    assert (b.used, b.reserved) == (990, 0)
    # what still fits is granted
    ok = await stub.ShouldRateLimit(req(desc(org_id="acme"), hits=10))
    assert ok.overall_code == Resp.OK and ok.statuses[0].limit_remaining == 0


async def test_hits_addend_zero_only_checks(rls: Any) -> None:
    stub, api = rls
    resp = await stub.ShouldRateLimit(req(desc(hits=0, org_id="acme")))
    assert resp.overall_code == Resp.OK and resp.statuses[0].limit_remaining == 1_000
    await api.use(1_000)
    resp = await stub.ShouldRateLimit(req(desc(hits=0, org_id="acme")))
    assert resp.overall_code == Resp.OVER_LIMIT
    assert (await api.balance()).used == 1_000


async def test_descriptors_are_independent(rls: Any) -> None:
    stub, api = rls
    await api.use(1_000, sub("beta"))
    resp = await stub.ShouldRateLimit(req(desc(org_id="acme"), desc(org_id="beta"), hits=5))
    assert resp.overall_code == Resp.OVER_LIMIT
    assert [s.code for s in resp.statuses] == [Resp.OK, Resp.OVER_LIMIT]
    assert (await api.balance()).used == 5
    assert (await api.balance(sub("beta"))).used == 1_000


async def test_a_dry_assistant_is_answered_silent(rls: Any) -> None:
    stub, api = rls
    await api.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
        org_id="acme", assistant_id="bot", enabled=True))
    await api.use(1_000)
    resp = await stub.ShouldRateLimit(req(desc(org_id="acme", assistant_id="bot")))
    assert resp.overall_code == Resp.OVER_LIMIT
    assert headers(resp) == {"x-quotagate-reason": "assistant_inactive",
                             "x-quotagate-silent": "true"}
    check = await api.q.Check(quota_pb2.CheckRequest(subject=sub(assistant="bot"), meter=M))
    assert not check.active and check.silent  # the runtime hides it, as for a Reserve


BAD = [
    (req(), "descriptors"),
    (req(desc(team_id="t")), "descriptors[0].org_id"),
    (req(desc(org_id="acme"), desc(org_id="acme", generic_key="x")),
     "descriptors[1].entries[1].key"),
    (req(desc(org_id="acme", meter="gold")), "descriptors[0].meter"),
    (req(desc(org_id="acme", meter=M, action="ai_sequence")), "descriptors[0].action"),
    (req(desc(org_id="acme", action="nope")), "descriptors[0].action"),
    (req(desc(hits=2**50 + 1, org_id="acme")), "descriptors[0].hits_addend"),
    (req(desc(org_id="acme", seat_id="s\n")), "descriptors[0].seat_id"),
]


@pytest.mark.parametrize(("request_", "field"), BAD, ids=[f for _, f in BAD])
async def test_bad_descriptors_are_refused_and_charge_nothing(rls: Any, request_: Any,
                                                              field: str) -> None:
    stub, api = rls
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ShouldRateLimit(request_)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(e.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    status.details[0].Unpack(bad)
    assert bad.field_violations[0].field == field
    assert (await api.balance()).used == 0  # a valid descriptor before it was not charged


async def test_concurrent_calls_never_grant_beyond_the_wallet(rls: Any, server: Grpc) -> None:
    stub, api = rls
    results = await asyncio.gather(*(stub.ShouldRateLimit(req(desc(org_id="acme"), hits=7))
                                     for _ in range(200)))
    granted = sum(r.overall_code == Resp.OK for r in results)
    assert granted == 1_000 // 7
    b = await api.balance()
    assert (b.used, b.reserved) == (granted * 7, 0)
    ledger = server.app.ledger
    assert ledger is not None
    # every grant's hold was committed: none is left for the sweeper
    assert await ledger.redis.zcard(ledger.keys.expiries(ledger.keys.shard_of("acme"))) == 0


@pytest.mark.parametrize("pipeline", [True, False], ids=["pipelined", "one-write-each"])
async def test_charge_now_as_a_connections_first_call(ledger: Any, redis: Any, clock: Any,
                                                      cat: Any, pipeline: bool) -> None:
    """The Reserve and its Commit go out together even while the connection is still
    being made; and without pipelining one after the other."""
    from quotagate.ledger.keys import Keys
    from quotagate.ledger.model import Charge, Decision, Subject
    from quotagate.ledger.store import Ledger, LedgerOptions

    await ledger.upsert_org("acme", "pro")
    for i in range(10):
        fresh = Ledger(redis, cat.catalog, clock, Keys(64), LedgerOptions(pipeline=pipeline))
        r = await fresh.charge_now(Subject("acme"), [Charge(M, 100 + i)])
        await fresh.aclose()
        assert r.decision is Decision.GRANTED and r.charged == (Charge(M, 100 + i),)
        assert r.balances[0].reserved == 0
    [b] = await ledger.get_balance(Subject("acme"), [M])
    assert (b.used, b.reserved) == (sum(100 + i for i in range(10)), 0)


async def test_redis_gone_is_unavailable_fast(clock: Any, tmp_path: Any) -> None:
    """Envoy's failure_mode_deny decides then; nothing was charged."""
    import time

    from quotagate.app import App
    from quotagate.settings import Settings
    from redis_server import RedisServer

    own = RedisServer().start()
    app = None
    try:
        app = await App(Settings(listen="127.0.0.1:0", redis_url=own.url, shards=64,
                                 sweep_interval_ms=600_000, grace_seconds=0,
                                 data_dir=tmp_path, metrics_listen="127.0.0.1:0"),
                        clock=clock).start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.port}")
        stub = rls_pb2_grpc.RateLimitServiceStub(channel)
        assert app.ledger is not None
        from quotagate.ledger.model import Allowance

        await app.ledger.upsert_plan("pro", [Allowance(M, 100)])
        await app.ledger.upsert_org("acme", "pro")
        ok = await stub.ShouldRateLimit(req(desc(org_id="acme"), hits=10))
        assert ok.overall_code == Resp.OK
        own.stop()
        t0 = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ShouldRateLimit(req(desc(org_id="acme"), hits=10), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - t0 < 3
        await channel.close()
    finally:
        if app is not None:
            await app.stop()
        own.close()
