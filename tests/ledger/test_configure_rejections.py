"""Configuration calls that are refused change nothing (every key byte for byte); the
ones accepted apply whole. UpsertSeat replaces the seat's limits. Switching AI off and on
for an org tells every assistant's new status on the events stream."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import ms
from quotagate.clock import ManualClock
from quotagate.errors import FailedPrecondition, InvalidArgument, NotFound
from quotagate.ledger.model import Allowance, Charge, Decision, DenyReason, SeatLimit, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"
K = "knowledge_tokens"


async def snapshot(redis: Any) -> dict[bytes, bytes]:
    """Every key of the database (both nodes' of a cluster), serialised by DUMP."""
    return {key: await redis.dump(key) async for key in redis.scan_iter("*")}


async def granted(ledger: Ledger, s: Subject, meter: str = M) -> int:
    return (await ledger.get_balance(s, [meter]))[0].monthly_granted


async def org_with_template(ledger: Ledger, monthly: int = 1_000, red: int = 800) -> None:
    await ledger.upsert_plan("big", [Allowance(M, monthly)])
    await ledger.upsert_plan("small", [Allowance(M, 500)])
    await ledger.upsert_org("acme", "big")
    await ledger.upsert_team("acme", "red", 2)
    await ledger.upsert_team("acme", "blue", 3)
    await ledger.set_allocation_template("acme", M, "custom", custom={"red": red})


async def test_upsert_org_to_a_plan_the_template_does_not_fit_changes_nothing(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await org_with_template(ledger)
    before = await snapshot(redis)
    with pytest.raises(FailedPrecondition) as e:
        await ledger.upsert_org("acme", "small")
    assert e.value.field == "plan"
    assert "800" in e.value.message and "500" in e.value.message
    assert await snapshot(redis) == before
    # still on the old plan, the team keeps its allocation, the org the rest
    assert await granted(ledger, Subject("acme")) == 200
    assert await granted(ledger, Subject("acme", "red")) == 800
    clock.set(ms(2026, 12, 1))
    assert await granted(ledger, Subject("acme")) == 200
    assert await granted(ledger, Subject("acme", "red")) == 800


async def test_upsert_org_with_fewer_seats_than_the_template_needs_changes_nothing(
        ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("seats", [Allowance(M, per_seat=100)])
    await ledger.upsert_org("acme", "seats", seats=10)
    await ledger.upsert_team("acme", "red", 6)
    await ledger.set_allocation_template("acme", M, "per_seat", per_seat=100)
    before = await snapshot(redis)
    with pytest.raises(FailedPrecondition) as e:
        await ledger.upsert_org("acme", "seats", seats=5)  # 500 for 600 allocated
    assert e.value.field == "seats"
    assert await snapshot(redis) == before
    assert await granted(ledger, Subject("acme")) == 400


async def test_upsert_org_that_fits_moves_the_org_and_keeps_the_allocations(
        ledger: Ledger, redis: Any) -> None:
    await org_with_template(ledger, red=400)
    await ledger.upsert_org("acme", "small")
    assert await granted(ledger, Subject("acme")) == 100
    assert await granted(ledger, Subject("acme", "red")) == 400
    assert await redis.sismember(ledger.keys.plan_orgs("small"), "acme")


async def test_refused_templates_keep_the_live_allocations(ledger: Ledger, redis: Any,
                                                           clock: ManualClock) -> None:
    await org_with_template(ledger)
    before = await snapshot(redis)
    with pytest.raises(NotFound) as nf:
        await ledger.set_allocation_template("acme", M, "custom", custom={"red": 1, "ghost": 1})
    assert nf.value.field == "custom" and "ghost" in nf.value.message
    assert await snapshot(redis) == before
    with pytest.raises(FailedPrecondition) as fp:
        await ledger.set_allocation_template("acme", M, "custom",
                                             custom={"red": 600, "blue": 600})
    assert fp.value.field == "custom"
    with pytest.raises(FailedPrecondition) as fp:
        await ledger.set_allocation_template("acme", M, "per_seat", per_seat=300)
    assert fp.value.field == "per_seat"
    assert await snapshot(redis) == before
    # Next period the team still gets its 800 and the org the 200 it kept: none vanish.
    clock.set(ms(2026, 12, 1))
    assert await granted(ledger, Subject("acme", "red")) == 800
    assert await granted(ledger, Subject("acme")) == 200
    r = await ledger.reserve(Subject("acme", "red"), [Charge(M, 800)], idempotency_key="r")
    assert r.decision is Decision.GRANTED


async def test_upsert_team_beyond_a_per_seat_template_changes_nothing(
        ledger: Ledger, redis: Any) -> None:
    await org_with_template(ledger)
    await ledger.set_allocation_template("acme", M, "per_seat", per_seat=100)  # 200 + 300
    before = await snapshot(redis)
    for team, seats in (("red", 8), ("green", 6)):  # 1,100 for a grant of 1,000
        with pytest.raises(FailedPrecondition) as e:
            await ledger.upsert_team("acme", team, seats)
        assert e.value.field == "seats"
        assert await snapshot(redis) == before
    assert await granted(ledger, Subject("acme")) == 500
    assert await ledger.upsert_team("acme", "green", 5)  # fits: 1,000
    assert await granted(ledger, Subject("acme", "green")) == 500
    assert await granted(ledger, Subject("acme")) == 0


async def test_upsert_plan_an_org_template_does_not_fit_changes_nothing(
        ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("plain", "p")
    await ledger.upsert_org("acme", "p")
    await ledger.upsert_team("acme", "red", 1)
    await ledger.set_allocation_template("acme", M, "custom", custom={"red": 800})
    before = await snapshot(redis)
    with pytest.raises(FailedPrecondition) as e:
        await ledger.upsert_plan("p", [Allowance(M, 500)])
    assert e.value.field == "allowances" and "'acme'" in e.value.message
    assert await snapshot(redis) == before  # neither the plan nor any org changed
    assert await ledger.plan("p") == (Allowance(M, 1_000),)
    await ledger.upsert_plan("p", [Allowance(M, 900)])  # fits: applied to both
    assert await granted(ledger, Subject("plain")) == 900
    assert await granted(ledger, Subject("acme")) == 100
    assert await granted(ledger, Subject("acme", "red")) == 800


async def test_upsert_seat_replaces_its_limits(ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 10_000), Allowance(K, 10_000)])
    await ledger.upsert_org("acme", "p")
    await ledger.upsert_seat("acme", "ann", limits=[SeatLimit(M, 100), SeatLimit(K, 10)])
    ann = Subject("acme", seat_id="ann")
    r = await ledger.reserve(ann, [Charge(M, 101)], idempotency_key="a")
    assert (r.decision, r.reason) == (Decision.DENIED, DenyReason.SEAT_LIMIT_REACHED)
    await ledger.upsert_seat("acme", "ann", limits=[SeatLimit(K, 20)])  # M not listed
    r = await ledger.reserve(ann, [Charge(M, 5_000)], idempotency_key="b")
    assert r.decision is Decision.GRANTED
    r = await ledger.reserve(ann, [Charge(K, 21)], idempotency_key="c")
    assert r.reason is DenyReason.SEAT_LIMIT_REACHED  # the listed one is the new one
    await ledger.upsert_seat("acme", "ann")  # no limits: no cap at all
    r = await ledger.reserve(ann, [Charge(K, 21)], idempotency_key="d")
    assert r.decision is Decision.GRANTED
    fields = await redis.hkeys(ledger.keys.cfg("acme"))
    assert not [f for f in fields if f.startswith(b"sl:")]


async def test_upsert_seat_refusals_change_nothing(ledger: Ledger, redis: Any) -> None:
    await ledger.upsert_org("acme", "pro")
    await ledger.upsert_seat("acme", "ann", limits=[SeatLimit(M, 100)])
    before = await snapshot(redis)
    with pytest.raises(InvalidArgument) as e:
        await ledger.upsert_seat("acme", "ann", limits=[SeatLimit(M, 5), SeatLimit(M, 9)])
    assert e.value.field == "limits[1].meter"
    with pytest.raises(NotFound) as nf:
        await ledger.upsert_seat("acme", "ann", "ghost")
    assert nf.value.field == "team_id"
    assert await snapshot(redis) == before


async def status_events(ledger: Ledger, redis: Any) -> list[tuple[str, str, dict[str, str]]]:
    raw = await redis.xrange(ledger.keys.events(ledger.keys.shard_of("acme")))
    out = []
    for _, f in raw:
        if f[b"type"].startswith(b"assistant."):
            out.append((f[b"type"].decode(), f[b"id"].decode(), json.loads(f[b"attrs"])))
    return out


async def test_ai_switched_off_and_on_tells_each_assistant(ledger: Ledger,
                                                          redis: Any) -> None:
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("acme", "p")
    await ledger.upsert_team("acme", "red")
    await ledger.set_allocation_template("acme", M, "custom", custom={"red": 100})
    await ledger.upsert_assistant("acme", "bot")
    await ledger.upsert_assistant("acme", "off", enabled=False)
    await ledger.upsert_assistant("acme", "dry", "red")
    # dry's team spends its allocation: dry is deactivated, bot (org wallet) is not
    r = await ledger.reserve(Subject("acme", "red"), [Charge(M, 100)], idempotency_key="x")
    await ledger.commit(r.reservation_id)
    assert not (await ledger.check(Subject("acme", assistant_id="dry"), M)).active
    seen = len(await status_events(ledger, redis))

    await ledger.upsert_org("acme", "p", ai_enabled=False)
    off = (await status_events(ledger, redis))[seen:]
    assert [(t, a["assistant_id"], a["reason"]) for t, _, a in off] == [
        ("assistant.deactivated", "bot", "ai"), ("assistant.deactivated", "dry", "ai"),
        ("assistant.deactivated", "off", "ai")]
    c = await ledger.check(Subject("acme", assistant_id="bot"), M)
    assert (c.active, c.reason) == (False, DenyReason.AI_DISABLED)
    await ledger.upsert_org("acme", "p", ai_enabled=False)  # no change: nothing said
    assert len(await status_events(ledger, redis)) == seen + 3

    await ledger.upsert_org("acme", "p", ai_enabled=True)
    on = (await status_events(ledger, redis))[seen + 3:]
    assert [(t, a["assistant_id"], a.get("reason")) for t, _, a in on] == [
        ("assistant.reactivated", "bot", "ai"), ("assistant.deactivated", "dry", "exhausted"),
        ("assistant.deactivated", "off", "disabled")]
    assert (await ledger.check(Subject("acme", assistant_id="bot"), M)).active
    ids = [i for _, i, _ in off + on]
    assert len(set(ids)) == len(ids)  # each event its own stable id


async def test_a_refill_while_ai_is_off_reactivates_nobody(ledger: Ledger, redis: Any) -> None:
    """A dry assistant's wallet refilled while AI is off for the org: it stays inactive
    (no assistant.reactivated), and switching AI on reactivates it."""
    await ledger.upsert_plan("p", [Allowance(M, 1_000)])
    await ledger.upsert_org("acme", "p")
    await ledger.upsert_team("acme", "red")
    await ledger.set_allocation_template("acme", M, "custom", custom={"red": 100})
    await ledger.upsert_assistant("acme", "dry", "red")
    r = await ledger.reserve(Subject("acme", "red"), [Charge(M, 100)], idempotency_key="x")
    await ledger.commit(r.reservation_id)
    await ledger.upsert_org("acme", "p", ai_enabled=False)
    seen = len(await status_events(ledger, redis))
    await ledger.topup("acme", M, 500, "refill-1", team_id="red")
    assert (await status_events(ledger, redis))[seen:] == []
    c = await ledger.check(Subject("acme", assistant_id="dry"), M)
    assert (c.active, c.reason) == (False, DenyReason.AI_DISABLED)
    await ledger.upsert_org("acme", "p", ai_enabled=True)
    on = (await status_events(ledger, redis))[seen:]
    assert [(t, a["assistant_id"]) for t, _, a in on] == [("assistant.reactivated", "dry")]
    assert (await ledger.check(Subject("acme", assistant_id="dry"), M)).active
