"""`quotagate restore` rebuilds the sweeper's overage index (`<shard prefix>ovc`, lib.lua's
overage_events / close_periods), so an org left in overage when Redis lost its data is
still billed when its period ends, though nobody touches it. Real Lua scripts on real
Redis (single, or a cluster with QUOTAGATE_TEST_REDIS=cluster), real SQL."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from conftest import ms
from quotagate.clock import ManualClock
from quotagate.ledger import scripts
from quotagate.ledger.keys import escape
from quotagate.ledger.model import Allowance, Charge, Decision, HoldState, Subject
from quotagate.ledger.store import Ledger
from quotagate.sync.restore import period_end_ms, restore
from quotagate.sync.sink import Sink, period_at
from quotagate.sync.syncer import Syncer

M = "message_tokens"
GAUGE = "storage_bytes"
PLAN = "small"
#: with anchor day 15, the clock's start (2026-11-10) is in the period 2026-10-15 .. 11-15
ANCHOR = 15
END = ms(2026, 11, 15)
NEXT_END = ms(2026, 12, 15)


async def overage_org(ledger: Ledger, org: str) -> None:
    """An org on a 1,000-token plan anchored on the 15th, with overage at $0.01 a token
    (billed every $50) on the message tokens and on the storage gauge."""
    await ledger.upsert_plan(PLAN, [Allowance(M, 1_000), Allowance(GAUGE, 1_000)])
    await ledger.upsert_org(org, PLAN, period_anchor_day=ANCHOR)
    for meter in (M, GAUGE):
        await ledger.set_overage(org, meter, 20_000, unit_price_micros=10_000,
                                 bill_every_micros=50_000_000)


async def spend(ledger: Ledger, org: str, amount: int, meter: str = M) -> None:
    r = await ledger.reserve(Subject(org), [Charge(meter, amount)],
                             idempotency_key=uuid.uuid4().hex)
    assert r.decision is Decision.GRANTED, r
    assert (await ledger.commit(r.reservation_id)).state is HoldState.COMMITTED


def index(ledger: Ledger, org: str) -> str:
    return ledger.keys.org_prefix(org) + "ovc"


def member(org: str, meter: str = M) -> str:
    return f"{escape(org)}|{escape(meter)}"


async def score(redis: Any, ledger: Ledger, org: str, meter: str = M) -> float | None:
    return await redis.zscore(index(ledger, org), member(org, meter))  # type: ignore[no-any-return]


async def closed(redis: Any, ledger: Ledger, org: str) -> list[dict[str, str]]:
    """The overage.period_closed events of `org` in its shard's events stream."""
    raw = await redis.xrange(ledger.keys.events(ledger.keys.shard_of(org)))
    return [json.loads(f[b"attrs"]) for _, f in raw
            if f[b"type"] == b"overage.period_closed" and f[b"org"].decode() == org]


async def lose_everything(redis: Any, syncer: Syncer) -> None:
    """The syncer copies what the scripts did (its snapshots), then Redis loses it all."""
    await syncer.run_once()
    await redis.flushall()


@pytest.mark.parametrize("org", ["acme", "b:{or}g ✓"])  # escaped ids, braces of a hash tag
async def test_restore_puts_an_org_in_overage_back_in_the_index(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer,
        org: str) -> None:
    await overage_org(ledger, org)
    await spend(ledger, org, 1_000)  # the plan
    await spend(ledger, org, 1_234)  # $12.34 of overage, unbilled, then silence
    before = await score(redis, ledger, org)
    assert before == END  # what lib.lua wrote: the end of the org's period, anchor 15

    await lose_everything(redis, syncer)
    assert await score(redis, ledger, org) is None
    counts = await restore(redis, ledger.keys, sink)
    assert await score(redis, ledger, org) == before
    assert counts.overage == 1
    assert await redis.zcard(index(ledger, org)) == 1
    await restore(redis, ledger.keys, sink)  # twice: the same entry
    assert await redis.zrange(index(ledger, org), 0, -1, withscores=True) == \
        [(member(org).encode(), float(END))]

    # nobody touches the org: the sweeper closes its period when it ends, once
    clock.set(END - 60_000)
    await ledger.sweep_all()
    assert await closed(redis, ledger, org) == []
    clock.set(END + 60_000)
    await ledger.sweep_all()
    assert await closed(redis, ledger, org) == [
        {"meter": M, "amount_micros": "12340000", "overage_tokens": "1234"}]
    assert await redis.zcard(index(ledger, org)) == 0
    await ledger.sweep_all()
    assert (await ledger.get_balance(Subject(org), [M]))[0].overage_used == 0
    assert len(await closed(redis, ledger, org)) == 1


async def test_restore_after_the_period_ended_closes_it_at_the_next_sweep(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """Overage billed up to the last threshold (nothing unbilled) still closes its period:
    lib.lua closes what was used (`ou`) even when the rest to bill is 0."""
    await overage_org(ledger, "acme")
    await ledger.set_overage("acme", M, 20_000, unit_price_micros=10_000,
                             bill_every_micros=10_000_000)  # bill every $10
    await spend(ledger, "acme", 2_000)  # 1,000 overage tokens: $10, billed at once
    assert await redis.hget(ledger.keys.bal("acme", M), "oub") == b"0"
    await lose_everything(redis, syncer)
    clock.set(END + 3_600_000)  # Redis came back after the period's end
    await restore(redis, ledger.keys, sink)
    assert await score(redis, ledger, "acme") == END
    await ledger.sweep_all()
    assert await closed(redis, ledger, "acme") == [
        {"meter": M, "amount_micros": "0", "overage_tokens": "1000"}]


async def test_restore_indexes_no_org_without_overage_to_close(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    orgs = ("within", "gauge", "closed")
    for org in orgs:
        await overage_org(ledger, org)
    await spend(ledger, "within", 999)  # inside the plan: no overage
    # a gauge has no periods of its own: its unbilled overage closes with the org's
    await spend(ledger, "gauge", 1_500, GAUGE)
    assert (await ledger.get_balance(Subject("gauge"), [GAUGE]))[0].overage_used == 500
    await spend(ledger, "closed", 1_500)
    clock.set(END + 60_000)
    await spend(ledger, "closed", 10)  # the first touch of its next period closes it
    assert [c["overage_tokens"] for c in await closed(redis, ledger, "closed")] == ["500"]
    await ledger.sweep_all()  # the entry lib.lua left behind goes; the gauge's closes
    assert await closed(redis, ledger, "gauge") == [
        {"meter": GAUGE, "amount_micros": "5000000", "overage_tokens": "500"}]
    for org in orgs:
        assert await score(redis, ledger, org) is None
    assert await score(redis, ledger, "gauge", GAUGE) is None

    await lose_everything(redis, syncer)
    assert (await restore(redis, ledger.keys, sink)).keys > 0
    for org in orgs:
        assert await redis.zcard(index(ledger, org)) == 0
    clock.set(NEXT_END + 60_000)
    await ledger.sweep_all()
    for org in orgs:
        assert [c["overage_tokens"] for c in await closed(redis, ledger, org)] == []


async def test_restore_puts_a_gauges_unbilled_overage_back_in_the_index(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """Stored bytes over the plan, billed below the threshold: the period they accrued in
    is indexed again by restore, and the sweeper bills them when it ends."""
    await overage_org(ledger, "acme")
    await spend(ledger, "acme", 1_300, GAUGE)  # 300 bytes over: $3, below the $50 step
    assert await score(redis, ledger, "acme", GAUGE) == END
    await lose_everything(redis, syncer)
    assert (await restore(redis, ledger.keys, sink)).overage == 1
    assert await score(redis, ledger, "acme", GAUGE) == END
    clock.set(END + 60_000)
    await ledger.sweep_all()
    assert await closed(redis, ledger, "acme") == [
        {"meter": GAUGE, "amount_micros": "3000000", "overage_tokens": "300"}]


async def test_restore_keeps_the_later_period_end_over_an_entry_left_behind(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """Redis came back holding an entry of an earlier period (a replica from before the
    org's next period began: lib.lua leaves the entry after the touch that closes that
    period, until a sweep). Kept, the sweeper would touch the org at once, find its period
    open and drop the entry: the period the restored hash is in would never be closed.
    The later end wins (lib.lua's ZADD only ever moves an entry to a later period)."""
    await overage_org(ledger, "acme")
    await spend(ledger, "acme", 1_500)
    clock.set(END + 60_000)
    await spend(ledger, "acme", 1_000)  # closes the first period
    await spend(ledger, "acme", 7)  # overage in the next one
    assert await score(redis, ledger, "acme") == NEXT_END
    await lose_everything(redis, syncer)
    await redis.zadd(index(ledger, "acme"), {member("acme"): END})  # what a replica had

    await restore(redis, ledger.keys, sink)
    assert await score(redis, ledger, "acme") == NEXT_END
    await ledger.sweep_all()
    assert await closed(redis, ledger, "acme") == []
    clock.set(NEXT_END + 60_000)
    await ledger.sweep_all()
    assert await closed(redis, ledger, "acme") == [
        {"meter": M, "amount_micros": "70000", "overage_tokens": "7"}]


async def test_period_end_is_lib_lua_period_compute(redis: Any) -> None:
    """period_end_ms (and sink.period_at) against lib.lua's own period_compute, run by
    Redis, for every day of two years (leap day, year ends) and every anchor day."""
    day0 = ms(2027, 12, 1) // 86_400_000
    body = ("local out = {}\n"
            "for day = tonumber(ARGV[1]), tonumber(ARGV[2]) do\n"
            "  for anchor = 1, 28 do\n"
            "    local id, _, pend = period_compute(day, anchor)\n"
            "    out[#out + 1] = id; out[#out + 1] = pend\n"
            "  end\n"
            "end\n"
            "return out\n")
    src = "local QUIET = {}\n" + scripts._read("lib.lua") + "\n" + body
    got = await redis.eval(src, 0, day0, day0 + 800)
    want = []
    for day in range(day0, day0 + 801):
        for anchor in range(1, 29):
            pid = period_at(day * 86_400_000, anchor)
            want += [pid, period_end_ms(pid, anchor)]
    assert got == want


async def test_restore_over_a_newer_period_does_not_bill_the_old_one_again(
        redis: Any, ledger: Ledger, clock: ManualClock, sink: Sink, syncer: Syncer) -> None:
    """Restore run on a Redis that kept more than SQL (it lost nothing, or less than SQL
    saw): the org's wallet has moved to a new period and its old period was closed and
    billed. The snapshot's unbilled rest of the old period must not come back, or the
    next close bills it a second time."""
    await overage_org(ledger, "acme")
    await spend(ledger, "acme", 1_000)
    await spend(ledger, "acme", 1_234)  # $12.34 unbilled in the period ending END
    await syncer.run_once()  # SQL's snapshot: the old period, 12,340,000 unbilled
    clock.set(END + 60_000)
    await spend(ledger, "acme", 10)  # the first touch of the next period closes the old
    assert [c["amount_micros"] for c in await closed(redis, ledger, "acme")] == ["12340000"]
    assert await redis.hget(ledger.keys.bal("acme", M), "oub") == b"0"

    await restore(redis, ledger.keys, sink)  # nothing was lost; SQL is older
    assert await redis.hget(ledger.keys.bal("acme", M), "oub") == b"0"
    clock.set(NEXT_END + 60_000)
    await ledger.sweep_all()
    await spend(ledger, "acme", 10)
    assert [c["amount_micros"] for c in await closed(redis, ledger, "acme")] == ["12340000"]
