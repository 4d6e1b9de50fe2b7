"""Refunding usage that became debt gives back exactly what was taken, also when a
refill paid the debt in between (found by the state machine; pinned here)."""

from __future__ import annotations

from quotagate.clock import ManualClock
from quotagate.ledger.model import Allowance, Charge, Decision, HoldState, Subject
from quotagate.ledger.store import Ledger

M = "message_tokens"


async def test_full_refund_after_debt_paid_by_a_refill(ledger: Ledger,
                                                       clock: ManualClock) -> None:
    await ledger.upsert_plan("small", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 300)
    org = Subject("o")
    a = await ledger.reserve(org, [Charge(M, 570)], idempotency_key="a", ttl_seconds=60)
    clock.advance(61_000)  # A expired, not swept yet
    await ledger.topup("o", M, 1, "p1")
    b = await ledger.reserve(org, [Charge(M, 1)], idempotency_key="b")
    assert a.decision is b.decision is Decision.GRANTED
    # 732 used on a hold of 1: 1 held + 429 monthly + 1 top-up + 300 overage + 1 debt
    c = await ledger.commit(b.reservation_id, [Charge(M, 732)])
    assert c.state is HoldState.COMMITTED and c.balances[0].debt == 1
    await ledger.sweep(ledger.keys.shard_of("o"))  # A's 570 come back: they pay the debt
    (paid,) = await ledger.get_balance(org, [M])
    assert paid.debt == 0 and paid.used == 732
    r = await ledger.refund(b.reservation_id)
    assert r.state is HoldState.REFUNDED and r.amounts == (Charge(M, 732),)
    (after,) = await ledger.get_balance(org, [M])
    # nothing used, nothing owed, and the monthly token that paid the debt is monthly
    # again: the org does not gain a top-up token it never bought
    assert (after.used, after.debt, after.overage_used) == (0, 0, 0)
    assert (after.total, after.monthly_used, after.topup_remaining) == (1_001, 0, 1)
    assert after.remaining == 1_001 + 300


async def test_refund_of_debt_paid_last_period_leaves_this_periods_usage_charged(
        ledger: Ledger, clock: ManualClock) -> None:
    """A debt paid by last month's tokens, refunded in a new month: the refund does not
    take this month's own usage back (it comes back as top-up: last month's tokens are
    gone), and refunding this month's usage afterwards still gives all of it back."""
    await ledger.upsert_plan("small", [Allowance(M, 1_000)])
    await ledger.upsert_org("o", "small")
    await ledger.set_overage("o", M, 300)
    org = Subject("o")
    a = await ledger.reserve(org, [Charge(M, 871)], idempotency_key="a", ttl_seconds=60)
    clock.advance(61_000)  # A expired, not swept yet
    b = await ledger.reserve(org, [Charge(M, 1)], idempotency_key="b")
    # 774 on a hold of 1: 129 monthly + 300 overage + 345 debt
    c = await ledger.commit(b.reservation_id, [Charge(M, 774)])
    assert c.balances[0].debt == 345
    await ledger.sweep(ledger.keys.shard_of("o"))  # A's 871 come back and pay the debt
    (paid,) = await ledger.get_balance(org, [M])
    assert (paid.debt, paid.monthly_used) == (0, 129 + 345)
    clock.advance(31 * 86_400_000)  # a new month
    late = await ledger.commit(a.reservation_id)  # A's usage, reported late: 871
    assert late.state is HoldState.COMMITTED and late.amounts == (Charge(M, 871),)
    (before,) = await ledger.get_balance(org, [M])
    assert (before.monthly_used, before.debt, before.topup_remaining) == (871, 0, 0)

    await ledger.refund(b.reservation_id)
    (mid,) = await ledger.get_balance(org, [M])
    # this month's 871 stay used; the 345 last month paid come back as top-up
    assert (mid.monthly_used, mid.topup_remaining, mid.debt) == (871, 345, 0)
    await ledger.refund(a.reservation_id)
    (after,) = await ledger.get_balance(org, [M])
    assert (after.monthly_used, after.topup_remaining, after.used) == (0, 345, 0)
    assert after.remaining == 1_000 + 345 + 300


async def test_holds_expiring_together_pay_debt_from_monthly_first(
        ledger: Ledger, clock: ManualClock) -> None:
    """Debt is waiting; three holds expire in one sweep, one of them holding the org's
    only top-up token. The batch comes back as one refill, so the debt is paid from the
    monthly tokens whatever order the sweep met the holds in (it depends on their random
    ids); settled between releases, the top-up was spent about one time in three."""
    await ledger.upsert_plan("small", [Allowance(M, 100)])
    for n in range(12):
        org = f"o{n}"
        await ledger.upsert_org(org, "small")
        await ledger.topup(org, M, 1, f"buy-{n}")
        who = Subject(org)
        first = await ledger.reserve(who, [Charge(M, 10)], idempotency_key=f"{org}-a",
                                     ttl_seconds=600)
        for i, amount in enumerate((50, 40, 1)):  # monthly all held, then the top-up
            r = await ledger.reserve(who, [Charge(M, amount)], idempotency_key=f"{org}-{i}",
                                     ttl_seconds=60)
            assert r.decision is Decision.GRANTED
        await ledger.commit(first.reservation_id, [Charge(M, 30)])  # 20 past: debt
        assert (await ledger.get_balance(who, [M]))[0].debt == 20
    clock.advance(61_000)
    await ledger.sweep_all()
    for n in range(12):
        b = (await ledger.get_balance(Subject(f"o{n}"), [M]))[0]
        assert (b.debt, b.monthly_used, b.topup_remaining) == (0, 30, 1), n
