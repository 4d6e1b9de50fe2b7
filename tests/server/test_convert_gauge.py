"""MeterBalance.period_start / period_end: set for counters, unset for gauges (they have
no period), through the real gRPC server."""

from __future__ import annotations

import pytest

from conftest import Grpc, ms
from grpc_api import Api, ch, sub
from quotagate.v1 import admin_pb2, quota_pb2


@pytest.fixture
async def api(server: Grpc) -> Api:
    a = Api(server)
    await a.a.UpsertPlan(admin_pb2.UpsertPlanRequest(name="both", allowances=[
        admin_pb2.Allowance(meter="message_tokens", monthly=1_000),
        admin_pb2.Allowance(meter="storage_bytes", monthly=10_000)]))
    await a.org(plan="both")
    return a


async def test_gauge_balance_has_no_period_counter_has_one(api: Api) -> None:
    r = await api.q.GetBalance(quota_pb2.GetBalanceRequest(
        subject=sub(), meters=["storage_bytes", "message_tokens"]))
    gauge, counter = r.balances
    assert gauge.meter == "storage_bytes"
    assert not gauge.HasField("period_start") and not gauge.HasField("period_end")
    assert counter.meter == "message_tokens"
    assert counter.period_start.ToMilliseconds() == ms(2026, 11, 1)
    assert counter.period_end.ToMilliseconds() == ms(2026, 12, 1)


async def test_every_reply_with_balances_leaves_the_gauge_period_unset(api: Api) -> None:
    # Reserve and Commit (built in place) and TopUp (built as a message) alike
    r = await api.reserve([ch(4_000, "storage_bytes"), ch(10)])
    held = {b.meter: b for b in r.balances}
    assert not held["storage_bytes"].HasField("period_start")
    assert held["message_tokens"].HasField("period_start")
    c = await api.q.Commit(quota_pb2.CommitRequest(reservation_id=r.reservation_id))
    done = {b.meter: b for b in c.balances}
    assert done["storage_bytes"].used == 4_000
    assert not done["storage_bytes"].HasField("period_end")
    assert done["message_tokens"].period_end.ToMilliseconds() == ms(2026, 12, 1)
    t = await api.topup(1_000, "buy-1", meter="storage_bytes")
    assert t.applied and not t.balances[0].HasField("period_start")
    t = await api.topup(1_000, "buy-2")
    assert t.balances[0].period_start.ToMilliseconds() == ms(2026, 11, 1)
