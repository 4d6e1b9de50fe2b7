"""Auto top-up: a crossing below the threshold that the cooldown or the per-period cap
holds back is not forgotten: the first touch once they allow it, still below, asks."""

from __future__ import annotations

from typing import Any

from test_events import events

from conftest import ms
from quotagate.clock import ManualClock
from quotagate.ledger.model import Allowance, Charge, Decision, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def requests(ledger: Ledger, redis: Any, org: str) -> list[dict[str, str]]:
    return [a for t, _, a in await events(ledger, redis, org) if t == "auto_topup.requested"]


async def use(ledger: Ledger, org: str, amount: int, key: str) -> None:
    r = await ledger.reserve(Subject(org), [Charge(M, amount)], idempotency_key=key)
    assert r.decision is Decision.GRANTED, r
    await ledger.commit(r.reservation_id)


async def test_a_crossing_within_the_cooldown_asks_once_the_cooldown_ends(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 2_000)])
    await ledger.upsert_org("a", "k")
    await ledger.set_auto_topup("a", M, threshold=500, amount=1_000, cooldown_seconds=600)
    await use(ledger, "a", 1_600, "u1")  # 400 left: below 500
    assert [(r["available"], r["amount"]) for r in await requests(ledger, redis, "a")] == [
        ("400", "1000")]
    for i in range(2):  # two more crossings, both within the cooldown
        clock.advance(60_000)
        await ledger.topup("a", M, 1_000, f"buy-{i}")  # 1,400: above again
        await use(ledger, "a", 1_000, f"u2-{i}")  # 400: below
    assert len(await requests(ledger, redis, "a")) == 1
    clock.advance(600_000)  # the cooldown is over, still below
    r = await ledger.reserve(Subject("a"), [Charge(M, 1)], idempotency_key="small")
    assert r.decision is Decision.GRANTED
    got = await requests(ledger, redis, "a")
    assert len(got) == 2 and got[1]["available"] == "399"
    await ledger.reserve(Subject("a"), [Charge(M, 1)], idempotency_key="small-2")
    await ledger.get_balance(Subject("a"), [M])
    assert len(await requests(ledger, redis, "a")) == 2  # the same crossing: once


async def test_a_crossing_over_the_cap_waits_for_the_next_period(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 2_000)])
    await ledger.upsert_org("c", "k")
    await ledger.set_auto_topup("c", M, threshold=500, amount=1_000, max_per_period=2)
    for i in range(4):  # four crossings this period, no cooldown
        await use(ledger, "c", 1_000 if i else 1_600, f"u{i}")  # 400 left each time
        await ledger.topup("c", M, 1_000, f"buy-{i}")
        if i < 3:
            assert (await ledger.get_balance(Subject("c"), [M]))[0].remaining == 1_400
    assert len(await requests(ledger, redis, "c")) == 2  # the cap
    await use(ledger, "c", 1_000, "below")  # 400: below, held back by the cap
    await ledger.get_balance(Subject("c"), [M])
    assert len(await requests(ledger, redis, "c")) == 2
    # the next period: 2,000 monthly again and 400 of top-up, above the threshold
    clock.set(ms(2026, 12, 1))
    await ledger.get_balance(Subject("c"), [M])
    assert len(await requests(ledger, redis, "c")) == 2  # no longer below: nothing to ask
    await use(ledger, "c", 2_000, "dec")  # 400 left: a new crossing, a new period's cap
    got = await requests(ledger, redis, "c")
    assert len(got) == 3 and len({r["available"] for r in got}) == 1


async def test_held_back_by_the_cap_and_still_below_asks_in_the_next_period(
        ledger: Ledger, redis: Any, clock: ManualClock) -> None:
    await ledger.upsert_plan("k", [Allowance(M, 300)])
    await ledger.upsert_org("b", "k")  # 300 a month: always below a threshold of 500
    await ledger.set_auto_topup("b", M, threshold=500, amount=1_000, max_per_period=1)
    assert len(await requests(ledger, redis, "b")) == 1
    await ledger.topup("b", M, 1_000, "buy")  # 1,300: above
    await use(ledger, "b", 1_300, "u")  # 0: below again, over the cap
    assert len(await requests(ledger, redis, "b")) == 1
    clock.set(ms(2026, 12, 1))  # 300 monthly + 0 top-up left: still below
    await ledger.get_balance(Subject("b"), [M])
    got = await requests(ledger, redis, "b")
    assert len(got) == 2 and got[1]["available"] == "300"
