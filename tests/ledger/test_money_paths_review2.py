"""Money paths of a second review: overage billing (threshold and period-close events add
up to what was really used, at the price it was used at, through refunds, price and cap
changes), multi-charge holds, each hold resolved once under concurrency, gauges across
months and plan changes, seat and team changes under open holds, auto top-up requests
under concurrent Commits, GetBalance / Check against what Reserve grants, and Envoy's
charge-at-once path."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import T0, ms
from quotagate.clock import ManualClock
from quotagate.errors import FailedPrecondition
from quotagate.ledger.model import (
    Allowance,
    Charge,
    Decision,
    DenyReason,
    SeatLimit,
    Subject,
)
from quotagate.ledger.store import Ledger
from quotagate.server.envoy_rls import RateLimitServicer
from quotagate.sync.sink import entry_fields

M = "message_tokens"
K = "knowledge_tokens"
G = "storage_bytes"
DAY_S = 86_400
#: $0.01 a token, billed every $50 (DESIGN §1)
PRICE = 10_000
EVERY = 50_000_000


async def events(ledger: Ledger, redis: Any, org: str) -> list[tuple[str, dict[str, str]]]:
    raw = await redis.xrange(ledger.keys.events(ledger.keys.shard_of(org)))
    return [(f[b"type"].decode(), json.loads(f[b"attrs"])) for _, f in raw
            if f[b"org"].decode() == org]


async def billed(ledger: Ledger, redis: Any, org: str, meter: str = M) -> list[int]:
    """amount_micros of every overage bill of the org and meter, in order."""
    return [int(a["amount_micros"]) for t, a in await events(ledger, redis, org)
            if t in ("overage.threshold_reached", "overage.period_closed")
            and a["meter"] == meter]


async def bal(ledger: Ledger, s: Subject, meter: str = M) -> Any:
    return (await ledger.get_balance(s, [meter]))[0]


async def spend(ledger: Ledger, s: Subject, amount: int, key: str,
                actual: int | None = None) -> str:
    r = await ledger.reserve(s, [Charge(M, amount)], idempotency_key=key)
    assert r.decision is Decision.GRANTED, r
    await ledger.commit(r.reservation_id, [] if actual is None else [Charge(M, actual)])
    return r.reservation_id


# -- (1) overage billing --------------------------------------------------------------------

async def test_overage_billed_then_refunded_is_credited_in_its_own_period(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    """6,000 overage tokens billed at the $50 threshold, then refunded: November's bills
    must add up to 0 (a credit closes it), and December's 6,000 must be billed in full,
    not paid by November's credit carried over silently."""
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 100_000, PRICE, EVERY)
    org = Subject("o")
    rid = await spend(ledger, org, 6_100, "a")
    assert await billed(ledger, redis, "o") == [60_000_000]
    await ledger.refund(rid)
    assert (await bal(ledger, org)).overage_used == 0
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, org)  # December's first touch closes November
    nov = await billed(ledger, redis, "o")
    assert sum(nov) == 0, nov
    await spend(ledger, org, 6_100, "b")
    clock.set(ms(2027, 1, 1, 1))
    await bal(ledger, org)
    dec = (await billed(ledger, redis, "o"))[len(nov):]
    assert sum(dec) == 6_000 * PRICE, dec


async def test_a_refund_credits_overage_at_the_price_it_was_billed_at(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 100_000, PRICE, EVERY)
    org = Subject("o")
    rid = await spend(ledger, org, 200, "a")  # 100 overage at $0.01
    await ledger.set_overage("o", M, 100_000, 3 * PRICE, EVERY)  # the price triples
    await ledger.refund(rid, [Charge(M, 60)])  # 60 of the overage back
    await spend(ledger, org, 10, "b")  # 10 more overage at the new price
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, org)
    assert sum(await billed(ledger, redis, "o")) == 40 * PRICE + 10 * 3 * PRICE


async def test_a_refund_of_overage_used_while_free_credits_nothing(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 1_000)  # no price yet
    org = Subject("o")
    rid = await spend(ledger, org, 300, "a")  # 200 overage, billed $0
    await ledger.set_overage("o", M, 1_000, PRICE, EVERY)
    await spend(ledger, org, 50, "b")  # 50 overage at $0.01
    await ledger.refund(rid)
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, org)
    assert sum(await billed(ledger, redis, "o")) == 50 * PRICE


OPS = st.lists(st.one_of(
    st.tuples(st.just("use"), st.integers(1, 1_500), st.none() | st.integers(0, 2_500)),
    st.tuples(st.just("hold"), st.integers(1, 1_500)),
    st.tuples(st.just("commit"), st.integers(0, 9), st.none() | st.integers(0, 2_500)),
    st.tuples(st.just("refund"), st.integers(0, 9), st.none() | st.integers(1, 1_500)),
    st.tuples(st.just("price"), st.sampled_from([0, 1_000, PRICE, 25_000])),
    st.tuples(st.just("cap"), st.sampled_from([0, 300, 2_000, 10_000])),
    st.tuples(st.just("every"), st.sampled_from([0, 1_000_000, 5_000_000]))),
    min_size=1, max_size=14)
_N = iter(range(10**9))


@settings(max_examples=int(os.environ.get("QG_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=OPS)
async def test_overage_bills_of_a_period_add_up_to_its_overage_at_its_prices(
        ledger: Ledger, redis: Any, clock: ManualClock, ops: list[tuple[Any, ...]]) -> None:
    """Whatever the sequence of Commits (above, below what was held), Refunds (whole,
    partial), price, cap and billing-step changes within a period: the period's
    overage.threshold_reached and overage.period_closed amounts add up exactly to each
    overage token used, at the price its Commit billed, minus what was refunded at that
    same price; each threshold event carries what was unbilled, never over the cap."""
    clock.set(T0)
    org = f"h{next(_N)}"
    s = Subject(org)
    await ledger.upsert_plan("hyp", [Allowance(M, 1_000)])
    await ledger.upsert_org(org, "hyp")
    price, cap, every = PRICE, 2_000, 5_000_000
    await ledger.set_overage(org, M, cap, price, every)
    expected = 0
    open_: list[str] = []
    committed: list[tuple[str, int]] = []  # rid, the price its Commit billed at
    max_cap = cap
    for op in ops:
        before = (await bal(ledger, s)).overage_used
        if op[0] in ("use", "hold"):
            r = await ledger.reserve(s, [Charge(M, op[1])], idempotency_key=f"k{next(_N)}")
            if r.decision is not Decision.GRANTED:
                continue
            if op[0] == "hold":
                open_.append(r.reservation_id)
                continue
            c = await ledger.commit(r.reservation_id,
                                    [] if op[2] is None else [Charge(M, op[2])])
            expected += (c.balances[0].overage_used - before) * price
            committed.append((r.reservation_id, price))
        elif op[0] == "commit" and open_:
            rid = open_.pop(op[1] % len(open_))
            c = await ledger.commit(rid, [] if op[2] is None else [Charge(M, op[2])])
            expected += (c.balances[0].overage_used - before) * price
            committed.append((rid, price))
        elif op[0] == "refund" and committed:
            rid, p = committed.pop(op[1] % len(committed))
            f = await ledger.refund(rid, [] if op[2] is None else [Charge(M, op[2])])
            expected += (f.balances[0].overage_used - before) * p
        elif op[0] in ("price", "cap", "every"):
            if op[0] == "price":
                price = op[1]
            elif op[0] == "cap":
                cap = op[1]
                max_cap = max(max_cap, cap)
            else:
                every = op[1]
            await ledger.set_overage(org, M, cap, price, every)
        b = await bal(ledger, s)
        assert b.overage_used + b.reserved <= max_cap + 1_000, b
    ou = (await bal(ledger, s)).overage_used
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, s)  # December's first touch closes November
    evs = [a for t, a in await events(ledger, redis, org)
           if t in ("overage.threshold_reached", "overage.period_closed")]
    assert sum(int(a["amount_micros"]) for a in evs) == expected, (evs, expected)
    closed = [a for t, a in await events(ledger, redis, org) if t == "overage.period_closed"]
    if ou or len(evs) > len(closed):  # overage left, or billed at a threshold
        assert len(closed) == 1 and int(closed[0]["overage_tokens"]) == ou, closed
    else:
        assert closed == []


async def test_concurrent_reserves_near_the_overage_cap_never_hold_beyond_it(
        ledger: Ledger) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 1_000, PRICE, EVERY)
    org = Subject("o")
    amounts = [37 + (i * 13) % 90 for i in range(60)]
    rs = await asyncio.gather(*(ledger.reserve(
        org, [Charge(M, a)], idempotency_key=f"c{i}", allow_partial=(i % 3 == 0))
        for i, a in enumerate(amounts)))
    granted = sum(r.granted[0].amount for r in rs if r.decision is Decision.GRANTED)
    assert granted == 1_100  # monthly 100 + overage 1,000: all of it, not a token more
    b = await bal(ledger, org)
    assert (b.reserved, b.remaining) == (1_100, 0)
    # committed concurrently, each above what it held: the excess is debt, not overage
    await asyncio.gather(*(ledger.commit(r.reservation_id, [Charge(M, r.granted[0].amount + 5)])
                           for r in rs if r.decision is Decision.GRANTED))
    b = await bal(ledger, org)
    n = sum(r.decision is Decision.GRANTED for r in rs)
    assert (b.overage_used, b.debt, b.reserved) == (1_000, 5 * n, 0)


async def test_a_lower_cap_mid_period_keeps_what_was_held_and_grants_no_more(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 1_000, PRICE, EVERY)
    org = Subject("o")
    h = await ledger.reserve(org, [Charge(M, 900)], idempotency_key="h")  # 800 overage
    await ledger.set_overage("o", M, 300, PRICE, EVERY)
    d = await ledger.reserve(org, [Charge(M, 1)], idempotency_key="d")
    assert (d.decision, d.reason) == (Decision.DENIED, DenyReason.OVERAGE_CAP_REACHED)
    c = await ledger.commit(h.reservation_id, [Charge(M, 950)])  # 50 above: debt
    assert (c.balances[0].overage_used, c.balances[0].debt) == (800, 50)
    await ledger.refund(h.reservation_id, [Charge(M, 600)])  # debt 50, then 550 overage
    b = await bal(ledger, org)
    assert (b.overage_used, b.debt, b.remaining) == (250, 0, 50)
    x = await ledger.reserve(org, [Charge(M, 51)], idempotency_key="x")
    assert x.decision is Decision.DENIED
    y = await ledger.reserve(org, [Charge(M, 50)], idempotency_key="y")
    assert y.decision is Decision.GRANTED
    await ledger.commit(y.reservation_id)
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, org)
    assert sum(await billed(ledger, redis, "o")) == 300 * PRICE



async def test_a_gauges_unbilled_overage_is_billed_when_the_period_ends(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("s1", [Allowance(M, 1_000), Allowance(G, 1_000)])
    await ledger.upsert_org("o", "s1")
    await ledger.set_overage("o", G, 500, 1_000, 0)  # no threshold: billed at period end
    r = await ledger.reserve(Subject("o"), [Charge(G, 1_200)], idempotency_key="a")
    await ledger.commit(r.reservation_id)  # 200 bytes of overage
    clock.set(ms(2026, 12, 1, 1))
    await bal(ledger, Subject("o"), G)
    await ledger.sweep(ledger.keys.shard_of("o"))
    assert sum(await billed(ledger, redis, "o", G)) == 200 * 1_000

async def _store(ledger: Ledger, org: str, nbytes: int, key: str) -> str:
    r = await ledger.reserve(Subject(org), [Charge(G, nbytes)], idempotency_key=key)
    assert r.decision is Decision.GRANTED, r
    await ledger.commit(r.reservation_id)
    return r.reservation_id


async def test_a_gauges_overage_closes_with_the_orgs_period_nobody_touching_it(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    """Stored bytes over the plan, anchor day 15: billed at the $50 step, and what is
    left unbilled when the period ends comes from the sweeper alone, once, for the period
    it accrued in; bytes stored over the plan in the next period close with that one. All
    bills add up to every byte over the plan at its price, a deleted file credited."""
    await ledger.upsert_plan("st", [Allowance(M, 1_000), Allowance(G, 1_000)])
    await ledger.upsert_org("o", "st", period_anchor_day=15)
    await ledger.set_overage("o", G, 100_000, PRICE, EVERY)  # $50 = 5,000 bytes
    await _store(ledger, "o", 7_000, "a")  # 6,000 over: $60, billed at the step
    gone = await _store(ledger, "o", 500, "b")  # 500 more over: $5 unbilled
    await ledger.refund(gone, [Charge(G, 500)])  # the file is deleted: $0 unbilled
    await _store(ledger, "o", 300, "c")  # $3 unbilled
    assert await billed(ledger, redis, "o", G) == [60_000_000]
    clock.set(ms(2026, 11, 14, 23))  # the period (2026-10-15 .. 11-15) has not ended
    await ledger.sweep_all()
    assert await billed(ledger, redis, "o", G) == [60_000_000]
    clock.set(ms(2026, 11, 15, 1))
    await ledger.sweep_all()
    await ledger.sweep_all()
    assert await billed(ledger, redis, "o", G) == [60_000_000, 3_000_000]
    closes = [a for t, a in await events(ledger, redis, "o") if t == "overage.period_closed"]
    assert closes == [{"meter": G, "amount_micros": "3000000", "overage_tokens": "6300"}]
    await _store(ledger, "o", 200, "d")  # the next period: 200 more bytes over
    clock.set(ms(2026, 12, 15, 1))
    await bal(ledger, Subject("o"), G)  # a touch closes it, as the sweeper would
    await _store(ledger, "o", 1, "e")
    await ledger.sweep_all()
    assert await billed(ledger, redis, "o", G) == [60_000_000, 3_000_000, 2_000_000]
    assert sum(await billed(ledger, redis, "o", G)) == (7_000 + 300 + 200 - 1_000) * PRICE
    assert (await bal(ledger, Subject("o"), G)).overage_used == 6_501  # stored, not reset


async def test_a_gauge_without_overage_has_nothing_to_close(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("st", [Allowance(M, 1_000), Allowance(G, 1_000)])
    await ledger.upsert_org("o", "st")
    await _store(ledger, "o", 900, "a")
    assert await redis.hget(ledger.keys.bal("o", G), "gop") is None
    assert await redis.zcard(ledger.keys.org_prefix("o") + "ovc") == 0
    clock.set(ms(2026, 12, 1, 1))
    await ledger.sweep_all()
    assert await billed(ledger, redis, "o", G) == []

# -- (2) multi-charge holds -----------------------------------------------------------------

async def test_one_meter_denied_holds_nothing_on_any(ledger: Ledger) -> None:
    await ledger.upsert_plan("two", [Allowance(M, 1_000), Allowance(K, 100)])
    await ledger.upsert_org("o", "two")
    org = Subject("o")
    for charges in ([Charge(M, 500), Charge(K, 200)], [Charge(K, 200), Charge(M, 500)]):
        r = await ledger.reserve(org, charges, idempotency_key=f"d{charges[0].meter}")
        assert r.decision is Decision.DENIED and r.granted == ()
        bs = await ledger.get_balance(org, [M, K])
        assert [(b.reserved, b.remaining) for b in bs] == [(0, 1_000), (0, 100)]
    with pytest.raises(Exception, match="allow_partial"):
        await ledger.reserve(org, [Charge(M, 500), Charge(K, 200)], idempotency_key="p",
                             allow_partial=True)


async def test_commit_of_several_meters_above_below_and_absent(ledger: Ledger) -> None:
    await ledger.upsert_plan("three", [Allowance(M, 1_000), Allowance(K, 100),
                                       Allowance("call_seconds", 60)])
    await ledger.upsert_org("o", "three")
    await ledger.topup("o", K, 50, "p")
    org = Subject("o")
    r = await ledger.reserve(org, [Charge(M, 500), Charge(K, 80), Charge("call_seconds", 30)],
                             idempotency_key="r")
    assert r.decision is Decision.GRANTED
    # M above what it held, K below, call_seconds absent (0)
    c = await ledger.commit(r.reservation_id, [Charge(M, 700), Charge(K, 20)])
    assert c.amounts == (Charge(M, 700), Charge(K, 20), Charge("call_seconds", 0))
    bs = {b.meter: b for b in await ledger.get_balance(org, [M, K, "call_seconds"])}
    assert (bs[M].used, bs[M].reserved, bs[M].remaining) == (700, 0, 300)
    assert (bs[K].used, bs[K].reserved, bs[K].remaining, bs[K].topup_remaining) == \
        (20, 0, 130, 50)
    assert (bs["call_seconds"].used, bs["call_seconds"].remaining) == (0, 60)
    f = await ledger.refund(r.reservation_id, [Charge(K, 100)])  # at most what was charged
    assert f.amounts == (Charge(M, 0), Charge(K, 20), Charge("call_seconds", 0))
    bs = {b.meter: b for b in await ledger.get_balance(org, [M, K])}
    assert (bs[M].used, bs[K].used, bs[K].remaining) == (700, 0, 150)


# -- (3) each hold resolves once under concurrency --------------------------------------------

async def test_concurrent_commit_refund_extend_and_expiry_resolve_a_hold_once(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 100_000)])
    await ledger.upsert_org("o", "small")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 50_000)])
    await ledger.set_overage("o", M, 1_000, PRICE, EVERY)
    seat = Subject("o", seat_id="s")
    shard = ledger.keys.shard_of("o")
    used = 0
    for trial in range(12):
        clock.set(T0 + trial * 3_600_000)
        r = await ledger.reserve(seat, [Charge(M, 300)], idempotency_key=f"t{trial}",
                                 ttl_seconds=60)
        assert r.decision is Decision.GRANTED
        rid = r.reservation_id
        if trial % 2:
            clock.advance(61_000)  # past its TTL: the sweeper and late calls race too
        calls: list[Any] = []
        for _ in range(4):
            calls += [ledger.commit(rid, [Charge(M, 200)]), ledger.refund(rid),
                      ledger.extend(rid, [Charge(M, 50)], 60), ledger.sweep(shard)]
        order = calls[trial % 4::] + calls[:trial % 4]
        got = await asyncio.gather(*order, return_exceptions=True)
        for g in got:
            assert not isinstance(g, BaseException) or isinstance(g, FailedPrecondition), g
        hold = await redis.hgetall(ledger.keys.hold(rid))
        state = hold[b"st"].decode()
        b = await bal(ledger, seat)
        assert b.reserved == 0, (trial, b)
        # each transition happened at most once: one commit, one release or expiry, one
        # refund of what was committed
        stream = ledger.keys.ledger(shard)
        kinds = [e["type"] for e in (entry_fields(f) for _, f in await redis.xrange(stream))
                 if e.get("rid") == rid]
        for k in ("reserve", "commit", "release", "expire", "refund"):
            assert kinds.count(k) <= 1, (trial, kinds)
        assert kinds.count("release") + kinds.count("expire") <= 1, (trial, kinds)
        used += 200 if state == "C" else 0
        assert b.used == used and b.remaining == 50_000 - used, (trial, state, kinds, b)
        assert state in ("C", "R", "E"), state
        assert (state == "C") == ("commit" in kinds and "refund" not in kinds), (state, kinds)


# -- (4) gauges -----------------------------------------------------------------------------

async def test_a_gauge_commit_refunded_months_later_across_plan_changes(
        ledger: Ledger, clock: ManualClock) -> None:
    await ledger.upsert_plan("s1", [Allowance(M, 1_000), Allowance(G, 1_000)])
    await ledger.upsert_plan("s2", [Allowance(M, 1_000), Allowance(G, 2_000)])
    await ledger.upsert_plan("s0", [Allowance(M, 1_000), Allowance(G, 300)])
    await ledger.upsert_org("o", "s1")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(G, 1_200)])
    await ledger.set_overage("o", G, 500, 1, 0)
    seat = Subject("o", seat_id="s")
    a = await ledger.reserve(seat, [Charge(G, 800)], idempotency_key="a")
    await ledger.commit(a.reservation_id)
    b = await ledger.reserve(seat, [Charge(G, 250)], idempotency_key="b")  # 50 overage
    await ledger.commit(b.reservation_id, [Charge(G, 300)])  # 50 more overage
    g = await bal(ledger, seat, G)
    assert (g.used, g.overage_used, g.remaining) == (1_100, 100, 100)  # the seat cap's 100
    clock.set(ms(2027, 1, 15))  # months later: a gauge does not reset
    await ledger.upsert_org("o", "s2")
    g = await bal(ledger, seat, G)
    assert (g.used, g.overage_used, g.remaining) == (1_100, 100, 100)
    await ledger.upsert_seat("o", "s")  # no cap
    assert (await bal(ledger, seat, G)).remaining == (2_000 - 1_000) + (500 - 100)
    clock.set(ms(2027, 3, 2))
    await ledger.upsert_org("o", "s0")  # a plan below what is stored
    f = await ledger.refund(b.reservation_id)  # the 300-byte file deleted
    assert f.amounts == (Charge(G, 300),)
    g = await bal(ledger, seat, G)
    assert (g.used, g.overage_used, g.debt) == (800, 0, 0)
    await ledger.refund(a.reservation_id)
    g = await bal(ledger, seat, G)
    assert (g.used, g.overage_used, g.remaining, g.reserved) == (0, 0, 300 + 500, 0)
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(G, 1_200)])
    assert (await bal(ledger, seat, G)).remaining == 800  # the cap counts nothing stored


async def test_a_gauge_hold_open_across_a_month_commits_and_refunds_exactly(
        ledger: Ledger, clock: ManualClock) -> None:
    await ledger.upsert_plan("s1", [Allowance(M, 1_000), Allowance(G, 1_000)])
    await ledger.upsert_org("o", "s1")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(G, 800)])
    seat = Subject("o", seat_id="s")
    clock.set(ms(2026, 11, 30, 20))
    h = await ledger.reserve(seat, [Charge(G, 500)], idempotency_key="h", ttl_seconds=DAY_S)
    clock.set(ms(2026, 12, 1, 2))
    e = await ledger.extend(h.reservation_id, [Charge(G, 100)], DAY_S)
    assert e.decision is Decision.GRANTED
    g = await bal(ledger, seat, G)
    assert (g.reserved, g.remaining) == (600, 200)
    await ledger.commit(h.reservation_id, [Charge(G, 400)])
    g = await bal(ledger, seat, G)
    assert (g.used, g.reserved, g.remaining) == (400, 0, 400)
    clock.set(ms(2027, 2, 1, 2))
    await ledger.refund(h.reservation_id)
    g = await bal(ledger, seat, G)
    assert (g.used, g.reserved, g.remaining) == (0, 0, 800)


# -- (5) seats and teams changed under open holds ------------------------------------------

async def test_a_seat_moved_to_another_team_resolves_its_hold_on_the_first(
        ledger: Ledger) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "p")
    await ledger.upsert_team("o", "red")
    await ledger.upsert_team("o", "blue")
    await ledger.set_allocation_template("o", M, "custom", custom={"red": 400, "blue": 400})
    await ledger.upsert_seat("o", "s", "red", [SeatLimit(M, 500)])
    seat, red, blue = Subject("o", seat_id="s"), Subject("o", "red"), Subject("o", "blue")
    h1 = await ledger.reserve(seat, [Charge(M, 300)], idempotency_key="h1")
    h2 = await ledger.reserve(seat, [Charge(M, 100)], idempotency_key="h2")
    await ledger.upsert_seat("o", "s", "blue", [SeatLimit(M, 500)])
    assert (await bal(ledger, seat)).remaining == 100  # the cap counts both holds
    await ledger.commit(h1.reservation_id, [Charge(M, 200)])
    await ledger.refund(h2.reservation_id)
    r, b, s = await bal(ledger, red), await bal(ledger, blue), await bal(ledger, seat)
    assert (r.used, r.reserved, r.remaining) == (200, 0, 200)
    assert (b.used, b.reserved, b.remaining) == (0, 0, 400)
    assert (s.reserved, s.remaining) == (0, 300)  # 500 cap - 200 used
    await ledger.upsert_seat("o", "s", "blue")  # limits removed
    assert (await bal(ledger, seat)).remaining == 400
    await ledger.refund(h1.reservation_id)
    r = await bal(ledger, red)
    assert (r.used, r.remaining) == (0, 400)
    await ledger.upsert_seat("o", "s", "blue", [SeatLimit(M, 500)])
    assert (await bal(ledger, seat)).remaining == 400  # blue's 400; the cap is whole


async def test_holds_taken_while_a_seat_had_no_limit_count_once_it_has_one(
        ledger: Ledger) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "p")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 500)])
    seat = Subject("o", seat_id="s")
    a = await ledger.reserve(seat, [Charge(M, 400)], idempotency_key="a")
    await ledger.upsert_seat("o", "s")
    b = await ledger.reserve(seat, [Charge(M, 400)], idempotency_key="b")
    assert b.decision is Decision.GRANTED
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 500)])
    assert (await bal(ledger, seat)).remaining == 0
    await ledger.commit(a.reservation_id)
    await ledger.commit(b.reservation_id, [Charge(M, 50)])
    s = await bal(ledger, seat)
    assert (s.used, s.reserved, s.remaining) == (450, 0, 50)
    await ledger.refund(a.reservation_id)
    assert (await bal(ledger, seat)).remaining == 450


# -- (6) auto top-up -----------------------------------------------------------------------

async def test_concurrent_commits_crossing_the_auto_topup_threshold_ask_once(
        ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "p")
    await ledger.set_auto_topup("o", M, threshold=2_000, amount=5_000)
    org = Subject("o")
    rs = await asyncio.gather(*(ledger.reserve(org, [Charge(M, 400)], idempotency_key=f"r{i}")
                                for i in range(19)))  # 7,600 held: 2,400 free
    asked = [a for t, a in await events(ledger, redis, "o") if t == "auto_topup.requested"]
    assert asked == []
    await asyncio.gather(*(ledger.commit(r.reservation_id, [Charge(M, 450)]) for r in rs))
    asked = [a for t, a in await events(ledger, redis, "o") if t == "auto_topup.requested"]
    assert len(asked) == 1, asked
    await asyncio.gather(*(ledger.refund(r.reservation_id) for r in rs[:10]))  # above again
    await asyncio.gather(*(spend(ledger, org, 500, f"u{i}") for i in range(10)))  # below
    asked = [a for t, a in await events(ledger, redis, "o") if t == "auto_topup.requested"]
    assert len(asked) == 2, asked


# -- (7) GetBalance and Check against what Reserve grants ------------------------------------

@settings(max_examples=int(os.environ.get("QG_EXAMPLES", "40")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(monthly=st.integers(0, 2_000), topup=st.integers(0, 1_000),
       cap=st.none() | st.integers(0, 500), alloc=st.none() | st.integers(0, 100),
       in_team=st.booleans(), limit=st.none() | st.integers(0, 2_000),
       used_org=st.integers(0, 3_000), used_seat=st.integers(0, 3_000),
       held=st.integers(0, 500), who=st.sampled_from(["org", "team", "seat", "bot"]))
async def test_remaining_is_exactly_what_a_reserve_gets_and_check_agrees(
        ledger: Ledger, clock: ManualClock, monthly: int, topup: int, cap: int | None,
        alloc: int | None, in_team: bool, limit: int | None, used_org: int, used_seat: int,
        held: int, who: str) -> None:
    clock.set(T0)
    org = f"b{next(_N)}"
    await ledger.upsert_plan(f"p{monthly}", [Allowance(M, monthly)])
    await ledger.upsert_org(org, f"p{monthly}")
    await ledger.upsert_team(org, "red", 2)
    if alloc is not None:
        await ledger.set_allocation_template(org, M, "custom",
                                             custom={"red": monthly * alloc // 100})
    await ledger.upsert_seat(org, "s", "red" if in_team else "",
                             [] if limit is None else [SeatLimit(M, limit)])
    await ledger.upsert_assistant(org, "bot", "red" if in_team else "")
    if topup:
        await ledger.topup(org, M, topup, "p")
    if cap is not None:
        await ledger.set_overage(org, M, cap, PRICE, EVERY)
    seat = Subject(org, seat_id="s")
    # spend: the org and the seat each use what they can of their amount, the rest of the
    # seat's becomes debt (a Commit above a hold of 1)
    for s, amount, key in ((Subject(org), used_org, "uo"), (seat, used_seat, "us")):
        if amount:
            r = await ledger.reserve(s, [Charge(M, 1)], idempotency_key=key)
            if r.decision is Decision.GRANTED:
                await ledger.commit(r.reservation_id, [Charge(M, amount)])
    if held:
        await ledger.reserve(seat, [Charge(M, held)], idempotency_key="h", allow_partial=True)
    s = {"org": Subject(org), "team": Subject(org, "red" if in_team else ""), "seat": seat,
         "bot": Subject(org, assistant_id="bot")}[who]
    b = await bal(ledger, s)
    c = await ledger.check(s, M)
    assert c.balances[0].remaining == b.remaining
    assert c.active == (b.remaining > 0), (b, c)
    over = await ledger.reserve(s, [Charge(M, b.remaining + 1)], idempotency_key="over")
    assert over.decision is Decision.DENIED, (b, over)
    if b.remaining:
        r = await ledger.reserve(s, [Charge(M, b.remaining)], idempotency_key="all")
        assert r.decision is Decision.GRANTED, (b, r)
        assert r.balances[0].remaining == 0
        p = await ledger.reserve(s, [Charge(M, b.remaining + 7)], idempotency_key="part",
                                 allow_partial=True)
        assert p.decision is Decision.DENIED


async def test_get_balance_counts_no_hold_past_its_ttl_that_reserve_would_release(
        ledger: Ledger, clock: ManualClock) -> None:
    """A hold past its TTL is released by the first Reserve it would block: what GetBalance
    and Check report as remaining is what that Reserve gets."""
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "p")
    org = Subject("o")
    h = await ledger.reserve(org, [Charge(M, 600)], idempotency_key="h", ttl_seconds=60)
    assert h.decision is Decision.GRANTED
    clock.advance(61_000)  # expired; the sweeper has not run
    b = await bal(ledger, org)
    c = await ledger.check(org, M)
    r = await ledger.reserve(org, [Charge(M, 1_000)], idempotency_key="r")
    assert r.decision is Decision.GRANTED  # the expired hold does not block it
    assert (c.balances[0].remaining, b.remaining) == (1_000, 1_000), (c, b)


@pytest.mark.parametrize("first", ["get_balance", "check", "transfer", "adjust"])
async def test_a_hold_past_its_ttl_is_released_once_by_whichever_call_meets_it_first(
        ledger: Ledger, clock: ManualClock, redis: Any, first: str) -> None:
    """GetBalance, Check, Transfer and Adjust each release the shard's expired holds before
    they look at a wallet, as a Reserve would: none of them sees the tokens of a hold that
    no longer stands, and the tokens come back exactly once (one expire entry, nothing
    left for the sweeper)."""
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "p")
    await ledger.upsert_team("o", "red")
    org, team = Subject("o"), Subject("o", "red")
    h = await ledger.reserve(org, [Charge(M, 600)], idempotency_key="h", ttl_seconds=60)
    assert h.decision is Decision.GRANTED
    clock.advance(61_000)  # expired; the sweeper has not run
    if first == "get_balance":
        assert (await bal(ledger, org)).remaining == 1_000
    elif first == "check":
        c = await ledger.check(org, M)
        assert c.active and c.balances[0].remaining == 1_000
    elif first == "transfer":  # all of the month's 1,000 is free again
        src, _ = await ledger.transfer("o", M, 1_000, "monthly", idempotency_key="x",
                                       to_team_id="red")
        assert src.remaining == 0
    else:  # taking 1,000 back leaves no debt: the hold's 600 were free again
        (o,) = await ledger.adjust("o", M, -1_000, "correction", idempotency_key="a")
        assert (o.remaining, o.reserved) == (0, 0)
    shard = ledger.keys.shard_of("o")
    assert await ledger.sweep(shard) == 0  # nothing left due
    entries = [entry_fields(f) for _, f in await redis.xrange(ledger.keys.ledger(shard))]
    expired = [e for e in entries if e.get("rid") == h.reservation_id
               and e["type"] == "expire"]
    assert len(expired) == 1, entries
    o = await bal(ledger, org)
    assert o.reserved == 0
    want = {"get_balance": 1_000, "check": 1_000, "transfer": 0, "adjust": 0}[first]
    assert o.remaining == want
    if first == "transfer":
        assert (await bal(ledger, team)).remaining == 1_000


async def test_readers_racing_a_late_commit_release_the_expired_hold_once(
        ledger: Ledger, clock: ManualClock, redis: Any) -> None:
    """GetBalance, Check and the sweeper, all at once with the late Commit of the same
    expired hold: the hold is released exactly once (one expire entry), the late usage is
    charged exactly once, and the wallet adds up."""
    await ledger.upsert_plan("p", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "p")
    org = Subject("o")
    holds = [await ledger.reserve(org, [Charge(M, 500)], idempotency_key=f"h{i}",
                                  ttl_seconds=60) for i in range(6)]
    assert all(h.decision is Decision.GRANTED for h in holds)
    clock.advance(61_000)
    shard = ledger.keys.shard_of("o")
    calls: list[Any] = []
    for i, h in enumerate(holds):
        calls.append(ledger.commit(h.reservation_id, [Charge(M, 100 + i)]))
        calls += [bal(ledger, org), ledger.check(org, M), ledger.sweep(shard)]
    got = await asyncio.gather(*calls)
    commits = got[0::4]
    assert [c.amounts[0].amount for c in commits] == [100 + i for i in range(6)]
    entries = [entry_fields(f) for _, f in await redis.xrange(ledger.keys.ledger(shard))]
    for h in holds:
        mine = [e["type"] for e in entries if e.get("rid") == h.reservation_id]
        assert sorted(mine) == ["commit", "expire", "reserve"], mine
    b = await bal(ledger, org)
    assert (b.reserved, b.used, b.remaining) == (0, sum(100 + i for i in range(6)),
                                                 10_000 - sum(100 + i for i in range(6)))


@pytest.mark.parametrize("anchor_then", [15, 0])
async def test_refund_after_the_anchor_day_moved_credits_the_seat_cap_of_the_commits_period(
        ledger: Ledger, clock: ManualClock, anchor_then: int) -> None:
    """A Commit on Dec 10 with anchor day 15 counts in the period of Nov 15; the anchor
    then moves to the 1st, so Dec 1 starts a new period and the seat's cap is fresh. A
    Refund of that Commit gives back nothing of the new period's cap: the usage was not
    counted there. (It used to recompute the Commit's period with the new anchor day,
    find Dec 1, and hand the seat room it never used.) Without the move (anchor 0, the
    1st all along), the Refund gives the cap back in full."""
    await ledger.upsert_plan("p", [Allowance(M, 100_000)])
    await ledger.upsert_org("o", "p", period_anchor_day=anchor_then)
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 1_000)])
    seat = Subject("o", seat_id="s")
    clock.set(ms(2026, 12, 10))
    r = await ledger.reserve(seat, [Charge(M, 600)], idempotency_key="r")
    assert r.decision is Decision.GRANTED
    await ledger.commit(r.reservation_id, [Charge(M, 600)])
    await ledger.upsert_org("o", "p", period_anchor_day=1)  # Dec 1 starts the period now
    clock.set(ms(2026, 12, 12))
    used = await ledger.reserve(seat, [Charge(M, 700)], idempotency_key="u")
    if anchor_then:  # a new period: its cap is all there
        assert used.decision is Decision.GRANTED
        await ledger.commit(used.reservation_id, [Charge(M, 700)])
    await ledger.refund(r.reservation_id)
    # the new period's cap: 1,000 less what was used in it, whatever was refunded
    in_period = 700 if anchor_then else 0
    fits = await ledger.reserve(seat, [Charge(M, 1_000 - in_period)], idempotency_key="f")
    assert fits.decision is Decision.GRANTED
    over = await ledger.reserve(seat, [Charge(M, 1)], idempotency_key="o")
    assert over.decision is Decision.DENIED and over.reason is DenyReason.SEAT_LIMIT_REACHED


# -- (8) Envoy's ShouldRateLimit: charged at once, once, never over a limit --------------------

def rls_request(*descriptors: dict[str, str], hits: int = 0) -> Any:
    from quotagate.envoy import ratelimit_pb2, rls_pb2
    return rls_pb2.RateLimitRequest(domain="ai", hits_addend=hits, descriptors=[
        ratelimit_pb2.RateLimitDescriptor(entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in d.items()])
        for d in descriptors])


async def test_envoy_concurrent_requests_never_charge_past_a_seat_cap(
        ledger: Ledger, redis: Any) -> None:
    from quotagate.envoy import rls_pb2
    await ledger.upsert_plan("p", [Allowance(M, 10_000)])
    await ledger.upsert_org("o", "p")
    await ledger.upsert_seat("o", "s", limits=[SeatLimit(M, 1_000)])
    await ledger.set_overage("o", M, 100, PRICE, EVERY)
    rls = RateLimitServicer(ledger)
    got = await asyncio.gather(*(rls.ShouldRateLimit(
        rls_request({"org_id": "o", "seat_id": "s", "action": "ai_sequence"}, hits=3),
        None) for _ in range(10)))  # 150 each: six fit in 1,000
    ok = [r for r in got if r.overall_code == rls_pb2.RateLimitResponse.OK]
    assert len(ok) == 6
    assert sorted(r.statuses[0].limit_remaining for r in ok) == [100, 250, 400, 550, 700, 850]
    b = await bal(ledger, Subject("o", seat_id="s"))
    assert (b.used, b.reserved, b.remaining) == (900, 0, 100)
    # nothing left held, nothing waiting to expire
    assert await redis.zcard(ledger.keys.expiries(ledger.keys.shard_of("o"))) == 0
    last = await rls.ShouldRateLimit(rls_request({"org_id": "o", "seat_id": "s"}, hits=100),
                                     None)
    assert last.overall_code == rls_pb2.RateLimitResponse.OK
    assert last.statuses[0].limit_remaining == 0
    more = await rls.ShouldRateLimit(rls_request({"org_id": "o", "seat_id": "s"}, hits=1),
                                     None)
    assert more.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT
    assert (await bal(ledger, Subject("o", seat_id="s"))).used == 1_000


@pytest.mark.parametrize("lost", ["before_its_hold", "answer_lost"])
async def test_charge_now_commits_once_when_its_commit_is_sent_again(
        ledger: Ledger, lost: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """charge_now sends its Commit again when the first found no hold: whether that first
    one really ran before the hold (changed nothing) or ran and its answer said otherwise,
    the usage is charged once."""
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "p")
    real = ledger._commit_call
    calls = []

    async def commit_call(key: str, lbl: str, items: Any) -> Any:
        calls.append(key)
        if len(calls) == 1:
            if lost == "answer_lost":  # it ran, after the hold, but said NOT_FOUND
                await asyncio.sleep(0.05)
                await real(key, lbl, items)
            return [b"ERR", b"NOT_FOUND", b"reservation_id", b"no such reservation"]
        return await real(key, lbl, items)

    monkeypatch.setattr(ledger, "_commit_call", commit_call)
    r = await ledger.charge_now(Subject("o"), [Charge(M, 40)])
    assert r.decision is Decision.GRANTED and r.charged == (Charge(M, 40),)
    assert len(calls) == 2
    b = await bal(ledger, Subject("o"))
    assert (b.used, b.reserved) == (40, 0)
