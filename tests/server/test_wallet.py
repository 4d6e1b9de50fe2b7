"""The whole wallet (issue 4): allocation templates, transfers, overage, auto top-up,
per-seat plans — through the real gRPC server, with the events the scripts write."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest

from conftest import Grpc, ms
from grpc_api import Api, D, G, M, ch, sub
from quotagate.v1 import admin_pb2, common_pb2, quota_pb2

MONTHLY, TOPUP = admin_pb2.BUCKET_MONTHLY, admin_pb2.BUCKET_TOPUP


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.plan("pro", monthly=10_000)
    await a.org()
    for team, seats in (("red", 2), ("blue", 3)):
        await a.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id=team,
                                                         seats=seats))
    await a.a.UpsertSeat(admin_pb2.UpsertSeatRequest(org_id="acme", seat_id="ann",
                                                     team_id="red"))
    return a


async def events(server: Grpc, redis: Any, org: str = "acme") -> list[tuple[str, dict[str, str]]]:
    ledger = server.app.ledger
    assert ledger is not None
    raw = await redis.xrange(ledger.keys.events(ledger.keys.shard_of(org)))
    return [(f[b"type"].decode(), json.loads(f[b"attrs"])) for _, f in raw
            if f[b"org"].decode() == org]


def set_clock(server: Grpc, when: int) -> None:
    server.app.clock.set(when)  # type: ignore[attr-defined]


async def template(api: Api, mode: int, per_seat: int = 0,
                   custom: dict[str, int] | None = None) -> dict[str, int]:
    r = await api.a.SetAllocationTemplate(admin_pb2.SetAllocationTemplateRequest(
        org_id="acme", meter=M, mode=mode, per_seat=per_seat, custom=custom or {}))
    return dict(r.allocations)


@pytest.mark.parametrize(("mode", "kw", "red", "blue", "org_left"), [
    (admin_pb2.ALLOCATION_MODE_PER_SEAT, {"per_seat": 1_000}, 2_000, 3_000, 5_000),
    (admin_pb2.ALLOCATION_MODE_EVEN, {}, 5_000, 5_000, 0),
    (admin_pb2.ALLOCATION_MODE_CUSTOM, {"custom": {"red": 4_000, "blue": 1_500}},
     4_000, 1_500, 4_500),
])
async def test_template_modes_across_a_period(api: Api, server: Grpc, mode: int,
                                              kw: dict[str, Any], red: int, blue: int,
                                              org_left: int) -> None:
    await template(api, admin_pb2.ALLOCATION_MODE_EVEN)
    await api.use(500, sub(team="red"))  # spent under the old template: counts against the new
    allocations = await template(api, mode, **kw)
    assert allocations == {"red": red, "blue": blue}
    assert (await api.balance(sub(team="red"))).remaining == red - 500
    assert (await api.balance(sub(team="blue"))).remaining == blue
    assert (await api.balance()).monthly_granted == org_left
    # A team's allocation is its budget: it does not fall through to the org pool.
    r = await api.reserve(red, sub(seat="ann"))
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_INSUFFICIENT_BALANCE)
    await api.use(red - 500, sub(seat="ann"))
    # Next period: every team gets its allocation again, nothing rolls over.
    set_clock(server, ms(2026, 12, 1))
    assert (await api.balance(sub(team="red"))).remaining == red
    assert (await api.balance(sub(team="blue"))).remaining == blue
    assert (await api.balance()).remaining == org_left


async def test_custom_template_beyond_the_pool_is_refused(api: Api) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await template(api, admin_pb2.ALLOCATION_MODE_CUSTOM, custom={"red": 9_000,
                                                                      "blue": 2_000})
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (await api.balance()).monthly_granted == 10_000  # nothing changed
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await template(api, admin_pb2.ALLOCATION_MODE_CUSTOM, custom={"ghost": 1})
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_per_seat_template_follows_team_seats(api: Api) -> None:
    await template(api, admin_pb2.ALLOCATION_MODE_PER_SEAT, per_seat=500)
    await api.a.UpsertTeam(admin_pb2.UpsertTeamRequest(org_id="acme", team_id="blue", seats=5))
    assert (await api.balance(sub(team="blue"))).monthly_granted == 2_500
    assert (await api.balance()).monthly_granted == 10_000 - 1_000 - 2_500


async def transfer(api: Api, amount: int, bucket: int, key: str, **kw: str) -> Any:
    return await api.a.Transfer(admin_pb2.TransferRequest(
        org_id="acme", meter=M, amount=amount, bucket=bucket, idempotency_key=key, **kw))


async def test_transfers_at_every_level_idempotent_never_overdrawn(api: Api,
                                                                  server: Grpc) -> None:
    await api.topup(3_000, "tp")
    r = await transfer(api, 4_000, MONTHLY, "t1", to_team_id="red")
    assert [b.monthly_granted for b in r.balances] == [6_000, 4_000]  # org, then team
    again = await transfer(api, 4_000, MONTHLY, "t1", to_team_id="red")
    assert [b.monthly_granted for b in again.balances] == [6_000, 4_000]  # not twice
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await transfer(api, 1, MONTHLY, "t1", to_team_id="red")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await transfer(api, 1_000, MONTHLY, "t2", from_team_id="red", to_seat_id="ann")
    await transfer(api, 2_000, TOPUP, "t3", to_seat_id="ann")
    await transfer(api, 500, TOPUP, "t4", from_seat_id="ann", to_team_id="blue")
    # Conservation: 10,000 monthly and 3,000 top-up, now spread over four wallets:
    # org 6,000 m + 1,000 t; red 3,000 m; ann 1,000 m + 1,500 t; blue 500 t.
    org = await api.balance()
    assert (org.monthly_granted, org.topup_remaining) == (6_000, 1_000)
    blue = await api.balance(sub(team="blue"))  # blue's chain: blue, then the org
    assert (blue.monthly_granted, blue.topup_remaining) == (6_000, 1_500)
    ann = await api.balance(sub(seat="ann"))  # ann, red, org
    assert (ann.monthly_granted, ann.topup_remaining) == (10_000, 2_500)
    # Never more than the source has free (held tokens stay put).
    held = await api.reserve(1_400, sub(seat="ann"))
    assert held.decision == G
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await transfer(api, 1_200, TOPUP, "t6", from_seat_id="ann")
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # Monthly tokens moved to a seat end with the period; top-ups moved stay.
    set_clock(server, ms(2026, 12, 1))
    r = await transfer(api, 1, TOPUP, "t7", from_seat_id="ann", to_team_id="red")
    assert r.balances[0].monthly_granted == 0
    assert r.balances[0].topup_remaining > 0


async def test_transfer_racing_with_reservations(api: Api) -> None:
    await api.topup(1_000, "tp")
    await transfer(api, 1_000, TOPUP, "seed", to_seat_id="ann")
    await api.a.SetAllocationTemplate(admin_pb2.SetAllocationTemplateRequest(
        org_id="acme", meter=M, mode=admin_pb2.ALLOCATION_MODE_CUSTOM, custom={"red": 0}))
    ann = sub(seat="ann")  # ann now draws only from her own 1,000 (and red's 0)
    calls = [api.reserve(100, ann) for _ in range(8)]
    calls += [transfer(api, 100, TOPUP, f"race{i}", from_seat_id="ann", to_team_id="blue")
              for i in range(8)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    granted = sum(100 for r in results[:8] if not isinstance(r, BaseException)
                  and r.decision == G)
    moved = sum(100 for r in results[8:] if not isinstance(r, BaseException))
    assert granted + moved <= 1_000
    assert granted + moved == 1_000  # each one either fit or found the wallet empty
    b = await api.balance(ann)
    assert b.reserved == granted and b.remaining == 0


async def overage(api: Api, cap: int, price: int = 0, every: int = 0) -> None:
    await api.a.SetOverage(admin_pb2.SetOverageRequest(
        org_id="acme", meter=M, cap=cap, unit_price_micros=price, bill_every_micros=every))


async def test_overage_cap_zero_blocks(api: Api) -> None:
    await api.use(10_000)
    assert (await api.reserve(1)).reason == common_pb2.DENY_REASON_INSUFFICIENT_BALANCE
    await overage(api, 0)
    r = await api.reserve(1)
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_OVERAGE_CAP_REACHED)


async def test_overage_billed_every_threshold_and_at_period_close(
        api: Api, server: Grpc, redis: Any) -> None:
    await overage(api, 20_000, price=10_000, every=50_000_000)  # $0.01 a token, bill every $50
    await api.use(10_000)  # the plan
    await api.use(4_999)  # $49.99 of overage: nothing to bill yet
    assert [e for e in await events(server, redis) if e[0].startswith("overage.")] == []
    await api.use(2)  # $50.01
    b = await api.balance()
    assert (b.overage_used, b.overage_cap, b.used, b.remaining) == (5_001, 20_000, 15_001,
                                                                    14_999)
    await api.use(5_000)  # another $50.00
    bills = [e[1] for e in await events(server, redis) if e[0] == "overage.threshold_reached"]
    assert [x["amount_micros"] for x in bills] == ["50010000", "50000000"]
    await api.use(1_234)  # $12.34 left unbilled at the period's end
    r = await api.reserve(20_000)
    assert (r.decision, r.reason) == (D, common_pb2.DENY_REASON_OVERAGE_CAP_REACHED)
    set_clock(server, ms(2026, 12, 1))
    await api.balance()
    closed = [e[1] for e in await events(server, redis) if e[0] == "overage.period_closed"]
    assert closed == [{"meter": M, "amount_micros": "12340000", "overage_tokens": "11235"}]
    assert (await api.balance()).overage_used == 0


async def test_overage_of_an_org_nobody_touches_is_closed_by_the_sweeper(
        api: Api, server: Grpc, redis: Any) -> None:
    """DESIGN: overage is billed "at the end of the billing month". An org that stops
    spending is not touched again, so the sweeper closes its period: once, with the rest
    to bill, and a later touch bills nothing twice."""
    ledger = server.app.ledger
    assert ledger is not None
    await overage(api, 20_000, price=10_000, every=50_000_000)
    await api.use(10_000)
    await api.use(1_234)  # $12.34 of overage, then silence
    set_clock(server, ms(2026, 11, 30, 23))
    await ledger.sweep_all()  # the period has not ended: nothing to close
    assert [e for e in await events(server, redis) if e[0] == "overage.period_closed"] == []
    set_clock(server, ms(2026, 12, 1) + 60_000)
    await ledger.sweep_all()
    closed = [e[1] for e in await events(server, redis) if e[0] == "overage.period_closed"]
    assert closed == [{"meter": M, "amount_micros": "12340000", "overage_tokens": "1234"}]
    await ledger.sweep_all()
    await api.balance()
    assert len([e for e in await events(server, redis)
                if e[0] == "overage.period_closed"]) == 1
    assert (await api.balance()).overage_used == 0
    # the index is empty again: an org without overage costs the sweeper nothing
    assert await redis.zcard(ledger.keys.prefix(ledger.keys.shard_of("acme")) + "ovc") == 0


async def test_overage_closed_by_a_touch_is_not_closed_again_by_the_sweeper(
        api: Api, server: Grpc, redis: Any) -> None:
    ledger = server.app.ledger
    assert ledger is not None
    await overage(api, 20_000, price=10_000)
    await api.use(10_000)
    await api.use(500)
    set_clock(server, ms(2026, 12, 1))
    await api.use(10_000)  # the first touch of December closes November
    await api.use(7)  # and uses overage again: December's must wait for its own end
    await ledger.sweep_all()
    closed = [e[1] for e in await events(server, redis) if e[0] == "overage.period_closed"]
    assert closed == [{"meter": M, "amount_micros": "5000000", "overage_tokens": "500"}]
    set_clock(server, ms(2027, 1, 1) + 1)
    await ledger.sweep_all()
    closed = [e[1] for e in await events(server, redis) if e[0] == "overage.period_closed"]
    assert closed[1:] == [{"meter": M, "amount_micros": "70000", "overage_tokens": "7"}]


async def test_auto_topup_once_per_crossing_with_cooldown_and_cap(
        api: Api, server: Grpc, redis: Any) -> None:
    await api.a.SetAutoTopUp(admin_pb2.SetAutoTopUpRequest(
        org_id="acme", meter=M, threshold=2_000, amount=5_000, enabled=True,
        cooldown_seconds=600, max_per_period=2))

    async def requests() -> list[dict[str, str]]:
        return [e[1] for e in await events(server, redis) if e[0] == "auto_topup.requested"]

    await api.use(8_500)  # 1,500 left: crosses below 2,000
    await api.use(100)  # still below: same crossing
    assert [r["amount"] for r in await requests()] == ["5000"]
    assert (await api.balance()).remaining == 1_400  # nothing arrives by itself
    await api.topup(5_000, "auto-1")  # the billing system answers
    assert (await api.balance()).remaining == 6_400
    await api.use(5_000)  # crosses again, but within the 10-minute cooldown
    assert len(await requests()) == 1
    await api.topup(1_000, "manual")
    server.app.clock.advance(601_000)  # type: ignore[attr-defined]
    await api.use(1_000)  # crosses again after the cooldown
    assert len(await requests()) == 2
    await api.topup(5_000, "auto-2")
    server.app.clock.advance(601_000)  # type: ignore[attr-defined]
    await api.use(5_000)  # third crossing this period: over max_per_period
    assert len(await requests()) == 2
    ids = [r for r in await requests()]
    assert len(ids) == 2


async def test_lemlist_style_per_seat_teams(api: Api, server: Grpc) -> None:
    await api.plan("email_outreach", per_seat=250)
    await api.plan("sales_engagement", per_seat=500)
    await api.org("team-a", plan="email_outreach", seats=2)
    await api.org("team-b", plan="sales_engagement", seats=5)
    assert (await api.balance(sub("team-a"))).total == 500
    assert (await api.balance(sub("team-b"))).total == 2_500
    await api.use(300, sub("team-a"))
    set_clock(server, ms(2026, 12, 1))
    a, b = await api.balance(sub("team-a")), await api.balance(sub("team-b"))
    assert (a.used, a.total, b.total) == (0, 500, 2_500)  # nothing rolls over


async def test_adjust_credits_and_debits_idempotently(api: Api) -> None:
    r = await api.a.Adjust(admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=700,
                                                   reason="goodwill", idempotency_key="a1"))
    assert r.balances[0].topup_remaining == 700
    r = await api.a.Adjust(admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=700,
                                                   reason="goodwill", idempotency_key="a1"))
    assert r.balances[0].topup_remaining == 700
    r = await api.a.Adjust(admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=-11_000,
                                                   reason="dispute", idempotency_key="a2"))
    b = r.balances[0]
    assert (b.monthly_used, b.topup_remaining, b.debt, b.remaining) == (10_000, 0, 300, 0)
    for bad, field in ((admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=0, reason="x",
                                                idempotency_key="k"), "delta"),
                       (admin_pb2.AdjustRequest(org_id="acme", meter=M, delta=5,
                                                idempotency_key="k"), "reason")):
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await api.a.Adjust(bad)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


async def test_commit_into_overage_is_billed_and_refund_unbills(api: Api, server: Grpc,
                                                                redis: Any) -> None:
    await overage(api, 1_000, price=1_000_000, every=3_000_000)  # $1 a token, bill every $3
    await api.use(10_000)
    r = await api.reserve(2)
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    assert c.balances[0].overage_used == 2
    await api.q.Refund(quota_pb2.RefundRequest(reservation_id=r.reservation_id))
    assert (await api.balance()).overage_used == 0
    await api.use(2)
    # 2 billed, 2 refunded, 2 billed: $2 accrued, under the $3 threshold.
    assert [e for e in await events(server, redis) if e[0] == "overage.threshold_reached"] == []
    await api.use(1)
    bills = [e[1]["amount_micros"] for e in await events(server, redis)
             if e[0] == "overage.threshold_reached"]
    assert bills == ["3000000"]
    assert ch(1).amount == 1


async def test_overage_closed_when_a_repeated_commit_is_the_first_touch(
        api: Api, server: Grpc, redis: Any) -> None:
    """The first call of a new period may be a retried Commit (or Refund): its answer
    rolls the period like any call, and closes the overage then."""
    ledger = server.app.ledger
    assert ledger is not None
    await overage(api, 20_000, price=10_000)
    await api.use(10_000)
    r = await api.reserve(500)
    await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    set_clock(server, ms(2026, 12, 1))
    again = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    assert again.state == common_pb2.HOLD_STATE_COMMITTED
    await ledger.sweep_all()
    closed = [e[1] for e in await events(server, redis) if e[0] == "overage.period_closed"]
    assert closed == [{"meter": M, "amount_micros": "5000000", "overage_tokens": "500"}]
