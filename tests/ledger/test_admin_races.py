"""Admin calls racing each other: an UpsertPlan re-applying a plan to its orgs never
undoes an UpsertOrg that landed meanwhile."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from quotagate.ledger.model import Allowance, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def test_upsert_plan_never_undoes_a_concurrent_upsert_org(
        redis: Any, ledger: Ledger) -> None:
    await ledger.upsert_plan("seatly", [Allowance(M, 1000, per_seat=100)])
    for o in range(20):  # the plan has other orgs: its re-apply takes a while
        await ledger.upsert_org(f"other-{o}", "seatly", seats=1)
    await ledger.upsert_org("o", "seatly", seats=0)
    cfg = ledger.keys.cfg("o")
    stale: list[tuple[int, int]] = []
    done = asyncio.Event()

    async def admin_sets_seats() -> None:
        for n in range(1, 151):
            await ledger.upsert_org("o", "seatly", seats=n)
            seen = int(await redis.hget(cfg, "seats"))
            if seen != n:
                stale.append((n, seen))
            await asyncio.sleep(0)
        done.set()

    async def plan_edits() -> None:
        monthly = 1000
        while not done.is_set():
            monthly += 1
            await ledger.upsert_plan("seatly", [Allowance(M, monthly, per_seat=100)])

    await asyncio.gather(admin_sets_seats(), plan_edits())
    assert stale == []
    assert int(await redis.hget(cfg, "seats")) == 150
    # the wallet follows: the last plan edit's monthly grant plus 150 seats
    (b,) = await ledger.get_balance(Subject("o"), [M])
    plan = await ledger.plan("seatly")
    assert plan is not None
    assert b.monthly_granted == plan[0].monthly + 150 * 100


async def test_upsert_org_does_not_write_back_a_plan_edited_meanwhile(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """UpsertOrg reads the plan, then writes the org. An UpsertPlan that lands in between
    re-applies its new allowances to the org first; the UpsertOrg must not then put the
    old ones back (the org would be granted a plan that no longer exists until the next
    plan edit). The interleaving is made exact: the UpsertPlan runs, for real, right
    after UpsertOrg's first read of the plan."""
    await ledger.upsert_plan("seatly", [Allowance(M, 1000, per_seat=100)])
    await ledger.upsert_org("o", "seatly", seats=1)
    real = ledger.plan
    reads = 0

    async def read_then_edit(name: str) -> Any:
        nonlocal reads
        reads += 1
        got = await real(name)
        if reads == 1:
            await ledger.upsert_plan("seatly", [Allowance(M, 2000, per_seat=100)])
        return got

    monkeypatch.setattr(ledger, "plan", read_then_edit)
    await ledger.upsert_org("o", "seatly", seats=3)
    (b,) = await ledger.get_balance(Subject("o"), [M])
    assert b.monthly_granted == 2000 + 3 * 100
    assert int(await ledger.redis.hget(ledger.keys.cfg("o"), "seats")) == 3


async def test_upsert_plan_reaches_an_org_that_joined_the_plan_meanwhile(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """UpsertPlan lists the plan's orgs, checks them, writes the plan, re-applies it. A
    new org that joins between the listing and the write (its UpsertOrg read the plan
    before the write, and read it again before it) must still end on the new plan."""
    await ledger.upsert_plan("seatly", [Allowance(M, 1000, per_seat=100)])
    real = ledger._configure_org
    joined = False

    async def check_then_join(*args: Any, **kw: Any) -> Any:
        nonlocal joined
        got = await real(*args, **kw)
        if kw.get("check_only") and not joined:  # the listing is done: "o" joins now
            joined = True
            monkeypatch.setattr(ledger, "_configure_org", real)
            await ledger.upsert_org("o", "seatly", seats=2)
        return got

    await ledger.upsert_org("other", "seatly", seats=1)  # so the check runs once
    monkeypatch.setattr(ledger, "_configure_org", check_then_join)
    await ledger.upsert_plan("seatly", [Allowance(M, 2000, per_seat=100)])
    assert joined
    (b,) = await ledger.get_balance(Subject("o"), [M])
    assert b.monthly_granted == 2000 + 2 * 100


async def test_upsert_plan_skips_an_org_that_moved_to_another_plan(ledger: Ledger) -> None:
    await ledger.upsert_plan("a", [Allowance(M, 1000)])
    await ledger.upsert_plan("b", [Allowance(M, 50)])
    await ledger.upsert_org("o", "a")
    await ledger.upsert_org("o", "b")   # still listed under "a" until a's next re-apply
    await ledger.upsert_plan("a", [Allowance(M, 9999)])
    (b,) = await ledger.get_balance(Subject("o"), [M])
    assert b.monthly_granted == 50


async def test_upsert_plan_replaces_the_plan_whole(ledger: Ledger) -> None:
    assert await ledger.upsert_plan("p", [Allowance(M, 10), Allowance("call_seconds", 5)])
    assert not await ledger.upsert_plan("p", [Allowance(M, 20, per_seat=3)])
    assert await ledger.plan("p") == (Allowance(M, 20, per_seat=3),)
