"""WatchEvents and WatchStatus on the real gRPC server: they see the events written
while they stream (plain XREAD from "$", not the notifier's consumer group)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest
from events_util import xadd

from conftest import Grpc
from grpc_api import next_msg, subscribed
from quotagate.events.hub import hub_for
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

INACTIVE = common_pb2.DENY_REASON_ASSISTANT_INACTIVE






async def test_watch_events_streams_the_orgs_new_events(server: Grpc, redis: Any) -> None:
    await xadd(redis, "wallet.low", "acme", {"meter": "m"})  # before the stream: not replayed
    call = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    await subscribed(server)
    await xadd(redis, "wallet.low", "other", {"meter": "m"})  # another org: filtered
    ids = [await xadd(redis, t, "acme", {"meter": "message_tokens", "team_id": "t1"},
                      at=1_762_732_800_123)
           for t in ("wallet.exhausted", "assistant.deactivated", "period.reset")]
    got = [(await next_msg(call)).event for _ in ids]
    assert [e.id for e in got] == ids
    assert [e.type for e in got] == ["wallet.exhausted", "assistant.deactivated",
                                     "period.reset"]
    assert all(e.org_id == "acme" for e in got)
    assert dict(got[0].attributes) == {"meter": "message_tokens", "team_id": "t1"}
    assert got[0].at.ToMilliseconds() == 1_762_732_800_123
    call.cancel()


async def test_two_streams_both_see_each_event(server: Grpc, redis: Any) -> None:
    a = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    b = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    await subscribed(server, 2)
    eid = await xadd(redis, "auto_topup.requested", "acme", {"meter": "m", "amount": "5000"})
    assert (await next_msg(a)).event.id == (await next_msg(b)).event.id == eid
    a.cancel()
    b.cancel()


async def test_watch_events_needs_org(server: Grpc) -> None:
    call = server.admin.WatchEvents(admin_pb2.WatchEventsRequest())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await next_msg(call)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_status_current_status_then_changes(server: Grpc, redis: Any) -> None:
    led = server.app.ledger
    assert led is not None
    await led.upsert_plan("p", [Allowance("message_tokens", 1000)])
    await led.upsert_org("acme", "p")
    await led.upsert_assistant("acme", "bot")
    await led.upsert_assistant("acme", "off", enabled=False)
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(
        org_id="acme", assistant_ids=["bot", "off"]))
    first = [await next_msg(call), await next_msg(call)]
    assert [(m.assistant_id, m.active) for m in first] == [("bot", True), ("off", False)]
    assert first[1].reason == INACTIVE
    await subscribed(server)
    await xadd(redis, "assistant.deactivated", "acme", {"assistant_id": "other",
                                                        "reason": "exhausted"})
    await xadd(redis, "wallet.exhausted", "acme", {"meter": "message_tokens"})
    await xadd(redis, "assistant.deactivated", "acme",
               {"assistant_id": "bot", "meter": "message_tokens", "reason": "exhausted"},
               at=1_762_732_801_000)
    await xadd(redis, "assistant.reactivated", "acme", {"assistant_id": "bot"},
               at=1_762_732_802_000)
    await server.admin.UpsertOrg(admin_pb2.UpsertOrgRequest(org_id="acme", plan="p",
                                                            ai_enabled=False))
    m1, m2, m3 = [await next_msg(call) for _ in range(3)]
    assert (m1.assistant_id, m1.active, m1.reason) == ("bot", False, INACTIVE)
    assert m1.at.ToMilliseconds() == 1_762_732_801_000
    assert (m2.assistant_id, m2.active, m2.reason) == ("bot", True,
                                                       common_pb2.DENY_REASON_UNSPECIFIED)
    assert (m3.assistant_id, m3.active, m3.reason) == ("bot", False,
                                                       common_pb2.DENY_REASON_AI_DISABLED)
    call.cancel()


async def test_watch_status_all_assistants_of_the_org(server: Grpc, redis: Any) -> None:
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="acme"))
    await subscribed(server)
    await xadd(redis, "assistant.deactivated", "beta", {"assistant_id": "x"})  # other org
    await xadd(redis, "assistant.deactivated", "acme", {"assistant_id": "a1",
                                                        "reason": "inactive"})
    await xadd(redis, "assistant.reactivated", "acme", {"assistant_id": "a2"})
    got = [await next_msg(call), await next_msg(call)]
    assert [(m.assistant_id, m.active) for m in got] == [("a1", False), ("a2", True)]
    call.cancel()


async def test_watch_status_without_ids_starts_with_every_assistants_status(
        server: Grpc) -> None:
    """No ids: the current status of each assistant the org has, then its changes —
    including assistants created after the stream opened."""
    led = server.app.ledger
    assert led is not None
    await led.upsert_org("many", "pro")
    await led.upsert_assistant("many", "b:bot")          # ids with ':' stay whole
    await led.upsert_assistant("many", "a bot", enabled=False)
    await led.upsert_org("other", "pro")
    await led.upsert_assistant("other", "c-bot")         # another org's: not listed
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="many"))
    first = [await next_msg(call), await next_msg(call)]
    assert [(m.assistant_id, m.active, m.reason) for m in first] == [
        ("a bot", False, INACTIVE), ("b:bot", True, common_pb2.DENY_REASON_UNSPECIFIED)]
    await subscribed(server)
    await led.upsert_assistant("many", "new-bot")
    await led.upsert_assistant("many", "new-bot", enabled=False)
    m = await next_msg(call)
    assert (m.assistant_id, m.active) == ("new-bot", False)
    call.cancel()


async def test_watch_status_sees_a_real_deactivation(server: Grpc) -> None:
    """End to end with the events the scripts write: spend the wallet dry."""
    led = server.app.ledger
    assert led is not None
    await led.upsert_plan("small", [Allowance("message_tokens", 100)])
    await led.upsert_org("e2e", "small")
    await led.upsert_assistant("e2e", "bot")
    call = server.quota.WatchStatus(quota_pb2.WatchStatusRequest(org_id="e2e",
                                                                 assistant_ids=["bot"]))
    assert (await next_msg(call)).active
    await subscribed(server)
    r = await led.reserve(Subject("e2e", assistant_id="bot"), [Charge("message_tokens", 100)],
                          idempotency_key="k1")
    assert r.decision is Decision.GRANTED
    await led.commit(r.reservation_id)
    await led.reserve(Subject("e2e", assistant_id="bot"), [Charge("message_tokens", 1)],
                      idempotency_key="k2")
    m = await next_msg(call)
    assert (m.assistant_id, m.active, m.reason) == ("bot", False, INACTIVE)
    await led.topup("e2e", "message_tokens", 50, "buy-1")
    m = await next_msg(call)
    assert (m.assistant_id, m.active) == ("bot", True)
    call.cancel()


async def test_stream_closed_by_client_unsubscribes(server: Grpc) -> None:
    assert server.app.ledger is not None
    hub = hub_for(server.app.ledger.redis, server.app.ledger.keys)
    call = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    await subscribed(server)
    call.cancel()
    deadline = time.monotonic() + 5
    while hub.subscribers:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_watch_events_resumes_after_a_cursor(server: Grpc, redis: Any) -> None:
    """A watcher that reconnects with the cursor of the last event it got sees what it
    missed, then what comes: none missed, none twice, other orgs filtered out."""
    call = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    await subscribed(server)
    first = await xadd(redis, "wallet.low", "acme")
    got = (await next_msg(call)).event
    assert got.id == first and got.cursor
    call.cancel()
    # while nobody watches
    missed = [await xadd(redis, "wallet.exhausted", "acme"),
              await xadd(redis, "wallet.low", "other"),
              await xadd(redis, "wallet.replenished", "acme")]
    resumed = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme",
                                                                    after=got.cursor))
    seen = [(await next_msg(resumed)).event for _ in range(2)]
    assert [e.id for e in seen] == [missed[0], missed[2]]
    def pos(cursor: str) -> tuple[int, ...]:
        return tuple(int(x) for x in cursor.split("-"))

    assert pos(got.cursor) < pos(seen[0].cursor) < pos(seen[1].cursor)
    await subscribed(server)
    live = await xadd(redis, "period.reset", "acme")
    assert (await next_msg(resumed)).event.id == live  # and nothing replayed twice
    resumed.cancel()


async def test_watch_events_refuses_a_cursor_it_cannot_honour(server: Grpc,
                                                              redis: Any) -> None:
    from quotagate.ledger.keys import Keys

    bad = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme", after="x-1"))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await next_msg(bad)
    assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "after" in e.value.details()
    await xadd(redis, "wallet.low", "acme")
    stream = Keys(64).events(Keys(64).shard_of("acme"))
    [(old, _)] = await redis.xrange(stream, count=1)
    await xadd(redis, "wallet.exhausted", "acme")
    await redis.xtrim(stream, maxlen=0)  # everything after `old` is gone from Redis
    gone = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(
        org_id="acme", after=old.decode() if isinstance(old, bytes) else old))
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await next_msg(gone)
    assert e.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    # trimmed only up to `kept`: what comes after it is all there, and is replayed
    await xadd(redis, "wallet.low", "acme")
    [(kept, _)] = await redis.xrange(stream, count=1)
    after_kept = await xadd(redis, "wallet.replenished", "acme")
    await redis.xtrim(stream, maxlen=2)
    ok = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(
        org_id="acme", after=kept.decode() if isinstance(kept, bytes) else kept))
    assert (await next_msg(ok)).event.id == after_kept
    ok.cancel()


async def test_a_stream_opened_on_an_empty_shard_can_be_resumed(server: Grpc,
                                                                redis: Any) -> None:
    """On a new deployment most shard streams are empty: the start cursor is 0-0, and
    resuming from it replays every event since (nothing was ever trimmed)."""
    call = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme"))
    start = dict(await call.initial_metadata())["quotagate-cursor"]
    assert start == "0-0"
    call.cancel()
    missed = [await xadd(redis, "wallet.low", "acme"), await xadd(redis, "period.reset", "acme")]
    resumed = server.admin.WatchEvents(admin_pb2.WatchEventsRequest(org_id="acme",
                                                                    after=start))
    assert [(await next_msg(resumed)).event.id for _ in range(2)] == missed
    resumed.cancel()
