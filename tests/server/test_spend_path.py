"""The DESIGN §1 rows the core covers, through the real gRPC server on a real Redis."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import DAY, Grpc, ms
from grpc_api import Api, D, G, M, ch, sub
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.plan("pro", monthly=2_000_000)
    await a.org()
    return a


def meter(b: Any) -> str:
    return f"[{b.used}/{b.total} used]"


async def test_period_example_byte_for_byte(api: Api, server: Grpc) -> None:
    """Pro 2,000,000; use 500,000; top up 1,000,000; use 1,000,000 more; next period.

    Burn order is monthly first (DESIGN §1, §3), so the 1,500,000 used all came from the
    monthly pool, the top-up is untouched, and the next period starts at 2,000,000 monthly
    + 1,000,000 top-up. (The issue's last figure, 2,500,000, would need 500,000 of the
    top-up to have been burned, which monthly-first never does: see the CHANGELOG.)"""
    await api.use(500_000)
    assert meter(await api.balance()) == "[500000/2000000 used]"
    await api.topup(1_000_000, "purchase-1")
    assert meter(await api.balance()) == "[500000/3000000 used]"
    await api.use(1_000_000)
    b = await api.balance()
    assert meter(b) == "[1500000/3000000 used]"
    assert (b.monthly_used, b.topup_remaining, b.remaining) == (1_500_000, 1_000_000, 1_500_000)
    server.app.clock.set(ms(2026, 12, 1))  # type: ignore[attr-defined]
    b = await api.balance()
    assert meter(b) == "[0/3000000 used]"
    assert (b.monthly_granted, b.monthly_used, b.topup_remaining) == (2_000_000, 0, 1_000_000)
    # Burning past the monthly pool reaches the top-up, and that is what carries over.
    await api.use(2_500_000)
    assert meter(await api.balance()) == "[2500000/3000000 used]"
    server.app.clock.set(ms(2027, 1, 1))  # type: ignore[attr-defined]
    assert meter(await api.balance()) == "[0/2500000 used]"


async def test_monthly_tokens_do_not_roll_over_and_reset_lazily(api: Api, server: Grpc) -> None:
    await api.use(100)
    b = await api.balance()
    assert b.period_start.ToMilliseconds() == ms(2026, 11, 1)
    assert b.period_end.ToMilliseconds() == ms(2026, 12, 1)
    server.app.clock.set(ms(2026, 11, 30, 23))  # type: ignore[attr-defined]
    assert (await api.balance()).used == 100
    server.app.clock.set(ms(2026, 12, 1))  # type: ignore[attr-defined]
    b = await api.balance()
    assert (b.used, b.remaining) == (0, 2_000_000)


async def test_billing_anchor_day(api: Api, server: Grpc) -> None:
    await api.org("anchored", anchor=15)
    s = sub("anchored")
    await api.use(10, s)
    b = await api.balance(s)
    assert b.period_start.ToMilliseconds() == ms(2026, 10, 15)  # T0 is Nov 10
    assert b.period_end.ToMilliseconds() == ms(2026, 11, 15)
    server.app.clock.set(ms(2026, 11, 15) - 1)  # type: ignore[attr-defined]
    assert (await api.balance(s)).used == 10
    server.app.clock.set(ms(2026, 11, 15))  # type: ignore[attr-defined]
    assert (await api.balance(s)).used == 0


async def test_per_seat_plan_and_one_time_trial(api: Api, server: Grpc) -> None:
    await api.plan("per_seat", per_seat=250)
    await api.org("seats", plan="per_seat", seats=4)
    assert (await api.balance(sub("seats"))).total == 1_000
    await api.org("seats", plan="per_seat", seats=6)  # seats added: applies at once
    assert (await api.balance(sub("seats"))).total == 1_500
    # A free trial is a one-time grant of the plan: applied once however often the plan
    # is applied, changed away from and back to; it never renews and never expires.
    await api.a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="trial", allowances=[
        admin_pb2.Allowance(meter=M, one_time=100)]))
    for plan in ("trial", "trial", "pro", "trial"):
        await api.org("trial", plan=plan)
    await api.org("trial", plan="trial")
    b = await api.balance(sub("trial"))
    assert (b.total, b.topup_remaining, b.monthly_granted) == (100, 100, 0)
    await api.a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="trial", allowances=[
        admin_pb2.Allowance(meter=M, one_time=100)]))  # re-applied to its orgs: still once
    await api.use(40, sub("trial"))
    server.app.clock.set(ms(2027, 3, 1))  # type: ignore[attr-defined]
    b = await api.balance(sub("trial"))
    assert (b.used, b.total, b.remaining) == (0, 60, 60)


async def test_topup_is_idempotent_on_purchase_id(api: Api) -> None:
    first = await api.topup(5_000, "order-1")
    again = await api.topup(5_000, "order-1")
    assert first.applied and not again.applied
    assert (await api.balance()).topup_remaining == 5_000
    with pytest.raises(Exception) as e:
        await api.topup(6_000, "order-1")
    assert "purchase_id" in str(e.value)


async def test_burn_order_seat_then_team_then_org_monthly_then_topup(api: Api) -> None:
    await api.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="t", seats=2))
    await api.a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="s", team_id="t"))
    await api.topup(100, "seat-pack", seat_id="s")
    await api.topup(200, "team-pack", team_id="t")
    await api.topup(300, "org-pack")
    s = sub(seat="s")
    await api.use(150, s)  # 100 from the seat wallet, 50 from the team's
    assert (await api.balance(sub(seat="s"))).topup_remaining == 0 + 150 + 300
    org = await api.balance()
    assert (org.monthly_used, org.topup_remaining) == (0, 300)
    await api.use(2_000_200, s)  # 150 team, 2,000,000 org monthly, 50 org top-up
    org = await api.balance()
    assert (org.monthly_used, org.topup_remaining) == (2_000_000, 250)


async def test_seat_limit_checked_with_the_wallet(api: Api, server: Grpc) -> None:
    await api.a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="bob", limits=[
        admin_pb2.SeatLimit(meter=M, monthly_limit=1_000)]))
    await api.a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="boss", limits=[
        admin_pb2.SeatLimit(meter=M, unlimited=True)]))
    bob = sub(seat="bob")
    held = await api.reserve(600, bob)
    assert held.decision == G
    denied = await api.reserve(500, bob)
    assert (denied.decision, denied.reason) == (D, common_pb2.DENY_REASON_SEAT_LIMIT_REACHED)
    assert not denied.silent and denied.reservation_id == ""
    assert (await api.reserve(400, bob)).decision == G
    assert (await api.reserve(5_000, sub(seat="boss"))).decision == G
    server.app.clock.set(ms(2026, 12, 1))  # type: ignore[attr-defined]
    assert (await api.reserve(1_000, bob)).decision == G  # the cap is monthly


async def test_features_and_ai_switch(api: Api) -> None:
    await api.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="sales"))
    await api.a.SetFeature(admin_pb2.SetFeatureRequest(org_id="acme", feature="spark",
                                                       enabled=False))
    await api.a.SetFeature(admin_pb2.SetFeatureRequest(org_id="acme", team_id="sales",
                                                       feature="transcription", enabled=False))
    r = await api.reserve(10, feature="spark")
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_FEATURE_DISABLED)
    # the subject is known: its meter comes with the denial, nothing held
    assert [(b.meter, b.used, b.reserved) for b in r.balances] == [(M, 0, 0)]
    assert r.balances[0].total == 2_000_000
    assert (await api.reserve(10, feature="transcription")).decision == G  # org-wide still on
    r = await api.reserve(10, sub(team="sales"), feature="transcription")
    assert r.reason == common_pb2.DENY_REASON_FEATURE_DISABLED
    assert [b.reserved for b in r.balances] == [10]  # the grant above, still held
    assert (await api.reserve(10, sub(team="sales"), feature="other")).decision == G
    await api.org(ai=False)
    r = await api.reserve(10)
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_AI_DISABLED)
    c = await api.q.Check(quota_pb2.CheckRequest(subject=sub(), meter=M))
    assert not c.active and c.reason == common_pb2.DENY_REASON_AI_DISABLED


async def test_unknown_subject_is_a_denial(api: Api) -> None:
    for s in (sub("nobody"), sub(team="ghost"), sub(seat="ghost"), sub(assistant="ghost")):
        r = await api.reserve(1, s)
        assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_UNKNOWN_SUBJECT), s


async def test_running_dry_deactivates_assistant_silently(api: Api, server: Grpc) -> None:
    await api.plan("small", monthly=1_000)
    await api.org("shop", plan="small")
    await api.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(org_id="shop",
                                                                 assistant_id="bot"))
    bot = sub("shop", assistant="bot")
    r = await api.reserve(1_000, bot)
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    for resp in (await api.reserve(1, bot),
                 await api.q.Check(quota_pb2.CheckRequest(subject=bot, meter=M))):
        assert resp.reason == common_pb2.DENY_REASON_ASSISTANT_INACTIVE
        assert resp.silent
    # Without an assistant the same wallet answers a plain, non-silent denial.
    r = await api.reserve(1, sub("shop"))
    assert (r.reason, r.silent) == (common_pb2.DENY_REASON_INSUFFICIENT_BALANCE, False)
    # A TopUp reactivates it …
    await api.topup(10, "refill", org="shop")
    assert (await api.q.Check(quota_pb2.CheckRequest(subject=bot, meter=M))).active
    r = await api.reserve(10, bot)
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    assert not (await api.q.Check(quota_pb2.CheckRequest(subject=bot, meter=M))).active
    # … and so does the next period.
    server.app.clock.set(ms(2026, 12, 1))  # type: ignore[attr-defined]
    assert (await api.reserve(1, bot)).decision == G
    # An assistant switched off by an admin is inactive whatever the wallet.
    await api.a.UpsertAssistant(admin_pb2.UpsertAssistantRequest(
        org_id="shop", assistant_id="bot", enabled=False))
    r = await api.reserve(1, bot)
    assert (r.decision, r.reason, r.silent) == (D, common_pb2.DENY_REASON_ASSISTANT_INACTIVE,
                                                True)


async def test_multi_meter_hold_is_all_or_nothing(api: Api) -> None:
    await api.plan("voice", monthly=100, meter="call_seconds")
    await api.a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="both", allowances=[
        admin_pb2.Allowance(meter=M, monthly=1_000),
        admin_pb2.Allowance(meter="call_seconds", monthly=60)]))
    await api.org("multi", plan="both")
    s = sub("multi")
    r = await api.reserve([ch(500), ch(61, "call_seconds")], s)
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_INSUFFICIENT_BALANCE)
    assert (await api.balance(s)).reserved == 0  # nothing taken from message tokens either
    r = await api.reserve([ch(500), ch(60, "call_seconds")], s)
    assert r.decision == G and {c.meter: c.amount for c in r.granted} == {
        M: 500, "call_seconds": 60}


async def test_allow_partial_grants_what_is_left(api: Api) -> None:
    await api.plan("voice", monthly=90, meter="call_seconds")
    await api.org("calls", plan="voice")
    s = sub("calls")
    r = await api.reserve([ch(60, "call_seconds")], s, allow_partial=True)
    assert r.granted[0].amount == 60
    r = await api.reserve([ch(60, "call_seconds")], s, allow_partial=True)
    assert r.decision == G and r.granted[0].amount == 30
    r = await api.reserve([ch(60, "call_seconds")], s, allow_partial=True)
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_INSUFFICIENT_BALANCE)


async def test_commit_less_releases_more_becomes_debt_paid_by_next_refill(
        api: Api, server: Grpc) -> None:
    await api.plan("small", monthly=1_000)
    await api.org("d", plan="small")
    s = sub("d")
    r = await api.reserve(600, s)
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                   actual=[ch(400)]))
    assert c.state == common_pb2.HOLD_STATE_COMMITTED and c.charged[0].amount == 400
    b = c.balances[0]
    assert (b.used, b.reserved, b.remaining) == (400, 0, 600)
    r = await api.reserve(500, s)
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                   actual=[ch(900)]))  # 300 beyond the wallet
    b = c.balances[0]
    assert (b.used, b.debt, b.remaining) == (1_300, 300, 0)
    await api.topup(200, "p1", org="d")  # the refill pays the debt first
    b = await api.balance(s)
    assert (b.debt, b.remaining, b.topup_remaining) == (100, 0, 0)
    server.app.clock.set(ms(2026, 12, 1))  # type: ignore[attr-defined]
    b = await api.balance(s)
    assert (b.debt, b.monthly_used, b.remaining) == (0, 100, 900)


async def test_refund_before_and_after_commit(api: Api) -> None:
    r = await api.reserve(1_000)
    f = await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id))
    assert f.state == common_pb2.HOLD_STATE_REFUNDED and f.refunded[0].amount == 1_000
    assert (await api.balance()).remaining == 2_000_000
    # Commit after Refund charges nothing and answers REFUNDED.
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    assert c.state == common_pb2.HOLD_STATE_REFUNDED
    assert (await api.balance()).used == 0
    # Refund after commit credits back at most what was charged, once.
    await api.topup(100, "tp")
    r = await api.reserve(2_000_050)  # all monthly + 50 of the top-up
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    f = await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id,
                                                   amount=[ch(80)]))
    assert f.refunded[0].amount == 80
    b = await api.balance()  # reverse burn order: the 50 top-up first, then 30 monthly
    assert (b.topup_remaining, b.monthly_used) == (100, 1_999_970)
    again = await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id,
                                                       amount=[ch(80)]))
    assert again.refunded[0].amount == 80 and (await api.balance()).monthly_used == 1_999_970
    r = await api.reserve(10)
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    f = await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id,
                                                   amount=[ch(1_000)]))
    assert f.refunded[0].amount == 10  # never more than was charged


async def test_double_commit_answers_the_same(api: Api) -> None:
    r = await api.reserve(100)
    first = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                       actual=[ch(70)]))
    second = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                        actual=[ch(90)]))
    assert first.charged == second.charged and second.charged[0].amount == 70
    assert (await api.balance()).used == 70


async def test_extend_holds_more_and_moves_expiry(api: Api, server: Grpc) -> None:
    await api.plan("voice", monthly=100, meter="call_seconds")
    await api.org("v", plan="voice")
    r = await api.reserve([ch(30, "call_seconds")], sub("v"), ttl_seconds=60)
    server.app.clock.advance(50_000)  # type: ignore[attr-defined]
    e = await api.q.Extend(quota_pb2.ExtendRequest(reservation_id=r.reservation_id,
                                                   additional=[ch(50, "call_seconds")],
                                                   ttl_seconds=60))
    assert e.decision == G and e.granted[0].amount == 50
    assert e.expires_at.ToMilliseconds() == server.app.clock.now_ms() + 60_000  # type: ignore[attr-defined]
    e = await api.q.Extend(quota_pb2.ExtendRequest(reservation_id=r.reservation_id,
                                                   additional=[ch(21, "call_seconds")]))
    assert (e.decision, e.reason) == (D, common_pb2.DENY_REASON_INSUFFICIENT_BALANCE)
    server.app.clock.advance(30_000)  # type: ignore[attr-defined] # past the first TTL
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    assert c.state == common_pb2.HOLD_STATE_COMMITTED and c.charged[0].amount == 80
    with pytest.raises(Exception) as err:
        await api.q.Extend(quota_pb2.ExtendRequest(reservation_id=r.reservation_id))
    assert "FAILED_PRECONDITION" in str(err.value.code())  # type: ignore[attr-defined]


async def test_expiry_sweeper_releases_and_late_commit_still_records(
        api: Api, server: Grpc) -> None:
    r = await api.reserve(1_500_000, ttl_seconds=10)
    assert (await api.balance()).remaining == 500_000
    server.app.clock.advance(11_000)  # type: ignore[attr-defined]
    assert await server.app.ledger.sweep_all() == 1  # type: ignore[union-attr]
    b = await api.balance()
    assert (b.reserved, b.remaining) == (0, 2_000_000)
    f = await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id))
    assert f.state == common_pb2.HOLD_STATE_EXPIRED and f.refunded[0].amount == 0
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id,
                                                   actual=[ch(1_000)]))
    assert c.state == common_pb2.HOLD_STATE_COMMITTED and c.charged[0].amount == 1_000
    assert (await api.balance()).used == 1_000
    # An expired hold no longer blocks others even before the sweeper runs.
    r = await api.reserve(1_999_000, ttl_seconds=5)
    server.app.clock.advance(6_000)  # type: ignore[attr-defined]
    assert (await api.reserve(1_999_000)).decision == G


async def test_idempotent_retry_returns_first_answer(api: Api) -> None:
    first = await api.reserve(700, idempotency_key="msg-42")
    retry = await api.reserve(700, idempotency_key="msg-42")
    assert retry.reservation_id == first.reservation_id
    assert retry.granted == first.granted and retry.expires_at == first.expires_at
    assert (await api.balance()).reserved == 700  # one hold, not two
    with pytest.raises(Exception) as e:
        await api.reserve(701, idempotency_key="msg-42")
    assert "INVALID_ARGUMENT" in str(e.value.code()) and "idempotency_key" in str(e.value)  # type: ignore[attr-defined]
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=first.reservation_id))
    after = await api.reserve(700, idempotency_key="msg-42")
    assert after.reservation_id == first.reservation_id
    assert (await api.balance()).used == 700


async def test_reserve_by_action_uses_the_price_catalog(api: Api) -> None:
    r = await api.q.Reserve(quota_pb2.ReserveRequest(subject=sub(), action="ai_sequence",
                                                     idempotency_key="seq-1"))
    assert r.decision == G and list(r.granted) == [ch(50)]
    r = await api.q.Reserve(quota_pb2.ReserveRequest(subject=sub(), action="ai_icebreaker",
                                                     idempotency_key="ice-1"))
    assert list(r.granted) == [ch(10)]


async def test_storage_gauge_goes_up_and_down_and_never_resets(api: Api, server: Grpc) -> None:
    await api.plan("store", monthly=10_000, meter="storage_bytes")
    await api.org("files", plan="store")
    s = sub("files")
    up = await api.reserve([ch(4_000, "storage_bytes")], s)
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=up.reservation_id))
    server.app.clock.advance(40 * DAY)  # type: ignore[attr-defined]
    assert (await api.balance(s, "storage_bytes")).used == 4_000
    await api.q.Refund(quota_pb2.RefundRequest(reservation_id=up.reservation_id,
                                               reason="file deleted"))
    assert (await api.balance(s, "storage_bytes")).used == 0
